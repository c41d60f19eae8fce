"""Privacy/utility of the diffusion-inspired defenses against DP-FedAvg and SecAgg + DDP.

Trains FedAvg (CNN, embedded MNIST, 100 clients, every client every round: q = 1) under
each defense, partition and seed (one `privacy.train` run each, resumable), then joins
the runs with the attack-vs-noise cells of `scripts/attack_vs_noise.sh` into figures and
one table:

  accuracy_vs_epsilon.png   final accuracy vs the model observer's epsilon (replace-one
                            user, PLD / closed form), one panel per partition
  psnr_vs_z.png             attack PSNR vs the upload's z: naive (A0) vs best adaptive (A1-A5),
                            with the ReRo ceiling (Kaissis et al. 2023) at the same mu
  frontier.png              accuracy vs the best adaptive attack's PSNR on what the server
                            sees, one panel per partition
  schedules.png             accuracy per round of schedules at equal epsilon
  tradeoff.md / .json       the table: accuracy (mean +- std over seeds), epsilon for each
                            threat model, z per upload, best adaptive PSNR

  python scripts/defense_tradeoff.py --out runs/tradeoff            # train (resumable)
  python scripts/defense_tradeoff.py --out runs/tradeoff --report runs/attack_vs_noise
  python scripts/defense_tradeoff.py --quick --out /tmp/t           # seconds, digits

The attack PSNR of a defense is read from the attack curve at the z of its least-noisy
round as the server sees it (0 for DP-FedAvg: its server sees every update in the
clear); SecAgg's server sees only the sum of all clients' updates (B = 4000 images) and
is reported without an attack number.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fljax import train as fl_train  # noqa: E402
from fljax.plots import panels as _panels  # noqa: E402
from privacy import forward_noise as fn  # noqa: E402
from privacy import train as ptrain  # noqa: E402

PARTITIONS = {"iid": dict(partition="iid"),
              "dirichlet0.5": dict(partition="dirichlet", alpha=0.5),
              "dirichlet0.1": dict(partition="dirichlet", alpha=0.1)}
TARGET = 8.0  # the model observer's epsilon for the calibrated defenses
Z_LOCAL = 0.3  # the hybrid's local z (empirical protection against the server)


def defenses(rounds: int, delta: float) -> dict[str, dict[str, Any]]:
  """name -> PrivacyConfig fields. Epsilon 8 for the model observer under replace-one."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", fn.ScheduleWarning)
    z_star = float(fn.calibrate(fn.constant(1.0, rounds), TARGET, delta).z[0])
  z_central = math.sqrt(z_star ** 2 - Z_LOCAL ** 2)
  fnoise = dict(mechanism="forward_noise", clip_norm=0.5)
  return {
      "none": dict(mechanism="none"),
      "forward z=0.03": dict(fnoise, noise_multiplier=0.03),
      "forward z=0.1": dict(fnoise, noise_multiplier=0.1),
      "forward z=0.3": dict(fnoise, noise_multiplier=0.3),
      "forward z=1": dict(fnoise, noise_multiplier=1.0),
      "forward eps=8": dict(fnoise, target_epsilon=TARGET),
      "forward anneal eps=8": dict(fnoise, target_epsilon=TARGET, schedule="anneal", z_end=1 / 3),
      "forward cosine eps=8": dict(fnoise, target_epsilon=TARGET, schedule="cosine", t_start=950,
                                   t_end=700),
      f"hybrid z_L={Z_LOCAL:g} + central": dict(fnoise, noise_multiplier=Z_LOCAL,
                                                central_noise_multiplier=z_central),
      "dp-sgd + forward z=0.3": dict(fnoise, noise_multiplier=0.3, record_noise_multiplier=1.0),
      "pfdm t0=500": dict(mechanism="pfdm", t_start=500),
      "dp-fedavg eps=8": dict(mechanism="dp_fedavg", target_epsilon=TARGET, clip_norm=0.5),
      # the same z as forward noise at epsilon 8: DP-FedAvg at epsilon 8 under replace-one
      "dp-fedavg eps=8 replace-one": dict(mechanism="dp_fedavg", noise_multiplier=z_star,
                                          clip_norm=0.5),
      # the distributed discrete Gaussian: replace-one, participation visible
      "secagg+ddp eps=8": dict(mechanism="secagg", target_epsilon=TARGET, clip_norm=0.5,
                               secagg_bits=20, secagg_neighbours=8),
  }


