"""Tests of inversion/labels.py: iDLG recovers every class from one example's gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fljax import federated as fed
from fljax import models
from fljax.partitions import Batch
from inversion import labels, objectives


@pytest.mark.parametrize("name,shape", [("lenet", (8, 8, 1)), ("cnn", (14, 14, 1)),
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


def test_count_round_is_exact_and_non_negative():
  counts = labels.count_round(jnp.array([2.6, -0.4, 1.3, 0.5]), 4)
  np.testing.assert_array_equal(counts, [2, 0, 1, 1])  # clipped, rescaled to 4, remainders
  np.testing.assert_array_equal(labels.expand_counts(counts, 4), [0, 0, 2, 3])


def _batch_gradient(model, params, x, y):
  grads, _ = jax.grad(fed.make_loss_fn(model.apply), has_aux=True)(
      params, Batch(x=x, y=y, mask=jnp.ones(len(y))), None)
  return grads


def test_bias_corrected_counts_repeated_labels_exactly_with_the_true_mean_prediction():
  model = models.make("cnn", num_classes=10, input_shape=(14, 14, 1))
  params = model.init(jax.random.key(0))
  x = jax.random.uniform(jax.random.key(1), (8, 14, 14, 1))
  y = jnp.array([3, 3, 3, 0, 7, 7, 9, 1])
  grads = _batch_gradient(model, params, x, y)
  true_mean = jax.nn.softmax(model.apply(params, x)).mean(0)  # what the estimate stands for
  np.testing.assert_array_equal(labels.bias_corrected(grads, 10, 8, true_mean), jnp.sort(y))


def test_batch_label_inference_accuracy_on_digits():
  from fljax import datasets
  from inversion import metrics, observation as ob
  ds = datasets.load("digits")
  model = models.make("lenet", num_classes=10, input_shape=ds.image_shape)
  params = model.init(jax.random.key(0))
  threat = ob.ThreatModel(batch_size=8, input_shape=ds.image_shape)
  rng = np.random.default_rng(0)
  acc = {"bias_corrected": [], "yin": []}
  for v in range(10):
    idx = rng.choice(len(ds.y_test), 8, replace=False)
    obs = ob.Observation(update=_batch_gradient(model, params, jnp.asarray(ds.x_test[idx]),
                                                jnp.asarray(ds.y_test[idx])), params=params)
    for method in acc:
      y = labels.from_observation(method, model.apply, obs, threat, key=jax.random.key(v))
      acc[method].append(metrics.label_accuracy(np.asarray(y), ds.y_test[idx]))
  assert np.mean(acc["bias_corrected"]) >= 0.95   # repeats included
  assert np.mean(acc["yin"]) >= 0.5               # misses repeated labels by design


def test_fedavg_delta_is_read_as_a_gradient():
  from inversion import observation as ob
  model = models.make("lenet", num_classes=10, input_shape=(8, 8, 1))
  params = model.init(jax.random.key(0))
  x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1))
  y = jnp.array([2, 2, 5, 8])
  threat = ob.ThreatModel(algorithm="fedavg", batch_size=4, input_shape=(8, 8, 1),
                          local_epochs=1, local_batch_size=4, local_lr=0.5)
  delta = ob.forward(model.apply, threat)(params, x, jax.nn.one_hot(y, 10))
  grads = _batch_gradient(model, params, x, y)
  for a, b in zip(jax.tree.leaves(ob.gradient_signal(delta, threat)), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert ob.local_steps(ob.ThreatModel(algorithm="fedavg", batch_size=5, local_epochs=3,
                                       local_batch_size=2)) == 9


def test_label_inference_refusals():
  g = {"out": {"kernel": jnp.zeros((3, 10))}}
  with pytest.raises(ValueError, match="has none"):
    labels.bias_corrected(g, 10, 2, jnp.full(10, 0.1))
  with pytest.raises(ValueError, match="distinct labels"):
    labels.yin(g, 10, 11)
  with pytest.raises(ValueError, match="unknown label inference"):
    labels.infer("magic", g, num_classes=10, batch_size=1)
  with pytest.raises(ValueError, match="single example"):
    labels.infer("idlg", g, num_classes=10, batch_size=2)
