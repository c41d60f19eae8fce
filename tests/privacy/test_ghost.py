"""Tests of privacy/ghost.py: ghost-norm clipping equals the vmap path on every model (flat
and per layer, masked and non-finite rows, micro-batches), and a layer it cannot cover
falls back with one warning."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fljax import federated as fed
from fljax import models
from fljax.partitions import Batch
from privacy import clipping, ghost


def _setup(model_name, n=6, size=16, channels=1, classes=4):
  model = models.make(model_name, num_classes=classes, input_shape=(size, size, channels))
  params = model.init(jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = Batch(x=jnp.asarray(rng.random((n, size, size, channels), dtype=np.float32)),
                y=jnp.asarray(rng.integers(0, classes, n), jnp.int32),
                mask=jnp.asarray([1.0] * (n - 1) + [0.0]))  # the last row is padding
  return fed.make_loss_fn(model.apply), params, batch


def _close(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_name", ["mlp", "cnn", "lenet", "resnet"])
@pytest.mark.parametrize("per_layer", [False, True])
def test_ghost_clipping_equals_the_vmap_path(model_name, per_layer):
  loss_fn, params, batch = _setup(model_name)
  clip = 0.05 if per_layer else 0.5  # some rows clipped, some not

  def run(fn, **kw):
    return jax.jit(lambda p, b: fn(loss_fn, p, b, jax.random.key(3), clip_norm=clip,
                                   per_layer=per_layer, **kw))(params, batch)

  with warnings.catch_warnings():
    warnings.simplefilter("error", ghost.GhostWarning)  # every model is covered
    total, m = run(ghost.clipped_grad_sum)
  want, wm = run(clipping.clipped_grad_sum)
  _close(total, want)
  assert jax.tree.structure(total) == jax.tree.structure(want)
  for k in wm:
    np.testing.assert_allclose(m[k], wm[k], rtol=1e-5)
  assert 0 < float(m["clipped"]) <= 5 and float(m["count"]) == 5
  chunks, _ = run(ghost.clipped_grad_sum, microbatch_size=3)
  _close(chunks, want)


def test_non_finite_rows_are_dropped_as_in_the_vmap_path():
  loss_fn, params, batch = _setup("cnn", n=4)
  bad = Batch(x=batch.x.at[1].set(jnp.nan), y=batch.y, mask=batch.mask)
  total, m = jax.jit(lambda b: ghost.clipped_grad_sum(
      loss_fn, params, b, jax.random.key(0), clip_norm=1.0))(bad)
  want, wm = jax.jit(lambda b: clipping.clipped_grad_sum(
      loss_fn, params, b, jax.random.key(0), clip_norm=1.0))(bad)
  assert float(m["nonfinite"]) == float(wm["nonfinite"]) == 1
  assert all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree.leaves(total))
  _close(total, want)


class _Shared(nn.Module):
  """One dense layer applied twice (shared weights: its per-row gradient sums two calls)."""

  @nn.compact
  def __call__(self, x):
    shared = nn.Dense(16)
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(4)(shared(jnp.tanh(shared(x))))


def test_a_layer_it_cannot_cover_falls_back_with_one_warning_naming_it():
  model = models.Model(_Shared(), (4, 4, 1))
  params = model.init(jax.random.key(0))
  loss_fn = fed.make_loss_fn(model.apply)
  batch = Batch(x=jax.random.uniform(jax.random.key(1), (3, 4, 4, 1)),
                y=jnp.array([0, 1, 2]), mask=jnp.ones(3))
  assert "Dense at Dense_0 is called more than once" in ghost.supported(
      loss_fn, params, batch, jax.random.key(2))
  with pytest.warns(ghost.GhostWarning, match="Dense at Dense_0 is called more") as caught:
    total, _ = ghost.clipped_grad_sum(loss_fn, params, batch, jax.random.key(2), clip_norm=1.0)
  assert len(caught) == 1
  want, _ = clipping.clipped_grad_sum(loss_fn, params, batch, jax.random.key(2), clip_norm=1.0)
  _close(total, want)


def test_auto_takes_ghost_norms_where_they_cover_the_model_and_vmap_silently_elsewhere():
  loss_fn, params, batch = _setup("cnn")
  key = jax.random.key(3)
  auto, _ = ghost.CLIPPING["auto"](loss_fn, params, batch, key, clip_norm=0.5)
  _close(auto, ghost.clipped_grad_sum(loss_fn, params, batch, key, clip_norm=0.5)[0])
  model = models.Model(_Shared(), (4, 4, 1))
  params = model.init(jax.random.key(0))
  loss_fn = fed.make_loss_fn(model.apply)
  batch = Batch(x=jax.random.uniform(jax.random.key(1), (3, 4, 4, 1)),
                y=jnp.array([0, 1, 2]), mask=jnp.ones(3))
  with warnings.catch_warnings():
    warnings.simplefilter("error", ghost.GhostWarning)  # 'auto' falls back without one
    total, _ = ghost.CLIPPING["auto"](loss_fn, params, batch, key, clip_norm=1.0)
  _close(total, clipping.clipped_grad_sum(loss_fn, params, batch, key, clip_norm=1.0)[0])
