"""Tests of privacy/clipping.py: per-example gradients against a loop, clip bounds,
micro-batching, per-layer clipping, dropped non-finite rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fljax import federated as fed
from fljax import models
from fljax.partitions import Batch
from privacy import clipping


def _setup(n=6, model_name="lenet"):
  model = models.make(model_name, num_classes=4, input_shape=(8, 8, 1))
  params = model.init(jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = Batch(x=jnp.asarray(rng.random((n, 8, 8, 1), dtype=np.float32)),
                y=jnp.asarray(rng.integers(0, 4, n), jnp.int32), mask=jnp.ones((n,)))
  return fed.make_loss_fn(model.apply), params, batch


@pytest.mark.parametrize("jit", [False, True])
def test_per_example_grads_equal_a_loop(jit):
  loss_fn, params, batch = _setup()
  fn = jax.jit(clipping.per_example_grads, static_argnums=0) if jit else clipping.per_example_grads
  grads, losses = fn(loss_fn, params, batch, jax.random.key(1))
  for i in range(batch.mask.shape[0]):
    one = Batch(x=batch.x[i:i + 1], y=batch.y[i:i + 1], mask=batch.mask[i:i + 1])
    (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(params, one, None)
    assert losses[i] == pytest.approx(float(loss), rel=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(g)):
      np.testing.assert_allclose(a[i], b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("per_layer", [False, True])
def test_every_clipped_norm_is_at_most_c(per_layer):
  loss_fn, params, batch = _setup()
  grads, _ = clipping.per_example_grads(loss_fn, params, batch, jax.random.key(1))
  c = 0.05  # far below the raw norms, so every row is clipped
  assert (clipping.global_norms(grads) > c).all()
  clipped, info = clipping.clip_rows(grads, c, per_layer=per_layer)
  assert (clipping.global_norms(clipped) <= c * (1 + 1e-5)).all()
  assert info["clipped"].sum() == batch.mask.shape[0]
  if per_layer:
    limit = c / np.sqrt(len(jax.tree.leaves(params)))
    for leaf in jax.tree.leaves(clipped):
      assert (jnp.sqrt((leaf.reshape(leaf.shape[0], -1) ** 2).sum(1)) <= limit * (1 + 1e-5)).all()
  else:  # flat clipping keeps each row's direction
    scale = c / clipping.global_norms(grads)
    for a, b in zip(jax.tree.leaves(clipped), jax.tree.leaves(grads)):
      np.testing.assert_allclose(a, b * scale.reshape((-1,) + (1,) * (b.ndim - 1)), rtol=1e-5)


def test_a_large_c_leaves_gradients_unchanged():
  loss_fn, params, batch = _setup()
  grads, _ = clipping.per_example_grads(loss_fn, params, batch, jax.random.key(1))
  clipped, info = clipping.clip_rows(grads, 1e6)
  for a, b in zip(jax.tree.leaves(clipped), jax.tree.leaves(grads)):
    np.testing.assert_array_equal(a, b)
  assert info["clipped"].sum() == 0


def test_clipped_sum_microbatched_equals_whole_and_skips_padding():
  loss_fn, params, batch = _setup(n=8)
  batch = Batch(x=batch.x, y=batch.y, mask=batch.mask.at[5:].set(0.0))
  whole, m1 = jax.jit(lambda b: clipping.clipped_grad_sum(
      loss_fn, params, b, jax.random.key(2), clip_norm=0.1))(batch)
  chunks, m2 = jax.jit(lambda b: clipping.clipped_grad_sum(
      loss_fn, params, b, jax.random.key(2), clip_norm=0.1, microbatch_size=2))(batch)
  grads, _ = clipping.per_example_grads(loss_fn, params, batch, jax.random.key(2))
  clipped, _ = clipping.clip_rows(grads, 0.1)
  expected = jax.tree.map(lambda g: g[:5].sum(0), clipped)
  for a, b, e in zip(jax.tree.leaves(whole), jax.tree.leaves(chunks), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(b, e, rtol=1e-5, atol=1e-7)
  assert m1["count"] == m2["count"] == 5
  with pytest.raises(ValueError, match="multiple of microbatch_size"):
    clipping.clipped_grad_sum(loss_fn, params, batch, jax.random.key(2), clip_norm=0.1,
                              microbatch_size=3)


def test_non_finite_rows_are_dropped_and_counted():
  loss_fn, params, batch = _setup(n=4)
  x = batch.x.at[1].set(jnp.nan).at[3, 0, 0, 0].set(jnp.inf)
  bad = Batch(x=x, y=batch.y, mask=batch.mask)
  total, m = jax.jit(lambda b: clipping.clipped_grad_sum(
      loss_fn, params, b, jax.random.key(0), clip_norm=1.0))(bad)
  assert m["nonfinite"] == 2 and m["count"] == 4
  assert all(bool(jnp.isfinite(l).all()) for l in jax.tree.leaves(total))
  good = Batch(x=batch.x[jnp.array([0, 2])], y=batch.y[jnp.array([0, 2])], mask=jnp.ones((2,)))
  grads, _ = clipping.per_example_grads(loss_fn, params, good, jax.random.key(0))
  clipped, _ = clipping.clip_rows(grads, 1.0)
  for a, g in zip(jax.tree.leaves(total), jax.tree.leaves(clipped)):
    np.testing.assert_allclose(a, g.sum(0), rtol=1e-5, atol=1e-7)


def test_clip_update_bounds_norm_and_drops_non_finite():
  update = {"a": jnp.full((3,), 2.0), "b": jnp.full((2, 2), -1.0)}
  clipped, norm = clipping.clip_update(update, 1.0)
  assert float(norm) == pytest.approx(np.sqrt(12 + 4))
  assert float(jnp.sqrt(sum((l ** 2).sum() for l in jax.tree.leaves(clipped)))) == pytest.approx(1.0)
  bad, _ = clipping.clip_update({"a": jnp.array([jnp.nan, 1.0])}, 1.0)
  np.testing.assert_array_equal(bad["a"], 0.0)
