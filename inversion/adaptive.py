"""The adaptive attacker's server-side processing of noised updates (before the inversion).

The attacker knows the defense (its clip norm C, its noise multiplier z, whether the upload
was rescaled), the model, and has public surrogate data (SoK threat model D). What it does
with an observed update y, a `denoise` pipeline of steps joined by '+':

  rescale   y / sqrt(abar): back to the clipped update plus z C xi (A1, calibrated)
  average   the same client's update observed in k rounds, inverse-variance averaged:
            z_joint = (sum z_r^-2)^-1/2 (A3; the model is held fixed across the k rounds,
            an upper bound on what k real rounds give the attacker)
  svd       each dense kernel truncated to rank B (a batch gradient's rank) (A2)
  wiener    per-coordinate Wiener shrinkage with the mean / variance of clipped surrogate
            updates computed on public data at the same model (A2)
  pca       linear MMSE denoiser on the surrogate updates' principal subspace (A4; the
            linear analogue of Mjolnir's learned diffusion denoiser of updates)

Every step is post-processing of what the client released, so none changes the
defense's privacy accounting; they only change how much an attack extracts. The attack
then matches the denoised update with the defense-aware loss (trial gradients clipped to
C, noise-weighted L2 at the remaining noise level).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from inversion import denoise as dn
from privacy.clipping import clip_update

STEPS = ("rescale", "average", "svd", "wiener", "pca")


@dataclasses.dataclass(frozen=True)
class DeclaredNoise:
  """What the attacker knows of a defense: the upload is scale * (clip_C(u) + sigma xi)."""

  sigma: float  # noise std per coordinate, in the units of the clipped update
  scale: float = 1.0  # sqrt(abar) for a forward-noised upload that was not rescaled
  clip_norm: float | None = None


def parse(text: str) -> tuple[str, ...]:
  """'rescale+wiener' -> ('rescale', 'wiener'); 'none' -> ()."""
  if text in ("", "none"):
    return ()
  steps = tuple(s.strip() for s in text.split("+"))
  bad = [s for s in steps if s not in STEPS]
  if bad:
    raise ValueError(f"unknown denoising step(s) {bad} in attack.denoise={text!r}; valid: "
                     f"{', '.join(STEPS)} joined by '+', or none")
  return steps


def process(ys: Any, steps: tuple[str, ...], noise: DeclaredNoise, *, batch_size: int,
            surrogates: Any = None, pca_rank: int = 32) -> tuple[Any, float]:
  """Runs the pipeline on observations `ys` stacked `[k, V, ...]` (k rounds of V victims).

  Returns the processed updates `[V, ...]` and the noise std left in them (for the
  noise-aware loss). Without 'average' only the first round is used. Any step but
  'rescale' needs to know sigma; 'wiener' and 'pca' need `surrogates` (`[K, ...]`, clean,
  unclipped updates on public data at the same model).
  """
  sigma = noise.sigma
  k = jax.tree.leaves(ys)[0].shape[0]
  if steps and noise.scale != 1.0:  # every step works in the clipped update's units
    ys = jax.tree.map(lambda y: y / noise.scale, ys)
  if "average" in steps:
    stds = jnp.full((k,), max(sigma, 1e-30))
    y, _ = jax.vmap(lambda o: dn.combine_rounds(o, stds), in_axes=1)(ys)
    sigma = sigma / math.sqrt(k)
  else:
    y = jax.tree.map(lambda a: a[0], ys)
  if "svd" in steps:
    y = jax.vmap(lambda u: dn.svd_shrink(u, batch_size))(y)
  if "wiener" in steps or "pca" in steps:
    if surrogates is None:
      raise ValueError("the 'wiener' and 'pca' steps need surrogate updates")
    if noise.clip_norm is not None:
      surrogates = jax.vmap(lambda u: clip_update(u, noise.clip_norm)[0])(surrogates)
    if "wiener" in steps:
      stats = dn.surrogate_stats(surrogates)
      y = jax.vmap(lambda u: dn.wiener(u, stats, sigma))(y)
    if "pca" in steps:
      n = jax.tree.leaves(surrogates)[0].shape[0]
      pca = dn.pca_fit(surrogates, min(pca_rank, n))
      y = jax.vmap(lambda u: dn.pca_denoise(pca, u, sigma))(y)
  return y, sigma


def update_cosine(a: Any, b: Any) -> jax.Array:
  """Cosine similarity of two updates stacked `[V, ...]`, per victim `[V]`."""
  fa = jnp.concatenate([x.reshape(x.shape[0], -1) for x in jax.tree.leaves(a)], axis=1)
  fb = jnp.concatenate([x.reshape(x.shape[0], -1) for x in jax.tree.leaves(b)], axis=1)
  num = (fa * fb).sum(axis=1)
  return num / jnp.maximum(jnp.linalg.norm(fa, axis=1) * jnp.linalg.norm(fb, axis=1), 1e-30)
