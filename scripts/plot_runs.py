"""Overlays the test-accuracy curves of several run folders in one PNG, and prints a table.

  python scripts/plot_runs.py runs/iid runs/dir05 runs/dir01 --workdir runs

Each curve is labelled by its run folder (as given); the picture is <workdir>/accuracy.png.
"""

import dataclasses
import json
from pathlib import Path

from fljax import config as config_lib
from fljax import plots


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlotConfig:
  """Where the picture goes.

  Attributes:
    workdir: output folder; the picture is written to <workdir>/accuracy.png.
  """

  workdir: str = "."


def read_run(workdir: Path) -> tuple[list[int], list[float], str]:
  """The evaluated rounds, their test accuracies, and the run's partition in words."""
  path = workdir / "metrics.jsonl"
  if not path.is_file():
    raise SystemExit(f"error: {path} not found; run scripts/train_fl.py --workdir {workdir} first")
  records = [r for r in map(json.loads, path.read_text().splitlines()) if "test_accuracy" in r]
  if not records:
    raise SystemExit(f"error: {path} holds no test accuracy yet; let the run evaluate once")
  partition = "?"
  if (workdir / "config.json").is_file():
    data = json.loads((workdir / "config.json").read_text()).get("data", {})
    partition = data.get("partition", "?") + (
        f" alpha={data['alpha']}" if data.get("partition") == "dirichlet" else "")
  return [r["round"] for r in records], [r["test_accuracy"] for r in records], partition


def main(argv=None):
  """Returns the figure (its legend names the runs)."""
  def extra(parser):
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="run folders written by scripts/train_fl.py")

  config, ns = config_lib.parse(PlotConfig, argv, description=__doc__.splitlines()[0],
                                extra=extra)
  curves = {}
  for run in map(Path, ns.runs):
    rounds, accuracy, partition = read_run(run)
    curves[str(run)] = rounds, accuracy
    marks = " ".join(f"r{r}={a:.3f}" for r, a in zip(rounds, accuracy)
                     if r in (10, 20, 30, 40, 50, 100))
    print(f"{str(run):<24} {partition:<20} {marks}  max={max(accuracy):.3f}")
  out = Path(config.workdir) / "accuracy.png"
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    figure = plots.plot_curves(curves, str(out), title="test accuracy per round")
  except OSError as e:
    raise SystemExit(f"error: cannot write {out}: {e.strerror}; pass a writable --workdir") from None
  print(f"wrote {out}")
  return figure


if __name__ == "__main__":
  main()
