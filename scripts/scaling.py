"""Scaling studies: attack quality vs batch size, local steps and SecAgg clients; throughput
vs clients and devices (`studies.scaling`).

  python scripts/scaling.py --workdir runs/scaling                 # all of it (CPU: ~15 min)
  python scripts/scaling.py --quick --workdir /tmp/scaling         # seconds (digits, tiny sizes)
  python scripts/scaling.py --parts clients,devices                # only the throughput parts

Writes scaling.md, scaling.json and one PNG per study into --workdir (attack cells cached
in its cells/, so reruns resume), and prints `RESULT scaling psnr_b1=... device_speedup=...`.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fljax import config, datasets  # noqa: E402
from studies import grid, scaling  # noqa: E402


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
  """Where the studies write.

  Attributes:
    workdir: output folder: scaling.md, scaling.json, figures, cells/.
    quick: digits, tiny sizes: a smoke test in seconds.
  """

  workdir: str = "runs/scaling"
  quick: bool = False


def main(argv: list[str] | None = None) -> None:
  opts, ns = config.parse(Options, argv, description=__doc__.split("\n\n")[0],
                          extra=lambda p: config.add_arguments(p, scaling.ScalingConfig))
  flags = {k: v for k, v in vars(ns).items() if not hasattr(opts, k)}
  try:
    cfg = grid.make(scaling.ScalingConfig, scaling.QUICK if opts.quick else {}, flags)
    data = scaling.run(cfg, opts.workdir)
  except (ValueError, datasets.DatasetError) as e:
    raise SystemExit(f"error: {e}") from None
  except KeyboardInterrupt:
    raise SystemExit(f"interrupted: finished attack cells are kept in {opts.workdir}/cells; "
                     f"rerun the same command to resume") from None
  print("RESULT scaling " + " ".join(f"{k}={v:.3g}" for k, v in data["headline"].items()))


if __name__ == "__main__":
  main()
