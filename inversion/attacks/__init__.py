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


EXPLODED = 1e3  # a reconstruction entry this large (images live in [0, 1]) has diverged


def healthy(loss: jax.Array, x: jax.Array) -> jax.Array:
  """Whether a step may be kept: a finite loss and a finite, not exploding iterate."""
  return jnp.isfinite(loss) & jnp.all(jnp.isfinite(x)) & (jnp.max(jnp.abs(x)) < EXPLODED)


def guard(new: Any, old: Any, ok: jax.Array) -> Any:
  """The state after a step: `new` if the step was finite (`ok`), else `old` unchanged;
  either way `diverged` latches once a step fails. States are NamedTuples with `diverged`."""
  kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  return kept._replace(diverged=old.diverged | ~ok)