CORE = ("none", "forward z=0.03", "forward z=0.3", "forward eps=8",
        f"hybrid z_L={Z_LOCAL:g} + central", "dp-fedavg eps=8", "dp-fedavg eps=8 replace-one",
        "secagg+ddp eps=8")


SCHEDULE_RUNS = ("forward eps=8", "forward anneal eps=8", "forward cosine eps=8", "dp-fedavg eps=8")


def slug(text: str) -> str:
  return "".join(c if c.isalnum() or c in "=.-" else "_" for c in text)


def config(name: str, privacy: dict, partition: str, seed: int, args) -> ptrain.PrivateExperimentConfig:
  data = fl_train.DataConfig(name=args.dataset, num_clients=args.clients, **PARTITIONS[partition])
  return ptrain.PrivateExperimentConfig(
      data=data, model=fl_train.ModelConfig(name=args.model),
      fed=fl_train.fed.FedConfig(clients_per_round=1.0, sampling="poisson"),
      rounds=args.rounds, seed=seed, eval_every=args.eval_every,
      checkpoint_every=args.rounds, privacy=ptrain.PrivacyConfig(**privacy))


def plan(args) -> list[tuple[str, str, int]]:
  """(defense, partition, seed): the core defenses everywhere, the rest on seed 0 of iid
  and Dirichlet 0.1."""
  names = args.defenses or list(defenses(args.rounds, 1e-5))
  cells = []
  for partition in args.partitions:
    for name in names:
      if name in CORE or args.all:
        cells += [(name, partition, s) for s in args.seeds]
      elif partition in ("iid", "dirichlet0.1"):
        cells.append((name, partition, args.seeds[0]))
  return cells


