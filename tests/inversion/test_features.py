import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fljax import models
from inversion import features


def _grads(model, params, x, y):
  def loss(p):
    logits = model.apply(p, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))
  return jax.grad(loss)(params)


@pytest.mark.parametrize("name, shape", [("cnn", (28, 28, 1)), ("mlp", (8, 8, 1)), ("lenet", (32, 32, 3))])
def test_single_example_features_are_exact(name, shape):
  model = models.make(name, num_classes=10, input_shape=shape)
  params = model.init(jax.random.key(0))
  x = jax.random.uniform(jax.random.key(1), (1, *shape))
  grads = _grads(model, params, x, jnp.array([3]))
  h = features.last_layer_features(grads, 10)
  want = model.features(params, x)[0]
  np.testing.assert_allclose(h, want, atol=1e-5, rtol=1e-5)


def test_batch_features_recover_distinct_label_examples_approximately():
  model = models.make("mlp", num_classes=10, input_shape=(8, 8, 1))
  params = model.init(jax.random.key(0))
  x = jax.random.uniform(jax.random.key(2), (4, 8, 8, 1))
  y = jnp.array([1, 5, 7, 2])
  h = features.batch_features(_grads(model, params, x, y), 10, y)
  true = model.features(params, x)
  # Each recovered feature is closest to its own example's.
  dist = jnp.sum((h[:, None] - true[None]) ** 2, -1)
  np.testing.assert_array_equal(jnp.argmin(dist, 1), jnp.arange(4))
  # With one example the batch formula is the exact one.
  g1 = _grads(model, params, x[:1], y[:1])
  np.testing.assert_allclose(features.batch_features(g1, 10, y[:1])[0], features.last_layer_features(g1, 10),
                             rtol=1e-4, atol=1e-6)
