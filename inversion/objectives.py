"""Gradient-matching objectives (Zhu et al. 2019; Geiping et al. 2020) and image priors.

Each objective compares the gradient a candidate input produces with the observed one,
both pytrees shaped like the model's parameters: `objective(candidate, observed) -> scalar`.

  l2            sum of squared differences over all leaves (DLG)
  cosine        1 - <a, b> / (|a| |b|) over the whole pytree (Inverting Gradients)
  layer_cosine  the mean over leaves of each leaf's cosine distance

`total_variation(x)` is the anisotropic TV prior of Inverting Gradients (mean absolute
difference of neighbouring pixels) on NHWC images.

`matching(kind, noise_std=, adapt=)` builds the generative attacks' matching loss: one of
the above, or 'l2_noise_aware' (the squared residual over 2 sigma^2, the Gaussian
negative log-likelihood of the observation under declared noise of std sigma), with the
attacker's own trial gradient passed first through the declared defense (GGL's adaptive
mode, the defense's parameters read off the observation): 'prune' zeroes the trial
gradient wherever the observed one is exactly zero; 'clip' rescales it to at most the
observed norm.
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
MATCHING = tuple(OBJECTIVES) + ("l2_noise_aware",)
ADAPTATIONS = ("none", "prune", "clip")


def _norm(tree: Any) -> jax.Array:
  return jnp.sqrt(_dot(tree, tree))


def adapt(candidate: Any, observed: Any, mode: str, clip_norm: float | None = None) -> Any:
  """The attacker's trial gradient after the defense it knows was applied (see above);
  'clip' clips to `clip_norm` when the defense declares it, else to the observed norm."""
  if mode == "prune":
    return jax.tree.map(lambda c, o: jnp.where(o == 0, 0.0, c), candidate, observed)
  if mode == "clip":
    bound = _norm(observed) if clip_norm is None else clip_norm
    factor = jnp.minimum(1.0, bound / jnp.maximum(_norm(candidate), 1e-12))
    return jax.tree.map(lambda c: c * factor, candidate)
  return candidate


def matching(kind: str, *, noise_std: float = 0.0, adapt_to: str = "none",
             clip_norm: float | None = None) -> Objective:
  """The matching loss `loss(candidate, observed)` named `kind` (module docstring)."""
  if kind not in MATCHING:
    raise ValueError(f"matching loss must be one of {MATCHING}, got {kind!r}")
  if adapt_to not in ADAPTATIONS:
    raise ValueError(f"adaptive mode must be one of {ADAPTATIONS}, got {adapt_to!r}")
  if kind == "l2_noise_aware":
    if noise_std <= 0:
      raise ValueError("the noise-aware L2 loss needs the declared noise std (> 0)")
    base = lambda a, b: l2(a, b) / (2.0 * noise_std ** 2)  # noqa: E731
  else:
    base = OBJECTIVES[kind]
  return lambda candidate, observed: base(adapt(candidate, observed, adapt_to, clip_norm),
                                         observed)
