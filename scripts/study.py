"""The comparative study: attacks x defenses x data skew, one command, one report.

  python scripts/study.py                              # the default grid, ~20 min on 2 CPU cores
  python scripts/study.py --full --workdir runs/full   # the full grid (accelerators)
  python scripts/study.py --tiny --workdir /tmp/s      # seconds: digits, 2 defenses, 2 seeds
  python scripts/study.py --preset scale --workdir runs/scale --budget_minutes 0  # hours
  python scripts/study.py --defenses none,forward --partitions iid --attacks ig,dps
  python scripts/study.py --preset scale --workdir runs/scale --report_only  # so far

Trains FedAvg (100 clients, embedded MNIST) under every defense, partition and seed,
attacks what the server sees with every attack on the same victims, and writes
`report.md`, `report.html` (self-contained) and the figures into --workdir. Each cell is
cached by a hash of its config: rerunning skips finished cells, retries failed ones and
resumes a killed study. Several hosts: start the same command on each with a shared
--workdir and `--hosts N --host I` (or under SLURM, which sets both); host 0 writes the
report. `studies/` holds the library (grid, cells, runner, report).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from fljax import config, datasets  # noqa: E402
from studies import grid, runner  # noqa: E402


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
  """How the study runs (not part of any cell).

  Attributes:
    workdir: output folder: cells/, report.md, report.html, figures.
    tiny: a smoke test in seconds (digits, 2 defenses, 2 seeds, 2 rounds).
    full: the full grid: 3 partitions, 5 seeds, 50 rounds, budgets to 10,000, B in {1, 4,
      16}, 1 and 5 local steps, untrained and trained models, 32 victims.
    preset: a preset by name (`studies.grid.PRESETS`): full, compare, tiny, or scale
      (Fashion-MNIST over 3,000 clients, every defense; `apt-get install
      dataset-fashion-mnist`).
    compare: the attack comparison's grid: 16 victims, B in {1, 4}, untrained and trained
      models, budgets 30 to 1,000 (generative attacks to 100); hours on 2 CPU cores.
    progress: progress bars (plain lines every 30 s when the output is not a terminal).
    budget_minutes: stop after the first cell when the estimate exceeds this (0: no limit;
      the estimate counts the first cell's compilation in every cell).
    hosts: hosts sharing the cells (none: $SLURM_NTASKS or 1).
    host: this host's index (none: $SLURM_PROCID or 0).
    report_only: write the report of the cells finished so far; run none.
  """

  workdir: str = "runs/study"
  tiny: bool = False
  full: bool = False
  compare: bool = False
  preset: str | None = dataclasses.field(default=None, metadata={"choices": tuple(grid.PRESETS)})
  progress: bool = True
  budget_minutes: float = 90.0
  hosts: int | None = None
  host: int | None = None
  report_only: bool = False


def main(argv: list[str] | None = None) -> None:
  opts, ns = config.parse(Options, argv, description=__doc__.split("\n\n")[0],
                          extra=lambda p: config.add_arguments(p, grid.StudyConfig))
  flags = {k: v for k, v in vars(ns).items() if not hasattr(opts, k)}
  chosen = [name for name in ("full", "compare", "tiny") if getattr(opts, name)]
  chosen += [opts.preset] if opts.preset else []
  if len(set(chosen)) > 1:
    raise SystemExit(f"error: pick one preset, got {', '.join(chosen)}")
  preset = grid.PRESETS[chosen[0]] if chosen else {}
  if not jax.config.jax_compilation_cache_dir:  # programs that agree across cells compile once
    jax.config.update("jax_compilation_cache_dir", str(Path(opts.workdir) / "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  try:
    cfg = grid.make(grid.StudyConfig, preset, flags)
    data = runner.run(cfg, opts.workdir, progress=opts.progress,
                      budget_minutes=opts.budget_minutes or None,
                      hosts=runner.Hosts.from_env(opts.host, opts.hosts),
                      report_only=opts.report_only)
  except (ValueError, datasets.DatasetError, runner.BudgetError) as e:
    raise SystemExit(f"error: {e}") from None
  except KeyboardInterrupt:
    raise SystemExit(f"interrupted: finished cells are kept in {opts.workdir}/cells; rerun the "
                     f"same command to resume") from None
  failed = [f for f in data.get("failed", [])
            if not (opts.report_only and f["reason"] == "not run")]
  if failed:
    named = "; ".join(f["what"] for f in failed[:5]) + (f"; {len(failed) - 5} more" if len(failed) > 5 else "")
    raise SystemExit(f"error: {len(failed)} cell(s) failed ({named}); their reasons are under "
                     f"'Failed cells' in {opts.workdir}/report.md, and rerunning the same "
                     f"command retries them")


if __name__ == "__main__":
  main()
