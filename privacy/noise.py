"""Gaussian noise mechanisms as optax transformations (jax-privacy's privatizers are the model).

The DP-SGD update is `(sum_i clip_C(g_i) + N(0, sigma^2 C^2 I)) / B_expected`: the noise is
added to the *sum* of clipped gradients and only then divided by the expected batch size
(a fixed public number, never the realised one, which depends on the data). Adding noise
after averaging, or dividing by the realised batch size, breaks the guarantee (both are
known pitfalls in jax-privacy's and Opacus's issue trackers).

  optax.chain(gaussian_privatizer(clip_norm=C, noise_multiplier=sigma,
                                  expected_batch_size=B, key=key),
              optax.sgd(lr))

turns a clipped *sum* (from `privacy.clipping.clipped_grad_sum`) into the private step, and

  optax.chain(clip_per_example(C), gaussian_privatizer(...), optax.sgd(lr))

does the same from per-example gradients `[B, ...]`.

Guarantee. With inputs of sensitivity C (each example's clipped gradient has norm <= C;
add/remove-one neighbours), one application is the Gaussian mechanism with noise
multiplier sigma; with Poisson sampling at rate q it is `PoissonSampledDpEvent(q,
GaussianDpEvent(sigma))` per step (see `privacy.accounting.dpsgd_event`).

Randomness. The transformation's state holds a key and a step count; step t draws its
noise from `fold_in(key, t)`, so no key is ever used twice and a restored state continues
the same stream.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from privacy import accounting
from privacy.clipping import clip_rows


class PrivatizerState(NamedTuple):
  key: jax.Array
  count: jax.Array


def tree_gaussian(tree: Any, stddev: float | jax.Array, *, key: jax.Array) -> Any:
  """Independent N(0, stddev^2) noise shaped like `tree`, one subkey per leaf."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  noise = [stddev * jax.random.normal(k, jnp.shape(x), jnp.result_type(x))
           for k, x in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, noise)


def gaussian_privatizer(*, clip_norm: float, noise_multiplier: float,
                        expected_batch_size: float, key: jax.Array
                        ) -> optax.GradientTransformation:
  """Adds N(0, (noise_multiplier * clip_norm)^2) to a clipped sum, then divides by B.

  What is clipped: the input must be a sum of terms each of L2 norm <= `clip_norm` (one
  per example, or one per client for DP-FedAvg). Sensitivity: `clip_norm` under
  add/remove-one. Event per application: `GaussianDpEvent(noise_multiplier)`, inside
  the sampling event of how the terms were drawn.

  Args:
    clip_norm: C.
    noise_multiplier: sigma (>= 0; 0 is the non-private step, for baselines).
    expected_batch_size: the public denominator (q * n with Poisson sampling).
    key: the noise key; step t uses `fold_in(key, t)`.
  """
  accounting.check_clip_norm(clip_norm)
  if noise_multiplier < 0:
    raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
  if expected_batch_size <= 0:
    raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size}")
  stddev = noise_multiplier * clip_norm

  def init(params):
    del params
    return PrivatizerState(key=key, count=jnp.zeros((), jnp.int32))

  def update(updates, state, params=None):
    del params
    noise = tree_gaussian(updates, stddev, key=jax.random.fold_in(state.key, state.count))
    out = jax.tree.map(lambda u, z: (u + z) / expected_batch_size, updates, noise)
    return out, PrivatizerState(key=state.key, count=state.count + 1)

  return optax.GradientTransformation(init, update)


def clip_per_example(clip_norm: float, *, per_layer: bool = False) -> optax.GradientTransformation:
  """Per-example gradients `[B, ...]` -> the sum of their clipped rows (sensitivity C).

  Rows that are not finite are dropped (see `privacy.clipping.clip_rows`). Stateless.
  """
  accounting.check_clip_norm(clip_norm)

  def update(updates, state, params=None):
    del params
    clipped, _ = clip_rows(updates, clip_norm, per_layer=per_layer)
    return jax.tree.map(lambda g: g.sum(axis=0), clipped), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
