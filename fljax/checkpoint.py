"""Checkpoints of a run's `ServerState` with orbax-checkpoint, resumable bit for bit.

Typed PRNG keys are stored as their raw key data and re-wrapped on restore. Saves are
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


def _to_tree(state: ServerState) -> dict[str, Any]:
  return {"params": state.params, "opt_state": state.opt_state, "round": state.round,
          "key_data": jax.random.key_data(state.key)}


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
    key = jax.random.wrap_key_data(tree["key_data"], impl=jax.random.key_impl(template.key))
    return dataclasses.replace(template, params=tree["params"], opt_state=tree["opt_state"],
                               round=tree["round"], key=key)

  def close(self) -> None:
    self._manager.close()
