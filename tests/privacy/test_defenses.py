"""Tests of privacy/defenses.py: top-k pruning and quantization."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from privacy import defenses


def test_topk_prune_keeps_the_largest_magnitudes():
  update = {"a": jnp.array([0.1, -5.0, 0.2]), "b": jnp.array([[3.0, -0.05], [0.0, 1.0]])}
  out = jax.jit(defenses.topk_prune(4 / 7))(update, jax.random.key(0))
  np.testing.assert_array_equal(out["a"], [0.0, -5.0, 0.0])
  np.testing.assert_array_equal(out["b"], [[3.0, 0.0], [0.0, 1.0]])
  with pytest.raises(ValueError, match="prune fraction"):
    defenses.topk_prune(1.0)


def test_int8_stochastic_rounding_is_unbiased_and_on_the_grid():
  u = {"w": jnp.linspace(-1.0, 1.0, 101)}
  q = defenses.quantize("int8")
  outs = np.stack([np.asarray(q(u, jax.random.key(i))["w"]) for i in range(400)])
  steps = outs / (1.0 / 127)
  np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
  np.testing.assert_allclose(outs.mean(0), u["w"], atol=3e-3)
  half = defenses.quantize("fp16")(u, None)["w"]
  assert half.dtype == jnp.float32
  np.testing.assert_allclose(half, u["w"], rtol=1e-3, atol=1e-6)
  with pytest.raises(ValueError, match="quantize mode"):
    defenses.quantize("int4")


def test_gaussian_noise_adds_the_declared_std():
  from scipy import stats
  u = {"w": jnp.ones((4000,)), "b": jnp.zeros((3,))}
  out = jax.jit(defenses.gaussian_noise(0.1))(u, jax.random.key(0))
  noise = np.asarray(out["w"]) - 1.0
  assert stats.kstest(noise, "norm", args=(0, 0.1)).pvalue > 1e-3
  assert stats.kstest(noise, "norm", args=(0, 0.1 * 2 / 3)).pvalue < 1e-3
  assert stats.kstest(noise, "norm", args=(0, 0.1 * 3 / 2)).pvalue < 1e-3
  np.testing.assert_array_equal(defenses.gaussian_noise(0.0)(u, jax.random.key(1))["w"], u["w"])
  with pytest.raises(ValueError, match="noise std"):
    defenses.gaussian_noise(-1.0)
