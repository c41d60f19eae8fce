"""Do DLG's optimisers converge as in the paper? iDLG on DLG's LeNet (uniform init), FedSGD
B = 1, 32x32x3 photos; the fraction of victims reaching 30 dB within the budget and the
evaluations it took (`studies.convergence`).

  python scripts/convergence.py --workdir runs/convergence             # 16 victims x 3 seeds
  python scripts/convergence.py --optimizers lbfgs --victims 32        # one optimiser
  python scripts/convergence.py --quick --workdir /tmp/convergence     # seconds

Writes convergence.md and convergence.json into --workdir, prints the table and ends with
`RESULT convergence converged_fraction=... median_evals=...` for DLG's default optimiser
(the first one measured when it is not among them).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fljax import config, datasets, runs  # noqa: E402
from inversion.attacks import dlg  # noqa: E402
from studies import convergence  # noqa: E402


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
  """Where the measurement writes.

  Attributes:
    workdir: output folder: convergence.md, convergence.json.
    quick: 2 victims, 1 seed, 40 evaluations: a smoke test in seconds.
    progress: print a line per chunk of steps.
  """

  workdir: str = "runs/convergence"
  quick: bool = False
  progress: bool = True


def main(argv: list[str] | None = None) -> None:
  opts, ns = config.parse(
      Options, argv, description=__doc__.split("\n\n")[0],
      extra=lambda p: config.add_arguments(p, convergence.ConvergenceConfig))
  flags = {k: v for k, v in vars(ns).items() if not hasattr(opts, k)}
  with runs.cli_errors(datasets.DatasetError):
    cfg = config.build(convergence.ConvergenceConfig,
                       {**(convergence.QUICK if opts.quick else {}), **flags})
    rows = convergence.run(cfg, opts.workdir,
                           log=print if opts.progress else lambda line: None)
  print(convergence.table(rows, cfg))
  default = dlg.DLGConfig().optimizer
  row = next((r for r in rows if r["optimizer"] == default), rows[0])
  print(f"RESULT convergence converged_fraction={row['converged_fraction']:.3g} "
        f"median_evals={row['median_evals']:.4g}")


if __name__ == "__main__":
  main()
