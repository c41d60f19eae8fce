"""Tests of privacy/dpsgd.py: batch sampling, the step against a hand computation, events."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fljax import federated as fed
from fljax import models
from fljax.partitions import Batch
from privacy import accounting, clipping, dpsgd


def test_poisson_batches_are_static_masked_and_sized():
  cfg = dpsgd.DPSGDConfig(batch_size=20)
  m = cfg.static_batch_size(400)
  assert 20 < m < 400
  sample = jax.jit(lambda k: dpsgd.sample_batch(400, cfg, key=k))
  sizes = []
  for i in range(200):
    idx, mask, truncated = sample(jax.random.key(i))
    assert idx.shape == mask.shape == (m,) and int(truncated) == 0
    chosen = np.asarray(idx)[np.asarray(mask) > 0]
    assert len(set(chosen)) == len(chosen)
    sizes.append(mask.sum())
  assert np.mean(sizes) == pytest.approx(20, rel=0.1)
  idx, mask, _ = dpsgd.sample_batch(400, dpsgd.DPSGDConfig(batch_size=20, sampling="fixed"),
                                    key=jax.random.key(0))
  assert mask.sum() == 20 and len(set(np.asarray(idx))) == 20


def test_events_match_the_sampling():
  poisson = dpsgd.DPSGDConfig(batch_size=10, max_batch_size=100)
  assert poisson.event(100, 5) == accounting.dpsgd_event(0.1, 1.0, 5)
  truncated = dpsgd.DPSGDConfig(batch_size=10, max_batch_size=30)
  assert "Truncated" in type(truncated.event(100, 5, "pld").event).__name__
  with pytest.raises(ValueError, match="accounted only by PLD"):
    truncated.event(100, 5, "rdp")
  fixed = dpsgd.DPSGDConfig(batch_size=10, sampling="fixed")
  assert accounting.default_neighbouring(fixed.event(100, 5)) == "replace_one"


def test_private_step_equals_hand_computation():
  model = models.make("mlp", num_classes=3, input_shape=(4, 4, 1), hidden=(8,))
  params = model.init(jax.random.key(0))
  loss_fn = fed.make_loss_fn(model.apply)
  rng = np.random.default_rng(0)
  data = Batch(x=jnp.asarray(rng.random((12, 4, 4, 1), dtype=np.float32)),
               y=jnp.asarray(rng.integers(0, 3, 12), jnp.int32), mask=jnp.ones((12,)))
  cfg = dpsgd.DPSGDConfig(clip_norm=0.5, noise_multiplier=1.5, batch_size=4, max_batch_size=12)
  noise_key = jax.random.key(7)
  opt = dpsgd.dp_optimizer(cfg, optax.sgd(0.1), key=noise_key)
  step = jax.jit(dpsgd.make_step(loss_fn, cfg, opt, 12))
  key = jax.random.key(9)
  new, _, metrics = step(params, opt.init(params), data, key)

  sample_key, loss_key = jax.random.split(key)
  idx, mask, _ = dpsgd.sample_batch(12, cfg, key=sample_key)
  batch = Batch(x=data.x[idx], y=data.y[idx], mask=mask)
  grads, _ = clipping.per_example_grads(loss_fn, params, batch, loss_key)
  clipped, _ = clipping.clip_rows(grads, 0.5)
  total = jax.tree.map(lambda g: jnp.tensordot(mask, g, axes=1), clipped)
  from privacy.noise import tree_gaussian
  z = tree_gaussian(total, 1.5 * 0.5, key=jax.random.fold_in(noise_key, 0))
  expected = jax.tree.map(lambda p, s, n: p - 0.1 * (s + n) / 4, params, total, z)
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert metrics["batch_size"] == mask.sum()


def test_config_rejects_bad_values():
  with pytest.raises(ValueError, match="clip norm"):
    dpsgd.DPSGDConfig(clip_norm=-1.0)
  with pytest.raises(ValueError, match="exceeds the dataset size"):
    dpsgd.DPSGDConfig(batch_size=50).sampling_rate(10)


@pytest.mark.parametrize("private", [True, False])
def test_slices_give_the_step_of_the_whole_batch(private):
  model = models.make("lenet", num_classes=3, input_shape=(8, 8, 1))
  params = model.init(jax.random.key(0))
  loss_fn = fed.make_loss_fn(model.apply)
  rng = np.random.default_rng(0)
  batch = Batch(x=jnp.asarray(rng.random((8, 8, 8, 1), dtype=np.float32)),
                y=jnp.asarray(rng.integers(0, 3, 8), jnp.int32),
                mask=jnp.asarray([1.0] * 6 + [0.0] * 2))  # padding in the second slice

  def run(**kw):
    cfg = dpsgd.DPSGDConfig(clip_norm=0.3, noise_multiplier=1.0, batch_size=6,
                            sampling="fixed", **kw)
    tx = (dpsgd.dp_optimizer(cfg, optax.sgd(0.1), key=jax.random.key(1)) if private
          else optax.sgd(0.1))
    step = jax.jit(dpsgd.make_batch_step(loss_fn, cfg, tx, private=private))
    return step(params, tx.init(params), batch, jax.random.key(2))

  # sliced equals micro-batched over the same chunks with the same keys (private), and the
  # whole batch (non-private: its loss ignores the key)
  want = run(microbatch_size=4) if private else run()
  got = run(slices=2)
  for a, b in zip(jax.tree.leaves((got[0], got[2])), jax.tree.leaves((want[0], want[2]))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert dpsgd.DPSGDConfig(batch_size=7, sampling="fixed", slices=2).static_batch_size(20) == 8
  with pytest.raises(ValueError, match="slices must be >= 1"):
    dpsgd.DPSGDConfig(slices=-1)


def test_auto_slices_split_only_what_each_core_can_keep_busy(monkeypatch):
  monkeypatch.setattr(dpsgd.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
  assert dpsgd.auto_slices(256) == 4
  assert dpsgd.auto_slices(96) == 3  # 4 would leave 24 rows a slice
  assert dpsgd.auto_slices(100) == 2  # 3 does not divide it
  assert dpsgd.auto_slices(64, unit=32) == 2
  assert dpsgd.auto_slices(63) == 1 and dpsgd.auto_slices(16) == 1
  cfg = dpsgd.DPSGDConfig(batch_size=7, sampling="fixed")  # auto never pads
  assert cfg.slices == 0 and cfg.static_batch_size(20) == 7 and cfg.num_slices(7) == 1
  monkeypatch.setattr(dpsgd.jax, "default_backend", lambda: "gpu")
  assert dpsgd.auto_slices(256) == 1
