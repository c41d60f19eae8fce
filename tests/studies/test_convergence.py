"""Tests of studies/convergence.py and scripts/convergence.py on a few photos and steps."""

import json

import numpy as np
import pytest

from studies import convergence
from tests.studies.conftest import load_script

TINY = {**convergence.QUICK, "optimizers": ("lbfgs",)}  # the script's --quick: compiled once


def test_a_victim_stops_where_it_first_converges_and_budgets_are_kept():
  always = convergence.ConvergenceConfig(**TINY, threshold=1e-3)  # any image passes
  result = convergence.run_optimizer("lbfgs", always, log=lambda line: None)
  assert result["first"] == [1, 1] and result["spent"] == [1, 1]  # init's evaluation
  never = convergence.ConvergenceConfig(**TINY, threshold=1e3)
  result = convergence.run_optimizer("lbfgs", never, log=lambda line: None)
  assert result["first"] == [-1, -1] and result["spent"] == [40, 40]
  assert result["labels_correct"] == [True, True]  # iDLG reads B = 1 labels exactly
  assert all(5 < p < 1e3 for p in result["best_psnr"])


def test_summary_reads_the_fraction_at_each_budget():
  result = {"optimizer": "adam", "first": [1, 150, 900, -1], "best_psnr": [40, 35, 31, 12],
            "spent": [1, 150, 900, 3000], "labels_correct": [True] * 4, "seconds": 2.0}
  row = convergence.summarise(result, 1000)
  assert row["converged_fraction"] == 0.75 and row["median_evals"] == 150
  assert row["fraction_at"] == {100: 0.25, 300: 0.5}
  assert row["median_best_psnr"] == 33 and row["label_accuracy"] == 1
  assert np.isnan(convergence.summarise({**result, "first": [-1] * 4}, 1000)["median_evals"])
  assert "| adam | 4 | 75 % | 25 % | 50 % | 150 |" in convergence.table(
      [row], convergence.ConvergenceConfig(budget=1000))


def test_bad_settings_are_one_sentence():
  with pytest.raises(ValueError, match="budget >= 2"):
    convergence.ConvergenceConfig(budget=1)
  with pytest.raises(ValueError, match="distinct seeds"):
    convergence.ConvergenceConfig(seeds=(0, 0))
  with pytest.raises(ValueError, match="optimizers must be"):
    convergence.ConvergenceConfig(optimizers=("sgd",))
  with pytest.raises(ValueError, match="RGB"):
    convergence.run_optimizer("lbfgs", convergence.ConvergenceConfig(**{**TINY, "data": "digits"}))


def test_script_writes_the_table_and_the_result_line(tmp_path, capsys):
  script = load_script("convergence")
  script.main(["--quick", "--optimizers", "lbfgs", "--workdir", str(tmp_path),
               "--progress", "false"])
  out = capsys.readouterr().out
  assert out.splitlines()[-1].startswith("RESULT convergence converged_fraction=0 ")
  data = json.loads((tmp_path / "convergence.json").read_text())
  assert data["summary"][0]["victims"] == 2 and len(data["victims"][0]["first"]) == 2
  assert "| lbfgs | 2 |" in (tmp_path / "convergence.md").read_text()
  (tmp_path / "file").write_text("")
  with pytest.raises(SystemExit, match="is a file"):
    script.main(["--quick", "--optimizers", "lbfgs", "--workdir", str(tmp_path / "file")])
