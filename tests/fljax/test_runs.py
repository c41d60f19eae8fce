"""fljax/runs.py on a toy run (a counter and one number, no model): the workdir rules,
resume, the step loop's records, checkpoints, stop signals and divergence rule, progress."""

import argparse
import dataclasses
import io
import itertools
import json
import os
import shutil
import signal
import types

import jax
import jax.numpy as jnp
import pytest

from fljax import runs
from fljax.checkpoint import CheckpointError


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class Toy:
  step: jax.Array
  x: jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToyConfig:
  steps: int = 6
  lr: float = 0.1


def fresh():
  return Toy(step=jnp.zeros((), jnp.int32), x=jnp.ones(()))


def double(state):  # loss = x, doubled every step
  return dataclasses.replace(state, step=state.step + 1, x=2 * state.x), {"loss": state.x}


def run(workdir, steps=6, step_fn=double, **kwargs):
  state, ckpt, log = runs.resume(workdir, fresh())
  kwargs = {"checkpoint_every": 2, "progress": False, **kwargs}
  return runs.run_steps(state, step_fn, steps=steps, ckpt=ckpt, log=log, **kwargs)


def records(workdir):
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_records_are_window_means_and_a_resumed_run_continues(tmp_path):
  exported = []
  state, record = run(tmp_path, steps=4, log_every=2, export=lambda s: exported.append(int(s.step)),
                      export_every=3)
  assert int(state.step) == 4 and float(state.x) == 16
  assert [(r["step"], r["loss"]) for r in records(tmp_path)] == [(2, 1.5), (4, 6.0)]
  assert record["step"] == 4 and record["seconds_per_step"] >= 0
  assert exported == [3, 4]  # every 3 steps and at the end
  state, record = run(tmp_path, steps=6, log_every=2)
  assert float(state.x) == 64 and [r["step"] for r in records(tmp_path)] == [2, 4, 6]
  state, again = run(tmp_path, steps=6)  # nothing to do: the last record
  assert again == record and int(state.step) == 6


def test_on_log_adds_fields(tmp_path):
  run(tmp_path, steps=2, on_log=lambda state, record: {"x": float(state.x)})
  assert [r["x"] for r in records(tmp_path)] == [2.0, 4.0]


def damage(folder, how):
  if how == "emptied":
    shutil.rmtree(folder)
    folder.mkdir()
  for f in folder.rglob("*"):
    if f.is_file():
      f.write_bytes(f.read_bytes()[:5])


@pytest.mark.parametrize("how", ["truncated", "emptied"])
def test_resume_skips_a_damaged_checkpoint_and_truncates_the_log(tmp_path, how):
  run(tmp_path, steps=4)  # checkpoints at 2 and 4, a record per step
  damage(tmp_path / "checkpoints" / "4", how)
  warnings = []
  state, ckpt, log = runs.resume(tmp_path, fresh(), warn=warnings.append)
  ckpt.close()
  assert int(state.step) == 2 and float(state.x) == 4
  assert len(warnings) == 1 and "4.corrupt" in warnings[0]
  assert [r["step"] for r in log.records] == [1, 2]
  damage(tmp_path / "checkpoints" / "2", how)
  with pytest.raises(CheckpointError, match="no checkpoint"):
    runs.resume(tmp_path, fresh(), warn=warnings.append)


@pytest.mark.parametrize("losses, diverged_at", [
    ([2.0, 3.0, float("nan")], 3),
    ([2.0, 1e3, 2.1e4], 3),  # grown 10^4-fold
    ([0.001, 5.0, 9e3], None),  # a first loss below 1 counts as 1
    ([200.0, 9e5, 1.5e6], 3),  # past the 10^6 ceiling
    ([5e6], 1),
])
def test_the_divergence_rule(tmp_path, losses, diverged_at):
  def step_fn(state):
    return dataclasses.replace(state, step=state.step + 1), {"loss": losses[int(state.step)]}

  divergence = runs.Divergence(advice="lower --lr")
  if diverged_at is None:
    run(tmp_path, steps=len(losses), step_fn=step_fn, divergence=divergence)
    return
  with pytest.raises(runs.DivergenceError, match=f"at step {diverged_at} .*lower --lr"):
    run(tmp_path, steps=len(losses), step_fn=step_fn, divergence=divergence)
  assert [r["step"] for r in records(tmp_path)] == list(range(1, diverged_at))


