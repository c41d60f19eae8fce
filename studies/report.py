"""The study's report: `report.md` and the same as one self-contained `report.html`.

Built from the cell caches (`studies.cells`): a summary table per defense and partition
(final accuracy, mean and 95% confidence interval over seeds (Student t); epsilon and its
accountant; the best attack's PSNR / SSIM / label accuracy), the attack table (median
PSNR of every attack under every defense), the figures (accuracy per round, accuracy vs
epsilon, attack PSNR vs epsilon, the frontier accuracy vs best attack PSNR, one panel per
partition; reconstruction grids of the same victims), and every cell's config, status,
device and wall time.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from fljax.plots import panels
from inversion import baselines, stats
from studies import cells, grid

# two-sided 97.5% Student t quantiles for n - 1 degrees of freedom
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228}

def ci95(values: list[float]) -> float:
  n = len(values)
  if n < 2:
    return float("nan")
  return _T975.get(n - 1, 1.96) * float(np.std(values, ddof=1)) / math.sqrt(n)


def _accountant(run: dict[str, Any], defense: str) -> str:
  """The threat model, relation and accountant of the logged epsilon, as the run declared
  them in its privacy.json."""
  if not grid.DEFENSES[defense].dp:
    return "not DP" + (" (the server sees only the sum)" if defense == "secagg" else "")
  g = ((run.get("privacy") or {}).get("guarantees") or {}).get("epsilon")
  if g is None:
    return "-"
  return f"{g['threat_model']}; {g['relation']}; {g['accountant']}"


def _epsilon(final: dict[str, Any], defense: str) -> float:
  if not grid.DEFENSES[defense].dp:
    return math.inf
  return float(final.get("epsilon", math.inf))


def _top(by_attack: dict[str, list[dict[str, Any]]]) -> tuple[str, dict[str, float]]:
  """The best attack (highest median PSNR over the attack seeds) and its median scores."""
  scores = {a: {k: float(np.median([e[k] for e in es])) for k in ("psnr", "ssim", "label_accuracy")}
            for a, es in by_attack.items()}
  top = max(scores, key=lambda a: scores[a]["psnr"])
  return top, scores[top]


def gather(cfg: grid.StudyConfig, out: Path, fl: dict, attack_plan: dict) -> dict[str, Any]:
  """Rows for the tables and figures from the cells' results."""
  cells_dir = out / "cells"
  summary, failed, curves = [], [], {}
  attack_rows, released_rows = [], []
  for p in cfg.partitions:
    for d in cfg.defenses:
      runs = []
      for s in cfg.seeds:
        h, cell = fl[(p, d, s)]
        r = cells.read_cell(cells_dir / "fl" / h)
        if r is None or r["status"] != "done":
          failed.append({"kind": "fl", "hash": h, "what": f"{p} / {d} / seed {s}",
                         "reason": "not run" if r is None else r["reason"]})
          continue
        runs.append(r)
      row: dict[str, Any] = {"partition": p, "defense": d, "seeds": len(runs)}
      if runs:
        acc = [r["final"]["test_accuracy"] for r in runs]
        row.update(accuracy=float(np.mean(acc)), accuracy_ci=ci95(acc),
                   epsilon=_epsilon(runs[0]["final"], d), accountant=_accountant(runs[0], d),
                   epsilon_replace_one=runs[0]["final"].get("epsilon_replace_one"))
        curves[(p, d)] = [([x["round"] for x in r["records"] if "test_accuracy" in x],
                           [x["test_accuracy"] for x in r["records"] if "test_accuracy" in x])
                          for r in runs]
      best, released = {}, {}
      for key, (h, cell) in attack_plan.items():
        if key[0] != p or key[1] != d:
          continue
        r = cells.read_cell(cells_dir / "attack" / h)
        _, _, seed, attack, b, steps, state, budget = key
        if r is None or r["status"] != "done":
          failed.append({"kind": "attack", "hash": h,
                         "what": f"{p} / {d} / seed {seed} / {attack} / B={b} / s={steps} / "
                                 f"{state} / budget {budget}",
                         "reason": "not run" if r is None else r["reason"]})
          continue
        entry = {"partition": p, "defense": d, "seed": seed, "attack": attack, "batch": b,
                 "view": cell["view"]["kind"],
                 "local_steps": steps, "state": state, "budget": budget, "hash": h,
                 "psnr": r["median_psnr"], "psnrs": r["psnr"],
                 "ssim": r["mean_ssim"], "label_accuracy": r["mean_label_accuracy"],
                 "evals": r["double_backward_evals_per_victim"],
                 "prior_nfe": r.get("prior_nfe_per_victim"), "seconds": r["wall_seconds"],
                 "seconds_per_victim": r.get("seconds_per_victim"),
                 "flops": r.get("flops_per_victim"),
                 "first_psnr": r["psnr"][0] if r["psnr"] and 0 not in r["failed_victims"] else None,
                 "failed_victims": len(r["failed_victims"])}
        if attack.endswith(grid.RELEASED):  # against the released model: its own column
          released_rows.append(entry)
          released.setdefault((b, steps, state), {}).setdefault(attack, []).append(entry)
          continue
        attack_rows.append(entry)
        if budget == max(cfg.rungs(attack, d, b)):  # each attack at its largest budget here
          best.setdefault((b, steps, state), {}).setdefault(attack, []).append(entry)
      point = (cfg.batch_sizes[0], cfg.local_steps[0], cfg.model_states[0])
      if point in best:
        top, scores = _top(best[point])
        row.update(best_attack=top, **scores)
      at = (cfg.batches(d)[0], cfg.local_steps[0])
      for name, found in (("psnr_by_state", best), ("released_by_state", released)):
        row[name] = {state: _top(found[at + (state,)]) for state in grid.ALL_MODEL_STATES
                     if at + (state,) in found}
      summary.append(row)
  base = []
  for h, (p, cell) in cells.plan_baselines(attack_plan, cfg.prior_only_steps).items():
    r = cells.read_cell(cells_dir / "baseline" / h)
    if r is None or r["status"] != "done":
      failed.append({"kind": "baseline", "hash": h,
                     "what": f"{p} / baselines B={cell['batch']} / {cell['model']['state']}",
                     "reason": "not run" if r is None else r["reason"]})
      continue
    base.append({"partition": p, "batch": cell["batch"],
                 "local_steps": cell["local_steps"],
                 "state": cell["model"]["state"], "seed": cell["partition_seed"],
                 "data": cell["data"], "scores": r["baselines"]})
  return {"summary": summary, "attacks": attack_rows, "released": released_rows,
          "failed": failed, "curves": curves, "baselines": base}



