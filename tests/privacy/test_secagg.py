"""Tests of privacy/secagg.py: exact sums under dropouts, uniform masked inputs, late
clients stay masked, tampering and replays rejected, aborts, SecAgg+."""

import random
import secrets

import numpy as np
import pytest
from scipy import stats

from privacy import secagg as sa


def _inputs(n, d, bits):
  return {u: np.frombuffer(secrets.token_bytes(8 * d), "<u8").astype(np.uint64) % (1 << bits)
          for u in range(1, n + 1)}


def _expected(xs, survivors, bits):
  return sum(xs[u].astype(object) for u in survivors) % (1 << bits)


@pytest.mark.parametrize("neighbours", [0, 4])
@pytest.mark.parametrize("seed", range(12))
def test_sum_equals_plaintext_sum_of_survivors_under_random_dropouts(seed, neighbours):
  rng = random.Random(seed)
  n, d, bits = 9, 50, rng.choice([8, 20, 32, 40])
  t = 3 if neighbours else 5
  cfg = sa.SecAggConfig(num_clients=n, threshold=t, dimension=d, bits=bits, neighbours=neighbours)
  xs = _inputs(n, d, bits)
  drops = {r: set(rng.sample(range(1, n + 1), rng.choice([0, 0, 1]))) for r in sa.ROUNDS}
  try:
    total, view = sa.run(xs, cfg, drop_before=drops)
  except sa.SecAggAbort:
    pytest.skip("this pattern left fewer than t clients in some neighbourhood")
  survivors = view.rosters["U3"]
  assert set(survivors).isdisjoint(drops["advertise"] | drops["share_keys"] | drops["masked_input"])
  np.testing.assert_array_equal(total.astype(object), _expected(xs, survivors, bits))


