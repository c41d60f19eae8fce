"""Tests of inversion/labels.py: iDLG recovers every class from one example's gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fljax import federated as fed
from fljax import models
from fljax.partitions import Batch
from inversion import labels, objectives


@pytest.mark.parametrize("name,shape", [("lenet", (8, 8, 1)), ("cnn", (12, 12, 1)),
                                        ("mlp", (8, 8, 1))])
def test_idlg_recovers_the_label_for_every_class(name, shape):
  model = models.make(name, num_classes=10, input_shape=shape, init="uniform")
  params = model.init(jax.random.key(0))
  loss_fn = fed.make_loss_fn(model.apply)
  x = jax.random.uniform(jax.random.key(1), (1,) + shape)
  for y in range(10):
    batch = Batch(x=x, y=jnp.array([y]), mask=jnp.ones(1))
    grads, _ = jax.grad(loss_fn, has_aux=True)(params, batch, None)
    assert int(labels.idlg(grads, 10)) == y
    # without the bias, the kernel's column sums (non-negative features in LeNet's sigmoid)
    kernel, _ = labels.last_layer(grads, 10)
    if name == "lenet":
      assert int(jnp.argmin(kernel.sum(0))) == y


def test_last_layer_must_be_unique():
  with pytest.raises(ValueError, match="found 2"):
    labels.last_layer({"a": {"kernel": jnp.zeros((3, 4))}, "b": {"kernel": jnp.zeros((5, 4))}}, 4)


def test_objectives_known_values():
  a = {"w": jnp.array([1.0, 0.0]), "b": jnp.array([0.0])}
  b = {"w": jnp.array([0.0, 2.0]), "b": jnp.array([0.0])}
  assert float(objectives.l2(a, b)) == pytest.approx(5.0)
  assert float(objectives.cosine(a, b)) == pytest.approx(1.0)
  assert float(objectives.cosine(a, a)) == pytest.approx(0.0, abs=1e-6)
  c = {"w": jnp.array([2.0, 0.0]), "b": jnp.array([3.0])}
  assert float(objectives.layer_cosine(a, c)) == pytest.approx(0.5)  # (0 + 1) / 2
  x = jnp.zeros((1, 3, 3, 1)).at[0, 1, 1, 0].set(1.0)
  # 2 of the 6 vertical and 2 of the 6 horizontal neighbour pairs differ by 1
  assert float(objectives.total_variation(x)) == pytest.approx(2 / 6 + 2 / 6)
  np.testing.assert_equal(sorted(objectives.OBJECTIVES), ["cosine", "l2", "layer_cosine"])
