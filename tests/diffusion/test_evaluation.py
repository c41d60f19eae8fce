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
