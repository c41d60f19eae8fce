"""Privacy/utility of the diffusion-inspired defenses against DP-FedAvg and SecAgg + DDP.

Trains FedAvg (CNN, embedded MNIST, 100 clients, every client every round: q = 1) under
each defense of `studies.grid.DEFENSES`, partition and seed (the study's FL cells, cached
in `cells/fl/`: resumable, failed cells retried), then joins the runs with the
attack-vs-noise cells of `scripts/attack_vs_noise.sh` into figures and one table:

  accuracy_vs_epsilon.png   final accuracy vs the model observer's epsilon (replace-one
                            user, PLD / closed form), one panel per partition
  psnr_vs_z.png             attack PSNR vs the upload's z: naive (A0) vs best adaptive (A1-A5),
                            with the ReRo ceiling (Kaissis et al. 2023) at the same mu
  frontier.png              accuracy vs the best adaptive attack's PSNR on what the server
                            sees, one panel per partition
  schedules.png             accuracy per round of schedules at equal epsilon
  tradeoff.md / .json       the table: accuracy (mean +- std over seeds), epsilon for each
                            threat model, z per upload, best adaptive PSNR

The attack PSNR of a defense is read from the attack curve at the z of its least-noisy
round as the server sees it (0 for DP-FedAvg: its server sees every update in the
clear); SecAgg's server sees only the sum of all clients' updates and PFDM's updates of
noised data: they are reported without an attack number.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fljax.plots import _pyplot
from fljax.plots import panels as _panels
from studies import cells, grid, runner

# on every partition and seed; the others on the first seed of iid and dirichlet0.1
CORE = ("none", "forward_z0.03", "forward", "forward_eps8", "hybrid", "dp_fedavg_eps8",
        "dp_fedavg_replace_one_eps8", "secagg_ddp")
DEFENSES = ("none", "forward_z0.03", "forward_z0.1", "forward", "forward_z1", "forward_eps8",
            "forward_anneal_eps8", "forward_cosine_eps8", "hybrid", "forward_dpsgd", "pfdm",
            "dp_fedavg_eps8", "dp_fedavg_replace_one_eps8", "secagg_ddp")
SCHEDULE_RUNS = ("forward_eps8", "forward_anneal_eps8", "forward_cosine_eps8", "dp_fedavg_eps8")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TradeoffConfig:
  """The trade-off grid.

  Attributes:
    partitions: data partitions.
    defenses: defenses compared (those outside the core set run on the first seed of iid
      and dirichlet0.1 only, unless all_cells).
    seeds: seeds of the core defenses.
    rounds: FedAvg rounds.
    clients: clients C (every one takes part in every round).
    q: clients' sampling rate per round.
    eval_every: test accuracy every this many rounds.
    data: the data.
    model: the model (fljax.models).
    all_cells: every defense on every partition and seed.
  """

  partitions: tuple[str, ...] = dataclasses.field(
      default=("iid", "dirichlet0.5", "dirichlet0.1"), metadata={"choices": tuple(grid.PARTITIONS)})
  defenses: tuple[str, ...] = dataclasses.field(
      default=DEFENSES, metadata={"choices": tuple(grid.DEFENSES)})
  seeds: tuple[int, ...] = (0, 1, 2)
  rounds: int = 30
  clients: int = 100
  q: float = 1.0
  eval_every: int = 5
  data: grid.DataSpec = grid.DataSpec()
  model: str = "cnn"
  all_cells: bool = False

  def __post_init__(self):
    grid.check_names("partition", self.partitions, grid.PARTITIONS)
    grid.check_names("defense", self.defenses, grid.DEFENSES)
    if not self.seeds:
      raise ValueError("at least one seed is needed")


# `scripts/defense_tradeoff.py --quick`: digits, 8 clients, 3 rounds, one seed, iid
QUICK = {"data.name": "digits", "model": "mlp", "clients": 8, "rounds": 3, "seeds": (0,),
         "partitions": ("iid",), "eval_every": 1}


def plan(cfg: TradeoffConfig) -> dict[tuple[str, str, int], tuple[str, dict[str, Any]]]:
  """(partition, defense, seed) -> (hash, FL cell) of the grid."""
  out = {}
  for partition in cfg.partitions:
    for name in cfg.defenses:
      if name in CORE or cfg.all_cells:
        seeds = cfg.seeds
      elif partition in ("iid", "dirichlet0.1"):
        seeds = cfg.seeds[:1]
      else:
        seeds = ()
      for seed in seeds:
        cell = cells.fl_cell(cfg, partition, name, seed)
        out[(partition, name, seed)] = (cells.config_hash(cell), cell)
  return out


def train(cfg: TradeoffConfig, workdir: str | Path, *, say: Callable[[str], Any] = print) -> None:
  """Runs the grid's FL cells that are not done (failed ones again)."""
  cells_dir = runner.open_workdir(Path(workdir)) / "fl"
  todo = [(key, h, cell) for key, (h, cell) in plan(cfg).items()
          if not cells.is_done(cells_dir / h)]
  for i, ((partition, name, seed), h, cell) in enumerate(todo):
    say(f"[{i + 1}/{len(todo)}] {partition} / {name} / seed {seed}")
    cells.reopen(cells_dir / h)
    result = cells.run_fl_cell(cell, cells_dir / h)
    if result["status"] == "failed":
      say(f"  failed: {result['reason']}")