def train_all(args) -> None:
  table = defenses(args.rounds, 1e-5)
  cells = plan(args)
  for i, (name, partition, seed) in enumerate(cells):
    workdir = Path(args.out) / partition / slug(name) / f"seed{seed}"
    if (workdir / "done.json").exists():
      continue
    print(f"[{i + 1}/{len(cells)}] {partition} / {name} / seed {seed}", flush=True)
    try:
      record = ptrain.train_and_evaluate(config(name, table[name], partition, seed, args),
                                         workdir, progress=False)
      (workdir / "done.json").write_text(json.dumps(record) + "\n")
    except Exception as e:  # a failed cell is recorded with its reason; the grid goes on
      workdir.mkdir(parents=True, exist_ok=True)
      (workdir / "failed.txt").write_text(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
      print(f"  failed: {type(e).__name__}: {e}", flush=True)


# ----------------------------------------------------------------------------- report


def _records(workdir: Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _server_z(name: str, workdir: Path) -> float | None:
  """The z of the least-noisy upload the server sees (0: in the clear; None: only a sum)."""
  if name.startswith("secagg") or name.startswith("pfdm"):
    return None  # only the sum / updates of pre-noised data: no attack cell for these
  path = workdir / "privacy.json"
  if path.exists():
    return float(min(json.loads(path.read_text())["event_z"]))
  return 0.0


def attack_curve(root: Path) -> dict[float, dict[str, float]]:
  """z -> {naive, adaptive, best attack name, rero}: median PSNR over the victims, the max
  over the A0 attacks and over A1-A5."""
  curve = {}
  for cell in sorted(root.glob("z*")):
    rows = json.loads((cell / "comparison.json").read_text()) if (cell / "comparison.json").exists() else []
    if not rows:
      continue
    z = float(cell.name[1:])
    naive = [r for r in rows if "denoise" not in r["attack"]]
    adapt = [r for r in rows if "denoise" in r["attack"]] or naive
    best = max(adapt + naive, key=lambda r: r["median_psnr"])
    curve[z] = {"naive": max(r["median_psnr"] for r in naive),
                "adaptive": max(r["median_psnr"] for r in adapt + naive),
                "best": best["attack"], "rero": best.get("rero_bound_kappa_1e-3", 1.0),
                "success": best.get("success_rate_20db", float("nan")),
                "cosine": best.get("update_cosine", 1.0)}
  return curve


def psnr_at(curve: dict[float, dict], z: float | None) -> float | None:
  """The best adaptive PSNR at z: measured, or interpolated in log z between measured cells;
  beyond the noisiest cell, that cell's value (an upper bound: more noise only lowers it);
  below the least noisy positive cell, none (no extrapolation)."""
  if z is None:
    return None
  if z in curve:
    return curve[z]["adaptive"]
  positive = sorted(v for v in curve if v > 0)
  if not positive or z < positive[0]:
    return None
  if z >= positive[-1]:
    return curve[positive[-1]]["adaptive"]
  return float(np.interp(math.log(z), [math.log(v) for v in positive],
                         [curve[v]["adaptive"] for v in positive]))


def report(args) -> None:
  from fljax.plots import _pyplot
  plt = _pyplot()
  out = Path(args.out)
  curve = attack_curve(Path(args.report)) if args.report else {}
  rows, by_round = [], {}
  for partition in args.partitions:
    for name in defenses(args.rounds, 1e-5):
      runs = []
      for seed_dir in sorted((out / partition / slug(name)).glob("seed*")):
        if (seed_dir / "done.json").exists():
          recs = _records(seed_dir)
          runs.append((seed_dir, recs))
        elif (seed_dir / "failed.txt").exists():
          rows.append({"partition": partition, "defense": name, "failed":
                       (seed_dir / "failed.txt").read_text().splitlines()[0]})
      if not runs:
        continue
      final = [r[-1] for _, r in runs]
      acc = np.asarray([f["test_accuracy"] for f in final])
      z_server = _server_z(name, runs[0][0])
      eps_model = final[0].get("epsilon_replace_one", final[0].get("epsilon"))
      row = {"partition": partition, "defense": name, "seeds": len(runs),
             "accuracy": float(acc.mean()), "accuracy_std": float(acc.std()),
             "epsilon_model": eps_model,
             "epsilon_model_add_remove": final[0].get("epsilon") if "epsilon_replace_one" in final[0] else None,
             "epsilon_server": final[0].get("epsilon_server", math.inf if z_server == 0 else None),
             "epsilon_record": final[0].get("epsilon_record"),
             "z_server": z_server, "psnr_best_adaptive": psnr_at(curve, z_server)}
      if name == "none":
        row["epsilon_model"] = math.inf
        row["epsilon_server"] = math.inf
      if name.startswith("pfdm"):  # one release of the data, against everyone, per image
        row["epsilon_server"] = row["epsilon_record"] = eps_model
      rows.append(row)
      by_round[(partition, name)] = [
          ([r["round"] for r in recs if "test_accuracy" in r],
           [r["test_accuracy"] for r in recs if "test_accuracy" in r]) for _, recs in runs]
  (out / "tradeoff.json").write_text(json.dumps({"rows": rows, "attack_curve": {
      str(k): v for k, v in curve.items()}}, indent=1) + "\n")
  _table(out, rows, curve)
  _figures(plt, out, rows, curve, by_round, args.partitions)


def _fmt(v, spec="{:.3g}") -> str:
  if v is None:
    return "-"
  if isinstance(v, float) and math.isinf(v):
    return "inf"
  return spec.format(v)


def _table(out: Path, rows: list[dict], curve: dict) -> None:
  lines = ["| partition | defense | accuracy (mean +- std) | seeds | eps model observer "
           "(replace-one) | eps server per upload | eps record | z per upload | best adaptive "
           "PSNR dB |", "|---" * 9 + "|"]
  for r in rows:
    if "failed" in r:
      lines.append(f"| {r['partition']} | {r['defense']} | failed: {r['failed']} |" + " |" * 6)
      continue
    eps = _fmt(r["epsilon_model"])
    if r.get("epsilon_model_add_remove") is not None:
      eps += f" (add/remove {_fmt(r['epsilon_model_add_remove'])})"
    lines.append(f"| {r['partition']} | {r['defense']} | {r['accuracy']:.3f} +- "
                 f"{r['accuracy_std']:.3f} | {r['seeds']} | {eps} | {_fmt(r['epsilon_server'])} | "
                 f"{_fmt(r['epsilon_record'])} | {_fmt(r['z_server'])} | "
                 f"{_fmt(r['psnr_best_adaptive'], '{:.1f}')} |")
  lines += ["", "| z per upload | naive A0 PSNR | best adaptive PSNR | best attack | "
            "ReRo ceiling (kappa 1e-3) | success >= 20 dB | update cosine |", "|---" * 7 + "|"]
  for z, c in sorted(curve.items()):
    lines.append(f"| {z:g} | {c['naive']:.1f} | {c['adaptive']:.1f} | {c['best']} | "
                 f"{c['rero']:.3g} | {c['success']:.2f} | {c['cosine']:.3f} |")
  (out / "tradeoff.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


def _figures(plt, out, rows, curve, by_round, partitions) -> None:
  ok = [r for r in rows if "failed" not in r]
  names = list(dict.fromkeys(r["defense"] for r in ok))
  color = {n: f"C{i % 10}" for i, n in enumerate(names)}
  marker = {n: "os^vD"[i // 10 % 5] for i, n in enumerate(names)}

  def point(ax, r, x):
    ax.errorbar([x], [r["accuracy"]], yerr=[r["accuracy_std"]], fmt=marker[r["defense"]],
                color=color[r["defense"]], label=r["defense"])

  def accuracy_vs_epsilon(ax, p):
    for r in (r for r in ok if r["partition"] == p):
      eps = r["epsilon_model"]
      point(ax, r, 1e4 if eps is None or math.isinf(eps) else eps)

  def frontier(ax, p):
    for r in (r for r in ok if r["partition"] == p and r["psnr_best_adaptive"] is not None):
      point(ax, r, r["psnr_best_adaptive"])
    ax.axvline(12, color="gray", ls=":", lw=1)

  def schedules(ax, p):
    for name in SCHEDULE_RUNS:
      for i, (rounds, acc) in enumerate(by_round.get((p, name), [])):
        ax.plot(rounds, acc, color=f"C{SCHEDULE_RUNS.index(name)}", alpha=0.8,
                label=name if i == 0 else None)

  _panels(plt, partitions, accuracy_vs_epsilon, out / "accuracy_vs_epsilon.png", xlog=True,
          xlabel="epsilon, model observer (replace-one; inf plotted at 1e4)",
          ylabel="final test accuracy", legend="lower right")
  _panels(plt, partitions, frontier, out / "frontier.png",
          xlabel="best adaptive attack PSNR on the server's view, dB (worst case B = 1)",
          ylabel="final test accuracy", legend="lower left")
  _panels(plt, partitions, schedules, out / "schedules.png", xlabel="round",
          ylabel="test accuracy", title="{}: schedules at epsilon 8")
  if curve:
    fig, ax = plt.subplots(figsize=(5, 3.6))
    zs = sorted(curve)
    xs = [max(z, 1e-3) for z in zs]
    ax.plot(xs, [curve[z]["naive"] for z in zs], "o-", label="naive (A0: ig, dps)")
    ax.plot(xs, [curve[z]["adaptive"] for z in zs], "s-", label="best adaptive (A1-A5)")
    ax.axhline(12, color="gray", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("z per upload (0 plotted at 1e-3)")
    ax.set_ylabel("median PSNR, dB")
    ax2 = ax.twinx()
    ax2.plot(xs, [curve[z]["rero"] for z in zs], "k--", lw=1, label="ReRo ceiling")
    ax2.set_ylabel("ReRo bound on success (kappa 1e-3)")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(out / "psnr_vs_z.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="runs/tradeoff")
  parser.add_argument("--report", default=None, metavar="ATTACK_ROOT",
                      help="only write the table and figures, with the attack cells under "
                           "ATTACK_ROOT (scripts/attack_vs_noise.sh's output)")
  parser.add_argument("--partitions", nargs="+", default=list(PARTITIONS), choices=list(PARTITIONS))
  parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  parser.add_argument("--rounds", type=int, default=30)
  parser.add_argument("--clients", type=int, default=100)
  parser.add_argument("--eval_every", type=int, default=5)
  parser.add_argument("--dataset", default="mnist")
  parser.add_argument("--model", default="cnn")
  parser.add_argument("--all", action="store_true", help="every defense on every partition and seed")
  parser.add_argument("--defenses", nargs="+", default=None,
                      help="only these defenses (names as in the table)")
  parser.add_argument("--quick", action="store_true",
                      help="digits, 8 clients, 3 rounds, one seed, iid (a smoke test)")
  args = parser.parse_args(argv)
  if args.quick:
    args.dataset, args.model, args.clients, args.rounds = "digits", "mlp", 8, 3
    args.seeds, args.partitions, args.eval_every = [0], ["iid"], 1
  if args.report is None:
    train_all(args)
  report(args)


if __name__ == "__main__":
  main()
