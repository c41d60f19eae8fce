"""Per-example gradients and L2 clipping, the sensitivity bound of DP-SGD (Abadi et al. 2016).

`per_example_grads` is `vmap(grad(loss_fn))` over the rows of a `Batch`, optionally in
micro-batches (a `lax.scan` over chunks of `microbatch_size` rows) to bound memory.
`clipped_grad_sum` never materialises more than one chunk of per-example gradients: it
clips inside the chunk and accumulates the sum.

Clipping. Flat: g <- g * min(1, C / ||g||_2) over the whole pytree. Per-layer: each leaf
(or each leaf of a pytree of norms) clipped to its own C_l; a scalar C is split as
C_l = C / sqrt(L) over L leaves, so that the whole gradient still has norm <= C.

Guarantee. Every row's contribution to the sum has L2 norm <= C (flat or per-layer), and a
masked (padding) row contributes exactly 0, so adding or removing one example changes the
sum by at most C: the sensitivity of the sum under add/remove-one neighbours is C (2C
under replace-one). A row whose gradient is not finite (NaN or inf anywhere) is dropped,
i.e. contributes 0 like padding, which keeps that bound, and is counted in `nonfinite`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fljax.partitions import Batch

Params = Any
Grads = Any
LossFn = Callable[[Params, Batch, jax.Array], tuple[jax.Array, dict]]


def _one(batch: Batch, i: jax.Array | int) -> Batch:
  """Row i of a batch as a batch of one."""
  return jax.tree.map(lambda a: a[i][None], batch)


def per_example_grads(loss_fn: LossFn, params: Params, batch: Batch, key: jax.Array
                      ) -> tuple[Grads, jax.Array]:
  """Gradients of each row's loss: leaves `[B, ...]`, and the per-row losses `[B]`.

  Row i is evaluated as a batch of one (its mask kept, so a padding row has loss and
  gradient 0) with key `fold_in(key, i)`.
  """
  n = batch.mask.shape[0]
  value_and_grad = jax.value_and_grad(lambda p, b, k: loss_fn(p, b, k)[0])

  def one(i):
    loss, grads = value_and_grad(params, _one(batch, i), jax.random.fold_in(key, i))
    return grads, loss

  return jax.vmap(one)(jnp.arange(n))


def global_norms(grads: Grads) -> jax.Array:
  """L2 norm of each row over the whole pytree: `[B]`."""
  squares = [jnp.sum(jnp.reshape(g, (g.shape[0], -1)) ** 2, axis=1) for g in jax.tree.leaves(grads)]
  return jnp.sqrt(sum(squares))


def layer_clip_norms(grads_or_params: Any, clip_norm: float | Any) -> Any:
  """Per-leaf clip norms: a scalar C becomes C / sqrt(L) for each of the L leaves."""
  if isinstance(clip_norm, (int, float)):
    leaves = jax.tree.leaves(grads_or_params)
    return jax.tree.map(lambda _: clip_norm / math.sqrt(len(leaves)), grads_or_params)
  return clip_norm


def clip_rows(grads: Grads, clip_norm: float | Any, *, per_layer: bool = False
              ) -> tuple[Grads, dict[str, jax.Array]]:
  """Clips each row `[B, ...]` to `clip_norm`, zeroing rows that are not finite.

  Returns the clipped rows and per-row `norms` (before clipping, over the whole pytree),
  `clipped` (1 where the clip was active) and `finite` (0 for dropped rows).
  """
  norms = global_norms(grads)
  finite = jnp.isfinite(norms)
  if per_layer:
    limits = layer_clip_norms(grads, clip_norm)
    leaf_norms = jax.tree.map(
        lambda g: jnp.sqrt(jnp.sum(jnp.reshape(g, (g.shape[0], -1)) ** 2, axis=1)), grads)
    scales = jax.tree.map(lambda n, c: jnp.minimum(1.0, c / jnp.maximum(n, 1e-30)),
                          leaf_norms, limits)
    active = sum(jax.tree.leaves(jax.tree.map(lambda n, c: n > c, leaf_norms, limits))) > 0
  else:
    scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-30))
    scales = jax.tree.map(lambda _: scale, grads)
    active = norms > clip_norm
  clipped_grads = jax.tree.map(
      lambda g, s: jnp.where(_expand(finite, g), g * _expand(s, g), 0.0).astype(g.dtype),
      grads, scales)
  return clipped_grads, {"norms": norms, "clipped": (active & finite).astype(jnp.float32),
                         "finite": finite.astype(jnp.float32)}


def _expand(v: jax.Array, like: jax.Array) -> jax.Array:
  return jnp.reshape(v, v.shape + (1,) * (like.ndim - 1))


def vmap_chunk_sum(loss_fn: LossFn, params: Params, b: Batch, k: jax.Array, *,
                   clip_norm: float | Any, per_layer: bool = False
                   ) -> tuple[Grads, dict[str, jax.Array]]:
  """One chunk's sum of clipped per-example gradients (`per_example_grads`) and its raw
  metrics (`count`, `nonfinite`, `clipped`, `norm_sum`, `loss_sum`)."""
  grads, losses = per_example_grads(loss_fn, params, b, k)
  clipped, info = clip_rows(grads, clip_norm, per_layer=per_layer)
  valid = b.mask > 0
  total = jax.tree.map(lambda g: jnp.tensordot(valid.astype(g.dtype), g, axes=1), clipped)
  finite_valid = valid & (info["finite"] > 0)
  metrics = {
      "count": valid.sum().astype(jnp.float32),
      "nonfinite": (valid & (info["finite"] == 0)).sum().astype(jnp.float32),
      "clipped": (info["clipped"] * valid).sum(),
      "norm_sum": jnp.where(finite_valid, info["norms"], 0.0).sum(),
      "loss_sum": jnp.where(finite_valid, losses, 0.0).sum(),
  }
  return total, metrics


def clipped_grad_sum(loss_fn: LossFn, params: Params, batch: Batch, key: jax.Array, *,
                     clip_norm: float | Any, per_layer: bool = False,
                     microbatch_size: int = 0, chunk_sum: Callable[..., Any] = vmap_chunk_sum
                     ) -> tuple[Grads, dict[str, jax.Array]]:
  """Sum over the valid rows of their clipped gradients, and the step's metrics.

  Args:
    loss_fn: the one loss contract, `loss_fn(params, batch, key) -> (mean loss, aux)`.
    params: the model parameters.
    batch: a `Batch` whose mask marks the rows to use (padding rows add nothing).
    key: folded with the row index for each row.
    clip_norm: C (a scalar), or per-leaf norms with `per_layer=True`.
    per_layer: clip each leaf separately (see the module docstring).
    microbatch_size: rows per chunk (0: all rows at once). B must be a multiple of it.
    chunk_sum: how one chunk's clipped sum is computed: `vmap_chunk_sum` (per-example
      gradients) or `privacy.ghost.chunk_sum` (ghost norms; same signature and result).

  Returns:
    The clipped sum (shaped like params; sensitivity C, see the module docstring) and
    metrics: `count` (valid rows used), `nonfinite` (valid rows dropped), `clipped`
    (valid rows whose clip was active), `grad_norm` (mean pre-clip norm of finite valid
    rows) and `loss_sum`.
  """
  n = batch.mask.shape[0]
  chunk = microbatch_size or n
  if n % chunk:
    raise ValueError(f"batch size {n} is not a multiple of microbatch_size {chunk}")

  def one_chunk(b: Batch, k: jax.Array):
    return chunk_sum(loss_fn, params, b, k, clip_norm=clip_norm, per_layer=per_layer)

  if chunk == n:
    total, m = one_chunk(batch, key)
  else:
    chunks = jax.tree.map(lambda a: a.reshape((n // chunk, chunk) + a.shape[1:]), batch)
    keys = jax.random.split(key, n // chunk)

    def body(carry, inputs):
      s, acc = one_chunk(*inputs)
      return jax.tree.map(jnp.add, carry, (s, acc)), None

    zeros = jax.eval_shape(one_chunk, jax.tree.map(lambda a: a[0], chunks), keys[0])
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
    (total, m), _ = jax.lax.scan(body, init, (chunks, keys))
  used = jnp.maximum(m["count"] - m["nonfinite"], 1.0)
  metrics = {"count": m["count"], "nonfinite": m["nonfinite"], "clipped": m["clipped"],
             "grad_norm": m["norm_sum"] / used, "loss_sum": m["loss_sum"]}
  return total, metrics


def clip_update(update: Any, clip_norm: float) -> tuple[Any, jax.Array]:
  """One pytree (a client's update) clipped to L2 norm `clip_norm`; non-finite -> zeros.

  Returns the clipped update and its norm before clipping.
  """
  norm = optax.tree.norm(update)
  finite = jnp.isfinite(norm)
  scale = jnp.where(finite, jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-30)), 0.0)
  return jax.tree.map(lambda u: jnp.where(finite, u * scale, 0.0).astype(u.dtype), update), norm