def attack_curve(root: Path) -> dict[float, dict[str, Any]]:
  """z -> {naive, adaptive, best attack name, rero}: median PSNR over the victims, the max
  over the A0 attacks and over A1-A5 (`scripts/attack_vs_noise.sh`'s `z*/comparison.json`)."""
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


def psnr_at(curve: dict[float, dict[str, Any]], z: float | None) -> float | None:
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


def _server_z(name: str, result: dict[str, Any]) -> float | None:
  """The z of the least-noisy upload the server sees (0: in the clear; None: no attack
  curve applies: only a sum, updates of noised data, or record-level noise)."""
  view = grid.DEFENSES[name].view
  if view == "forward":
    return float(min(result["privacy"]["event_z"]))
  return 0.0 if view == "clear" else None


def _row(partition: str, name: str, runs: list[dict[str, Any]], curve: dict) -> dict[str, Any]:
  final = [r["final"] for r in runs]
  acc = np.asarray([f["test_accuracy"] for f in final])
  z_server = _server_z(name, runs[0])
  eps_model = final[0].get("epsilon_replace_one", final[0].get("epsilon"))
  row = {"partition": partition, "defense": name, "seeds": len(runs),
         "accuracy": float(acc.mean()), "accuracy_std": float(acc.std()),
         "epsilon_model": eps_model,
         "epsilon_model_add_remove": final[0].get("epsilon") if "epsilon_replace_one" in final[0] else None,
         "epsilon_server": final[0].get("epsilon_server", math.inf if z_server == 0 else None),
         "epsilon_record": final[0].get("epsilon_record"),
         "z_server": z_server, "psnr_best_adaptive": psnr_at(curve, z_server)}
  if not grid.DEFENSES[name].dp:
    row["epsilon_model"] = row["epsilon_server"] = math.inf
  if grid.DEFENSES[name].privacy["mechanism"] == "pfdm":  # one release of the data, per image
    row["epsilon_server"] = row["epsilon_record"] = eps_model
  return row


def report(cfg: TradeoffConfig, workdir: str | Path, attack_root: str | Path | None = None, *,
           say: Callable[[str], Any] = print) -> list[dict[str, Any]]:
  """tradeoff.md / .json and the figures from the finished cells (and the attack curve
  under `attack_root`); returns the table's rows (a failed cell's row says why)."""
  out = Path(workdir)
  curve = attack_curve(Path(attack_root)) if attack_root else {}
  grid_cells = plan(cfg)
  rows, by_round = [], {}
  for partition in cfg.partitions:
    for name in cfg.defenses:
      runs = []
      for (p, d, seed), (h, _) in grid_cells.items():
        if (p, d) != (partition, name):
          continue
        r = cells.read_cell(out / "cells" / "fl" / h)
        if r is not None and r["status"] == "done":
          runs.append(r)
        else:
          rows.append({"partition": partition, "defense": name, "seed": seed, "hash": h,
                       "failed": "not run" if r is None else r["reason"].splitlines()[0]})
      if not runs:
        continue
      rows.append(_row(partition, name, runs, curve))
      by_round[(partition, name)] = [
          ([x["round"] for x in r["records"] if "test_accuracy" in x],
           [x["test_accuracy"] for x in r["records"] if "test_accuracy" in x]) for r in runs]
  (out / "tradeoff.json").write_text(json.dumps({"rows": rows, "attack_curve": {
      str(k): v for k, v in curve.items()}}, indent=1) + "\n")
  say(_table(out, rows, curve))
  _figures(out, rows, curve, by_round, cfg.partitions)
  return rows


def _fmt(v, spec="{:.3g}") -> str:
  if v is None:
    return "-"
  if isinstance(v, float) and math.isinf(v):
    return "inf"
  return spec.format(v)


def _table(out: Path, rows: list[dict[str, Any]], curve: dict) -> str:
  lines = ["| partition | defense | accuracy (mean +- std) | seeds | eps model observer "
           "(replace-one) | eps server per upload | eps record | z per upload | best adaptive "
           "PSNR dB |", "|---" * 9 + "|"]
  for r in rows:
    if "failed" in r:
      lines.append(f"| {r['partition']} | {r['defense']} | failed (seed {r['seed']}): "
                   f"{r['failed']} |" + " |" * 6)
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
  text = "\n".join(lines) + "\n"
  (out / "tradeoff.md").write_text(text)
  return text


def _figures(out, rows, curve, by_round, partitions) -> None:
  plt = _pyplot()
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
