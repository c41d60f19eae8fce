"""privacy/centralized.py: centralized DP-SGD runs meet their target epsilon, resume where
they stopped, refuse to extend a calibrated run, and run the non-private baseline."""

import dataclasses
import json

import pytest

from fljax import datasets, runs
from fljax import train as fl_train
from privacy import centralized, dpsgd

# Fixed-size batches of 64: accounted by RDP (PLD takes seconds per epsilon).
DIGITS = centralized.CentralConfig(data=datasets.Source(name="digits"),
                                   model=fl_train.ModelConfig(name="mlp"),
                                   dpsgd=dpsgd.DPSGDConfig(batch_size=64, sampling="fixed"),
                                   lr=0.1, epochs=2)


def _records(workdir):
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_meets_the_target_epsilon_and_refuses_to_extend_a_calibrated_run(tmp_path):
  cfg = dataclasses.replace(DIGITS, target_epsilon=2.0)
  record = centralized.train_and_evaluate(cfg, tmp_path, progress=False)
  records = _records(tmp_path)
  result = json.loads((tmp_path / "result.json").read_text())
  assert [r["epoch"] for r in records] == [1, 2]
  assert [r["step"] for r in records] == [22, 44]  # round(1438 / 64) steps per epoch
  assert records[0]["epsilon"] < records[1]["epsilon"] == result["epsilon"] == record["epsilon"]
  assert result["epsilon"] <= 2.0 and result["epsilon"] == pytest.approx(2.0, rel=1e-2)
  assert result["accountant"] == "rdp"
  with pytest.raises(runs.WorkdirError, match="different config"):  # sigma was fixed for 2
    centralized.train_and_evaluate(dataclasses.replace(cfg, epochs=3), tmp_path, progress=False)


def test_a_run_with_a_fixed_sigma_extends_as_if_uninterrupted(tmp_path, capsys):
  cfg = dataclasses.replace(DIGITS, dpsgd=dataclasses.replace(DIGITS.dpsgd, noise_multiplier=1.0))
  straight = centralized.train_and_evaluate(cfg, tmp_path / "straight", progress=False)
  centralized.train_and_evaluate(dataclasses.replace(cfg, epochs=1), tmp_path / "split",
                                 progress=False)
  capsys.readouterr()
  resumed = centralized.train_and_evaluate(cfg, tmp_path / "split", progress=False)
  assert "resuming at epoch 1" in capsys.readouterr().out
  assert [r["epoch"] for r in _records(tmp_path / "split")] == [1, 2]
  assert resumed["loss"] == straight["loss"] and resumed["epsilon"] == straight["epsilon"]


def test_the_non_private_baseline_reports_no_epsilon(tmp_path):
  cfg = dataclasses.replace(DIGITS, private=False, lr=0.05)
  record = centralized.train_and_evaluate(cfg, tmp_path, progress=False)
  assert record["test_accuracy"] > 0.5 and "epsilon" not in record
  result = json.loads((tmp_path / "result.json").read_text())
  assert result["epsilon"] is None and result["accountant"] is None


def test_main_answers_a_diverging_run_in_one_line(tmp_path):
  with pytest.raises(SystemExit) as e:
    centralized.main(["--workdir", str(tmp_path), "--data.name", "digits", "--model.name", "mlp",
                      "--private", "false", "--lr", "1e9", "--epochs", "1", "--progress", "false",
                      "--dpsgd.batch_size", "64"])
  assert e.value.code.startswith("error: training diverged at step 22") and "--lr" in e.value.code
