"""Tests of privacy/federated.py: DP-FedAvg against a hand computation on 3 clients,
adaptive clipping, local DP, record-level DP-SGD clients, participation, events."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import dp_event

from fljax import federated as fed
from fljax import models, partitions
from privacy import federated as pfed
from privacy.noise import tree_gaussian


def test_dp_fedavg_on_three_clients_matches_hand_computation():
  updates = {"w": jnp.array([[3.0, 4.0], [0.0, 0.5], [6.0, 8.0]])}  # norms 5, 0.5, 10
  weights = jnp.array([40.0, 10.0, 0.0])  # the third slot is padding (not sampled)
  agg = pfed.dp_fedavg(clip_norm=1.0, noise_multiplier=2.0, expected_clients=2.5)
  key = jax.random.key(5)
  state = agg.init(None)
  out, state, metrics = jax.jit(agg.update)(updates, weights, state, key)
  update_key, _ = jax.random.split(key)
  noise = tree_gaussian({"w": jnp.zeros(2)}, 2.0, key=update_key)["w"]
  # clipped: [0.6, 0.8] and [0, 0.5]; weight 1 each (sizes ignored); padding excluded
  expected = (np.array([0.6, 0.8]) + np.array([0.0, 0.5]) + np.asarray(noise)) / 2.5
  np.testing.assert_allclose(out["w"], expected, rtol=1e-6)
  assert float(metrics["dp_noise_std"]) == pytest.approx(2.0 / 2.5)


def test_adaptive_clipping_moves_c_towards_the_quantile():
  agg = pfed.dp_fedavg(clip_norm=1.0, noise_multiplier=0.5, expected_clients=100.0,
                       adaptive=pfed.AdaptiveClipping(target_quantile=0.5, lr=0.2,
                                                      count_noise_multiplier=5.0))
  norms = jnp.linspace(0.1, 10.0, 100)  # median about 5: C must grow from 1
  updates = {"w": norms[:, None] * jnp.array([[1.0, 0.0]])}
  state = agg.init(None)
  step = jax.jit(agg.update)
  for r in range(40):
    _, state, _ = step(updates, jnp.ones(100), state, jax.random.key(r))
  assert 3.0 < float(state.clip_norm) < 7.5
  # update noise shrinks so that both queries together have multiplier 0.5
  assert pfed.dp_fedavg_update_noise(0.5, pfed.AdaptiveClipping(count_noise_multiplier=5.0)) == \
      pytest.approx((0.5 ** -2 - 10.0 ** -2) ** -0.5)
  with pytest.raises(ValueError, match="2 \\* count_noise_multiplier"):
    pfed.dp_fedavg_update_noise(3.0, pfed.AdaptiveClipping(count_noise_multiplier=1.0))


def test_dp_fedavg_events():
  cfg = fed.FedConfig(sampling="poisson", clients_per_round=0.1)
  event, rel = pfed.dp_fedavg_event(cfg, 100, 1.0)
  assert event == dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(1.0))
  assert rel == "add_remove"
  event, rel = pfed.dp_fedavg_event(fed.FedConfig(clients_per_round=0.1), 100, 1.0)
  # replace-one user: the sum moves by up to 2C, so the multiplier is sigma / 2
  assert event == dp_event.SampledWithoutReplacementDpEvent(100, 10, dp_event.GaussianDpEvent(0.5))
  assert rel == "replace_one"
  assert pfed.expected_clients(cfg, 100) == pytest.approx(10.0)


def test_local_dp_clips_then_noises():
  defense = pfed.local_dp(clip_norm=1.0, noise_multiplier=0.5)
  update = {"w": jnp.array([30.0, 40.0])}
  out = defense(update, jax.random.key(1))
  noise = tree_gaussian(update, 0.5, key=jax.random.key(1))
  np.testing.assert_allclose(out["w"], np.array([0.6, 0.8]) + np.asarray(noise["w"]), rtol=1e-6)
  assert pfed.local_dp_event(0.5) == dp_event.GaussianDpEvent(0.25)


@pytest.mark.parametrize("algorithm", ["fedavg", "fedsgd"])
def test_dpsgd_client_update_runs_and_sends_noisy_updates(algorithm):
  rng = np.random.default_rng(0)
  x = rng.random((30, 4, 4, 1), dtype=np.float32)
  y = rng.integers(0, 3, 30).astype(np.int32)
  clients = partitions.make_clients(x, y, [np.arange(20), np.arange(20, 30)])
  model = models.make("mlp", num_classes=3, input_shape=(4, 4, 1), hidden=(8,))
  params = model.init(jax.random.key(0))
  cfg = fed.FedConfig(algorithm=algorithm, local_batch_size=5, local_lr=0.1)
  update = jax.jit(pfed.make_dpsgd_client_update(fed.make_loss_fn(model.apply), cfg,
                                                 clip_norm=0.1, noise_multiplier=0.0))
  small = jax.tree.map(lambda a: jnp.asarray(a[1]), clients)
  u, metrics = update(params, small, jax.random.key(3))
  norm = float(jnp.sqrt(sum((l ** 2).sum() for l in jax.tree.leaves(u))))
  # no noise: each step moves at most lr * (sum of <= n_i clipped rows) / B
  steps = 1 if algorithm == "fedsgd" else 2
  bound = (1.0 if algorithm == "fedsgd" else 0.1) * steps * 10 * 0.1 / 5
  assert 0 < norm <= bound * (1 + 1e-5)
  assert metrics["count"] == 10
  ghosted = jax.jit(pfed.make_dpsgd_client_update(fed.make_loss_fn(model.apply), cfg,
                                                  clip_norm=0.1, noise_multiplier=0.0,
                                                  clipping="ghost"))
  for a, b in zip(jax.tree.leaves(ghosted(params, small, jax.random.key(3))[0]), jax.tree.leaves(u)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)  # the same clipped sums
  noisy = jax.jit(pfed.make_dpsgd_client_update(fed.make_loss_fn(model.apply), cfg,
                                                clip_norm=0.1, noise_multiplier=5.0))
  u2, _ = noisy(params, small, jax.random.key(3))
  assert float(jnp.sqrt(sum((l ** 2).sum() for l in jax.tree.leaves(u2)))) > 5 * norm
  event = pfed.dpsgd_client_event(cfg, 10, 1.0)
  assert event.count == steps and event.event.sampling_probability == 0.5


def test_participation_matches_the_round_sampling():
  cfg = fed.FedConfig(clients_per_round=0.3)
  key = jax.random.key(4)
  taken = np.asarray(pfed.participation(cfg, 10, key, range(5)))
  assert taken.shape == (5, 10) and (taken.sum(1) == 3).all()
  idx, _, _ = fed.sample_clients(10, cfg, key=fed.round_keys(key, 2)["sample"])
  assert set(np.flatnonzero(taken[2])) == set(np.asarray(idx))


@pytest.mark.parametrize("batching,clipping", [("vmap", "vmap"), ("map", "vmap"),
                                               ("vmap", "ghost"), ("map", "ghost")])
def test_private_rounds_on_four_devices_equal_one(batching, clipping):
  """Record-level client DP-SGD, local DP and DP-FedAvg give the same round sharded (with
  ghost norms too: their zero perturbations must vary over the mesh, or their gradients
  are summed over it)."""
  rng = np.random.default_rng(1)
  sizes = [5, 9, 3, 6, 8, 2]
  x = rng.random((sum(sizes), 4, 4, 1), dtype=np.float32)
  y = rng.integers(0, 3, sum(sizes)).astype(np.int32)
  parts = np.split(np.arange(sum(sizes)), np.cumsum(sizes)[:-1])
  clients = jax.tree.map(jnp.asarray, partitions.make_clients(x, y, parts))
  model = models.make("mlp", num_classes=3, input_shape=(4, 4, 1), hidden=(8,))
  params = model.init(jax.random.key(3))
  cfg = fed.FedConfig(clients_per_round=0.5, local_batch_size=3, client_batching=batching)
  client_update = pfed.make_dpsgd_client_update(fed.make_loss_fn(model.apply), cfg,
                                                clip_norm=0.5, noise_multiplier=1.0,
                                                clipping=clipping)
  aggregate = pfed.dp_fedavg(clip_norm=1.0, noise_multiplier=1.0, expected_clients=3.0)
  results = []
  for mesh in (None, fed.make_mesh(4)):
    step = jax.jit(fed.make_round_step(client_update, cfg, 6, mesh=mesh,
                                       defense=pfed.local_dp(clip_norm=2.0, noise_multiplier=0.1),
                                       aggregate=aggregate))
    state = fed.replicate(fed.init_server_state(params, cfg, key=jax.random.key(0),
                                                aggregate=aggregate), mesh)
    for _ in range(2):
      state, _ = step(state, fed.replicate(clients, mesh))
    results.append(state.params)
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
