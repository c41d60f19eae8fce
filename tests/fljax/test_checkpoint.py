"""A run stopped at a checkpoint and resumed ends bit-identical to an uninterrupted run."""

import jax
import jax.numpy as jnp
import numpy as np

from fljax import federated as fed
from fljax import models, partitions
from fljax.checkpoint import Checkpointer


def _setup():
  rng = np.random.default_rng(0)
  x = rng.random((40, 8, 8, 1), dtype=np.float32)
  y = rng.integers(0, 4, 40).astype(np.int32)
  parts = partitions.dirichlet(y, 5, key=jax.random.key(0), alpha=0.5, min_size=2)
  clients = jax.tree.map(jnp.asarray, partitions.make_clients(x, y, parts))
  model = models.make("lenet", num_classes=4, input_shape=(8, 8, 1))
  cfg = fed.FedConfig(clients_per_round=0.6, local_batch_size=3, server_optimizer="adam",
                      server_lr=0.01)
  step = jax.jit(fed.make_round_step(
      fed.make_client_update(fed.make_loss_fn(model.apply), cfg), cfg, 5))
  fresh = lambda: fed.init_server_state(model.init(jax.random.key(1)), cfg,
                                        key=jax.random.key(2))
  return clients, step, fresh


def _leaves(state):
  return jax.tree.leaves((state.params, state.opt_state, state.round,
                          jax.random.key_data(state.key)))


def test_resume_is_bit_identical(tmp_path):
  clients, step, fresh = _setup()
  straight = fresh()
  for _ in range(4):
    straight, _ = step(straight, clients)

  first = fresh()
  for _ in range(2):
    first, _ = step(first, clients)
  ckpt = Checkpointer(tmp_path / "ckpt")
  ckpt.save(first)
  ckpt.close()
  del first

  reopened = Checkpointer(tmp_path / "ckpt")
  assert reopened.latest_round() == 2
  resumed = reopened.restore(fresh())
  assert int(resumed.round) == 2
  for _ in range(2):
    resumed, _ = step(resumed, clients)
  for a, b in zip(_leaves(straight), _leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_keeps_newest_and_saving_twice_is_harmless(tmp_path):
  clients, step, fresh = _setup()
  ckpt = Checkpointer(tmp_path / "ckpt", max_to_keep=2)
  assert ckpt.latest_round() is None
  state = fresh()
  for _ in range(3):
    state, _ = step(state, clients)
    ckpt.save(state)
    ckpt.save(state)
  assert ckpt.latest_round() == 3
  old = ckpt.restore(fresh(), round_=2)
  assert int(old.round) == 2
  ckpt.close()
