"""Attacks as `init(key, observation) -> state`, `step(state, observation) -> (state, metrics)`.

  dlg  DLG / iDLG (Zhu et al. 2019; Zhao et al. 2020)
  ig   Inverting Gradients (Geiping et al. 2020)

Many victims, or several restarts of one, are batched at the call site with
`fljax.federated.batch_over(run, 'vmap' | 'map')`; `best` keeps each victim's restart with
the lowest final matching loss (the ground truth is never looked at).
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class Attack(NamedTuple):
  init: Callable[[jax.Array, Any], Any]
  step: Callable[[Any, Any], tuple[Any, dict[str, jax.Array]]]


def best(states: Any, losses: jax.Array) -> Any:
  """From states stacked over restarts `[R, ...]`, the one with the lowest loss (finite first)."""
  losses = jnp.where(jnp.isfinite(losses), losses, jnp.inf)
  i = jnp.argmin(losses)
  return jax.tree.map(lambda s: s[i], states)


def guard(new: Any, old: Any, ok: jax.Array) -> Any:
  """The state after a step: `new` if the step was finite (`ok`), else `old` unchanged;
  either way `diverged` latches once a step fails. States are NamedTuples with `diverged`."""
  kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  return kept._replace(diverged=old.diverged | ~ok)
