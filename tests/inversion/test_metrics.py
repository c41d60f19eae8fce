"""Tests of inversion/metrics.py: PSNR and SSIM against known values and scikit-image,
Hungarian matching, label accuracy."""

import jax.numpy as jnp
import numpy as np
import pytest

from inversion import metrics


def test_psnr_and_mse_known_values():
  x = jnp.zeros((2, 4, 4, 1))
  y = jnp.full((2, 4, 4, 1), 0.1)
  np.testing.assert_allclose(metrics.mse(x, y), 0.01, rtol=1e-6)
  np.testing.assert_allclose(metrics.psnr(x, y), 20.0, rtol=1e-5)
  assert np.isinf(metrics.psnr(x, x)).all()


@pytest.mark.parametrize("shape", [(32, 32, 3), (28, 28, 1), (16, 20, 3)])
def test_ssim_matches_scikit_image(shape):
  skimage_metrics = pytest.importorskip("skimage.metrics")
  rng = np.random.default_rng(0)
  truth = rng.random((3,) + shape).astype(np.float32)
  smooth = np.cumsum(truth, axis=1) / np.arange(1, shape[0] + 1)[None, :, None, None]
  noisy = np.clip(truth + 0.2 * rng.standard_normal(truth.shape), 0, 1).astype(np.float32)
  ours = np.asarray(metrics.ssim(jnp.asarray(noisy), jnp.asarray(smooth.astype(np.float32))))
  for i in range(3):
    ref = skimage_metrics.structural_similarity(
        noisy[i], smooth[i].astype(np.float32), gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, data_range=1.0, channel_axis=-1)
    assert ours[i] == pytest.approx(ref, abs=1e-4)


def test_ssim_of_identical_images_is_one_and_of_constants_is_known():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.random((2, 12, 12, 3)), jnp.float32)
  np.testing.assert_allclose(metrics.ssim(x, x), 1.0, rtol=1e-5)
  # constant images a and b: SSIM = (2ab + C1) / (a^2 + b^2 + C1)
  a, b, c1 = 0.2, 0.6, 0.01 ** 2
  value = metrics.ssim(jnp.full((1, 12, 12, 1), a), jnp.full((1, 12, 12, 1), b))
  assert float(value[0]) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-4)


def test_hungarian_matching_undoes_a_permutation():
  rng = np.random.default_rng(2)
  truth = rng.random((6, 8, 8, 1))
  perm = rng.permutation(6)
  shuffled = truth[perm] + 0.01 * rng.standard_normal(truth.shape)
  order = metrics.match(shuffled, truth)
  np.testing.assert_allclose(shuffled[order], truth, atol=0.05)
  np.testing.assert_array_equal(perm[order], np.arange(6))
  scores = metrics.score(shuffled, truth)
  assert scores["mean_psnr"] > 35 and scores["mean_ssim"] > 0.9


def test_label_accuracy_counts_multisets():
  assert metrics.label_accuracy([3, 1, 1], [1, 3, 1]) == 1.0
  assert metrics.label_accuracy([1, 1, 2], [1, 2, 2]) == pytest.approx(2 / 3)
  with pytest.raises(ValueError, match="predicted labels"):
    metrics.label_accuracy([1], [1, 2])


def test_feature_distance_and_score_with_a_trained_classifier(tmp_path):
  import functools
  import jax
  from fljax import classifier, datasets
  ds = datasets.load("digits")
  model, params, acc = classifier.reference_classifier(ds, tmp_path, steps=300)
  assert acc > 0.85  # a classifier worth measuring features with (8x8 digits, MLP)
  again = classifier.reference_classifier(ds, tmp_path, steps=300)  # loaded from the cache
  assert again[2] == acc
  np.testing.assert_array_equal(again[1]["Dense_0"]["kernel"], params["Dense_0"]["kernel"])
  feats = functools.partial(model.features, params)
  x = jnp.asarray(ds.x_test[:4])
  noisy = jnp.clip(x + 0.3 * jax.random.normal(jax.random.key(0), x.shape), 0, 1)
  np.testing.assert_allclose(metrics.feature_distance(feats, x, x), 0.0, atol=1e-6)
  near, far = metrics.feature_distance(feats, x, noisy), metrics.feature_distance(feats, x, x[::-1])
  assert float(near.mean()) < float(far.mean())
  scores = metrics.score(np.asarray(x[::-1]), np.asarray(x), features=feats)
  np.testing.assert_allclose(scores["feature_distance"], 0.0, atol=1e-5)  # matched first
  assert scores["mean_psnr"] == np.inf
