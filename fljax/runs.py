"""Run infrastructure of every trainer: the workdir, resume, the step loop and its faults.

The federated trainer (`fljax.train`), centralized DP-SGD (`privacy.centralized`) and the
prior trainers (`diffusion.training`, `inversion.gan`) run the same way, as the flax
examples' `train_and_evaluate(config, workdir)`:

    check_workdir(workdir, config, extendable=("steps",))   # config.json, or a WorkdirError
    state, ckpt, log = resume(workdir, state, say=say)      # newest valid checkpoint
    state, record = run_steps(state, step_fn, steps=..., ckpt=ckpt, log=log, ...)

A workdir holds `config.json`, `metrics.jsonl` (one JSON record per logged step, keyed by
the state's step counter) and `checkpoints/` (orbax, `fljax.checkpoint`). Rerunning the
same command resumes from the newest readable checkpoint; an unreadable newest one is set
aside with one warning and the previous one is used.

Faults end in typed errors whose message is one sentence that says what to do:
`WorkdirError` (the workdir is a file, unwritable, or holds another run),
`DivergenceError` (see `Divergence` for the rule), `fljax.checkpoint.CheckpointError` (no
checkpoint can be read) and `Interrupted` (Ctrl-C or SIGTERM: the loop finished its step
and saved a checkpoint first).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import jax
import numpy as np

from fljax import config as config_lib
from fljax.checkpoint import CheckpointError, Checkpointer

PROGRESS_SECONDS = 30.0  # a plain progress line this often when stderr is not a terminal


class WorkdirError(ValueError):
  """A workdir that cannot hold this run (the message names the path and what to do)."""


class DivergenceError(RuntimeError):
  """A run whose loss is non-finite or has grown by orders of magnitude (see `Divergence`)."""


class Interrupted(KeyboardInterrupt):
  """Ctrl-C or SIGTERM stopped the run after its checkpoint was saved (the message says
  where). A KeyboardInterrupt, so that callers which do not know it stop as on Ctrl-C."""


# ----------------------------------------------------------------------------- workdir


def stamp(folder: str | os.PathLike, names: tuple[str, ...]) -> tuple[tuple[str, int, int], ...]:
  """Each file's (name, mtime in ns, size) in `folder`: a key under which what was read from
  them may be cached (a rewritten file changes it)."""
  out = []
  for name in names:
    st = (Path(folder) / name).stat()
    out.append((name, st.st_mtime_ns, st.st_size))
  return tuple(out)


def _has_content(path: Path) -> bool:
  """A non-empty file, or a folder with one somewhere inside it."""
  if path.is_file():
    return path.stat().st_size > 0
  return path.is_dir() and any(p.is_file() and p.stat().st_size > 0 for p in path.rglob("*"))


def check_workdir(workdir: str | os.PathLike, config: Any, overwrite: bool = False, *,
                  extendable: tuple[str, ...] = (),
                  setup_files: tuple[str, ...] = ()) -> None:
  """Makes `workdir` and writes the run's `config.json` there.

  A workdir that already holds a run with another config is refused, unless the two
  differ only in the `extendable` fields (a longer run resumes the shorter one) or
  `overwrite` is set (the old checkpoints are deleted). A workdir counts as holding a run
  once it has anything but `config.json` and the `setup_files` (what a run writes before
  its first step; empty files and folders do not count either): a run that failed before
  its first step, e.g. on a typo, leaves its workdir to the corrected command.

  Raises:
    WorkdirError: `workdir` is a file, cannot be written, or holds another run's config.
  """
  workdir = Path(workdir)
  path = workdir / "config.json"
  if workdir.exists() and not workdir.is_dir():
    raise WorkdirError(f"--workdir {workdir} is a file, not a folder; pass a folder path")
  current = config_lib.to_dict(config)
  if path.is_file() and not overwrite:
    try:
      saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
      raise WorkdirError(f"{path} cannot be read ({e}); pass --overwrite to start afresh "
                         f"in {workdir}") from None
    differ = sorted(k for k in set(saved) | set(current)
                    if k not in extendable and saved.get(k) != current.get(k))
    used = any(_has_content(p) for p in workdir.iterdir()
               if p.name not in ("config.json", *setup_files))
    if differ and used:
      raise WorkdirError(f"{workdir} holds a run with a different config ({', '.join(differ)} "
                         f"differ); choose a new --workdir, or pass --overwrite to start afresh")
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:  # with jax.distributed, the first process writes the files
      if overwrite and (workdir / "checkpoints").exists():
        shutil.rmtree(workdir / "checkpoints")
      path.write_text(json.dumps(current, indent=2) + "\n")
  except OSError as e:
    raise WorkdirError(f"--workdir {workdir} cannot be written ({e.strerror or e}); pass a "
                       f"folder you can write to") from None


def _to_bool(text: str) -> bool:
  try:
    return config_lib.parse_value(bool, text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def add_flags(parser: argparse.ArgumentParser, *, workdir: str | None,
              distributed: bool = False) -> None:
  """The flags of a training entry point: --workdir (default `workdir`; None makes it
  required), --overwrite and --progress (booleans; a bare flag means true), and with
  `distributed` --distributed, --coordinator, --num_processes, --process_id."""
  def switch(name: str, default: bool, text: str) -> None:
    parser.add_argument(name, type=_to_bool, nargs="?", const=True, default=default,
                        metavar="BOOL", help=f"{text} (default: {str(default).lower()})")

  parser.add_argument("--workdir", default=workdir, required=workdir is None,
                      help="output folder: config.json, metrics.jsonl, checkpoints/ ..."
                           + (f" (default: {workdir})" if workdir else ""))
  switch("--overwrite", False, "discard the run in --workdir and start afresh")
  switch("--progress", True, "progress on stderr: a bar on a terminal, else a line every "
                             f"{PROGRESS_SECONDS:.0f} s; false: none")
  if not distributed:
    return
  switch("--distributed", False, "call jax.distributed.initialize() first: one process per "
                                 "host, all running the same command; with --devices 0 the "
                                 "client axis spans every process's devices and the first "
                                 "process writes the files")
  parser.add_argument("--coordinator", default=None,
                      help="with --distributed: host:port of process 0 (default: from the "
                           "cluster environment, e.g. SLURM)")
  parser.add_argument("--num_processes", type=int, default=None,
                      help="with --distributed: number of processes")
  parser.add_argument("--process_id", type=int, default=None,
                      help="with --distributed: this process's rank")


@contextlib.contextmanager
def cli_errors(*errors: type[BaseException]):
  """For entry points (`main()`) only: a run's faults (WorkdirError, DivergenceError,
  CheckpointError, ValueError, and `errors`) end the program with one `error: ...` line
  on stderr and status 1; Ctrl-C / SIGTERM with status 130 and where the checkpoint is."""
  try:
    yield
  except Interrupted as e:
    print(f"\n{e}", file=sys.stderr)
    raise SystemExit(130) from None
  except KeyboardInterrupt:
    print("\ninterrupted: the steps since the last checkpoint are lost; rerun the same "
          "command to resume", file=sys.stderr)
    raise SystemExit(130) from None
  except (ValueError, DivergenceError, CheckpointError, *errors) as e:
    raise SystemExit(f"error: {e}") from None


def warn(message: str) -> None:
  """A warning line on stderr (clear of a progress bar)."""
  from tqdm import tqdm
  tqdm.write(message, file=sys.stderr)


# ----------------------------------------------------------------------------- metrics


class MetricsLog:
  """metrics.jsonl, truncated to the resumed step so that no step appears twice.

  Records are keyed by `key` (the state's step counter, e.g. 'round' or 'step').
  """

  def __init__(self, path: Path, resume_step: int, *, write: bool = True, key: str = "round"):
    self.path, self.write = path, write
    records = []
    if path.exists() and resume_step > 0:
      records = [r for r in map(json.loads, path.read_text().splitlines())
                 if r[key] <= resume_step]
    if write:
      path.write_text("".join(json.dumps(r) + "\n" for r in records))
    self.records = records

  def append(self, record: dict[str, Any]) -> None:
    self.records.append(record)
    if not self.write:
      return
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")


def resume(workdir: str | os.PathLike, state: Any, *, counter: str = "step",
           warn: Callable[[str], Any] = warn, write: bool = True
           ) -> tuple[Any, Checkpointer, MetricsLog]:
  """Restores `state` (a dataclass whose `counter` field counts its steps) from the newest
  valid checkpoint in `workdir/checkpoints`, and opens metrics.jsonl truncated to it.

  An unreadable checkpoint (truncated, corrupted) is moved aside to `<step>.corrupt` with
  one line through `warn`, and the one before it is used.

  Returns:
    The state (as given when there is no checkpoint), the checkpointer (closed by
    `run_steps`), and the metrics log (`write=False`: kept in memory only).

  Raises:
    CheckpointError: there are checkpoints and none of them can be read.
  """
  workdir = Path(workdir)
  ckpt = Checkpointer(workdir / "checkpoints", step_field=counter)
  if ckpt.latest_round() is not None:
    restored = ckpt.restore_newest_valid(state, warn=warn)
    if restored is None:
      ckpt.close()
      raise CheckpointError(f"no checkpoint in {ckpt.directory} can be read (each was moved "
                            f"aside to <step>.corrupt); rerun the command to start again "
                            f"from step 0")
    state = restored
  log = MetricsLog(workdir / "metrics.jsonl", int(getattr(state, counter)), write=write,
                   key=counter)
  return state, ckpt, log


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass(frozen=True, kw_only=True)
class Divergence:
  """When a run counts as diverged, checked on every metrics record.

  A watched metric diverged when it is not finite, or when its magnitude passes
  min(`ceiling`, `growth` x max(|first|, 1)), `first` being its value in the run's first
  record: it has grown 10^4-fold (values below 1 count as 1), or passed 10^6. No loss of
  the trainers here comes near either while training works (cross-entropy starts near
  ln(classes), the DDPM loss near 1, the GAN losses near 1).

  Attributes:
    keys: the watched metrics (the trainer's losses).
    advice: what to change, for the error's message (e.g. "lower --fed.local_lr").
    growth: the growth over the first record that counts as divergence.
    ceiling: the magnitude that counts as divergence whatever the first record.
  """

  keys: tuple[str, ...] = ("loss",)
  advice: str = "lower the learning rate"
  growth: float = 1e4
  ceiling: float = 1e6

  def check(self, record: dict[str, Any], first: dict[str, Any], counter: str) -> None:
    """Raises DivergenceError if a watched metric of `record` diverged (`first`: the run's
    first record, keyed by `counter` as `record` is)."""
    for key in self.keys:
      value, start = record[key], first[key]
      if math.isfinite(value) and abs(value) <= min(self.ceiling,
                                                    self.growth * max(abs(start), 1.0)):
        continue
      since = f", from {start:.4g} at {counter} {first[counter]}" if first is not record else ""
      raise DivergenceError(
          f"training diverged at {counter} {record[counter]} ({key} {value:.4g}{since}): "
          f"{self.advice}, then rerun with --overwrite or a new --workdir")


class Progress:
  """A loop's progress on `stream` (stderr): a tqdm bar on a terminal; otherwise a plain
  line every `every_seconds` (steps done / total, rate, eta), so that output sent to a
  file is not silent; nothing when disabled.

  The rate counts only the steps done in this process over its wall time: a resumed run
  reports its true throughput.
  """

  def __init__(self, total: int, *, initial: int = 0, unit: str = "steps", enabled: bool = True,
               every_seconds: float = PROGRESS_SECONDS, stream: TextIO | None = None):
    self.total, self.initial, self.done, self.unit = total, initial, initial, unit
    self.stream = stream or sys.stderr
    self.every, self.postfix = every_seconds, ""
    self.t0 = self.last = time.perf_counter()
    self.bar = self.lines = None
    if enabled and self.stream.isatty():
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=initial, unit=unit.rstrip("s"), desc=unit,
                      file=self.stream, dynamic_ncols=True, leave=False)
    elif enabled:
      self.lines = True

  def update(self, n: int = 1, postfix: dict[str, float] | None = None) -> None:
    self.done += n
    if postfix:
      self.postfix = "  ".join(f"{k} {v:.4g}" for k, v in postfix.items())
    if self.bar is not None:
      self.bar.update(n)
      if postfix:
        self.bar.set_postfix_str(self.postfix, refresh=False)
      return
    now = time.perf_counter()
    if self.lines and (now - self.last >= self.every or self.done == self.total):
      self.last = now
      print(self.line(now), file=self.stream, flush=True)

  def line(self, now: float | None = None) -> str:
    """`rounds 40/100 (40%)  2.1 rounds/s  eta 0:00:29  train_loss 0.31`."""
    elapsed = (time.perf_counter() if now is None else now) - self.t0
    rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
    eta = "?" if rate <= 0 else _clock((self.total - self.done) / rate)
    percent = 100 * self.done / max(self.total, 1)
    return (f"{self.unit} {self.done}/{self.total} ({percent:.0f}%)  {rate:.3g} {self.unit}/s  "
            f"eta {eta}" + (f"  {self.postfix}" if self.postfix else ""))

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def _clock(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _StopRequests:
  """Turns Ctrl-C and SIGTERM into a request that the loop honours between steps.

  The first signal lets the current step finish; the loop then checkpoints and raises
  `Interrupted`. A second one interrupts at once (KeyboardInterrupt, losing the steps
  since the last checkpoint). Handlers are installed only in the main thread.
  """

  requested = False

  def _handle(self, signum, frame):
    if self.requested:
      raise KeyboardInterrupt
    self.requested = True

  def __enter__(self):
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False


def run_steps(state: Any, step_fn: Callable[[Any], tuple[Any, dict[str, Any]]], *, steps: int,
              ckpt: Checkpointer, log: MetricsLog, checkpoint_every: int, log_every: int = 1,
              on_log: Callable[[Any, dict[str, Any]], dict[str, Any] | None] | None = None,
              export: Callable[[Any], None] | None = None, export_every: int = 0,
              divergence: Divergence = Divergence(), progress: bool = True
              ) -> tuple[Any, dict[str, Any]]:
  """Runs `state, metrics = step_fn(state)` until the state's step counter (the
  checkpointer's `step_field`) reaches `steps`.

  Every `log_every` steps and at the end, the means of the step metrics since the last
  record become a record `{counter: step, **means}`; `divergence` checks it (raising
  DivergenceError, with the last checkpoint kept), `on_log(state, record)` may add fields
  (an evaluation, epsilon), the wall time `seconds_per_<counter>` is added and the record
  goes to `log`. The state is checkpointed every `checkpoint_every` steps and at the end;
  `export(state)` runs every `export_every` steps (0: never) and at the end. Ctrl-C or
  SIGTERM finish the step, checkpoint and raise `Interrupted`. The checkpointer is closed
  on every exit.

  Returns:
    The final state and the last record (the log's last one when there was nothing to do).
  """
  counter = ckpt.step_field
  step = start = int(getattr(state, counter))
  first = log.records[0] if log.records else None
  record = log.records[-1] if log.records else {}
  bar = Progress(steps, initial=min(start, steps), unit=counter + "s", enabled=progress)
  window, t0 = [], time.perf_counter()
  try:
    with _StopRequests() as stop:
      while step < steps and not stop.requested:
        state, metrics = step_fn(state)
        window.append(metrics)
        step += 1
        if step % log_every == 0 or step == steps:
          host = jax.device_get(window)
          record = {counter: step, **{k: float(np.mean([m[k] for m in host])) for k in host[0]}}
          first = first or record
          divergence.check(record, first, counter)
          if on_log is not None:
            record.update(on_log(state, record) or {})
          record[f"seconds_per_{counter}"] = (time.perf_counter() - t0) / len(window)
          log.append(record)
          window, t0 = [], time.perf_counter()
        if step % checkpoint_every == 0 or step == steps:
          ckpt.save(state)
        if export is not None and ((export_every and step % export_every == 0) or step == steps):
          export(state)
        bar.update(1, {k: record[k] for k in divergence.keys if k in record})
      if step < steps:
        ckpt.save(state)
        raise Interrupted(f"interrupted: checkpoint saved at {counter} {step} in "
                          f"{ckpt.directory}; rerun the same command to resume")
  finally:
    bar.close()
    ckpt.close()
  return state, record
