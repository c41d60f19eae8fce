"""Tests of fljax/federated.py: FedAvg/FedSGD against hand-written references, sampling,
hooks, the update a client sends on its own, 8-device sharding, evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fljax import federated as fed
from fljax import models, partitions


def _toy_clients(sizes, shape=(8, 8, 1), seed=0):
  """Random images, labels 0..3, one client per size."""
  rng = np.random.default_rng(seed)
  n = sum(sizes)
  x = rng.random((n,) + shape, dtype=np.float32)
  y = rng.integers(0, 4, n).astype(np.int32)
  parts = np.split(np.arange(n), np.cumsum(sizes)[:-1])
  return x, y, parts, jax.tree.map(jnp.asarray, partitions.make_clients(x, y, parts))


def _mlp():
  model = models.make("mlp", num_classes=4, input_shape=(8, 8, 1), hidden=(16,))
  return model, model.init(jax.random.key(42))


def _close(a, b, atol=1e-6):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(u, v, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("batching", ["vmap", "map"])
def test_fedavg_full_batch_matches_hand_written_reference(batching):
  # B >= n: every local step is full-batch gradient descent, so the order of examples
  # cannot matter and the reference is a plain loop.
  sizes = [5, 3, 7]
  x, y, parts, clients = _toy_clients(sizes)
  model, params = _mlp()
  cfg = fed.FedConfig(local_epochs=3, local_batch_size=16, local_lr=0.3, clients_per_round=1.0,
                      client_batching=batching)
  step = jax.jit(fed.make_round_step(fed.make_client_update(fed.make_loss_fn(model.apply), cfg),
                                     cfg, 3))
  state, metrics = step(fed.init_server_state(params, cfg, key=jax.random.key(0)), clients)

  def mean_ce(p, xs, ys):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, xs), ys).mean()

  deltas = []
  for p_idx in parts:
    local = params
    for _ in range(3):
      g = jax.grad(mean_ce)(local, x[p_idx], y[p_idx])
      local = jax.tree.map(lambda w, gw: w - 0.3 * gw, local, g)
    deltas.append(jax.tree.map(jnp.subtract, local, params))
  weights = np.array(sizes, np.float32) / sum(sizes)
  expected = jax.tree.map(lambda w, *ds: w + sum(a * d for a, d in zip(weights, ds)), params,
                          *deltas)
  _close(state.params, expected)
  assert int(state.round) == 1 and float(metrics["clients"]) == 3
  assert float(metrics["examples"]) == sum(sizes)


def test_fedavg_minibatches_visit_each_example_once_per_epoch():
  # A loss linear in the parameters has a constant per-example gradient x_i, so local SGD
  # with batch B (dividing n) moves the parameters by exactly -lr * E / B * sum_i x_i:
  # this checks the number of steps, the batch means and the coverage of every epoch.
  sizes = [6, 3]
  x, y, parts, clients = _toy_clients(sizes)

  def linear_loss(params, batch, key):
    del key
    per_example = batch.x.reshape(batch.x.shape[0], -1) @ params["w"]
    count = batch.mask.sum()
    return (per_example * batch.mask).sum() / jnp.maximum(count, 1.0), {
        "loss_sum": (per_example * batch.mask).sum(), "count": count}

  cfg = fed.FedConfig(local_epochs=2, local_batch_size=3, local_lr=0.1)
  client_update = jax.jit(fed.make_client_update(linear_loss, cfg))
  params = {"w": jnp.zeros(64)}
  for i, p_idx in enumerate(parts):
    data = jax.tree.map(lambda a: a[i], clients)
    delta, metrics = client_update(params, data, jax.random.key(i))
    expected = -0.1 * 2 / 3 * x[p_idx].reshape(len(p_idx), -1).sum(0)
    np.testing.assert_allclose(delta["w"], expected, rtol=1e-5, atol=1e-6)
    assert float(metrics["count"]) == sizes[i]


def test_fedsgd_is_one_gradient_step_on_the_union():
  sizes = [4, 9, 2, 5]
  x, y, parts, clients = _toy_clients(sizes)
  model, params = _mlp()
  cfg = fed.FedConfig(algorithm="fedsgd", local_lr=0.5, clients_per_round=1.0)
  step = jax.jit(fed.make_round_step(fed.make_client_update(fed.make_loss_fn(model.apply), cfg),
                                     cfg, 4))
  state, _ = step(fed.init_server_state(params, cfg, key=jax.random.key(0)), clients)

  def mean_ce(p):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()

  expected = jax.tree.map(lambda w, g: w - 0.5 * g, params, jax.grad(mean_ce)(params))
  _close(state.params, expected)


def test_server_adam_and_momentum_use_the_pseudo_gradient():
  sizes = [4, 4]
  _, _, _, clients = _toy_clients(sizes)
  model, params = _mlp()
  for opt, tx in (("adam", optax.adam(0.01)), ("momentum", optax.sgd(0.5, momentum=0.9))):
    cfg = fed.FedConfig(clients_per_round=1.0, server_optimizer=opt,
                        server_lr=0.01 if opt == "adam" else 0.5)
    client_update = fed.make_client_update(fed.make_loss_fn(model.apply), cfg)
    step = jax.jit(fed.make_round_step(client_update, cfg, 2))
    state = fed.init_server_state(params, cfg, key=jax.random.key(0))
    ref_params, ref_opt = params, tx.init(params)
    for r in range(2):
      deltas = [client_update(ref_params, jax.tree.map(lambda a: a[i], clients),
                              fed.client_key(state.key, r, i))[0] for i in range(2)]
      pseudo = jax.tree.map(lambda a, b: -(a + b) / 2, *deltas)
      updates, ref_opt = tx.update(pseudo, ref_opt, ref_params)
      ref_params = optax.apply_updates(ref_params, updates)
      state, _ = step(state, clients)
    _close(state.params, ref_params, atol=1e-5)


def test_the_update_a_client_sends_is_obtainable_on_its_own():
  _, _, _, clients = _toy_clients([5, 6, 7, 8])
  model, params = _mlp()
  cfg = fed.FedConfig(clients_per_round=0.25, local_batch_size=2, local_epochs=2)
  client_update = fed.make_client_update(fed.make_loss_fn(model.apply), cfg)
  seen = []

  def first_update(updates, weights, key):  # an aggregate that keeps one client's update
    seen.append(True)
    return jax.tree.map(lambda u: u[0], updates)

  step = jax.jit(fed.make_round_step(client_update, cfg, 4, aggregate=first_update))
  state = fed.init_server_state(params, cfg, key=jax.random.key(7))
  new_state, _ = step(state, clients)
  idx, _, _ = fed.sample_clients(4, cfg, key=fed.round_keys(state.key, 0)["sample"])
  i = int(idx[0])
  alone, _ = client_update(params, jax.tree.map(lambda a: a[i], clients),
                           fed.client_key(state.key, 0, i))
  _close(jax.tree.map(jnp.subtract, new_state.params, params), alone)
  assert seen


def test_defense_hook_gets_distinct_keys_and_changes_the_round():
  _, _, _, clients = _toy_clients([4, 4, 4])
  model, params = _mlp()
  cfg = fed.FedConfig(clients_per_round=1.0)
  client_update = fed.make_client_update(fed.make_loss_fn(model.apply), cfg)

  def zero(update, key, round_):
    return jax.tree.map(jnp.zeros_like, update)

  step = jax.jit(fed.make_round_step(client_update, cfg, 3, defense=zero))
  state, _ = step(fed.init_server_state(params, cfg, key=jax.random.key(0)), clients)
  _close(state.params, params, atol=0)

  def key_as_update(update, key, round_):  # each client's defense key, as a number
    return jax.tree.map(lambda u: jnp.zeros_like(u) + jax.random.uniform(key), update)

  captured = {}

  def capture(updates, weights, key):
    captured["u"] = jax.tree.leaves(updates)[0].reshape(3, -1)[:, 0]
    return fed.weighted_mean(updates, weights, key)

  # Unjitted, so that the aggregate sees concrete values.
  fed.make_round_step(client_update, cfg, 3, defense=key_as_update, aggregate=capture)(
      fed.init_server_state(params, cfg, key=jax.random.key(0)), clients)
  assert len(set(np.asarray(captured["u"]).tolist())) == 3

  def round_as_update(update, key, round_):  # the round index reaches the hook
    return jax.tree.map(lambda u: jnp.zeros_like(u) + round_, update)

  step = fed.make_round_step(client_update, cfg, 3, defense=round_as_update, aggregate=capture)
  state = fed.init_server_state(params, cfg, key=jax.random.key(0))
  state, _ = step(state, clients)
  state, _ = step(state, clients)
  np.testing.assert_allclose(np.asarray(captured["u"]), 1.0)


def test_weighted_mean():
  u = {"a": jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])}
  out = fed.weighted_mean(u, jnp.array([1.0, 3.0, 0.0]), None)
  np.testing.assert_allclose(out["a"], [2.5, 3.5])
  zero = fed.weighted_mean(u, jnp.zeros(3), None)
  np.testing.assert_array_equal(zero["a"], [0.0, 0.0])


def test_fixed_sampling_distinct_and_uniform():
  cfg = fed.FedConfig(clients_per_round=0.2)
  sample = jax.jit(lambda k: fed.sample_clients(50, cfg, key=k))
  counts = np.zeros(50)
  for r in range(400):
    idx, real, dropped = sample(jax.random.fold_in(jax.random.key(0), r))
    idx = np.asarray(idx)
    assert len(idx) == 10 and len(set(idx.tolist())) == 10 and idx.max() < 50
    assert float(real.sum()) == 10 and int(dropped) == 0
    counts[idx] += 1
  # Each client is sampled with probability 0.2: 80 times in 400 rounds (sd ~8).
  assert abs(counts.mean() - 80) < 1e-9 and counts.min() > 50 and counts.max() < 110


def test_poisson_sampling_rate_and_cap():
  cfg = fed.FedConfig(sampling="poisson", clients_per_round=0.1)
  sizes = []
  for r in range(300):
    idx, real, dropped = fed.sample_clients(100, cfg, key=jax.random.fold_in(jax.random.key(1), r))
    assert idx.shape == (100,) and int(dropped) == 0
    n = int(real.sum())
    assert np.all(np.asarray(real)[:n] == 1) and np.all(np.asarray(real)[n:] == 0)
    assert len(set(np.asarray(idx)[:n].tolist())) == n
    sizes.append(n)
  # Binomial(100, 0.1): mean 10, variance 9.
  assert abs(np.mean(sizes) - 10) < 0.6 and 5 < np.var(sizes) < 14
  capped = fed.FedConfig(sampling="poisson", clients_per_round=0.5, poisson_cap=10)
  idx, real, dropped = fed.sample_clients(100, capped, key=jax.random.key(2))
  assert idx.shape == (10,) and float(real.sum()) == 10 and int(dropped) > 20


def test_poisson_round_with_no_client_keeps_params():
  _, _, _, clients = _toy_clients([3, 3])
  model, params = _mlp()
  cfg = fed.FedConfig(sampling="poisson", clients_per_round=1e-9)
  step = jax.jit(fed.make_round_step(fed.make_client_update(fed.make_loss_fn(model.apply), cfg),
                                     cfg, 2))
  state, metrics = step(fed.init_server_state(params, cfg, key=jax.random.key(0)), clients)
  _close(state.params, params, atol=0)
  assert float(metrics["clients"]) == 0 and np.isfinite(float(metrics["train_loss"]))


@pytest.mark.parametrize("algorithm", ["fedavg", "fedsgd"])
@pytest.mark.parametrize("batching", ["vmap", "map"])
def test_eight_devices_equal_one(algorithm, batching):
  assert jax.device_count() >= 8, "tests/conftest.py forces 8 CPU devices"
  _, _, _, clients = _toy_clients([5, 9, 3, 6, 8, 2, 7, 4, 6, 5, 3, 8])
  model = models.make("lenet", num_classes=4, input_shape=(8, 8, 1))
  params = model.init(jax.random.key(3))
  # 6 of 12 clients per round: padded to 8 slots on 8 devices.
  cfg = fed.FedConfig(algorithm=algorithm, clients_per_round=0.5, local_batch_size=3,
                      client_batching=batching)
  client_update = fed.make_client_update(fed.make_loss_fn(model.apply), cfg)
  results = []
  for mesh in (None, fed.make_mesh(8)):
    step = jax.jit(fed.make_round_step(client_update, cfg, 12, mesh=mesh))
    state = fed.replicate(fed.init_server_state(params, cfg, key=jax.random.key(0)), mesh)
    data = fed.replicate(clients, mesh)
    for _ in range(3):
      state, metrics = step(state, data)
    results.append((state.params, metrics))
  _close(results[0][0], results[1][0], atol=1e-5)
  np.testing.assert_allclose(results[0][1]["train_loss"], results[1][1]["train_loss"], rtol=1e-5)
  assert float(results[1][1]["clients"]) == 6


def test_too_many_devices_is_a_clear_error():
  with pytest.raises(ValueError, match="xla_force_host_platform_device_count"):
    fed.make_mesh(jax.device_count() + 1)


def test_evaluate_matches_direct_computation():
  model, params = _mlp()
  x = jax.random.uniform(jax.random.key(0), (23, 8, 8, 1))
  y = jax.random.randint(jax.random.key(1), (23,), 0, 4)
  out = jax.jit(fed.make_evaluate(model.apply, batch_size=5))(params, x, y)
  logits = model.apply(params, x)
  np.testing.assert_allclose(out["accuracy"], (logits.argmax(-1) == y).mean(), rtol=1e-6)
  np.testing.assert_allclose(
      out["loss"], optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), rtol=1e-5)


def test_bad_config_is_rejected():
  with pytest.raises(ValueError, match="clients_per_round"):
    fed.FedConfig(clients_per_round=0.0)
  with pytest.raises(ValueError, match="algorithm"):
    fed.FedConfig(algorithm="fedprox")
  with pytest.raises(ValueError, match="client_batching"):
    fed.FedConfig(client_batching="pmap")


def test_poisson_rounds_agree_between_vmap_and_map():
  # lax.map skips the empty slots with a cond; vmap computes them and weights them 0.
  _, _, _, clients = _toy_clients([5, 9, 3, 6, 8, 2, 7, 4])
  model, params = _mlp()
  results = {}
  for batching in ("vmap", "map"):
    cfg = fed.FedConfig(sampling="poisson", clients_per_round=0.4, local_batch_size=3,
                        client_batching=batching)
    step = jax.jit(fed.make_round_step(
        fed.make_client_update(fed.make_loss_fn(model.apply), cfg), cfg, 8))
    state = fed.init_server_state(params, cfg, key=jax.random.key(5))
    for _ in range(3):
      state, metrics = step(state, clients)
    results[batching] = (state.params, metrics)
  _close(results["vmap"][0], results["map"][0], atol=1e-6)
  assert float(results["vmap"][1]["clients"]) == float(results["map"][1]["clients"]) < 8
