"""Checkpoints of a run's `ServerState` with orbax-checkpoint, resumable bit for bit.

Typed PRNG keys (the run's key, and any inside optimizer or aggregator states) are stored
as their raw key data and re-wrapped on restore. Saves are
synchronous and atomic (orbax writes to a temporary folder and renames it), so a run
killed at any moment keeps its last complete checkpoint.
"""

from __future__ import annotations

import dataclasses
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


class Checkpointer:
  """Saves and restores `ServerState`s in `directory`, keeping the newest `max_to_keep`."""

  def __init__(self, directory: str | Path, *, max_to_keep: int = 2):
    self.directory = Path(directory).absolute()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=False))

  def latest_round(self) -> int | None:
    """The round of the newest checkpoint, or None when there is none."""
    return self._manager.latest_step()

  def save(self, state: ServerState, *, force: bool = False) -> None:
    """Saves `state` under its round number (no-op if that round is already saved)."""
    step = int(state.round)
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.StandardSave(_to_tree(state)), force=force)
    self._manager.wait_until_finished()

  def restore(self, template: ServerState, round_: int | None = None) -> ServerState:
    """Restores round `round_` (newest by default) into the structure of `template`."""
    step = self.latest_round() if round_ is None else round_
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_tree(template))
    tree = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    fields = {}
    for f in dataclasses.fields(template):
      fields[f.name] = jax.tree.map(
          lambda t, x: jax.random.wrap_key_data(x, impl=jax.random.key_impl(t)) if _is_key(t) else x,
          getattr(template, f.name), tree[f.name])
    return dataclasses.replace(template, **fields)

  def close(self) -> None:
    self._manager.close()
