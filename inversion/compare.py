"""Several attacks on the same victims: one experiment each, one picture, one table.

`compare(config, variants, workdir)` runs `inversion.experiment.run` once per attack
variant, each in `workdir/<variant>/` (same victims, model, clients, defense and seed:
only `config.attack` changes, so every attack sees the very same observations), and
writes

  comparison.png   rows: the ground truth, then one row per attack (PSNR under each image)
  comparison.md    the table: PSNR, SSIM, label accuracy, evaluations spent, wall time
  comparison.json  the same, machine-readable

A variant is an attack name with optional `AttackSpec` overrides in brackets, e.g.
`ig`, `dps[features=0]`, `dps[gradient_weight=0,features=0]` (the prior-only control),
`gifd[control=random_observation]`. Finished variants are not run again (each
experiment's folder keeps its results), so an interrupted comparison resumes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import sys
import typing
from pathlib import Path
from typing import Any

import numpy as np

from fljax import config as config_lib
from fljax import datasets, runs
from inversion import experiment, specs

_VARIANT = re.compile(r"^(\w+)(?:\[(.*)\])?$")


@functools.cache
def _attack_hints() -> dict[str, Any]:
  return typing.get_type_hints(specs.AttackSpec)  # slow: it evaluates every annotation


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
  """'dps[features=0,scale=8]' -> ('dps', {'features': 0.0, 'scale': 8.0})."""
  m = _VARIANT.match(text.strip())
  if not m:
    raise ValueError(f"cannot read the attack variant {text!r}; write NAME or NAME[key=value,...]")
  name, body = m.group(1), m.group(2)
  if name not in specs.ATTACKS:
    raise ValueError(f"unknown attack {name!r} in {text!r}; valid: "
                     f"{', '.join(sorted(specs.ATTACKS))}")
  hints = _attack_hints()
  overrides = {}
  for item in filter(None, (body or "").split(",")):
    key, _, value = item.partition("=")
    key = key.strip()
    if key not in hints or key == "name":
      raise ValueError(f"{key!r} in {text!r} is not an attack setting; valid: "
                       f"{', '.join(k for k in hints if k != 'name')}")
    overrides[key] = config_lib.parse_value(hints[key], value.strip())
  return name, overrides


def slug(text: str) -> str:
  return re.sub(r"[^\w=.-]+", "_", text.strip()).strip("_")


def compare(config: specs.InversionConfig, variants: list[str], workdir: str | Path, *,
            overwrite: bool = False, progress: bool = True) -> list[dict[str, Any]]:
  """Runs every variant (or reuses its finished results, unless `overwrite`); writes the
  picture and the table."""
  workdir = Path(workdir)
  parsed = [(v, *parse_variant(v)) for v in variants]  # every variant checked before any runs
  if not parsed:
    raise ValueError("no attack variant given; pass --attacks NAME[key=value,...],...")
  rows = []
  for text, name, overrides in parsed:
    attack = dataclasses.replace(config.attack, name=name, **overrides)
    cfg = dataclasses.replace(config, attack=attack)
    print(f"== {text}", flush=True)
    summary = experiment.run(cfg, workdir / slug(text), overwrite=overwrite, progress=progress)
    rows.append({**summary, "attack": text})
  write_table(workdir, rows)
  save_comparison_grid(workdir / "comparison.png", [workdir / slug(r["attack"]) for r in rows],
                       [r["attack"] for r in rows])
  return rows


COLUMNS = (("median PSNR", "median_psnr", "{:.2f}"), ("mean SSIM", "mean_ssim", "{:.3f}"),
           ("label acc", "label_accuracy", "{:.2f}"), ("failed", "failed", "{:d}"),
           ("double-backward / victim", "double_backward_evals_per_victim", "{:.0f}"),
           ("gradients / victim", "grad_evals_per_victim", "{:.0f}"),
           ("prior NFE / victim", "prior_nfe_per_victim", "{:.0f}"),
           ("attack s", "attack_seconds", "{:.0f}"))


def write_table(workdir: Path, rows: list[dict[str, Any]]) -> None:
  lines = ["| attack | " + " | ".join(c for c, _, _ in COLUMNS) + " |",
           "|---" * (len(COLUMNS) + 1) + "|"]
  for r in rows:
    cells = []
    for _, key, fmt in COLUMNS:
      value = r.get(key)
      cells.append("-" if value is None else fmt.format(value))
    lines.append(f"| {r['attack']} | " + " | ".join(cells) + " |")
  (workdir / "comparison.md").write_text("\n".join(lines) + "\n")
  (workdir / "comparison.json").write_text(json.dumps(rows, indent=2) + "\n")
  print("\n".join(lines))


def collect(root: str | Path) -> str:
  """One markdown table of every finished experiment under `root/<cell>/<attack>/` (e.g.
  the folders of `scripts/acceptance_generative.sh`), one row per cell and attack."""
  root = Path(root)
  lines = ["| cell | attack | " + " | ".join(c for c, _, _ in COLUMNS) + " |",
           "|---" * (len(COLUMNS) + 2) + "|"]
  for cell in sorted(p for p in root.iterdir() if p.is_dir()):
    for run in sorted(cell.glob("*/metrics.json"), key=lambda p: p.stat().st_mtime):
      summary = json.loads(run.read_text())["summary"]
      cells = [fmt.format(summary[key]) if summary.get(key) is not None else "-"
               for _, key, fmt in COLUMNS]
      lines.append(f"| {cell.name} | {run.parent.name} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def save_comparison_grid(path: Path, folders: list[Path], names: list[str], *,
                         max_images: int = 16) -> None:
  """Ground truth, then one row per attack (its Hungarian-matched reconstructions)."""
  from fljax.plots import _pyplot
  plt = _pyplot()
  runs = [np.load(f / "reconstructions.npz") for f in folders]
  truth = runs[0]["truth"].reshape((-1,) + runs[0]["truth"].shape[2:])[:max_images]
  n = len(truth)
  fig, axes = plt.subplots(len(runs) + 1, n, figsize=(0.9 * n + 1.6, 1.05 * (len(runs) + 1)),
                           squeeze=False)
  show = lambda ax, img: ax.imshow(np.clip(img.squeeze(-1) if img.shape[-1] == 1 else img, 0, 1),  # noqa: E731
                                   cmap="gray", vmin=0, vmax=1)
  for j in range(n):
    show(axes[0, j], truth[j])
  axes[0, 0].set_ylabel("truth", fontsize=7, rotation=0, ha="right", va="center")
  for i, (run, name) in enumerate(zip(runs, names), start=1):
    rec = run["reconstruction"].reshape((-1,) + truth.shape[1:])[:n]
    psnr = run["psnr"].reshape(-1)[:n]
    failed = np.repeat(run["failed"], run["psnr"].shape[1])[:n]
    for j in range(n):
      show(axes[i, j], rec[j])
      axes[i, j].set_title("failed" if failed[j] else f"{psnr[j]:.1f}", fontsize=6, pad=1)
    axes[i, 0].set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
      spine.set_visible(False)
  fig.tight_layout(pad=0.3, rect=(0.1, 0, 1, 1))  # room for the attacks' names
  fig.savefig(path, dpi=110)
  plt.close(fig)


def split_variants(text: str) -> list[str]:
  """'ig,dps[features=0,scale=8]' -> ['ig', 'dps[features=0,scale=8]'] (commas inside
  brackets belong to the variant)."""
  return [v.strip() for v in re.split(r",(?![^\[]*\])", text) if v.strip()]


def main(argv: list[str] | None = None) -> None:
  def extra(parser):
    runs.add_flags(parser, workdir="runs/compare")
    parser.add_argument("--attacks", default="idlg,ig,gifd,ggdm,dps[features=0],dps",
                        help="attack variants NAME[key=value,...], comma-separated (default: "
                             "%(default)s)")
    parser.add_argument("--collect", default=None, metavar="ROOT",
                        help="only print one table of every finished comparison under ROOT")

  config, ns = config_lib.parse(specs.InversionConfig, argv, extra=extra,
                                description="Several gradient-inversion attacks on the same "
                                            "victims: one grid, one table.")
  if ns.collect:
    print(collect(ns.collect), end="")
    return
  try:
    compare(config, split_variants(ns.attacks), ns.workdir, overwrite=ns.overwrite,
            progress=ns.progress)
  except (datasets.DatasetError, ValueError) as e:  # runs.WorkdirError among them
    raise SystemExit(f"error: {e}") from None
  except KeyboardInterrupt:
    print("\ninterrupted: rerun the same command to resume", file=sys.stderr)
    raise SystemExit(130) from None
