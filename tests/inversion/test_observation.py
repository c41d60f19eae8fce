"""Tests of inversion/observation.py: every defense of the privacy package applies to an
observation, and a secure-aggregation round is observed as its aggregate only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fljax import federated as fed
from fljax import models
from fljax.partitions import Batch
from inversion import observation as ob
from inversion.attacks import dlg
from privacy import defenses, secagg
from privacy import federated as pfed

SHAPE = (8, 8, 1)


def _setup():
  model = models.make("lenet", num_classes=10, input_shape=SHAPE, init="uniform")
  params = model.init(jax.random.key(0))
  client_update = fed.make_client_update(fed.make_loss_fn(model.apply),
                                         fed.FedConfig(algorithm="fedsgd"))
  return model, params, client_update


DEFENSES = {
    "gaussian": lambda: defenses.gaussian_noise(1e-2),
    "prune": lambda: defenses.topk_prune(0.9),
    "quantize_int8": lambda: defenses.quantize("int8"),
    "quantize_fp16": lambda: defenses.quantize("fp16"),
    "local_dp": lambda: pfed.local_dp(clip_norm=1.0, noise_multiplier=0.5),
}


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_each_defense_applies_to_the_observation_and_an_attack_runs(name):
  model, params, client_update = _setup()
  data = Batch(x=jax.random.uniform(jax.random.key(1), (1,) + SHAPE), y=jnp.array([4]),
               mask=jnp.ones(1))
  threat = ob.ThreatModel(batch_size=1, input_shape=SHAPE, defense=name)
  plain = ob.observe(client_update, params, data, jax.random.key(2), threat)
  obs = ob.observe(client_update, params, data, jax.random.key(2), threat,
                   defense=DEFENSES[name]())
  ob.check(obs, threat)
  changed = any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(obs.update),
                                                         jax.tree.leaves(plain.update)))
  assert changed
  if name == "prune":
    flat = np.concatenate([np.ravel(u) for u in jax.tree.leaves(obs.update)])
    assert np.sum(flat != 0) == round(0.1 * flat.size)  # the top 10% kept
  attack = dlg.make(model.apply, threat)
  state = attack.init(jax.random.key(3), obs)
  state, m = jax.jit(attack.step)(state, obs)
  assert bool(jnp.isfinite(m["loss"]))


def _clients():
  x = jax.random.uniform(jax.random.key(1), (2, 2) + SHAPE)
  return Batch(x=x, y=jnp.array([[1, 7], [3, 3]]), mask=jnp.ones((2, 2)))


def test_aggregate_of_equal_fedsgd_clients_is_the_union_batch_gradient():
  model, params, client_update = _setup()
  clients = _clients()
  threat = ob.ThreatModel(batch_size=4, input_shape=SHAPE, observes="aggregate",
                          labels_known=True)
  obs = ob.observe_aggregate(client_update, params, clients, jax.random.key(0), threat)
  union = Batch(x=clients.x.reshape((4,) + SHAPE), y=clients.y.reshape(4), mask=jnp.ones(4))
  grads, _ = client_update(params, union, jax.random.key(0))
  for a, b in zip(jax.tree.leaves(obs.update), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(obs.labels, [1, 7, 3, 3])


def test_secure_aggregation_observation_is_the_protocols_sum():
  model, params, client_update = _setup()
  clients = _clients()
  threat = ob.ThreatModel(batch_size=4, input_shape=SHAPE, observes="aggregate")
  settings = secagg.SecureAggregation(clip=1.0, bits=32, threshold=0.6)
  obs = ob.observe_aggregate(client_update, params, clients, jax.random.key(0), threat,
                             aggregate=secagg.aggregator(settings))
  plain = ob.observe_aggregate(client_update, params, clients, jax.random.key(0), threat)
  for a, b in zip(jax.tree.leaves(obs.update), jax.tree.leaves(plain.update)):
    np.testing.assert_allclose(a, b, atol=1e-6)  # the secure sum, up to its quantisation
  with pytest.raises(ValueError, match="observes='aggregate'"):
    ob.observe_aggregate(client_update, params, clients, jax.random.key(0),
                         ob.ThreatModel(batch_size=4, input_shape=SHAPE))
  with pytest.raises(ValueError, match="declares batch size 3"):
    ob.observe_aggregate(client_update, params, clients, jax.random.key(0),
                         ob.ThreatModel(batch_size=3, input_shape=SHAPE, observes="aggregate"))


def test_dp_fedavg_and_record_level_dpsgd_produce_attackable_observations():
  model, params, client_update = _setup()
  clients = _clients()
  threat = ob.ThreatModel(batch_size=4, input_shape=SHAPE, observes="aggregate",
                          defense="dp_fedavg")
  noisy = ob.observe_aggregate(client_update, params, clients, jax.random.key(0), threat,
                               aggregate=pfed.dp_fedavg(clip_norm=0.1, noise_multiplier=1.0,
                                                        expected_clients=2.0))
  ob.check(noisy, threat)
  plain = ob.observe_aggregate(client_update, params, clients, jax.random.key(0), threat)
  diff = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(noisy.update),
                                                          jax.tree.leaves(plain.update)))
  assert diff > 0  # clipped and noised by the server's aggregator
  dpsgd_update = pfed.make_dpsgd_client_update(
      fed.make_loss_fn(model.apply), fed.FedConfig(algorithm="fedsgd", local_batch_size=1),
      clip_norm=1.0, noise_multiplier=1.0)
  one = ob.ThreatModel(batch_size=1, input_shape=SHAPE, defense="dpsgd")
  data = Batch(x=clients.x[0, :1], y=clients.y[0, :1], mask=jnp.ones(1))
  obs = ob.observe(dpsgd_update, params, data, jax.random.key(3), one)
  ob.check(obs, one)
  attack = dlg.make(model.apply, one)
  state, m = jax.jit(attack.step)(attack.init(jax.random.key(4), obs), obs)
  assert bool(jnp.isfinite(m["loss"]))
