"""Tests of fljax/models.py: output shapes, initialisers, no batch coupling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fljax import models


@pytest.mark.parametrize("name", sorted(models.MODELS))
@pytest.mark.parametrize("shape", [(32, 32, 3), (16, 16, 1)])
def test_output_shapes(name, shape):
  model = models.make(name, num_classes=7, input_shape=shape)
  params = model.init(jax.random.key(0))
  logits = jax.jit(model.apply)(params, jnp.zeros((3,) + shape))
  assert logits.shape == (3, 7) and bool(jnp.isfinite(logits).all())


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_features_are_the_output_layers_input(name):
  model = models.make(name, num_classes=7, input_shape=(16, 16, 1))
  params = model.init(jax.random.key(0))
  x = jax.random.uniform(jax.random.key(1), (3, 16, 16, 1))
  h = model.features(params, x)
  out = [v for v in params.values() if v.get("kernel", jnp.zeros((0, 0))).shape[-1:] == (7,)]
  assert h.ndim == 2 and h.shape[0] == 3 and len(out) == 1
  np.testing.assert_allclose(h @ out[0]["kernel"] + out[0]["bias"], model.apply(params, x),
                             rtol=1e-5, atol=1e-5)


def test_lenet_matches_dlg_shapes():
  params = models.make("lenet", num_classes=10, input_shape=(32, 32, 3)).init(jax.random.key(0))
  shapes = {k: v["kernel"].shape for k, v in params.items()}
  assert shapes == {"Conv_0": (5, 5, 3, 12), "Conv_1": (5, 5, 12, 12),
                    "Conv_2": (5, 5, 12, 12), "Dense_0": (768, 10)}


def test_cnn_has_opacus_parameter_count():
  params = models.make("cnn", num_classes=10, input_shape=(28, 28, 1)).init(jax.random.key(0))
  assert models.num_params(params) == 26_010


def test_uniform_init_is_dlg_range():
  params = models.make("lenet", num_classes=10, input_shape=(8, 8, 1),
                       init="uniform").init(jax.random.key(0))
  leaves = jnp.concatenate([p.ravel() for p in jax.tree.leaves(params)])
  assert -0.5 <= float(leaves.min()) < -0.45 and 0.45 < float(leaves.max()) <= 0.5
  assert abs(float(leaves.mean())) < 0.02  # biases are drawn too, not zero


def test_no_batch_coupling():
  # GroupNorm, not BatchNorm: an example's logits do not depend on its batch companions.
  model = models.make("resnet", num_classes=10, input_shape=(8, 8, 3))
  params = model.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  np.testing.assert_allclose(model.apply(params, x)[:1], model.apply(params, x[:1]), atol=1e-5)


def test_bad_model_arguments():
  with pytest.raises(ValueError, match="unknown model"):
    models.make("vgg", num_classes=10, input_shape=(8, 8, 1))
  with pytest.raises(ValueError, match="unknown init"):
    models.make("mlp", num_classes=10, input_shape=(8, 8, 1), init="xavier")
  with pytest.raises(ValueError, match="at least 14x14"):
    models.make("cnn", num_classes=10, input_shape=(8, 8, 1))


def test_max_pool_2x2_is_flax_max_pool_and_its_gradient_a_subgradient():
  import flax.linen as nn
  x = jax.random.normal(jax.random.key(0), (2, 7, 6, 3))
  np.testing.assert_array_equal(models.max_pool_2x2(x), nn.max_pool(x, (2, 2), strides=(1, 1)))
  w = jax.random.normal(jax.random.key(1), (2, 6, 5, 3))
  mine, flax_ = (jax.grad(lambda x, f=f: jnp.sum(w * f(x)))(x)
                 for f in (models.max_pool_2x2, lambda x: nn.max_pool(x, (2, 2), strides=(1, 1))))
  np.testing.assert_allclose(mine, flax_, atol=1e-6)  # no ties in random normals: equal
  tied = jnp.zeros((1, 3, 3, 1))  # every window tied: the gradient is shared, its sum kept
  g = jax.grad(lambda x: jnp.sum(models.max_pool_2x2(x)))(tied)
  assert float(g.sum()) == 4.0 and np.count_nonzero(g) == 9