# ----------------------------------------------------------------------------- the ladder


def ladder(cfg: grid.StudyConfig, data: dict[str, Any]) -> list[dict[str, Any]]:
  """Quality against compute on the clear update, one entry per grid point (B, local
  steps, model state): each attack at each rung (per-image PSNR pooled over partitions
  and attack seeds, with its bootstrap interval; evaluations, prior network passes,
  seconds and FLOPs per victim), the baselines on the same victims, and the verdicts."""
  points = sorted({(e["batch"], e["local_steps"], e["state"]) for e in data["attacks"]
                   if e["defense"] == "none"})
  out = []
  for pt in points:
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    for e in sorted((e for e in data["attacks"] if e["defense"] == "none"
                     and (e["batch"], e["local_steps"], e["state"]) == pt),
                    key=lambda e: (e["partition"], e["seed"])):
      r = runs.setdefault((e["attack"], e["budget"]), {"psnrs": [], "cells": []})
      r["psnrs"] += e["psnrs"]
      r["cells"].append(e)
    rows = []
    for (attack, budget), r in sorted(runs.items(), key=lambda kv: (cfg.attacks.index(kv[0][0]), kv[0][1])):
      mean = lambda k: float(np.mean([c[k] for c in r["cells"] if c.get(k) is not None] or [np.nan]))  # noqa: E731
      rows.append({"attack": attack, "budget": budget, "psnrs": r["psnrs"],
                   "interval": stats.bootstrap_median(baselines.cap_psnr(r["psnrs"]),
                                                      group=pt[0]) if r["psnrs"] else None,
                   "evals": mean("evals"), "prior_nfe": mean("prior_nfe"),
                   "seconds": mean("seconds_per_victim"), "flops": mean("flops"),
                   "ssim": mean("ssim"), "label_accuracy": mean("label_accuracy"),
                   "failed_victims": sum(c["failed_victims"] for c in r["cells"])})
    base: dict[str, list[float]] = {}
    for bl in sorted((b for b in data.get("baselines", [])
                      if (b["batch"], b["local_steps"], b["state"]) == pt), key=lambda b: b["seed"]):
      for name, sc in bl["scores"].items():
        base.setdefault(name, []).extend(sc["psnr"])
    out.append({"point": pt, "rows": rows, "verdicts": _verdicts(rows, pt[0]),
                "baselines": {k: stats.bootstrap_median(baselines.cap_psnr(v), group=pt[0])
                              for k, v in base.items()}})
  return out


def _best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
  rows = [r for r in rows if r["interval"] is not None]
  return max(rows, key=lambda r: r["interval"].estimate, default=None)


def _compare(a: dict[str, Any], b: dict[str, Any], group: int = 1) -> str:
  name = lambda r: f"{r['attack']} at {r['budget']}"  # noqa: E731
  if len(a["psnrs"]) != len(b["psnrs"]):  # a failed victim breaks the pairing
    return (f"{name(a)} {a['interval'].estimate:.1f} dB vs {name(b)} "
            f"{b['interval'].estimate:.1f} dB (not paired: failed victims)")
  d = stats.paired_difference(baselines.cap_psnr(a["psnrs"]), baselines.cap_psnr(b["psnrs"]),
                              group=group)
  return stats.verdict(d, name(a), name(b))


