"""Server-side denoisers of a noised client update, for adaptive gradient-inversion attacks.

A client's update u (a pytree shaped like the model's parameters) is clipped to L2 norm C
and released as y = clip(u) + sigma xi, xi ~ N(0, I), sigma = z C. The attacker knows
sigma and can compute clean "surrogate" updates on public data at the same model
(stacked pytrees with a leading axis [K, ...]). Everything here is post-processing of y,
so it costs the client no privacy; it only tightens how much the attacker extracts from it.

  surrogate_stats  per-coordinate mean and variance of the surrogate updates
  wiener           per-coordinate Wiener (MMSE) shrinkage under N(mean, var)
  svd_shrink       truncated SVD of each dense kernel (a batch gradient has rank <= B)
  pca_fit          principal subspace of the surrogate updates
  pca_denoise      linear MMSE denoiser on that subspace (linear analogue of Mjolnir's
                   diffusion denoiser, arXiv 2407.05285)
  combine_rounds   inverse-variance average of repeated observations of one update

The attackers they serve:
  A2  Wiener + SVD shrinkage with surrogate statistics (`wiener`, `svd_shrink`);
  A3  multi-round joint observation (`combine_rounds`, then any denoiser at `joint_std`);
  A4  learned denoiser: PCA MMSE on surrogate updates (`pca_fit`, `pca_denoise`).

All functions are pure and jit-able (`rank` and `k` static).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

Update = Any  # a pytree of arrays shaped like the model's parameters


class Stats(NamedTuple):
  """Per-coordinate prior of an update: both fields are pytrees shaped like one update."""
  mean: Update
  var: Update


class Pca(NamedTuple):
  """Principal subspace of flattened surrogate updates (d coordinates, k components).

  Attributes:
    mean: [d] mean of the flattened surrogate updates.
    components: [k, d] orthonormal rows, the top-k principal directions.
    variances: [k] variance of the surrogate updates along each direction (s^2 / K).
  """
  mean: jax.Array
  components: jax.Array
  variances: jax.Array


def _floor(var: jax.Array) -> jax.Array:
  """`var` floored at the dtype's smallest normal number (keeps 0 / 0 out of the gains)."""
  return jnp.maximum(var, jnp.finfo(var.dtype).tiny)


def _noise_var(noise_std: float | jax.Array) -> jax.Array:
  return jnp.square(jnp.asarray(noise_std))


def surrogate_stats(updates: Update) -> Stats:
  """Per-coordinate mean and variance (ddof 0, floored at a tiny positive value).

  Args:
    updates: surrogate updates stacked on a leading axis, every leaf [K, ...].

  Returns:
    `Stats(mean, var)`, each a pytree shaped like one update.
  """
  mean = jax.tree.map(lambda u: jnp.mean(u, axis=0), updates)
  var = jax.tree.map(lambda u: _floor(jnp.var(u, axis=0)), updates)
  return Stats(mean=mean, var=var)


def wiener(y: Update, stats: Stats, noise_std: float | jax.Array) -> Update:
  """Per-coordinate Wiener shrinkage mean + var / (var + noise_std^2) (y - mean).

  Under a Gaussian prior u_j ~ N(mean_j, var_j), independent across coordinates, and
  y = u + noise_std xi, this is the posterior mean E[u | y], the MMSE estimator; its
  expected squared error is sum_j var_j noise_std^2 / (var_j + noise_std^2), below the
  d noise_std^2 of y itself.

  Args:
    y: the noised update.
    stats: the prior's per-coordinate mean and variance (`surrogate_stats`).
    noise_std: the std of the added noise (a scalar).

  Returns:
    The denoised update, shaped like `y`.
  """
  n2 = _noise_var(noise_std)
  return jax.tree.map(lambda obs, m, v: m + v / (v + n2) * (obs - m), y, stats.mean, stats.var)


def _truncate(matrix: jax.Array, rank: int) -> jax.Array:
  if rank >= min(matrix.shape):
    return matrix
  u, s, vt = jnp.linalg.svd(matrix, full_matrices=False)
  return (u[:, :rank] * s[:rank]) @ vt[:rank]