def test_a_resumed_run_measures_growth_from_the_runs_first_record(tmp_path):
  losses = [2.0, 3.0, 3e4]

  def step_fn(state):
    return dataclasses.replace(state, step=state.step + 1), {"loss": losses[int(state.step)]}

  run(tmp_path, steps=2, step_fn=step_fn)
  with pytest.raises(runs.DivergenceError, match="from 2 at step 1"):
    run(tmp_path, steps=3, step_fn=step_fn)


def test_a_stop_signal_checkpoints_then_the_rerun_resumes(tmp_path):
  def step_fn(state):
    if int(state.step) == 2:
      os.kill(os.getpid(), signal.SIGTERM)  # honoured once this step is done
    return double(state)

  with pytest.raises(runs.Interrupted, match="checkpoint saved at step 3"):
    run(tmp_path, step_fn=step_fn, checkpoint_every=100)
  state, _ = run(tmp_path)
  assert float(state.x) == 64 and [r["step"] for r in records(tmp_path)] == list(range(1, 7))
  with pytest.raises(SystemExit) as e:
    with runs.cli_errors():
      raise runs.Interrupted("interrupted: checkpoint saved")
  assert e.value.code == 130


def test_check_workdir(tmp_path):
  config = ToyConfig()
  runs.check_workdir(tmp_path / "run", config, extendable=("steps",))
  assert json.loads((tmp_path / "run" / "config.json").read_text()) == {"steps": 6, "lr": 0.1}
  (tmp_path / "file").write_text("x")
  with pytest.raises(runs.WorkdirError, match="is a file"):
    runs.check_workdir(tmp_path / "file", config)
  with pytest.raises(runs.WorkdirError, match="cannot be written"):  # its parent is a file
    runs.check_workdir(tmp_path / "file" / "run", config)

  # nothing but config.json and setup files: another config replaces it
  (tmp_path / "run" / "histogram.txt").write_text("setup")
  (tmp_path / "run" / "metrics.jsonl").write_text("")
  other = ToyConfig(lr=0.2)
  runs.check_workdir(tmp_path / "run", other, setup_files=("histogram.txt",))
  assert json.loads((tmp_path / "run" / "config.json").read_text())["lr"] == 0.2
  # a run that logged a record: only the extendable fields may change
  (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
  runs.check_workdir(tmp_path / "run", ToyConfig(lr=0.2, steps=9), extendable=("steps",))
  with pytest.raises(runs.WorkdirError, match=r"different config \(lr differ\)"):
    runs.check_workdir(tmp_path / "run", config, extendable=("steps",))
  runs.check_workdir(tmp_path / "run", config, overwrite=True)


def test_progress_lines_off_a_terminal_count_only_this_process(monkeypatch):
  clock = itertools.chain([0.0, 10.0, 20.0, 30.0], itertools.repeat(30.0))
  monkeypatch.setattr(runs, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
  out = io.StringIO()  # not a terminal
  bar = runs.Progress(115, initial=100, unit="steps", every_seconds=15, stream=out)
  for _ in range(3):  # at t = 10, 20, 30 s: a line once 15 s have passed, and at the end
    bar.update(5, {"loss": 0.5})
  bar.close()
  first, last = out.getvalue().splitlines()
  # a resumed run: 10 steps in this process in 20 s are 0.5 steps/s (not 110 / 20)
  assert first.startswith("steps 110/115") and "0.5 steps/s" in first and "eta 0:00:10" in first
  assert last.startswith("steps 115/115 (100%)") and "eta 0:00:00" in last
  silent = io.StringIO()
  runs.Progress(3, enabled=False, stream=silent).update(3)
  assert silent.getvalue() == ""


def test_flags():
  parser = argparse.ArgumentParser()
  runs.add_flags(parser, workdir="runs/x", distributed=True)
  ns = parser.parse_args([])
  assert (ns.workdir, ns.overwrite, ns.progress, ns.distributed) == ("runs/x", False, True, False)
  ns = parser.parse_args(["--overwrite", "--progress", "false", "--num_processes", "2"])
  assert ns.overwrite is True and ns.progress is False and ns.num_processes == 2
