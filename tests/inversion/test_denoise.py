import functools

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import numpy as np
import pytest

from inversion import denoise


def _tree(key, scale=1.0):
  """A small update-shaped pytree (two leaves, 50 coordinates)."""
  k_w, k_b = jax.random.split(key)
  return {"w": scale * jax.random.normal(k_w, (5, 6)), "b": scale * jax.random.normal(k_b, (20,))}


def _sq(tree):
  return sum(jnp.sum(x ** 2) for x in jax.tree.leaves(tree))


def _sub(a, b):
  return jax.tree.map(jnp.subtract, a, b)


def test_surrogate_stats_matches_numpy():
  k_a, k_b = jax.random.split(jax.random.key(0))
  updates = {"a": jax.random.normal(k_a, (7, 3, 4)), "b": 2.0 + jax.random.normal(k_b, (7, 5))}
  stats = jax.jit(denoise.surrogate_stats)(updates)
  for name in ("a", "b"):
    np.testing.assert_allclose(stats.mean[name], np.mean(np.asarray(updates[name]), 0), atol=1e-6)
    np.testing.assert_allclose(stats.var[name], np.var(np.asarray(updates[name]), 0), rtol=1e-5)
  # A constant coordinate gets a tiny positive variance, not zero.
  const = denoise.surrogate_stats(jnp.ones((4, 3)))
  assert np.all(np.asarray(const.var) > 0) and np.all(np.asarray(const.var) < 1e-30)


@pytest.mark.parametrize("jit", [False, True])
def test_wiener_reaches_the_mmse(jit):
  k_mean, k_var, k_draws = jax.random.split(jax.random.key(1), 3)
  noise = 0.7
  mean = _tree(k_mean)
  var = jax.tree.map(lambda x: 0.1 + 2.0 * jax.nn.sigmoid(x), _tree(k_var))
  stats = denoise.Stats(mean=mean, var=var)
  wiener = jax.jit(denoise.wiener) if jit else denoise.wiener

  def error(key):
    k_u, k_xi = jax.random.split(key)
    u = jax.tree.map(lambda m, v, z: m + jnp.sqrt(v) * z, mean, var, _tree(k_u))
    y = jax.tree.map(lambda a, z: a + noise * z, u, _tree(k_xi))
    return _sq(_sub(wiener(y, stats, noise), u)), _sq(_sub(y, u))

  denoised, raw = jax.vmap(error)(jax.random.split(k_draws, 4000))
  expected = sum(jnp.sum(v * noise ** 2 / (v + noise ** 2)) for v in jax.tree.leaves(var))
  np.testing.assert_allclose(jnp.mean(denoised), expected, rtol=0.05)
  np.testing.assert_allclose(jnp.mean(raw), 50 * noise ** 2, rtol=0.05)
  assert jnp.mean(denoised) < 0.9 * jnp.mean(raw)


