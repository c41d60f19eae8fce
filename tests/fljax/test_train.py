"""End-to-end tests of fljax/train.py and scripts/train_fl.py: outputs, resume, faults."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fljax import datasets, runs, train
from fljax.checkpoint import CheckpointError, Checkpointer

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--data.name", "digits", "--data.num_clients", "8", "--model.name", "mlp",
         "--fed.clients_per_round", "0.5", "--progress", "false"]
TINY = train.ExperimentConfig(data=train.DataConfig(name="digits", num_clients=4),
                              model=train.ModelConfig(name="mlp"), rounds=1)


def _cli(*args, **kwargs):
  env = {**os.environ, "XLA_FLAGS": ""}
  return subprocess.run([sys.executable, str(ROOT / "scripts" / "train_fl.py"), *args],
                        capture_output=True, text=True, env=env, timeout=300, **kwargs)


def _records(workdir):
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_main_two_rounds_then_resume(tmp_path, capsys):
  workdir = tmp_path / "run"
  train.main(["--workdir", str(workdir), "--rounds", "2", *SMALL])
  assert "round    2/2" in capsys.readouterr().out
  for name in ("config.json", "metrics.jsonl", "accuracy.png", "label_histogram.txt",
               "label_histogram.png", "params.msgpack"):
    assert (workdir / name).exists(), name
  records = _records(workdir)
  assert [r["round"] for r in records] == [1, 2]
  assert all(0 <= r["test_accuracy"] <= 1 and r["train_loss"] > 0 for r in records)
  config = json.loads((workdir / "config.json").read_text())
  assert config["data"]["name"] == "digits" and config["rounds"] == 2

  train.main(["--workdir", str(workdir), "--rounds", "3", *SMALL])
  assert "resuming at round 2" in capsys.readouterr().out
  assert [r["round"] for r in _records(workdir)] == [1, 2, 3]


def _error(argv):
  with pytest.raises(SystemExit) as e:
    train.main(argv)
  return e.value.code


def test_main_help_and_bad_values_end_in_one_line(tmp_path, capsys):
  assert _error(["--help"]) == 0
  out = capsys.readouterr().out
  assert "--fed.local_epochs" in out and "--data.alpha" in out and "--num_processes" in out
  assert _error(["--workdir", str(tmp_path / "x"), "--fed.clients_per_round", "0"]) == 2
  err = capsys.readouterr().err
  assert "clients_per_round is the fraction of all clients sampled each round" in err
  assert "in (0, 1], got 0.0" in err
  code = _error(["--workdir", str(tmp_path / "y"), "--data.name", "cifar11", "--rounds", "1"])
  assert code.startswith("error: ") and "unknown dataset 'cifar11'" in code and "\n" not in code


def test_a_diverging_run_stops_with_advice(tmp_path):
  # lenet at local_lr 1e6: the first round's loss is ~1e7 (cross-entropy starts near 2.3)
  cfg = dataclasses.replace(TINY, model=train.ModelConfig(name="lenet"), rounds=3,
                            fed=train.fed.FedConfig(clients_per_round=0.5, local_lr=1e6))
  with pytest.raises(runs.DivergenceError, match="--fed.local_lr"):
    train.train_and_evaluate(cfg, tmp_path / "api", progress=False, figures=False)
  code = _error(["--workdir", str(tmp_path / "cli"), "--rounds", "3", *SMALL,
                 "--model.name", "lenet", "--fed.local_lr", "1e6"])
  assert code.startswith("error: training diverged at round 1") and "\n" not in code


def test_a_run_that_failed_before_round_one_leaves_its_workdir_reusable(tmp_path):
  with pytest.raises(datasets.DatasetError):  # a typo: fails while loading
    train.train_and_evaluate(dataclasses.replace(TINY, data=train.DataConfig(name="digitz")),
                             tmp_path, progress=False)
  with pytest.raises(ValueError, match="14x14"):  # fails after the label histogram is written
    train.train_and_evaluate(dataclasses.replace(TINY, model=train.ModelConfig(name="cnn")),
                             tmp_path, progress=False)
  assert train.train_and_evaluate(TINY, tmp_path, progress=False)["round"] == 1
  # now the workdir holds a run: another config is refused, --overwrite starts afresh
  other = dataclasses.replace(TINY, data=train.DataConfig(name="digits", num_clients=5))
  with pytest.raises(runs.WorkdirError, match="different config"):
    train.train_and_evaluate(other, tmp_path, progress=False)
  assert train.train_and_evaluate(other, tmp_path, progress=False, overwrite=True)["round"] == 1


def _truncate(folder):
  for f in folder.rglob("*"):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(f.read_bytes()[:7])


def test_resume_skips_a_corrupt_newest_checkpoint(tmp_path, capsys):
  cfg = dataclasses.replace(TINY, rounds=2, checkpoint_every=1)
  straight = train.train_and_evaluate(dataclasses.replace(cfg, rounds=3), tmp_path / "straight",
                                      progress=False, figures=False)
  workdir = tmp_path / "run"
  train.train_and_evaluate(cfg, workdir, progress=False, figures=False)
  _truncate(workdir / "checkpoints" / "2")
  capsys.readouterr()
  record = train.train_and_evaluate(dataclasses.replace(cfg, rounds=3), workdir, progress=False,
                                    figures=False)
  warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
  assert len(warnings) == 1 and "2.corrupt" in warnings[0]
  assert [r["round"] for r in _records(workdir)] == [1, 2, 3]
  assert record["train_loss"] == straight["train_loss"]  # resumed from round 1, same run

  # no readable checkpoint at all: one sentence
  for folder in (workdir / "checkpoints").iterdir():
    if folder.name.isdigit():
      _truncate(folder)
  with pytest.raises(CheckpointError, match="no checkpoint .* can be read"):
    train.train_and_evaluate(dataclasses.replace(cfg, rounds=4), workdir, progress=False)


@pytest.mark.slow  # a real SIGTERM to a subprocess (about 30 s); tests/fljax/test_runs.py stops a run in process
def test_interrupt_checkpoints_and_resumes(tmp_path):
  workdir = tmp_path / "run"
  env = {**os.environ, "XLA_FLAGS": ""}
  args = [sys.executable, str(ROOT / "scripts" / "train_fl.py"), "--workdir", str(workdir),
          "--rounds", "100000", "--checkpoint_every", "1000", *SMALL]
  proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env)
  deadline = time.time() + 240
  while time.time() < deadline:
    path = workdir / "metrics.jsonl"
    if path.exists() and len(path.read_text().splitlines()) >= 3:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err
  assert "checkpoint saved at round" in err and "Traceback" not in err
  saved = Checkpointer(workdir / "checkpoints").latest_round()
  assert saved is not None and saved >= 3
  out = _cli("--workdir", str(workdir), "--rounds", str(saved + 1), "--checkpoint_every",
             "1000", *SMALL)
  assert out.returncode == 0, out.stderr
  assert f"resuming at round {saved}" in out.stdout
  assert [r["round"] for r in _records(workdir)] == list(range(1, saved + 2))


def _free_port():
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow  # two jax.distributed processes (about 35 s)
def test_two_processes_with_jax_distributed_equal_one(tmp_path):
  # 2 processes x 4 CPU devices (gloo collectives over loopback) against 1 process, 1 device.
  args = ["--rounds", "2", "--data.num_clients", "16", *SMALL]
  single = _cli("--workdir", str(tmp_path / "one"), *args)
  assert single.returncode == 0, single.stderr
  port = _free_port()
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  procs = [subprocess.Popen(
      [sys.executable, str(ROOT / "scripts" / "train_fl.py"), "--workdir", str(tmp_path / "two"),
       *args, "--devices", "0", "--distributed", "--coordinator", f"127.0.0.1:{port}",
       "--num_processes", "2", "--process_id", str(i)],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:] + outs[1][1][-2000:]
  # Only the first process reports (gloo itself prints connection lines from C++).
  assert "round    2/2" in outs[0][0] and "round" not in outs[1][0]
  one, two = _records(tmp_path / "one"), _records(tmp_path / "two")
  assert [r["round"] for r in two] == [1, 2]
  for a, b in zip(one, two):
    assert b["clients"] == a["clients"] and b["test_accuracy"] == pytest.approx(a["test_accuracy"])
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
