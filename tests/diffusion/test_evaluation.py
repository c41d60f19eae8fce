import numpy as np
import pytest
import scipy.linalg

from diffusion import evaluation


def test_frechet_distance_matches_the_closed_form():
  rng = np.random.default_rng(0)
  a = rng.standard_normal((4000, 3))
  b = 2.0 * rng.standard_normal((4000, 3)) + 1.0
  # N(0, I) vs N(1, 4 I): |mu|^2 + Tr(I + 4I - 2 * 2I) = 3 + 3.
  assert abs(evaluation.frechet_distance(a, b) - 6.0) < 0.3
  assert evaluation.frechet_distance(a, a) < 1e-6
  c = rng.standard_normal((500, 4)) @ rng.standard_normal((4, 4))
  d = rng.standard_normal((500, 4))
  ca, cd = np.cov(c, rowvar=False), np.cov(d, rowvar=False)
  want = np.sum((c.mean(0) - d.mean(0)) ** 2) + np.trace(ca + cd - 2 * scipy.linalg.sqrtm(ca @ cd).real)
  np.testing.assert_allclose(evaluation.frechet_distance(c, d), want, rtol=1e-6)
  # Singular covariances (a constant feature) stay finite.
  assert np.isfinite(evaluation.frechet_distance(np.c_[a, np.zeros(4000)], np.c_[b, np.zeros(4000)]))


def test_nearest_psnr_finds_copies():
  rng = np.random.default_rng(1)
  train = rng.uniform(size=(50, 4, 4, 1)).astype(np.float32)
  copies = train[[3, 7]]
  fresh = rng.uniform(size=(2, 4, 4, 1)).astype(np.float32)
  psnr = evaluation.nearest_psnr(np.concatenate([copies, fresh]), train, chunk=3)
  assert psnr[0] >= 60 and psnr[1] >= 60 and psnr[2] < 20 and psnr[3] < 20  # float32 cancellation: not inf
  mse = np.min(np.mean((train - fresh[0]) ** 2, (1, 2, 3)))
  np.testing.assert_allclose(psnr[2], 10 * np.log10(1 / mse), rtol=1e-4)


def test_evaluation_compares_random_subsets_of_class_sorted_data(tmp_path):
  # digits' test split is not sorted, so sort it: the first `num` images would then hold
  # a few classes only, and a uniform-class sample would look far from them.
  import dataclasses

  import jax
  from diffusion import prior as prior_lib
  from diffusion import schedules, unet
  from fljax import datasets
  ds = datasets.load("digits", image_size=8, channels=1)
  order = np.argsort(ds.y_test, kind="stable")
  ds = dataclasses.replace(ds, x_test=ds.x_test[order], y_test=ds.y_test[order])
  cfg = unet.UNetConfig(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8,),
                        down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
                        layers_per_block=1, norm_num_groups=4, num_class_embeds=11)
  p = prior_lib.Prior(unet_config=cfg, params=unet.init(cfg, key=jax.random.key(0)),
                      schedule=schedules.linear(1000), num_classes=10)
  r = evaluation.evaluate(p, ds, key=jax.random.key(1), num=100, num_steps=2, cache_dir=str(tmp_path),
                          classifier_steps=50)
  # Train and test are exchangeable random draws: their distance is small next to the
  # untrained prior's.
  assert r["reference_fd_train_vs_test"] < 0.2 * r["frechet_distance"]


def test_score_sees_mode_collapse_and_copies(tmp_path):
  import jax
  from fljax import datasets
  ds = datasets.load("digits", image_size=8, channels=1)
  keys = dict(test_key=jax.random.key(0), train_key=jax.random.key(1), cache_dir=str(tmp_path))
  fresh = evaluation.score(ds.x_train[:200], ds, classifier_steps=50, **keys)  # the data itself
  collapsed = evaluation.score(np.repeat(ds.x_train[:1], 200, axis=0), ds, classifier_steps=50,
                               **keys)  # one copied training image
  assert fresh["class_share_tv"] < 0.2 and collapsed["class_share_tv"] > 0.7
  assert collapsed["frechet_distance"] > 5 * fresh["frechet_distance"]
  assert collapsed["median_nearest_train_psnr"] == float("inf") or \
      collapsed["median_nearest_train_psnr"] > 2 * collapsed["median_nearest_train_psnr_of_test_images"]
  assert "class_accuracy" not in fresh  # unconditional samples
  with pytest.raises(ValueError, match="load it with the prior's image_size"):
    evaluation.score(np.zeros((4, 16, 16, 1)), ds, **keys)