def test_masked_inputs_are_uniform_mod_r():
  n, d, bits = 5, 40_000, 8
  cfg = sa.SecAggConfig(num_clients=n, threshold=3, dimension=d, bits=bits)
  zeros = {u: np.zeros(d, np.uint64) for u in range(1, n + 1)}  # the most structured input
  _, view = sa.run(zeros, cfg)
  for y in view.masked.values():
    counts = np.bincount(y.astype(np.int64), minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-4


def test_late_client_declared_dropped_stays_masked_by_its_self_mask():
  n, d, bits = 5, 20_000, 8
  cfg = sa.SecAggConfig(num_clients=n, threshold=3, dimension=d, bits=bits)
  xs = {u: np.zeros(d, np.uint64) for u in range(1, n + 1)}
  clients = {u: sa.Client(u, xs[u], cfg) for u in xs}
  server = sa.Server(cfg)
  roster = server.advertise([c.advertise() for c in clients.values()])
  inboxes = server.share_keys([c.share_keys(roster) for c in clients.values()])
  late = clients[5].masked_input(inboxes[5])  # computed, but arrives after the deadline
  request = server.masked_input([clients[u].masked_input(inboxes[u]) for u in (1, 2, 3, 4)])
  total = server.unmask([clients[u].unmask(request) for u in (1, 2, 3, 4)])
  np.testing.assert_array_equal(total, 0)
  # The server now knows client 5's mask key (it was declared dropped), so it can strip the
  # pairwise masks from the late y_5, but never its self-mask: what is left is uniform.
  msg = sa._unpack(late, "y")
  y5 = np.frombuffer(msg["y"], "<u8").astype(cfg.dtype)
  s_shares = {}
  for u in (1, 2, 3, 4):
    s_shares[u] = clients[u]._decrypt(5)["s"]
  from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
  from privacy import shamir
  s_sk = X25519PrivateKey.from_private_bytes(shamir.reconstruct(s_shares, 3))
  stripped = y5.copy()
  for u in (1, 2, 3, 4):
    mask = sa.prg(sa._agree(s_sk, server._keys[u][1], sa._pair_info(b"mask", server.session, 5, u)),
                  d, bits)
    stripped = stripped - mask if 5 < u else stripped + mask
  stripped = cfg.reduce(stripped)
  assert stats.chisquare(np.bincount(stripped.astype(np.int64), minlength=256)).pvalue > 1e-4
  # and no client reveals client 5's self-mask share, even if asked again as a survivor
  with pytest.raises(sa.SecAggError, match="refusing to reveal both"):
    clients[1].unmask(sa._pack(survivors=[1, 2, 3, 4, 5], dropped=[]))


def _rounds_to_unmask(cfg, xs):
  clients = {u: sa.Client(u, xs[u], cfg) for u in xs}
  server = sa.Server(cfg)
  roster = server.advertise([c.advertise() for c in clients.values()])
  inboxes = server.share_keys([c.share_keys(roster) for c in clients.values()])
  return clients, server, inboxes


def test_tampered_and_replayed_ciphertexts_are_rejected():
  cfg = sa.SecAggConfig(num_clients=4, threshold=3, dimension=8, bits=16)
  xs = _inputs(4, 8, 16)
  clients, server, inboxes = _rounds_to_unmask(cfg, xs)
  box = sa._unpack(inboxes[1], "ciphertexts")["ciphertexts"]
  tampered = dict(box)
  ct = bytearray(tampered[2])
  ct[-1] ^= 1
  tampered[2] = bytes(ct)
  clients[1].masked_input(sa._pack(ciphertexts=tampered))
  request = sa._pack(survivors=[1, 2, 3, 4], dropped=[])
  with pytest.raises(sa.SecAggError, match="failed authentication"):
    clients[1].unmask(request)
  # replay: client 2's ciphertext for client 3, redirected to client 1
  other = sa._unpack(inboxes[3], "ciphertexts")["ciphertexts"][2]
  clients2, _, inboxes2 = _rounds_to_unmask(cfg, xs)
  clients2[1].masked_input(sa._pack(ciphertexts={**sa._unpack(inboxes2[1], "ciphertexts")
                                                 ["ciphertexts"], 2: other}))
  with pytest.raises(sa.SecAggError, match="failed authentication"):
    clients2[1].unmask(request)


def test_unknown_clients_and_malformed_messages_are_rejected():
  cfg = sa.SecAggConfig(num_clients=4, threshold=3, dimension=8, bits=16)
  xs = _inputs(4, 8, 16)
  clients, server, inboxes = _rounds_to_unmask(cfg, xs)
  request = server.masked_input([clients[u].masked_input(inboxes[u]) for u in (1, 2, 3, 4)])
  answers = [clients[u].unmask(request) for u in (1, 2, 3)]
  forged = sa._pack(id=9, b_shares={}, s_shares={})
  with pytest.raises(sa.SecAggError, match="unknown or excluded client 9"):
    server.unmask(answers + [forged])
  with pytest.raises(sa.SecAggError, match="malformed message"):
    server.unmask([b"not json"])
  with pytest.raises(sa.SecAggError, match="sent twice"):
    server.unmask(answers + answers[:1])


def test_too_few_survivors_abort_with_a_clear_error():
  cfg = sa.SecAggConfig(num_clients=5, threshold=3, dimension=4, bits=16)
  with pytest.raises(sa.SecAggAbort, match="fewer than the threshold t=3"):
    sa.run(_inputs(5, 4, 16), cfg, drop_before={"masked_input": {1, 2, 3}})


def test_parameters_are_checked():
  with pytest.raises(ValueError, match="n/2 < t"):
    sa.SecAggConfig(num_clients=10, threshold=5, dimension=4)
  with pytest.raises(ValueError, match="even number of neighbours"):
    sa.SecAggConfig(num_clients=10, threshold=3, dimension=4, neighbours=3)
  with pytest.raises(ValueError, match="unknown rounds"):
    sa.run(_inputs(3, 4, 16), sa.SecAggConfig(num_clients=3, threshold=2, dimension=4),
           drop_before={"round3": {1}})


def test_secagg_plus_graph_is_k_regular_and_symmetric():
  graph = sa.harary_neighbours(20, 6, b"\x01" * 32)
  assert sorted(graph) == list(range(1, 21))
  for u, nbrs in graph.items():
    assert len(nbrs) == 6 and u not in nbrs
    assert all(u in graph[v] for v in nbrs)
  assert graph != sa.harary_neighbours(20, 6, b"\x02" * 32)


# ----------------------------------------------------------------------------- federated hook

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from fljax import federated as fed  # noqa: E402
from fljax import models, partitions  # noqa: E402


def _uniform_mean(updates, weights, key):
  del key
  real = (weights > 0).astype(jnp.float32)
  return jax.tree.map(lambda u: jnp.tensordot(real, u, axes=1) / real.sum(), updates)


@pytest.mark.parametrize("bits,neighbours", [(32, 0), (24, 4)])
def test_secure_aggregator_equals_plain_mean_up_to_quantization(bits, neighbours):
  updates = {"a": jax.random.normal(jax.random.key(0), (7, 3, 4)) * 0.2,
             "b": jax.random.normal(jax.random.key(1), (7, 5)) * 0.2}
  weights = jnp.array([3.0, 1.0, 0.0, 2.0, 5.0, 1.0, 0.0])  # two padding slots
  agg = sa.aggregator(sa.SecureAggregation(clip=1.0, bits=bits, neighbours=neighbours))
  out, _, metrics = jax.jit(agg.update)(updates, weights, (), jax.random.key(2))
  step = 1.0 / sa.encoding_scale(7, 1.0, bits)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(_uniform_mean(updates, weights, None))):
    np.testing.assert_allclose(a, b, atol=2 * step + 1e-7)  # + float32 rounding
  assert float(metrics["secagg_survivors"]) == 5 and float(metrics["secagg_aborted"]) == 0


