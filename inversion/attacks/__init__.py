"""Attacks as `init(key, observation) -> state`, `step(state, observation) -> (state, metrics)`.

  dlg                DLG / iDLG (Zhu et al. 2019; Zhao et al. 2020)
  ig                 Inverting Gradients (Geiping et al. 2020)
  diffusion_guided   gradient matching as guidance of a diffusion prior's sampler (DPS,
                     Chung et al. 2023; GGDM, Gu et al. 2024), with label and feature
                     conditioning
  gifd               GAN-prior latent and intermediate-feature search (Fang et al. 2023)

Many victims, or several restarts of one, are batched at the call site with
`fljax.federated.batch_over(run, 'vmap' | 'map')`; `best` keeps each victim's restart with
the lowest final matching loss (the ground truth is never looked at).

Every attack state carries `counts` `[3]` (`COUNTERS`): the victim-model evaluations it
has spent, first-order gradients (a matching loss's value) and double-backward gradients
(a matching loss of a gradient, differentiated with respect to the trial input), each
evaluation counted once, and the prior network's forward evaluations (a diffusion UNet
call, twice under classifier-free guidance; a generator run, whole or from one of its
stages on; backpropagating through it is not counted again). The driver reports them and
sizes every attack to the same double-backward budget; phases marked `always` spend
none of it and run after it is spent.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


Step = Callable[[Any, Any], tuple[Any, dict[str, jax.Array]]]


class Phase(NamedTuple):
  """`steps` steps of `step`, one part of an attack in phases.

  `always`: the step spends no double-backward evaluation (it scores the iterate or moves
  to the next stage), so it runs even after the restart's budget is spent: the result of
  the last optimised stage is always scored.
  """

  step: Step
  steps: int
  always: bool = False


class Attack(NamedTuple):
  """`init(key, obs) -> state`, `step(state, obs) -> (state, metrics)`. An attack in
  phases (a sampler, then a refinement; GIFD's stages) also lists its `Phase`s, run in
  order (then `step` is the first phase's)."""

  init: Callable[[jax.Array, Any], Any]
  step: Step
  phases: tuple[Phase, ...] = ()


COUNTERS = ("grad_evals", "double_backward_evals", "prior_nfe")


def counted(counts: jax.Array, *, grad: int | jax.Array = 0,
            double_backward: int | jax.Array = 0, prior: int | jax.Array = 0) -> jax.Array:
  """`counts` `[3]` plus one step's evaluations (in `COUNTERS` order)."""
  return counts + jnp.asarray([grad, double_backward, prior], jnp.int32)


def no_counts() -> jax.Array:
  return jnp.zeros(len(COUNTERS), jnp.int32)


def to_victim(prior_shape: tuple[int, ...], victim_shape: tuple[int, ...]
              ) -> Callable[[jax.Array], jax.Array]:
  """Maps a generative prior's images (in [-1, 1], `prior_shape` (H, W, C)) to the victim
  model's inputs (in [0, 1], `victim_shape`): grayscale replicated to RGB, RGB averaged to
  grayscale. The sizes must agree (raises a ValueError saying what to change)."""
  (ph, pw, pc), (vh, vw, vc) = tuple(prior_shape), tuple(victim_shape)
  if (ph, pw) != (vh, vw):
    raise ValueError(f"the prior makes {ph}x{pw} images but the victim model takes {vh}x{vw}; "
                     f"attack {ph}x{pw} victims (--data.image_size {ph}) or train a prior "
                     f"of the victims' size")
  if pc == vc:
    channels = lambda x: x  # noqa: E731
  elif pc == 1:
    channels = lambda x: jnp.repeat(x, vc, axis=-1)  # noqa: E731
  elif vc == 1:
    channels = lambda x: jnp.mean(x, axis=-1, keepdims=True)  # noqa: E731
  else:
    raise ValueError(f"cannot map a {pc}-channel prior onto {vc}-channel victims")
  return lambda x: channels((x + 1.0) / 2.0)


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
