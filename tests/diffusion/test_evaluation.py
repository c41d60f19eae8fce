import numpy as np
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