def test_out_of_range_coordinates_are_clipped_and_counted():
  updates = {"w": jnp.array([[5.0, 0.1], [-3.0, 0.2], [0.0, 0.3]])}
  agg = sa.aggregator(sa.SecureAggregation(clip=1.0))
  out, _, metrics = agg.update(updates, jnp.ones(3), (), jax.random.key(0))
  assert float(metrics["secagg_clipped"]) == 2
  np.testing.assert_allclose(out["w"], [0.0, 0.2], atol=1e-6)


def test_dropouts_below_threshold_abort_the_round_and_keep_the_model():
  updates = {"w": jnp.ones((4, 3))}
  agg = sa.aggregator(sa.SecureAggregation(threshold=1.0, dropout=0.9))
  out, _, metrics = agg.update(updates, jnp.ones(4), (), jax.random.key(0))
  assert float(metrics["secagg_aborted"]) == 1
  np.testing.assert_array_equal(out["w"], 0.0)


def test_distributed_noise_sums_to_sigma_c_over_the_survivors():
  m, d, z, c = 4, 4000, 1.5, 0.5
  agg = sa.aggregator(sa.SecureAggregation(clip=50.0, threshold=1.0, noise_multiplier=z,
                                           l2_clip=c))
  out, _, metrics = jax.jit(agg.update)({"w": jnp.zeros((m, d))}, jnp.ones(m), (),
                                        jax.random.key(5))
  total = np.asarray(out["w"]) * float(metrics["secagg_survivors"])  # the noised sum
  assert stats.kstest(total, "norm", args=(0, z * c)).pvalue > 1e-3
  assert stats.kstest(total, "norm", args=(0, z * c * 2 / 3)).pvalue < 1e-6
  assert stats.kstest(total, "norm", args=(0, z * c * 3 / 2)).pvalue < 1e-6


def test_fedavg_rounds_with_secure_aggregation_match_plain_averaging():
  rng = np.random.default_rng(0)
  x = rng.random((60, 4, 4, 1), dtype=np.float32)
  y = rng.integers(0, 3, 60).astype(np.int32)
  clients = jax.tree.map(jnp.asarray, partitions.make_clients(x, y, np.split(np.arange(60), 6)))
  model = models.make("mlp", num_classes=3, input_shape=(4, 4, 1), hidden=(8,))
  params = model.init(jax.random.key(0))
  cfg = fed.FedConfig(clients_per_round=1.0, local_batch_size=5)
  client_update = fed.make_client_update(fed.make_loss_fn(model.apply), cfg)
  results = []
  for aggregate in (_uniform_mean, sa.aggregator(sa.SecureAggregation(clip=2.0))):
    step = jax.jit(fed.make_round_step(client_update, cfg, 6, aggregate=aggregate))
    state = fed.init_server_state(params, cfg, key=jax.random.key(1), aggregate=aggregate)
    for _ in range(3):
      state, _ = step(state, clients)
    results.append(state.params)
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_logged_effective_noise_multiplier_falls_with_dropouts():
  m, d, z = 5, 50, 2.0
  agg = sa.aggregator(sa.SecureAggregation(clip=50.0, threshold=0.6, noise_multiplier=z,
                                           dropout=0.3))
  seen = {}
  for seed in range(12):
    _, _, metrics = jax.jit(agg.update)({"w": jnp.zeros((m, d))}, jnp.ones(m), (),
                                        jax.random.key(seed))
    if not float(metrics["secagg_aborted"]):
      seen[int(metrics["secagg_survivors"])] = float(metrics["secagg_z_eff"])
  t_noise = 3  # max(ceil(0.6 * 5), 5 // 2 + 1)
  assert len(seen) >= 2  # at least two survivor counts among the seeds
  for k, z_eff in seen.items():
    assert z_eff == pytest.approx(z * (k / t_noise) ** 0.5, rel=1e-6)
  ks = sorted(seen)
  assert all(seen[a] < seen[b] for a, b in zip(ks, ks[1:]))
  assert float(sa.effective_noise_multiplier(z, t_noise, t_noise)) == z
