"""Overlays the test-accuracy curves of several run folders in one PNG, and prints a table.

  python scripts/plot_runs.py runs/iid runs/dir05 runs/dir01 --out runs/accuracy.png
"""

import argparse
import json
from pathlib import Path

from fljax import plots


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("workdirs", nargs="+", help="folders written by scripts/train_fl.py")
  parser.add_argument("--out", default="accuracy.png", help="output PNG")
  args = parser.parse_args()
  curves = {}
  for workdir in map(Path, args.workdirs):
    path = workdir / "metrics.jsonl"
    if not path.exists():
      raise SystemExit(f"error: {path} not found; run scripts/train_fl.py --workdir {workdir} first")
    config = json.loads((workdir / "config.json").read_text())
    data = config["data"]
    label = data["partition"] + (f" alpha={data['alpha']}" if data["partition"] == "dirichlet" else "")
    records = [r for r in map(json.loads, path.read_text().splitlines()) if "test_accuracy" in r]
    curves[label] = ([r["round"] for r in records], [r["test_accuracy"] for r in records])
    acc = {r: a for r, a in zip(*curves[label])}
    marks = " ".join(f"r{r}={acc[r]:.3f}" for r in (10, 20, 30, 40, 50, 100) if r in acc)
    print(f"{label:<22} {marks}  max={max(curves[label][1]):.3f}")
  plots.plot_curves(curves, args.out, title="test accuracy per round")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