def svd_shrink(update: Update, rank: int) -> Update:
  """Each 2-D leaf (a dense kernel) cut to its top-`rank` singular components.

  A dense layer's gradient over a batch of B examples is a sum of B rank-1 outer products
  (delta_i x_i^T), so its clean gradient has rank <= B, while isotropic noise spreads over
  all min(m, n) singular directions: keeping the top B of them removes most of the noise
  and (when the signal dominates them) little of the gradient. Leaves of any other rank
  (biases, conv kernels) pass unchanged, as do 2-D leaves with min(shape) <= rank.

  Args:
    update: the (noised) update.
    rank: singular components kept per kernel (static), e.g. the client's batch size.

  Returns:
    The shrunk update, shaped like `update`.

  Raises:
    ValueError: if `rank` < 1.
  """
  if rank < 1:
    raise ValueError(f"svd_shrink keeps at least one singular component, got rank={rank}")
  return jax.tree.map(lambda x: _truncate(x, rank) if x.ndim == 2 else x, update)


def pca_fit(updates: Update, k: int) -> Pca:
  """Top-`k` principal subspace of the flattened surrogate updates.

  Args:
    updates: surrogate updates stacked on a leading axis, every leaf [K, ...].
    k: number of components kept (static), 1 <= k <= K.

  Returns:
    `Pca(mean [d], components [k, d], variances [k])`, the variances s^2 / K of the
    centred [K, d] matrix's singular values, floored at a tiny positive value.

  Raises:
    ValueError: if k is not in [1, K].
  """
  flat = jax.vmap(lambda u: ravel_pytree(u)[0])(updates)
  num = flat.shape[0]
  if not 1 <= k <= num:
    raise ValueError(f"pca_fit needs 1 <= k <= K = {num} surrogate updates, got k={k}")
  mean = jnp.mean(flat, axis=0)
  _, s, vt = jnp.linalg.svd(flat - mean, full_matrices=False)
  return Pca(mean=mean, components=vt[:k], variances=_floor(s[:k] ** 2 / num))


def pca_denoise(pca: Pca, y: Update, noise_std: float | jax.Array) -> Update:
  """Linear MMSE denoiser under a Gaussian prior on the surrogates' principal subspace.

  With the prior u = mean + sum_k a_k v_k, a_k ~ N(0, variances_k), and y = u + noise_std xi,
  the posterior mean is mean + sum_k variances_k / (variances_k + noise_std^2)
  <y - mean, v_k> v_k. It is a learned denoiser of updates, the linear analogue of
  Mjolnir's diffusion denoiser (arXiv 2407.05285); everything outside the subspace
  (all but k of the d noise dimensions) is dropped. At noise_std = 0 it is the
  orthogonal projection of y onto the affine subspace mean + span(v).

  Args:
    pca: the fitted subspace (`pca_fit`).
    y: the noised update, with the structure of the updates `pca` was fitted on.
    noise_std: the std of the added noise (a scalar).

  Returns:
    The denoised update, shaped like `y`.

  Raises:
    ValueError: if `y` has a different number of coordinates from `pca.mean`.
  """
  flat, unravel = ravel_pytree(y)
  if flat.shape != pca.mean.shape:
    raise ValueError(f"y has {flat.size} coordinates, the PCA was fitted on {pca.mean.size}")
  gain = pca.variances / (pca.variances + _noise_var(noise_std))
  coeff = pca.components @ (flat - pca.mean)
  return unravel(pca.mean + (gain * coeff) @ pca.components)


def combine_rounds(ys: Update, noise_stds: jax.Array) -> tuple[Update, jax.Array]:
  """Inverse-variance average of k observations of one clean update.

  With y_i = u + s_i xi_i, independent xi_i, the weights s_i^-2 / sum_j s_j^-2 give the
  minimum-variance unbiased combination, itself u + s xi with s = (sum_i s_i^-2)^-1/2.
  Every s_i must be positive.

  Args:
    ys: the observations stacked on a leading axis, every leaf [k, ...].
    noise_stds: [k] noise std of each observation.

  Returns:
    `(combined, joint_std)`: the weighted mean, shaped like one observation, and its noise
    std (a scalar array).

  Raises:
    ValueError: if `noise_stds` is not 1-D or a leaf's leading size is not k.
  """
  noise_stds = jnp.asarray(noise_stds)
  if noise_stds.ndim != 1:
    raise ValueError(f"noise_stds must be 1-D [k], got shape {noise_stds.shape}")
  k = noise_stds.shape[0]
  sizes = {leaf.shape[0] if leaf.ndim else None for leaf in jax.tree.leaves(ys)}
  if sizes != {k}:
    got = sorted(map(str, sizes))
    raise ValueError(f"every leaf of ys must have leading size k = {k}, got {got}")
  precision = noise_stds ** -2.0
  weights = precision / jnp.sum(precision)
  combined = jax.tree.map(lambda y: jnp.tensordot(weights.astype(y.dtype), y, axes=1), ys)
  return combined, jnp.sum(precision) ** -0.5
