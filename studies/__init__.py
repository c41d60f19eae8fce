"""Studies: the grids of experiments above the four libraries, and their reports.

  grid      registries (partitions, attacks, the one defense registry), `StudyConfig` and
            its presets, the calibrated noise of the defenses
  cells     FL cells and attack cells: configs, hashes, the on-disk cache, running them
  runner    the comparative study: plan, run (resumable, several hosts), report
  report    the study's report.md / report.html / report.json and figures
  tradeoff  privacy/utility of the defenses at equal epsilon, with the attack curve
  scaling   attack quality vs B, local steps and SecAgg clients; throughput vs clients
            and devices

May import `fljax`, `privacy`, `diffusion` and `inversion`; none of them imports it.
"""
