"""Privacy/utility of the diffusion-inspired defenses against DP-FedAvg and SecAgg + DDP
(`studies.tradeoff`): FL under each defense, then a table and figures.

  python scripts/defense_tradeoff.py --workdir runs/tradeoff          # train (resumable)
  python scripts/defense_tradeoff.py --workdir runs/tradeoff --report_only \
      --attack_root runs/attack_vs_noise                              # table and figures
  python scripts/defense_tradeoff.py --quick --workdir /tmp/t         # seconds, digits

Defenses are named as in `studies.grid.DEFENSES` (--help lists them). The attack curve
comes from `scripts/attack_vs_noise.sh`'s cells under --attack_root.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fljax import config, datasets  # noqa: E402
from studies import grid, tradeoff  # noqa: E402


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
  """Where the grid runs, and what the report reads.

  Attributes:
    workdir: output folder: cells/, tradeoff.md, tradeoff.json, figures.
    quick: digits, 8 clients, 3 rounds, one seed, iid (a smoke test).
    attack_root: scripts/attack_vs_noise.sh's output, for the attack curve (none: no
      attack numbers).
    report_only: only write the table and figures from the cells already finished.
  """

  workdir: str = "runs/tradeoff"
  quick: bool = False
  attack_root: str | None = None
  report_only: bool = False


def main(argv: list[str] | None = None) -> None:
  opts, ns = config.parse(Options, argv, description=__doc__.split("\n\n")[0],
                          extra=lambda p: config.add_arguments(p, tradeoff.TradeoffConfig))
  flags = {k: v for k, v in vars(ns).items() if not hasattr(opts, k)}
  try:
    cfg = grid.make(tradeoff.TradeoffConfig, tradeoff.QUICK if opts.quick else {}, flags)
    if not opts.report_only:
      tradeoff.train(cfg, opts.workdir)
    rows = tradeoff.report(cfg, opts.workdir, opts.attack_root)
  except (ValueError, datasets.DatasetError) as e:
    raise SystemExit(f"error: {e}") from None
  except KeyboardInterrupt:
    raise SystemExit(f"interrupted: finished cells are kept in {opts.workdir}/cells; rerun the "
                     f"same command to resume") from None
  failed = [r for r in rows if "failed" in r]
  if failed:
    named = "; ".join(f"{r['partition']} / {r['defense']} / seed {r['seed']}: {r['failed']}"
                      for r in failed[:5]) + (f"; {len(failed) - 5} more" if len(failed) > 5 else "")
    raise SystemExit(f"error: {len(failed)} cell(s) failed or did not run ({named}); rerun the "
                     f"same command (without --report_only) to run them again")


if __name__ == "__main__":
  main()
