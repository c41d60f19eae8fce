"""Euclidean projection onto the l1 ball (Duchi, Shalev-Shwartz, Singer & Chandra, ICML
2008), as GIFD (Fang et al., ICCV 2023) projects each intermediate-feature deviation.

w = argmin ||w - v||_2 s.t. ||w||_1 <= r is the soft threshold sign(v) max(|v| - theta, 0)
with theta = 0 inside the ball, else the theta at which the l1 norm equals r, found
exactly from the sorted magnitudes: theta = (sum_{j <= rho} u_j - r) / rho, u sorted
descending, rho = max{j : u_j > (sum_{i <= j} u_i - r) / j}. O(n log n), no loops, jit-able.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def l1_ball(v: jax.Array, radius: float | jax.Array) -> jax.Array:
  """Projects `v` (any shape, as one vector) onto {w : ||w||_1 <= radius}."""
  flat = v.reshape(-1)
  u = jnp.sort(jnp.abs(flat))[::-1]
  cumulative = jnp.cumsum(u)
  j = jnp.arange(1, flat.size + 1, dtype=flat.dtype)
  rho = jnp.max(jnp.where(u * j > cumulative - radius, j, 0.0))
  theta = (cumulative[jnp.maximum(rho.astype(jnp.int32) - 1, 0)] - radius) / jnp.maximum(rho, 1.0)
  projected = jnp.sign(flat) * jnp.maximum(jnp.abs(flat) - theta, 0.0)
  return jnp.where(jnp.sum(jnp.abs(flat)) <= radius, flat, projected).reshape(v.shape)


def l1_ball_batch(v: jax.Array, radius: float | jax.Array) -> jax.Array:
  """Each example of `v [B, ...]` projected onto its own l1 ball (`radius` scalar or `[B]`)."""
  radius = jnp.broadcast_to(jnp.asarray(radius, v.dtype), v.shape[:1])
  return jax.vmap(l1_ball)(v, radius)
