"""Reconstruction quality: MSE, PSNR, SSIM (Wang et al., IEEE TIP 2004), label accuracy, a
feature-space distance, and Hungarian matching of a reconstructed batch to the ground truth.

All image metrics take de-normalised images in [0, 1], NHWC. SSIM is the standard one:
an 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, population (not sample)
statistics, the SSIM map averaged over valid positions and channels; it matches
scikit-image's `structural_similarity(..., gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1)` (checked in the tests). Images smaller than
the window use a window cropped to the image (still Gaussian, sigma 1.5).

`feature_distance` compares images in the penultimate feature space of a classifier
trained here (`fljax.classifier.reference_classifier`), a semantic complement to PSNR.

A batch attack returns its B reconstructions in an arbitrary order: `match` pairs them
with the B ground-truth images by the Hungarian algorithm on pairwise MSE
(scipy.optimize.linear_sum_assignment) before any score is computed.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def mse(x: jax.Array, y: jax.Array) -> jax.Array:
  """Per-image mean squared error over H, W, C: `[B]`."""
  return jnp.mean((x - y) ** 2, axis=(-3, -2, -1))


def psnr(x: jax.Array, y: jax.Array, *, max_value: float = 1.0) -> jax.Array:
  """Per-image peak signal-to-noise ratio in dB: `[B]` (inf for identical images)."""
  return 10.0 * jnp.log10(max_value ** 2 / mse(x, y))


def _gaussian_window(size: int, sigma: float) -> jax.Array:
  r = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2.0
  g = jnp.exp(-(r ** 2) / (2 * sigma ** 2))
  return g / g.sum()


def ssim(x: jax.Array, y: jax.Array, *, max_value: float = 1.0, window: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> jax.Array:
  """Per-image SSIM: `[B]` for NHWC images (mean of the SSIM map, valid positions)."""
  h, w = x.shape[-3], x.shape[-2]
  size = min(window, h, w)
  size -= 1 - size % 2  # odd, as the standard window
  g = _gaussian_window(size, sigma)

  def blur(img):  # separable valid Gaussian filter of [B, H, W, C], channel by channel
    c = img.shape[-1]
    kh = jnp.tile(g[:, None, None, None], (1, 1, 1, c))
    kw = jnp.tile(g[None, :, None, None], (1, 1, 1, c))
    dn = ("NHWC", "HWIO", "NHWC")
    img = jax.lax.conv_general_dilated(img, kh, (1, 1), "VALID", dimension_numbers=dn,
                                       feature_group_count=c)
    return jax.lax.conv_general_dilated(img, kw, (1, 1), "VALID", dimension_numbers=dn,
                                        feature_group_count=c)

  x = x.astype(jnp.float32)
  y = y.astype(jnp.float32)
  c1, c2 = (k1 * max_value) ** 2, (k2 * max_value) ** 2
  mx, my = blur(x), blur(y)
  sxx = blur(x * x) - mx ** 2
  syy = blur(y * y) - my ** 2
  sxy = blur(x * y) - mx * my
  num = (2 * mx * my + c1) * (2 * sxy + c2)
  den = (mx ** 2 + my ** 2 + c1) * (sxx + syy + c2)
  return jnp.mean(num / den, axis=(-3, -2, -1))


def feature_distance(features: Callable[[jax.Array], jax.Array], x: jax.Array, y: jax.Array
                     ) -> jax.Array:
  """Per-image L2 distance between `features(x)` and `features(y)`: `[B]`.

  `features` maps images to a classifier's penultimate features (e.g.
  `functools.partial(model.features, params)` of `fljax.classifier.reference_classifier`),
  so 0 means the classifier cannot tell the reconstruction from the original.
  """
  return jnp.linalg.norm(features(x) - features(y), axis=-1)


def match(reconstruction: np.ndarray, truth: np.ndarray) -> np.ndarray:
  """The permutation p minimising sum_i MSE(reconstruction[p[i]], truth[i]) (Hungarian).

  Returns p such that `reconstruction[p]` is aligned with `truth`.
  """
  from scipy.optimize import linear_sum_assignment
  rec = np.asarray(reconstruction, np.float64).reshape(len(reconstruction), -1)
  tru = np.asarray(truth, np.float64).reshape(len(truth), -1)
  if rec.shape != tru.shape:
    raise ValueError(f"reconstruction {reconstruction.shape} and truth {truth.shape} differ in shape")
  cost = ((tru[:, None, :] - rec[None, :, :]) ** 2).mean(-1)  # [truth, reconstruction]
  rows, cols = linear_sum_assignment(cost)
  return cols[np.argsort(rows)]


def label_accuracy(predicted: np.ndarray, truth: np.ndarray) -> float:
  """Fraction of labels recovered, as multisets (the order of a batch is not observable)."""
  predicted, truth = np.asarray(predicted).ravel(), np.asarray(truth).ravel()
  if predicted.shape != truth.shape:
    raise ValueError(f"{predicted.size} predicted labels for {truth.size} true ones")
  hits = 0
  remaining = list(predicted)
  for t in truth:
    if t in remaining:
      remaining.remove(t)
      hits += 1
  return hits / max(len(truth), 1)


def score(reconstruction: np.ndarray, truth: np.ndarray, *,
          features: Callable[[jax.Array], jax.Array] | None = None
          ) -> dict[str, float | np.ndarray]:
  """Matches the batch, then per-image MSE, PSNR, SSIM (and, with `features`, the feature
  distance) as arrays, and their means."""
  order = match(reconstruction, truth)
  rec = jnp.asarray(np.asarray(reconstruction)[order])
  tru = jnp.asarray(truth)
  out = {"order": order, "mse": np.asarray(mse(rec, tru)), "psnr": np.asarray(psnr(rec, tru)),
         "ssim": np.asarray(ssim(rec, tru))}
  if features is not None:
    out["feature_distance"] = np.asarray(feature_distance(features, rec, tru))
  for k in ("mse", "psnr", "ssim", "feature_distance"):
    if k in out:
      out[f"mean_{k}"] = float(np.mean(out[k]))
  return out
