"""Checkpoints of a run's `ServerState` with orbax-checkpoint, resumable bit for bit.

Typed PRNG keys (the run's key, and any inside optimizer or aggregator states) are stored
as their raw key data and re-wrapped on restore. Saves are
synchronous and atomic (orbax writes to a temporary folder and renames it), so a run
killed at any moment keeps its last complete checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from fljax.federated import ServerState


def _is_key(x: Any) -> bool:
  return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def _to_tree(state: ServerState) -> dict[str, Any]:
  """The state's fields as a dict, every typed key (anywhere in it) as its key data."""
  return {f.name: jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x,
                               getattr(state, f.name))
          for f in dataclasses.fields(state)}


@contextlib.contextmanager
def _orbax_quiet():
  """Silences orbax's (absl) log lines for a while: the callers report damage themselves."""
  absl = logging.getLogger("absl")
  level = absl.level
  absl.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    absl.setLevel(level)


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be read (the message names it and says what to do)."""


class Checkpointer:
  """Saves and restores states (frozen dataclasses of arrays) in `directory`, keeping the
  newest `max_to_keep`; a state is saved under its `step_field` (a `ServerState`'s round)."""

  def __init__(self, directory: str | Path, *, max_to_keep: int = 2, step_field: str = "round"):
    self.directory = Path(directory).absolute()
    self.step_field = step_field
    self._options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=False)
    with _orbax_quiet():  # its complaints about damaged checkpoints: see restore_newest_valid
      self._manager = ocp.CheckpointManager(self.directory, options=self._options)

  def latest_round(self) -> int | None:
    """The round of the newest checkpoint, or None when there is none."""
    return self._manager.latest_step()

  def save(self, state: Any, *, force: bool = False) -> None:
    """Saves `state` under its round number (no-op if that round is already saved)."""
    step = int(getattr(state, self.step_field))
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.StandardSave(_to_tree(state)), force=force)
    self._manager.wait_until_finished()

  def restore(self, template: Any, round_: int | None = None) -> Any:
    """Restores round `round_` (newest by default) into the structure of `template`.

    Raises:
      FileNotFoundError: there is no checkpoint.
      CheckpointError: the checkpoint is unreadable (truncated, corrupted, or written by
        a run with other shapes); the message names its folder.
    """
    step = self.latest_round() if round_ is None else round_
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_tree(template))
    try:
      tree = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # orbax raises many types (ValueError, KeyError, OSError, ...)
      first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
      raise CheckpointError(f"checkpoint {self.directory / str(step)} cannot be read ({first}); "
                            "it is corrupted or was written by a different configuration") from e
    fields = {}
    for f in dataclasses.fields(template):
      fields[f.name] = jax.tree.map(
          lambda t, x: jax.random.wrap_key_data(x, impl=jax.random.key_impl(t)) if _is_key(t) else x,
          getattr(template, f.name), tree[f.name])
    return dataclasses.replace(template, **fields)

  def restore_newest_valid(self, template: Any, *, warn: Callable[[str], Any] = print) -> Any | None:
    """The newest readable checkpoint restored into `template`, or None when none is.

    An unreadable one is moved aside to `<step>.corrupt` (kept for inspection), with one
    warning line (orbax's own log lines about it are silenced), and the previous one is
    tried: a run killed or damaged mid-save resumes from its last good checkpoint.
    """
    with _orbax_quiet():
      for step in sorted(self._manager.all_steps(), reverse=True):
        try:
          return self.restore(template, step)
        except CheckpointError as e:
          warn(f"warning: {e}; moved it to {step}.corrupt and trying the previous checkpoint")
          shutil.move(str(self.directory / str(step)), str(self.directory / f"{step}.corrupt"))
          # a fresh manager: a failed restore can leave the old one unable to read the rest
          self._manager.close()
          self._manager = ocp.CheckpointManager(self.directory, options=self._options)
    return None

  def close(self) -> None:
    self._manager.close()
