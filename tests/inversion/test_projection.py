import itertools

import jax
import jax.numpy as jnp
import numpy as np

from inversion import projection


def _brute_force(v, r):
  """The projection by bisection on theta (a different algorithm from the sort)."""
  if np.abs(v).sum() <= r:
    return v
  lo, hi = 0.0, np.abs(v).max()
  for _ in range(200):
    mid = (lo + hi) / 2
    if np.maximum(np.abs(v) - mid, 0).sum() > r:
      lo = mid
    else:
      hi = mid
  return np.sign(v) * np.maximum(np.abs(v) - hi, 0)


def test_matches_brute_force_on_small_inputs():
  rng = np.random.default_rng(0)
  for n, r in itertools.product((1, 2, 3, 5, 8), (0.1, 0.5, 1.0, 3.0)):
    for _ in range(5):
      v = rng.standard_normal(n)
      got = np.asarray(projection.l1_ball(jnp.asarray(v, jnp.float32), r))
      np.testing.assert_allclose(got, _brute_force(v, r), atol=1e-5)
      assert np.abs(got).sum() <= r + 1e-5


def test_identity_inside_and_on_the_boundary_outside():
  v = jnp.array([[0.1, -0.2], [3.0, -4.0]])
  out = jax.jit(projection.l1_ball_batch)(v, jnp.array([1.0, 2.0]))
  np.testing.assert_array_equal(out[0], v[0])
  np.testing.assert_allclose(jnp.abs(out[1]).sum(), 2.0, rtol=1e-6)
  np.testing.assert_allclose(out[1], [0.5, -1.5], atol=1e-6)  # theta = 2.5: (3 - 2.5) + (4 - 2.5) = 2
  # Ties and multi-dimensional features.
  f = jnp.ones((2, 3, 3))
  p = projection.l1_ball(f, 18 * 0.5)
  np.testing.assert_allclose(p, 0.5 * f, atol=1e-6)
