"""End-to-end tests of fljax/train.py and scripts/train_fl.py: outputs, resume, errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fljax import train

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--data.name", "digits", "--data.num_clients", "8", "--model.name", "mlp",
         "--fed.clients_per_round", "0.5", "--no-progress"]


def _cli(*args, **kwargs):
  env = {**os.environ, "XLA_FLAGS": ""}
  return subprocess.run([sys.executable, str(ROOT / "scripts" / "train_fl.py"), *args],
                        capture_output=True, text=True, env=env, timeout=300, **kwargs)


def _records(workdir):
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_cli_smoke_two_rounds_then_resume(tmp_path):
  workdir = tmp_path / "run"
  out = _cli("--workdir", str(workdir), "--rounds", "2", *SMALL)
  assert out.returncode == 0, out.stderr
  assert "round    2/2" in out.stdout and "test_acc" in out.stdout
  for name in ("config.json", "metrics.jsonl", "accuracy.png", "label_histogram.txt",
               "label_histogram.png"):
    assert (workdir / name).exists(), name
  records = _records(workdir)
  assert [r["round"] for r in records] == [1, 2]
  assert all(0 <= r["test_accuracy"] <= 1 and r["train_loss"] > 0 for r in records)
  config = json.loads((workdir / "config.json").read_text())
  assert config["data"]["name"] == "digits" and config["rounds"] == 2

  out = _cli("--workdir", str(workdir), "--rounds", "3", *SMALL)
  assert out.returncode == 0, out.stderr
  assert "resuming at round 2" in out.stdout
  assert [r["round"] for r in _records(workdir)] == [1, 2, 3]


def test_cli_help_and_bad_values(tmp_path):
  out = _cli("--help")
  assert out.returncode == 0 and "--fed.local_epochs" in out.stdout and "--data.alpha" in out.stdout
  out = _cli("--workdir", str(tmp_path / "x"), "--fed.clients_per_round", "0")
  assert out.returncode == 2 and "clients_per_round must be in (0, 1]" in out.stderr
  assert "Traceback" not in out.stderr
  out = _cli("--workdir", str(tmp_path / "y"), "--data.name", "cifar11", "--rounds", "1")
  assert out.returncode == 1 and "unknown dataset 'cifar11'" in out.stderr
  assert "Traceback" not in out.stderr


def test_resume_refuses_another_config(tmp_path):
  cfg = train.ExperimentConfig(data=train.DataConfig(name="digits", num_clients=4),
                               model=train.ModelConfig(name="mlp"), rounds=1)
  train.train_and_evaluate(cfg, tmp_path, progress=False)
  other = train.ExperimentConfig(data=train.DataConfig(name="digits", num_clients=5),
                                 model=train.ModelConfig(name="mlp"), rounds=1)
  with pytest.raises(SystemExit, match="different config"):
    train.train_and_evaluate(other, tmp_path, progress=False)
  record = train.train_and_evaluate(other, tmp_path, progress=False, overwrite=True)
  assert record["round"] == 1


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
  assert "checkpoint saved at round" in err
  saved = train.Checkpointer(workdir / "checkpoints").latest_round()
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
       "--num-processes", "2", "--process-id", str(i)],
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
