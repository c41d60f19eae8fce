"""Gradient-matching objectives (Zhu et al. 2019; Geiping et al. 2020) and image priors.

Each objective compares the gradient a candidate input produces with the observed one,
both pytrees shaped like the model's parameters: `objective(candidate, observed) -> scalar`.

  l2            sum of squared differences over all leaves (DLG)
  cosine        1 - <a, b> / (|a| |b|) over the whole pytree (Inverting Gradients)
  layer_cosine  the mean over leaves of each leaf's cosine distance

`total_variation(x)` is the anisotropic TV prior of Inverting Gradients (mean absolute
difference of neighbouring pixels) on NHWC images.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Objective = Callable[[Any, Any], jax.Array]


def l2(candidate: Any, observed: Any) -> jax.Array:
  return sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(candidate),
                                                   jax.tree.leaves(observed)))


def _dot(a: Any, b: Any) -> jax.Array:
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def cosine(candidate: Any, observed: Any, eps: float = 1e-12) -> jax.Array:
  num = _dot(candidate, observed)
  den = jnp.sqrt(_dot(candidate, candidate)) * jnp.sqrt(_dot(observed, observed))
  return 1.0 - num / jnp.maximum(den, eps)


def layer_cosine(candidate: Any, observed: Any, eps: float = 1e-12) -> jax.Array:
  dists = [1.0 - jnp.vdot(a, b) / jnp.maximum(jnp.linalg.norm(a) * jnp.linalg.norm(b), eps)
           for a, b in zip(jax.tree.leaves(candidate), jax.tree.leaves(observed))]
  return sum(dists) / len(dists)


def total_variation(x: jax.Array) -> jax.Array:
  """Anisotropic total variation of NHWC images (mean over pixels and the batch)."""
  dh = jnp.abs(x[:, 1:, :, :] - x[:, :-1, :, :]).mean()
  dw = jnp.abs(x[:, :, 1:, :] - x[:, :, :-1, :]).mean()
  return dh + dw


OBJECTIVES: dict[str, Objective] = {"l2": l2, "cosine": cosine, "layer_cosine": layer_cosine}
