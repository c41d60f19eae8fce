"""The comparative study: attacks x defenses x data skew, one command, one report.

  python scripts/study.py                       # the default grid, ~20 min on 2 CPU cores
  python scripts/study.py --full --out runs/full   # the full grid (accelerators)
  python scripts/study.py --tiny --out /tmp/s   # seconds: digits, 2 defenses, 2 seeds

Trains FedAvg (100 clients, embedded MNIST) under every defense, partition and seed,
attacks what the server sees with every attack on the same victims, and writes
`report.md`, `report.html` (self-contained) and the figures into --out. Each cell is
cached by a hash of its config: rerunning skips finished cells and resumes a killed
study. Several hosts: start the same command on each with a shared --out and
`--hosts N --host I` (or under SLURM, which sets both); each host runs its share of the
cells on its own devices and host 0 writes the report once every cell is done.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

def parse(argv=None) -> tuple[argparse.Namespace, dict]:
  from inversion import study as st
  defaults = st.StudyConfig()
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="partitions: " + ", ".join(st.PARTITIONS) + "\ndefenses: "
                              + ", ".join(st.DEFENSES) + "\nattacks: " + ", ".join(st.ATTACKS))
  p.add_argument("--out", default="runs/study", help="output folder (default: runs/study)")
  p.add_argument("--full", action="store_true", help="the full grid: 5 seeds, 50 rounds, B in "
                 "{1, 4, 16}, 1 and 5 local steps, untrained and trained models, 8 victims")
  p.add_argument("--tiny", action="store_true", help="a smoke test in seconds (digits)")
  for name in ("partitions", "defenses", "attacks", "model_states"):
    p.add_argument(f"--{name}", nargs="+", default=None,
                   help=f"default: {' '.join(getattr(defaults, name))}")
  for name in ("seeds", "attack_seeds", "batch_sizes", "local_steps"):
    p.add_argument(f"--{name}", nargs="+", type=int, default=None,
                   help=f"default: {' '.join(map(str, getattr(defaults, name)))}")
  for name in ("rounds", "clients", "victims", "budget", "eval_every"):
    p.add_argument(f"--{name}", type=int, default=None, help=f"default: {getattr(defaults, name)}")
  p.add_argument("--q", type=float, default=None, help=f"default: {defaults.q}")
  p.add_argument("--dataset", default=None, help=f"default: {defaults.dataset}")
  p.add_argument("--model", default=None, help=f"default: {defaults.model}")
  p.add_argument("--budget_minutes", type=float, default=90.0,
                 help="stop before starting when the estimate (from the first cell) exceeds "
                      "this (0: no limit; default 90: the estimate counts the first cell's "
                      "compilation in every cell, so the default grid estimates ~45)")
  p.add_argument("--hosts", type=int, default=None,
                 help="hosts sharing the cells (default: $SLURM_NTASKS or 1)")
  p.add_argument("--host", type=int, default=None,
                 help="this host's index (default: $SLURM_PROCID or 0)")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  args = p.parse_args(argv)
  fields = dict(st.PRESETS["full"] if args.full else st.PRESETS["tiny"] if args.tiny else {})
  for f in dataclasses.fields(st.StudyConfig):
    value = getattr(args, f.name, None)
    if value is not None:
      fields[f.name] = tuple(value) if isinstance(value, list) else value
  return args, fields


def main(argv=None) -> None:
  args, fields = parse(argv)
  from fljax import datasets
  from inversion import study as st
  try:
    env = st.Hosts.from_env()
    hosts = st.Hosts(env.index if args.host is None else args.host,
                     env.count if args.hosts is None else args.hosts)
    cfg = st.StudyConfig(**fields)
    st.run(cfg, args.out, progress=not args.no_progress,
           budget_minutes=args.budget_minutes or None, hosts=hosts)
  except (ValueError, datasets.DatasetError, st.BudgetError) as e:
    raise SystemExit(f"error: {e}") from None
  except KeyboardInterrupt:
    raise SystemExit(f"\ninterrupted: finished cells are kept in {args.out}/cells; rerun the "
                     f"same command to resume") from None


if __name__ == "__main__":
  main()