def test_wiener_takes_an_array_noise_std_and_is_identity_at_zero_noise():
  k_u, k_y = jax.random.split(jax.random.key(2))
  stats = denoise.surrogate_stats(jax.vmap(_tree)(jax.random.split(k_u, 3)))
  y = _tree(k_y)
  out = denoise.wiener(y, stats, jnp.asarray(0.0))
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(y)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  # Infinite noise collapses onto the prior mean.
  far = denoise.wiener(y, stats, 1e6)
  for a, b in zip(jax.tree.leaves(far), jax.tree.leaves(stats.mean)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_combine_rounds_equal_stds_quarter_the_variance():
  k_u, k_draws = jax.random.split(jax.random.key(3))
  u = _tree(k_u)
  stds = jnp.full((4,), 0.5)

  def noise_of_combined(key):
    keys = jax.random.split(key, 4)
    ys = jax.vmap(lambda k: jax.tree.map(lambda a, z: a + 0.5 * z, u, _tree(k)))(keys)
    combined, joint = denoise.combine_rounds(ys, stds)
    return _sq(_sub(combined, u)) / 50, joint

  var, joint = jax.vmap(noise_of_combined)(jax.random.split(k_draws, 2000))
  np.testing.assert_allclose(jnp.mean(var), 0.25 / 4, rtol=0.05)
  np.testing.assert_allclose(joint, 0.25, rtol=1e-6)


def test_combine_rounds_unequal_stds():
  k_u, k_draws = jax.random.split(jax.random.key(4))
  u = _tree(k_u)
  stds = jnp.array([0.3, 0.6, 1.0, 2.0])
  combine = jax.jit(denoise.combine_rounds)

  def noise_of_combined(key):
    keys = jax.random.split(key, 4)
    ys = jax.vmap(lambda k, s: jax.tree.map(lambda a, z: a + s * z, u, _tree(k)))(keys, stds)
    combined, joint = combine(ys, stds)
    return _sq(_sub(combined, u)) / 50, joint

  var, joint = jax.vmap(noise_of_combined)(jax.random.split(k_draws, 2000))
  expected = float(np.sum(np.asarray(stds, np.float64) ** -2) ** -0.5)
  np.testing.assert_allclose(joint, expected, rtol=1e-6)
  np.testing.assert_allclose(jnp.mean(var), expected ** 2, rtol=0.05)
  assert expected < 0.3  # better than the best single round


def test_combine_rounds_rejects_mismatched_sizes():
  ys = {"a": jnp.zeros((3, 2)), "b": jnp.zeros((3,))}
  with pytest.raises(ValueError, match="leading size"):
    denoise.combine_rounds(ys, jnp.ones(4))
  with pytest.raises(ValueError, match="1-D"):
    denoise.combine_rounds(ys, jnp.ones((3, 1)))


def test_svd_shrink_recovers_a_rank_one_kernel():
  k_a, k_b, k_xi, k_bias = jax.random.split(jax.random.key(5), 4)
  clean = jnp.outer(jax.random.normal(k_a, (20,)), jax.random.normal(k_b, (30,)))
  bias = jax.random.normal(k_bias, (30,))
  conv = jnp.ones((3, 3, 2, 4))
  noisy = {"kernel": clean + 0.1 * jax.random.normal(k_xi, clean.shape), "bias": bias, "conv": conv}
  shrunk = jax.jit(denoise.svd_shrink, static_argnums=1)(noisy, 1)
  noisy_err = jnp.sum((noisy["kernel"] - clean) ** 2)
  shrunk_err = jnp.sum((shrunk["kernel"] - clean) ** 2)
  assert shrunk_err < 0.2 * noisy_err
  np.testing.assert_array_equal(shrunk["bias"], bias)
  np.testing.assert_array_equal(shrunk["conv"], conv)
  assert np.linalg.matrix_rank(np.asarray(shrunk["kernel"]), tol=1e-4) == 1


def test_svd_shrink_full_rank_is_identity_and_rank_zero_raises():
  x = {"kernel": jax.random.normal(jax.random.key(6), (4, 7))}
  for rank in (4, 9):
    np.testing.assert_allclose(denoise.svd_shrink(x, rank)["kernel"], x["kernel"], atol=1e-6)
  # rank 3 < 4 still reconstructs exactly what the top-3 SVD gives.
  u, s, vt = np.linalg.svd(np.asarray(x["kernel"]), full_matrices=False)
  np.testing.assert_allclose(denoise.svd_shrink(x, 3)["kernel"], (u[:, :3] * s[:3]) @ vt[:3],
                             atol=1e-5)
  with pytest.raises(ValueError, match="rank"):
    denoise.svd_shrink(x, 0)


def _subspace_data(key, num, noise=1e-3):
  """`num` updates mean + coeffs @ basis^T (+ tiny noise) in a known 3-dim subspace."""
  k_basis, k_mean, k_coef, k_xi = jax.random.split(key, 4)
  basis, _ = jnp.linalg.qr(jax.random.normal(k_basis, (50, 3)))
  mean = jax.random.normal(k_mean, (50,))
  coef = jax.random.normal(k_coef, (num, 3)) * jnp.array([3.0, 2.0, 1.0])
  flat = mean + coef @ basis.T + noise * jax.random.normal(k_xi, (num, 50))
  return basis, mean, flat


def _unflatten(flat):
  """[..., 50] -> the `_tree` structure."""
  return {"w": flat[..., :30].reshape(flat.shape[:-1] + (5, 6)), "b": flat[..., 30:]}


def _flatten(tree):
  return jnp.concatenate([tree["b"], tree["w"].reshape(-1)])  # ravel_pytree's sorted key order


def test_pca_fit_recovers_the_subspace():
  basis, mean, flat = _subspace_data(jax.random.key(7), 200)
  # Columns in ravel_pytree's order ('b' before 'w'), so compare in that order too.
  perm = jnp.concatenate([jnp.arange(30, 50), jnp.arange(30)])
  pca = jax.jit(denoise.pca_fit, static_argnums=1)(_unflatten(flat), 3)
  assert pca.components.shape == (3, 50) and pca.variances.shape == (3,)
  np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(3), atol=1e-5)
  truth = (basis @ basis.T)[perm][:, perm]
  np.testing.assert_allclose(pca.components.T @ pca.components, truth, atol=1e-2)
  np.testing.assert_allclose(pca.mean, mean[perm], atol=0.5)
  np.testing.assert_allclose(pca.variances, [9.0, 4.0, 1.0], rtol=0.3)
  with pytest.raises(ValueError, match="k <= K"):
    denoise.pca_fit(_unflatten(flat[:2]), 3)
  with pytest.raises(ValueError, match="k <= K"):
    denoise.pca_fit(_unflatten(flat[:2]), 0)


def test_pca_denoise_beats_raw_and_projects_at_zero_noise():
  k_fit, k_new, k_xi = jax.random.split(jax.random.key(8), 3)
  basis, mean, flat = _subspace_data(k_fit, 200)
  pca = denoise.pca_fit(_unflatten(flat), 3)
  # New clean updates from the same subspace (the same basis and mean, fresh coefficients).
  coef = jax.random.normal(k_new, (500, 3)) * jnp.array([3.0, 2.0, 1.0])
  clean = mean + coef @ basis.T
  noisy = clean + 0.5 * jax.random.normal(k_xi, clean.shape)
  denoised = jax.vmap(functools.partial(denoise.pca_denoise, pca, noise_std=0.5))(_unflatten(noisy))
  err = jnp.mean(jax.vmap(_sq)(_sub(denoised, _unflatten(clean))))
  raw = jnp.mean(jnp.sum((noisy - clean) ** 2, -1))
  assert err < 0.1 * raw
  # Zero noise: the orthogonal projection onto mean + span, so the identity in the subspace.
  y = _unflatten(clean[0])
  out = jax.jit(denoise.pca_denoise)(pca, y, 0.0)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(y)):
    np.testing.assert_allclose(a, b, atol=1e-2)
  off = _unflatten(noisy[0])
  fy, _ = ravel_pytree(off)
  proj = pca.mean + pca.components.T @ (pca.components @ (fy - pca.mean))
  np.testing.assert_allclose(_flatten(denoise.pca_denoise(pca, off, 0.0)), proj, atol=1e-5)
  with pytest.raises(ValueError, match="coordinates"):
    denoise.pca_denoise(pca, {"b": jnp.zeros(3)}, 0.1)
