"""Tests of privacy/noise.py: the privatizer's noise is N(0, (sigma C)^2) on the sum (KS
test), divided by the expected batch size, never reusing a key; optax chaining."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from privacy import noise


def _noise_samples(sigma, c, b=1.0, n=20_000, steps=2):
  priv = noise.gaussian_privatizer(clip_norm=c, noise_multiplier=sigma, expected_batch_size=b,
                                   key=jax.random.key(3))
  zeros = {"w": jnp.zeros((n // steps,))}
  state = priv.init(zeros)
  out = []
  for _ in range(steps):
    upd, state = priv.update(zeros, state)
    out.append(np.asarray(upd["w"]))
  return np.concatenate(out), out


def test_noise_std_is_sigma_times_c_by_ks_test():
  sigma, c = 1.3, 0.7
  samples, _ = _noise_samples(sigma, c)
  std = sigma * c
  assert stats.kstest(samples, "norm", args=(0, std)).pvalue > 1e-3
  assert stats.kstest(samples, "norm", args=(0, std * 2 / 3)).pvalue < 1e-6
  assert stats.kstest(samples, "norm", args=(0, std * 3 / 2)).pvalue < 1e-6


def test_noise_is_added_to_the_sum_then_divided():
  samples, _ = _noise_samples(2.0, 1.0, b=10.0)
  # (sum + N(0, (sigma C)^2)) / B: std sigma*C/B, not sigma*C.
  assert stats.kstest(samples, "norm", args=(0, 0.2)).pvalue > 1e-3
  priv = noise.gaussian_privatizer(clip_norm=1.0, noise_multiplier=0.0, expected_batch_size=4.0,
                                   key=jax.random.key(0))
  upd, _ = priv.update({"w": jnp.array([8.0])}, priv.init(None))
  assert float(upd["w"][0]) == 2.0


def test_each_step_draws_fresh_noise():
  _, (first, second) = _noise_samples(1.0, 1.0, n=200)
  assert not np.allclose(first, second)
  assert abs(np.corrcoef(first, second)[0, 1]) < 0.3


def test_chains_with_optax_from_per_example_gradients():
  per_example = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4]])}  # norms 5 and 0.5
  opt = optax.chain(noise.clip_per_example(1.0),
                    noise.gaussian_privatizer(clip_norm=1.0, noise_multiplier=0.0,
                                              expected_batch_size=2.0, key=jax.random.key(0)),
                    optax.sgd(1.0))
  params = {"w": jnp.zeros((2,))}
  updates, _ = jax.jit(opt.update)(per_example, opt.init(params), params)
  np.testing.assert_allclose(updates["w"], -(np.array([0.6, 0.8]) + np.array([0.3, 0.4])) / 2,
                             rtol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(clip_norm=0.0, noise_multiplier=1.0, expected_batch_size=1.0), "clip norm"),
    (dict(clip_norm=1.0, noise_multiplier=-1.0, expected_batch_size=1.0), "noise_multiplier"),
    (dict(clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=0.0), "expected_batch_size"),
])
def test_bad_input(kwargs, match):
  with pytest.raises(ValueError, match=match):
    noise.gaussian_privatizer(key=jax.random.key(0), **kwargs)