def _verdicts(rows: list[dict[str, Any]], group: int = 1) -> list[str]:
  """Paired verdicts (same victims): the best generative attack against the best classical
  one at each budget both reached (equal evaluations), and at each generative rung against
  the best classical run that took no more seconds per victim (equal or less time)."""
  gen = [r for r in rows if r["attack"] in grid.GENERATIVE]
  cls = [r for r in rows if r["attack"] not in grid.GENERATIVE]
  out = []
  for budget in sorted({r["budget"] for r in gen} & {r["budget"] for r in cls}):
    a = _best([r for r in gen if r["budget"] == budget])
    b = _best([r for r in cls if r["budget"] == budget])
    if a and b:
      out.append(f"equal evaluations ({budget}): " + _compare(a, b, group))
  for budget in sorted({r["budget"] for r in gen}):
    a = _best([r for r in gen if r["budget"] == budget])
    b = _best([r for r in cls if a and r["seconds"] <= a["seconds"]])
    if a and b:
      out.append(f"equal or less time ({a['seconds']:.2g} s per victim): "
                 + _compare(a, b, group))
  return out


# ----------------------------------------------------------------------------- figures


def figures(cfg: grid.StudyConfig, out: Path, data: dict[str, Any]) -> list[tuple[str, str]]:
  from fljax.plots import _pyplot
  plt = _pyplot()
  ok = [r for r in data["summary"] if "accuracy" in r]
  color = {d: f"C{i % 10}" for i, d in enumerate(cfg.defenses)}
  marker = {d: "os^vD"[i // 10 % 5] for i, d in enumerate(cfg.defenses)}
  eps_inf = 1e4

  def x_eps(r):
    e = r.get("epsilon", math.inf)
    return eps_inf if e is None or not math.isfinite(e) else e

  def per_round(ax, p):
    for d in cfg.defenses:
      runs = data["curves"].get((p, d))
      if not runs:
        continue
      n = min(len(x) for x, _ in runs)
      ax.plot(runs[0][0][:n], np.mean([y[:n] for _, y in runs], axis=0), color=color[d], label=d)

  def point(ax, r, x, y, yerr=None):
    ax.errorbar([x], [y], yerr=None if yerr is None or not math.isfinite(yerr) else [yerr],
                fmt=marker[r["defense"]], color=color[r["defense"]], label=r["defense"])

  def acc_eps(ax, p):
    for r in (r for r in ok if r["partition"] == p):
      point(ax, r, x_eps(r), r["accuracy"], r["accuracy_ci"])

  def psnr_eps(ax, p):
    for r in (r for r in ok if r["partition"] == p and "psnr" in r):
      point(ax, r, x_eps(r), r["psnr"])

  def frontier(ax, p):
    for r in (r for r in ok if r["partition"] == p and "psnr" in r):
      point(ax, r, r["psnr"], r["accuracy"], r["accuracy_ci"])

  made = []
  points = {f"B = {e['point'][0]}, {e['point'][1]} step(s), {e['point'][2]}": e
            for e in data.get("ladder", [])}

  def against(key):
    def draw(ax, name):
      e = points[name]
      for i, attack in enumerate(cfg.attacks):
        rows = [r for r in e["rows"] if r["attack"] == attack and r["interval"] is not None]
        if not rows:
          continue
        x = [r[key] for r in rows]
        ax.plot(x, [r["interval"].estimate for r in rows], "o-", color=f"C{i}", label=attack, ms=3)
        ax.fill_between(x, [r["interval"].low for r in rows], [r["interval"].high for r in rows],
                        color=f"C{i}", alpha=0.2, lw=0)
      for j, (name_, iv) in enumerate(sorted(e["baselines"].items())):
        ax.axhline(iv.estimate, color="0.5", lw=0.8, ls=(0, (1 + j, 2)), label=f"baseline: {name_}")
    return draw

  if points:
    panels(plt, list(points), against("evals"), out / "psnr_vs_evaluations.png", xlog=True,
           xlabel="double-backward evaluations of the victim model per victim",
           ylabel="median PSNR, dB (95% band)", legend="outside")
    made.append(("psnr_vs_evaluations.png", "Quality against evaluations on the clear update: "
                 "each attack's median PSNR at each budget of the ladder (bootstrap 95% band "
                 "over the pooled victims); grey lines: the baselines on the same victims."))
    panels(plt, list(points), against("seconds"), out / "psnr_vs_seconds.png", xlog=True,
           xlabel="attack seconds per victim on this machine (compilation excluded)",
           ylabel="median PSNR, dB (95% band)", legend="outside")
    made.append(("psnr_vs_seconds.png", "The same runs against seconds per victim (the "
                 "batched computation's run time divided by its victims)."))
  panels(plt, cfg.partitions, per_round, out / "accuracy_per_round.png", xlabel="round",
          ylabel="test accuracy (mean over seeds)", legend="outside")
  made.append(("accuracy_per_round.png", "Test accuracy per round, mean over seeds."))
  panels(plt, cfg.partitions, acc_eps, out / "accuracy_vs_epsilon.png", xlog=True,
          xlabel=f"epsilon at delta 1e-5 (not DP plotted at {eps_inf:g})",
          ylabel="final test accuracy", legend="outside")
  made.append(("accuracy_vs_epsilon.png", "Final accuracy (mean, 95% CI over seeds) vs "
               "epsilon; each defense's own relation and accountant (summary table)."))
  panels(plt, cfg.partitions, psnr_eps, out / "psnr_vs_epsilon.png", xlog=True,
          xlabel=f"epsilon at delta 1e-5 (not DP plotted at {eps_inf:g})",
          ylabel="best attack median PSNR, dB", legend="outside")
  made.append(("psnr_vs_epsilon.png", "The best attack's median PSNR on what the server sees "
               "vs epsilon."))
  panels(plt, cfg.partitions, frontier, out / "frontier.png",
          xlabel="best attack PSNR on the server's view, dB (lower: more private)",
          ylabel="final test accuracy", legend="outside")
  made.append(("frontier.png", "The privacy/utility frontier: accuracy vs the best attack's "
               "PSNR, one panel per partition."))
  for p in cfg.partitions:
    name = f"reconstructions_{p}.png"
    if _grid(plt, cfg, out, data, p, out / name):
      made.append((name, f"{p}: the same victim (the first image of victim 0, attack seed "
                         f"{cfg.attack_seeds[0]}) and each attack's reconstruction of it under "
                         f"each defense, with its PSNR (under SecAgg the attack reconstructs "
                         f"the whole aggregate; the image matched to this one is shown)."))
  return made


def _grid(plt, cfg, out: Path, data: dict, partition: str, path: Path) -> bool:
  rows = {}
  for e in data["attacks"]:
    if (e["partition"] == partition and e["seed"] == cfg.attack_seeds[0]
        and (e["batch"], e["local_steps"], e["state"]) ==
        (cfg.batch_sizes[0], cfg.local_steps[0], cfg.model_states[0])
        and e["budget"] == max(cfg.rungs(e["attack"], e["defense"], e["batch"]))):
      rows.setdefault(e["defense"], {})[e["attack"]] = e
  if not rows:
    return False
  defenses = [d for d in cfg.defenses if d in rows]
  cols = ["truth"] + list(cfg.attacks)
  fig, axes = plt.subplots(len(defenses), len(cols), figsize=(1.1 * len(cols) + 1.2,
                                                              1.15 * len(defenses) + 0.4),
                           squeeze=False)
  for i, d in enumerate(defenses):
    for j, c in enumerate(cols):
      ax = axes[i, j]
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(c, fontsize=7)
      if j == 0:
        ax.set_ylabel(d, fontsize=6, rotation=0, ha="right", va="center")
      e = rows[d].get(c if j else next(iter(rows[d])))
      if e is None:
        continue
      npz = out / "cells" / "attack" / e["hash"] / "reconstructions.npz"
      if not npz.exists():
        continue
      z = np.load(npz)
      img = z["truth"][0, 0] if j == 0 else z["reconstruction"][0, 0]
      ax.imshow(np.clip(img.squeeze(-1) if img.shape[-1] == 1 else img, 0, 1), cmap="gray",
                vmin=0, vmax=1)
      if j:
        ax.set_xlabel(_fmt(e["first_psnr"], "{:.1f} dB"), fontsize=6, labelpad=1)
  fig.tight_layout(pad=0.3, h_pad=0.2, w_pad=0.2)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


# ----------------------------------------------------------------------------- documents


def _by_state(found: dict[str, Any] | None) -> str:
  """'untrained 14.2 (ig); trained 11.0 (ig)': the best attack's median PSNR per model."""
  if not found:
    return "-"
  return "; ".join(f"{state} {scores['psnr']:.1f} ({attack.removesuffix(grid.RELEASED)})"
                   for state, (attack, scores) in found.items())


def _baselines_by_state(ladder_: list[dict[str, Any]], batch: int, steps: int) -> str:
  """'prior_only: untrained 9.1, trained 9.4 (n = 16); ...': each baseline's median PSNR
  per model state at one grid point, from the ladder's pooled baselines ('' when none ran)."""
  by_name: dict[str, list[tuple[str, stats.Interval]]] = {}
  order = {s: i for i, s in enumerate(grid.ALL_MODEL_STATES)}
  for e in sorted(ladder_, key=lambda e: order[e["point"][2]]):
    if e["point"][:2] == (batch, steps):
      for name, iv in e["baselines"].items():
        by_name.setdefault(name, []).append((e["point"][2], iv))
  return "; ".join(f"{name}: " + ", ".join(f"{state} {iv.estimate:.1f}" for state, iv in found)
                   + f" (n = {found[0][1].n})" for name, found in sorted(by_name.items()))


BLIND = ("blank", "mean_image", "gan_sample")  # baselines that need nothing from the update


def against_prior_only(cfg: grid.StudyConfig, data: dict[str, Any], *, margin: float = 1.0
                       ) -> list[dict[str, Any]]:
  """Each defense's best attack on what the server sees (the highest pooled median among
  the attacks at their largest budget there) in each partition at each model state of the
  first grid point, paired with the prior-only baseline on the same victims (a defense's
  victims are the first of the clear update's in its partition: `cells.victim_batches`),
  pooled over the attack seeds; not under secure aggregation, whose aggregate holds other
  clients' images too.
  `within`: 'yes' when the difference's 95% interval lies at or below `margin` dB, 'no'
  when above it, 'unresolved' otherwise.

  The prior-only sample takes the labels inferred from the clear update, which a defense
  may hide, so each row is also paired with the best *blind* baseline (`BLIND`: the one
  of highest median on these victims among the blank image, the training mean image and
  a GAN sample, outputs that need nothing from the update): `blind`, `blind_psnr` and
  `blind_difference`, `blind_low`, `blind_high`, `blind_within` as above."""
  b, steps = cfg.batch_sizes[0], cfg.local_steps[0]
  scores = {(e["partition"], e["state"], e["seed"]): e["scores"]
            for e in data.get("baselines", [])
            if (e["batch"], e["local_steps"]) == (b, steps) and "prior_only" in e["scores"]}
  out = []
  for p, d, state in itertools.product(cfg.partitions, cfg.defenses, grid.ALL_MODEL_STATES):
    if d == "none":
      continue
    runs: dict[str, tuple[list[float], dict[str, list[float]]]] = {}
    for e in data["attacks"]:
      if ((e["partition"], e["defense"], e["batch"], e["local_steps"], e["state"])
          != (p, d, b, steps, state)
          or e.get("view") == "aggregate"  # not the clear update's victims
          or e["budget"] != max(cfg.rungs(e["attack"], d, b))
          or (p, state, e["seed"]) not in scores):
        continue
      a, base = runs.setdefault(e["attack"], ([], {}))
      a += e["psnrs"]
      for name, score in scores[(p, state, e["seed"])].items():
        base.setdefault(name, []).extend(score["psnr"][:len(e["psnrs"])])
    if not runs:
      continue
    attack = max(runs, key=lambda k: float(np.median(runs[k][0])))
    a, base = runs[attack]
    blind = max((n for n in BLIND if n in base), key=lambda n: float(np.median(base[n])),
                default=None)
    row = {"partition": p, "defense": d, "state": state, "attack": attack,
           "budget": max(cfg.rungs(attack, d, b)),
           "psnr": float(np.median(baselines.cap_psnr(a))), "n": len(a) // b,
           **_paired(a, base["prior_only"], b, margin, "prior_only", "")}
    if blind is not None:
      row.update(blind=blind, **_paired(a, base[blind], b, margin, "blind_psnr", "blind_"))
    out.append(row)
  return out


def _paired(a: list[float], base: list[float], b: int, margin: float, name: str,
            prefix: str) -> dict[str, Any]:
  """The baseline's median as `name` and the paired difference of `a` from it."""
  a, base = baselines.cap_psnr(a), baselines.cap_psnr(base)
  diff = stats.paired_difference(a, base, group=b)
  within = "yes" if diff.high <= margin else "no" if diff.low > margin else "unresolved"
  return {name: float(np.median(base)), prefix + "difference": diff.estimate,
          prefix + "low": diff.low, prefix + "high": diff.high, prefix + "within": within}


def _fmt(v, spec="{:.3g}") -> str:
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return "-"
  if isinstance(v, float) and math.isinf(v):
    return "inf"
  return spec.format(v)


def _interval(iv: stats.Interval | None) -> str:
  if iv is None:
    return "-"
  if not iv.defined:
    return f"{iv.estimate:.1f} (n = {iv.n})"
  return f"{iv.estimate:.1f} [{iv.low:.1f}, {iv.high:.1f}] (n = {iv.n})"


def blocks(cfg: grid.StudyConfig, out: Path, data: dict, fl: dict, attack_plan: dict,
           figs: list[tuple[str, str]], wall_seconds: float) -> list[tuple]:
  """The report as blocks: ('h', level, text), ('p', text), ('table', header, rows),
  ('img', file, caption), ('pre', text)."""
  env = cells.environment()
  spent, cell_rows = {}, []  # each distinct cell read once: its table row and its wall time
  for kind, plan in (("fl", fl), ("attack", attack_plan)):
    spent[kind] = 0.0
    seen = set()
    for key, (h, cell) in plan.items():
      if h in seen:
        continue
      seen.add(h)
      r = cells.read_cell(out / "cells" / kind / h) or {}
      e = r.get("environment", {})
      spent[kind] += r.get("wall_seconds", 0.0)
      cell_rows.append([kind, h, " / ".join(map(str, key)), r.get("status", "not run"),
                        _fmt(r.get("wall_seconds"), "{:.1f}"),
                        f"{e.get('backend', '-')} x{e.get('devices', '-')}",
                        "`" + json.dumps(cell, sort_keys=True) + "`"])
  b: list[tuple] = [("h", 1, "fljax study report")]
  b.append(("p", f"{len(cfg.partitions)} partitions x {len(cfg.defenses)} defenses x "
                 f"{len(cfg.seeds)} seeds of FedAvg ({cfg.model}, {cfg.data.name} "
                 f"{cfg.data.image_size}x{cfg.data.image_size}x{cfg.data.channels}, "
                 f"{cfg.clients} clients, "
                 f"Poisson q = {cfg.q}, {cfg.fl_rounds} rounds); attacks {', '.join(cfg.attacks)} "
                 f"on {cfg.victims} victims per cell (attack seeds {list(cfg.attack_seeds)}, "
                 f"batch {list(cfg.batch_sizes)}, local steps {list(cfg.local_steps)}, models "
                 f"{list(cfg.model_states)}; budgets {list(cfg.budgets)} double-backward "
                 f"evaluations per victim on the clear update, generative attacks up to "
                 f"{cfg.generative_budget}; under the other defenses "
                 f"{', '.join(cfg.attacks_under('dp'))} at one budget up to "
                 f"{cfg.defense_budget}, B in {list(cfg.defense_batch_sizes)}, models "
                 f"{list(cfg.defense_model_states)}). Machine: {env['cpus']} CPUs, {env['backend']} "
                 f"({env['device_kind']}) x {env['devices']}, {env['processes']} process(es); "
                 f"jax {env['jax']}, flax {env['flax']}, optax {env['optax']}, numpy "
                 f"{env['numpy']}, Python {env['python']}. Wall time of the cells: FL "
                 f"{spent['fl']:.0f} s, attacks {spent['attack']:.0f} s (this session: "
                 f"{wall_seconds:.0f} s)."))
  b.append(("h", 2, "Summary per defense"))
  b.append(("p", "Final test accuracy: mean +- 95% confidence interval over seeds (Student t). "
                 "Epsilon at delta 1e-5 after the last round, with its relation and "
                 "accountant. Best attack: the highest median PSNR among the attacks on the "
                 f"first grid point (B = {cfg.batch_sizes[0]}, {cfg.local_steps[0]} local "
                 f"step(s), {cfg.model_states[0]} model); by model: the same at each model "
                 "state attacked. Released model: the best of the attacks "
                 f"({', '.join(cfg.released_attacks) or 'none in this grid'}) on what a model "
                 "observer recovers from two consecutive global models (the round's mean "
                 "update over its q C clients, with DP-FedAvg's central noise)."))
  header = ["partition", "defense", "accuracy", "seeds", "epsilon", "accountant",
            "best attack", "PSNR dB", "SSIM", "label acc", "best PSNR by model",
            "released model: best PSNR"]
  rows = []
  for r in data["summary"]:
    acc = "failed" if "accuracy" not in r else (
        f"{r['accuracy']:.3f} +- {_fmt(r['accuracy_ci'], '{:.3f}')}")
    eps = _fmt(r.get("epsilon"))
    if r.get("epsilon_replace_one") is not None:
      eps += f" (replace-one {_fmt(r['epsilon_replace_one'])})"
    rows.append([r["partition"], r["defense"], acc, str(r["seeds"]), eps,
                 r.get("accountant", "-"), r.get("best_attack", "-"),
                 _fmt(r.get("psnr"), "{:.1f}"), _fmt(r.get("ssim"), "{:.3f}"),
                 _fmt(r.get("label_accuracy"), "{:.2f}"),
                 _by_state(r.get("psnr_by_state")), _by_state(r.get("released_by_state"))])
  b.append(("table", header, rows))
  baseline_line = _baselines_by_state(data["ladder"], cfg.batch_sizes[0], cfg.local_steps[0])
  if baseline_line:
    b.append(("p", "What an attacker gets without the gradient (the baselines on the clear "
                   "update's victims, median PSNR dB by model; the prior-only baseline is the "
                   "diffusion prior's sample at the labels inferred from the update): "
                   + baseline_line + "."))
  rows = [[r["partition"], r["defense"], r["state"], f"{r['attack']} at {r['budget']}",
           f"{r['psnr']:.1f}",
           f"{r['prior_only']:.1f}", f"{r['difference']:+.1f} [{r['low']:+.1f}, {r['high']:+.1f}]",
           r["within"], *([f"{r['blind'].replace('_', ' ')} {r['blind_psnr']:.1f}",
                           f"{r['blind_difference']:+.1f} [{r['blind_low']:+.1f}, "
                           f"{r['blind_high']:+.1f}]", r["blind_within"]]
                          if "blind" in r else ["-"] * 3), str(r["n"])]
          for r in data["against_prior_only"]]
  if rows:
    b.append(("h", 3, "The best attack on what the server sees, against the prior-only "
                      "baseline"))
    b.append(("p", "Per partition, defense and model state: the best attack's median PSNR, "
                   "the prior-only baseline's on the same victims, and their paired difference "
                   "(median of per-victim differences, bootstrap 95% interval). Within +1 dB: "
                   "yes when the interval lies at or below +1 dB (the attack recovers no more "
                   "than the prior alone plus 1 dB), no when above, unresolved otherwise. "
                   "The prior-only sample takes the labels the clear update leaks, which a "
                   "defense may hide; the blind baseline is the best of the outputs that need "
                   "nothing from the update (blank image, training mean image, GAN sample) on "
                   "the same victims, paired the same way."))
    b.append(("table", ["partition", "defense", "model", "best attack", "PSNR dB",
                        "prior-only dB",
                        "difference dB [95% CI]", "within +1 dB", "blind baseline dB",
                        "difference dB [95% CI]", "within +1 dB", "victims"], rows))
  b.append(("h", 2, "Quality against compute (clear update)"))
  b.append(("p", "Each attack at each budget of the ladder on the clear update (defense "
                 "`none`), a run of its own per budget. PSNR: median over every victim image "
                 "(pooled over partitions and attack seeds) with its bootstrap 95% interval, n "
                 "victims (at B > 1 each victim's B images are resampled together: they come "
                 "from one attack run). "
                 "Evaluations, prior network passes, seconds (the batched computation's run "
                 "time per victim, compilation excluded) and FLOPs (`inversion.cost`: XLA's "
                 "count of one evaluation times the evaluations) are per victim. Baselines "
                 "on the same victims: what an attacker gets without the gradient. Verdicts "
                 "are paired over the same victims; a difference is claimed only when its "
                 "95% interval excludes 0."))
  for e in data.get("ladder", []):
    bsz, steps, state = e["point"]
    b.append(("h", 3, f"B = {bsz}, {steps} local step(s), {state} model"))
    rows = [[r["attack"], str(r["budget"]), _fmt(r["evals"], "{:.0f}"), _fmt(r["prior_nfe"], "{:.0f}"),
             _fmt(r["seconds"], "{:.3g}"), _fmt(r["flops"] / 1e9 if r["flops"] else None, "{:.3g}"),
             _interval(r["interval"]), _fmt(r["ssim"], "{:.3f}"), _fmt(r["label_accuracy"], "{:.2f}"),
             str(r["failed_victims"])] for r in e["rows"]]
    rows += [[f"baseline: {name}", "-", "0", "-", "-", "-", _interval(iv), "-", "-", "-"]
             for name, iv in sorted(e["baselines"].items())]
    b.append(("table", ["attack", "budget", "evals", "prior NFE", "s / victim", "GFLOPs / victim",
                        "PSNR dB [95% CI]", "SSIM", "label acc", "failed"], rows))
    for v in e["verdicts"]:
      b.append(("p", "- " + v))
  b.append(("h", 2, "Every attack under every defense"))
  b.append(("p", "Median PSNR (dB) over the victims (and attack seeds) of each attack on what "
                 "the server sees, each at its largest budget there; the best per row in bold."))
  points = sorted({(e["batch"], e["local_steps"], e["state"]) for e in data["attacks"]})
  for pt in points:
    header = ["partition", "defense"] + list(cfg.attacks)
    rows = []
    for p in cfg.partitions:
      for d in cfg.defenses:
        vals = {}
        for a in cfg.attacks:
          es = [e["psnr"] for e in data["attacks"] if (e["partition"], e["defense"], e["attack"],
                e["batch"], e["local_steps"], e["state"]) == (p, d, a) + pt
                and e["budget"] == max(cfg.rungs(a, d, pt[0]))]
          vals[a] = float(np.median(es)) if es else None
        top = max((v for v in vals.values() if v is not None), default=None)
        if top is None:  # not attacked at this point (e.g. --defense_model_states)
          continue
        rows.append([p, d] + [("**{}**" if v is not None and v == top else "{}").format(
            _fmt(v, "{:.1f}")) for v in vals.values()])
    b.append(("p", f"B = {pt[0]}, {pt[1]} local step(s), {pt[2]} model:"))
    b.append(("table", header, rows))
  b.append(("h", 2, "Figures"))
  for name, caption in figs:
    b.append(("img", name, caption))
  b.append(("h", 2, "Defenses and attacks"))
  b.append(("table", ["defense", "what trains the model", "what the server sees", "paper"],
            [[d, json.dumps(grid.DEFENSES[d].privacy), grid.DEFENSES[d].view or "not modelled",
              grid.DEFENSES[d].paper]
             for d in cfg.defenses]))
  b.append(("table", ["attack", "variant", "paper"],
            [[a, grid.ATTACKS[a][0], grid.ATTACKS[a][1]] for a in cfg.attacks]))
  b.append(("h", 2, "Failed cells"))
  if data["failed"]:
    b.append(("table", ["kind", "cell", "what", "reason"],
              [[f["kind"], f["hash"], f["what"], f["reason"].splitlines()[0][:300]]
               for f in data["failed"]]))
  else:
    b.append(("p", "None."))
  b.append(("h", 2, "Cells"))
  b.append(("p", "Every cell's exact config (the JSON its hash covers), status, device and wall "
                 "time; its folder `cells/<kind>/<hash>/` holds done.json (or failed.json) "
                 "with the full records."))
  b.append(("table", ["kind", "hash", "grid point", "status", "wall s", "device", "config"],
            cell_rows))
  return b


def to_markdown(blocks_: list[tuple]) -> str:
  lines = []
  for blk in blocks_:
    if blk[0] == "h":
      lines += ["#" * blk[1] + " " + blk[2], ""]
    elif blk[0] == "p":
      lines += [blk[1], ""]
    elif blk[0] == "table":
      lines.append("| " + " | ".join(blk[1]) + " |")
      lines.append("|" + "---|" * len(blk[1]))
      lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in blk[2]]
      lines.append("")
    elif blk[0] == "img":
      lines += [f"![{blk[2]}]({blk[1]})", "", f"*{blk[2]}*", ""]
    elif blk[0] == "pre":
      lines += ["```", blk[1], "```", ""]
  return "\n".join(lines)


def _inline(text: str) -> str:
  """Escaped text with **bold** and `code` kept."""
  import re
  out = html.escape(text)
  out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
  return re.sub(r"`(.+?)`", r"<code>\1</code>", out)


def to_html(blocks_: list[tuple], out: Path) -> str:
  parts = ["<!doctype html><html><head><meta charset='utf-8'><title>fljax study report</title>",
           "<style>body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
           "table{border-collapse:collapse;font-size:12px;margin:0.5em 0}"
           "td,th{border:1px solid #ccc;padding:2px 6px;vertical-align:top}"
           "code{font-size:10px;word-break:break-all}img{max-width:100%}</style></head><body>"]
  for blk in blocks_:
    if blk[0] == "h":
      parts.append(f"<h{blk[1]}>{html.escape(blk[2])}</h{blk[1]}>")
    elif blk[0] == "p":
      parts.append(f"<p>{_inline(blk[1])}</p>")
    elif blk[0] == "table":
      parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in blk[1]) + "</tr>")
      parts += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in blk[2]]
      parts.append("</table>")
    elif blk[0] == "img":
      data = base64.b64encode((out / blk[1]).read_bytes()).decode()
      parts.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(blk[1])}'>"
                   f"<figcaption>{_inline(blk[2])}</figcaption></figure>")
    elif blk[0] == "pre":
      parts.append(f"<pre>{html.escape(blk[1])}</pre>")
  parts.append("</body></html>")
  return "\n".join(parts)


def write(cfg: grid.StudyConfig, out: Path, fl: dict, attack_plan: dict, *,
          wall_seconds: float) -> dict[str, Any]:
  data = gather(cfg, out, fl, attack_plan)
  data["ladder"] = ladder(cfg, data)
  data["against_prior_only"] = against_prior_only(cfg, data)
  figs = figures(cfg, out, data)
  b = blocks(cfg, out, data, fl, attack_plan, figs, wall_seconds)
  (out / "report.md").write_text(to_markdown(b) + "\n")
  (out / "report.html").write_text(to_html(b, out) + "\n")
  json_data = {k: v for k, v in data.items() if k not in ("curves", "ladder")}
  json_data["ladder"] = [{**e, "point": list(e["point"]),
                          "rows": [{**r, "interval": None if r["interval"] is None
                                    else dataclasses.asdict(r["interval"])} for r in e["rows"]],
                          "baselines": {k: dataclasses.asdict(v) for k, v in e["baselines"].items()}}
                         for e in data["ladder"]]
  (out / "report.json").write_text(json.dumps(json_data, indent=1, default=float) + "\n")
  return data
