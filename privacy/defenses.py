"""Baseline non-DP defenses on updates: top-k pruning and additive Gaussian noise (Zhu et
al. 2019), and quantization.

All are `defense(update, key, round) -> update` hooks for `fljax.federated.make_round_step`.
Neither has a DP guarantee (no sensitivity bound, no noise calibrated to one): their
epsilon is infinity, and what they buy against gradient inversion is measured
empirically, as the DLG paper did for pruning.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fljax.federated import DefenseFn
from privacy.noise import tree_gaussian


def _flatten(update: Any) -> tuple[jax.Array, Any]:
  leaves, treedef = jax.tree.flatten(update)
  flat = jnp.concatenate([jnp.ravel(x) for x in leaves])

  def unflatten(v: jax.Array) -> Any:
    out, start = [], 0
    for x in leaves:
      out.append(v[start:start + x.size].reshape(x.shape).astype(x.dtype))
      start += x.size
    return jax.tree.unflatten(treedef, out)

  return flat, unflatten


def topk_prune(fraction: float, *, per_layer: bool = False) -> DefenseFn:
  """Zeroes the `fraction` of entries with the smallest magnitude (DLG's pruning defense).

  Keeps the k = ceil((1 - fraction) * P) largest |u_j| over the whole update (or in each
  tensor with `per_layer`). Not DP (epsilon = inf).
  """
  if not 0 <= fraction < 1:
    raise ValueError(f"prune fraction must be in [0, 1), got {fraction}")

  def prune_vector(v: jax.Array) -> jax.Array:
    k = max(1, int(round((1.0 - fraction) * v.size)))
    threshold = jax.lax.top_k(jnp.abs(v), k)[0][-1]
    return jnp.where(jnp.abs(v) >= threshold, v, 0.0)

  def defense(update, key, round_=0):
    del key, round_
    if per_layer:
      return jax.tree.map(lambda u: prune_vector(u.ravel()).reshape(u.shape), update)
    flat, unflatten = _flatten(update)
    return unflatten(prune_vector(flat))

  return defense


def gaussian_noise(std: float) -> DefenseFn:
  """Adds N(0, std^2) to every entry of the update, without clipping (DLG's noise defense).

  Not DP (epsilon = inf): with no bound on the update's norm the sensitivity is unbounded,
  so no noise level gives a guarantee; `privacy.federated.local_dp` is the clipped, DP
  version.
  """
  if not std >= 0:
    raise ValueError(f"noise std must be >= 0, got {std}")

  def defense(update, key, round_=0):
    del round_
    return jax.tree.map(jnp.add, update, tree_gaussian(update, std, key=key))

  return defense


def quantize(mode: str) -> DefenseFn:
  """Update quantization: 'fp16' (round to half precision) or 'int8' (stochastic rounding).

  'int8': each tensor is scaled by s = max|u| / 127 and u/s rounded stochastically to an
  integer in [-127, 127] (unbiased: E[round(x)] = x), then sent as s * integer. Not DP
  (epsilon = inf); the rounding noise is bounded and data-dependent.
  """
  if mode not in QUANTIZERS:
    raise ValueError(f"quantize mode must be one of {sorted(QUANTIZERS)}, got {mode!r}")
  return QUANTIZERS[mode]


def _fp16(update, key, round_=0):
  del key, round_
  return jax.tree.map(lambda u: u.astype(jnp.float16).astype(u.dtype), update)


def _int8(update, key, round_=0):
  del round_
  leaves, treedef = jax.tree.flatten(update)
  keys = jax.random.split(key, len(leaves))

  def one(u, k):
    scale = jnp.max(jnp.abs(u)) / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)
    x = u / safe
    low = jnp.floor(x)
    q = low + (jax.random.uniform(k, u.shape) < (x - low))
    return (jnp.clip(q, -127, 127) * scale).astype(u.dtype)

  return jax.tree.unflatten(treedef, [one(u, k) for u, k in zip(leaves, keys)])


QUANTIZERS: dict[str, DefenseFn] = {"fp16": _fp16, "int8": _int8}
