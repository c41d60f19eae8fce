"""Tests of privacy/secagg.py: exact sums under dropouts, uniform masked inputs, late
clients stay masked, tampered, replayed, incomplete and malformed messages rejected,
aborts, SecAgg+'s parameter selection and its refusal to expose partial sums, and the
federated hook around an `Encoding`."""

import random
import secrets

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from scipy import stats

from privacy import secagg as sa
from privacy import shamir


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
    pytest.skip("this pattern left fewer than t clients somewhere, or cut the graph")
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


def _strip_mask(y, owner, other, s_sk, public_of, server, cfg):
  """y_owner without its pairwise mask with `other`, from one end's mask key s_sk and the
  other end's (`public_of`) public key in the roster; owner added it iff owner < other."""
  info = sa._pair_info(b"mask", server.session, owner, other)
  mask = sa.prg(sa._agree(s_sk, server._keys[public_of][1], info), cfg.dimension, cfg.bits)
  return cfg.reduce(y - mask if owner < other else y + mask)


def test_late_client_declared_dropped_stays_masked_by_its_self_mask():
  n, d, bits = 5, 20_000, 8
  cfg = sa.SecAggConfig(num_clients=n, threshold=3, dimension=d, bits=bits)
  xs = {u: np.zeros(d, np.uint64) for u in range(1, n + 1)}
  clients, server, inboxes = _rounds_to_masked_input(cfg, xs)
  late = clients[5].masked_input(inboxes[5])  # computed, but arrives after the deadline
  request = server.masked_input([clients[u].masked_input(inboxes[u]) for u in (1, 2, 3, 4)])
  total = server.unmask([clients[u].unmask(request) for u in (1, 2, 3, 4)])
  np.testing.assert_array_equal(total, 0)
  # The server now knows client 5's mask key (it was declared dropped), so it can strip the
  # pairwise masks from the late y_5, but never its self-mask: what is left is uniform.
  y5 = np.frombuffer(sa.unpack(late, "test", "y")["y"], "<u8").astype(cfg.dtype)
  s_shares = {u: clients[u]._decrypt(5)["s"] for u in (1, 2, 3, 4)}
  s_sk = X25519PrivateKey.from_private_bytes(shamir.reconstruct(s_shares, 3))
  stripped = y5
  for u in (1, 2, 3, 4):
    stripped = _strip_mask(stripped, 5, u, s_sk, u, server, cfg)
  assert stats.chisquare(np.bincount(stripped.astype(np.int64), minlength=256)).pvalue > 1e-4
  np.testing.assert_array_equal(cfg.reduce(stripped - sa.prg(clients[5]._b, d, bits)), 0)
  # and no client reveals client 5's self-mask share, even if asked again as a survivor
  with pytest.raises(sa.SecAggError, match="refusing to reveal both"):
    clients[1].unmask(sa.pack(survivors=[1, 2, 3, 4, 5], dropped=[]))


def _rounds_to_masked_input(cfg, xs):
  clients = {u: sa.Client(u, xs[u], cfg) for u in xs}
  server = sa.Server(cfg)
  roster = server.advertise([c.advertise() for c in clients.values()])
  inboxes = server.share_keys([c.share_keys(roster) for c in clients.values()])
  return clients, server, inboxes


def _box(inbox):
  return sa.unpack(inbox, "test", "u2", "ciphertexts")


def test_tampered_and_replayed_ciphertexts_are_rejected():
  cfg = sa.SecAggConfig(num_clients=4, threshold=3, dimension=8, bits=16)
  xs = _inputs(4, 8, 16)
  clients, server, inboxes = _rounds_to_masked_input(cfg, xs)
  msg = _box(inboxes[1])
  ct = bytearray(msg["ciphertexts"][2])
  ct[-1] ^= 1
  clients[1].masked_input(sa.pack(u2=msg["u2"], ciphertexts={**msg["ciphertexts"], 2: bytes(ct)}))
  request = sa.pack(survivors=[1, 2, 3, 4], dropped=[])
  with pytest.raises(sa.SecAggError, match="failed authentication"):
    clients[1].unmask(request)
  # replay: client 2's ciphertext for client 3, redirected to client 1
  other = _box(inboxes[3])["ciphertexts"][2]
  clients2, _, inboxes2 = _rounds_to_masked_input(cfg, xs)
  msg2 = _box(inboxes2[1])
  clients2[1].masked_input(sa.pack(u2=msg2["u2"], ciphertexts={**msg2["ciphertexts"], 2: other}))
  with pytest.raises(sa.SecAggError, match="failed authentication"):
    clients2[1].unmask(request)


def test_share_keys_message_missing_a_neighbours_ciphertext_is_refused():
  # Before the fix the server forwarded it, client 3 masked without client 1 and the sum
  # came out silently wrong; now nothing past ShareKeys runs.
  cfg = sa.SecAggConfig(num_clients=5, threshold=3, dimension=8, bits=16)
  xs = _inputs(5, 8, 16)
  clients = {u: sa.Client(u, xs[u], cfg) for u in xs}
  server = sa.Server(cfg)
  roster = server.advertise([c.advertise() for c in clients.values()])
  shared = [c.share_keys(roster) for c in clients.values()]
  crafted = sa.unpack(shared[0], "test", "id", "ciphertexts")
  del crafted["ciphertexts"][3]
  with pytest.raises(sa.SecAggError, match=r"client 1's ShareKeys message lacks ciphertexts "
                                           r"for its neighbours \[3\]"):
    server.share_keys([sa.pack(**crafted)] + shared[1:])
  # defence in depth: a client whose inbox lacks a U2 neighbour refuses to mask
  inboxes = server.share_keys(shared)
  msg = _box(inboxes[3])
  del msg["ciphertexts"][1]
  with pytest.raises(sa.SecAggError, match=r"client 3 lacks the shares of its U2 neighbours \[1\]"):
    clients[3].masked_input(sa.pack(**msg))


def _server_at(stage, cfg, xs):
  """Plays the honest rounds before `stage`; returns (server method, honest messages, clients)."""
  clients = {u: sa.Client(u, xs[u], cfg) for u in xs}
  server = sa.Server(cfg)
  sent = [c.advertise() for c in clients.values()]
  if stage == "advertise":
    return server.advertise, sent, clients
  roster = server.advertise(sent)
  sent = [c.share_keys(roster) for c in clients.values()]
  if stage == "share_keys":
    return server.share_keys, sent, clients
  inboxes = server.share_keys(sent)
  sent = [clients[u].masked_input(inboxes[u]) for u in clients]
  if stage == "masked_input":
    return server.masked_input, sent, clients
  request = server.masked_input(sent)
  return server.unmask, [c.unmask(request) for c in clients.values()], clients


KEY, SHARE = b"k" * 32, b"s" * shamir.SHARE_BYTES
MALFORMED_TO_SERVER = [  # (stage, client 1's message, field named in the error)
    ("advertise", dict(id=1, c_pk=b"k" * 31, s_pk=KEY), "c_pk"),
    ("advertise", dict(id=1, c_pk=[1, 2], s_pk=KEY), "c_pk"),
    ("advertise", dict(id=1, c_pk=KEY, s_pk=7), "s_pk"),
    ("advertise", dict(id="1", c_pk=KEY, s_pk=KEY), "id"),
    ("share_keys", dict(id=1, ciphertexts=[b"c" * 40]), "ciphertexts"),
    ("share_keys", dict(id=1, ciphertexts={2: 5}), "ciphertexts"),
    ("share_keys", dict(id=1, ciphertexts={2: b"short"}), "ciphertexts"),
    ("share_keys", dict(id=1.0, ciphertexts={}), "id"),
    ("masked_input", dict(id=1, y=b"\x00" * 63), "y"),  # not a multiple of the word size
    ("masked_input", dict(id=1, y=[0] * 8), "y"),
    ("masked_input", dict(id=1, y=5), "y"),
    ("masked_input", dict(id=1, y=b"\x00" * 56), "y"),  # 7 words, d = 8
    ("unmask", dict(id=1, b_shares={1: SHARE[:-1]}, s_shares={}), "b_shares"),
    ("unmask", dict(id=1, b_shares={1: 3}, s_shares={}), "b_shares"),
    ("unmask", dict(id=1, b_shares={}, s_shares=[SHARE]), "s_shares"),
    ("unmask", dict(id=True, b_shares={}, s_shares={}), "id"),
]


@pytest.mark.parametrize("stage,message,field", MALFORMED_TO_SERVER)
def test_malformed_messages_to_the_server_name_the_client_and_field(stage, message, field):
  cfg = sa.SecAggConfig(num_clients=4, threshold=3, dimension=8, bits=16)
  receive, sent, _ = _server_at(stage, cfg, _inputs(4, 8, 16))
  who = "" if field == "id" else "client 1's message"
  with pytest.raises(sa.SecAggError, match=f"{who}.*'{field}'"):
    receive([sa.pack(**message)] + sent[1:])


MALFORMED_TO_CLIENT = [  # (round the client is in, message from the server, field)
    ("share_keys", dict(session=b"x" * 16, keys={1: [KEY]}), "keys"),
    ("share_keys", dict(session=b"x" * 15, keys={1: [KEY, KEY]}), "session"),
    ("masked_input", dict(u2=["1"], ciphertexts={}), "u2"),
    ("masked_input", dict(u2=[1, 2], ciphertexts={2: "abc"}), "ciphertexts"),
    ("unmask", dict(survivors="1,2", dropped=[]), "survivors"),
    ("unmask", dict(survivors=[1, 2, 3, 4], dropped=None), "dropped"),
]


@pytest.mark.parametrize("stage,message,field", MALFORMED_TO_CLIENT)
def test_malformed_messages_to_a_client_name_it_and_the_field(stage, message, field):
  cfg = sa.SecAggConfig(num_clients=4, threshold=3, dimension=8, bits=16)
  clients, server, inboxes = _rounds_to_masked_input(cfg, _inputs(4, 8, 16))
  if stage == "unmask":
    server.masked_input([clients[u].masked_input(inboxes[u]) for u in clients])
  with pytest.raises(sa.SecAggError, match=f"client 1.*'{field}'"):
    getattr(clients[1], stage)(sa.pack(**message))


def test_unknown_clients_and_malformed_messages_are_rejected():
  cfg = sa.SecAggConfig(num_clients=4, threshold=3, dimension=8, bits=16)
  receive, answers, _ = _server_at("unmask", cfg, _inputs(4, 8, 16))
  forged = sa.pack(id=9, b_shares={}, s_shares={})
  with pytest.raises(sa.SecAggError, match="unknown or excluded client 9"):
    receive(answers[:3] + [forged])
  for garbage in (b"not json", b"[1, 2]", None):
    with pytest.raises(sa.SecAggError, match="malformed message"):
      receive([garbage])
  with pytest.raises(sa.SecAggError, match="sent twice"):
    receive(answers[:3] + answers[:1])


def test_too_few_survivors_abort_with_a_clear_error():
  cfg = sa.SecAggConfig(num_clients=5, threshold=3, dimension=4, bits=16)
  with pytest.raises(sa.SecAggAbort, match="fewer than the threshold t=3"):
    sa.run(_inputs(5, 4, 16), cfg, drop_before={"masked_input": {1, 2, 3}})


def test_parameters_are_checked():
  with pytest.raises(ValueError, match="n/2 < t"):
    sa.SecAggConfig(num_clients=10, threshold=5, dimension=4)
  with pytest.raises(ValueError, match="even number of neighbours"):
    sa.SecAggConfig(num_clients=10, threshold=3, dimension=4, neighbours=3)
  with pytest.raises(ValueError, match="k/2 < t"):
    sa.SecAggConfig(num_clients=10, threshold=2, dimension=4, neighbours=4)
  with pytest.raises(ValueError, match="corruption must be"):
    sa.SecAggConfig(num_clients=10, threshold=6, dimension=4, corruption=0.5)
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


# ----------------------------------------------------------------------------- SecAgg+ analysis


@pytest.mark.parametrize("n,k", [(10, 2), (10, 4), (11, 6), (12, 4)])
def test_harary_graph_minus_a_set_is_disconnected_iff_two_long_removed_runs(n, k):
  # The criterion behind bound (b), checked exhaustively against a BFS.
  h = k // 2
  graph = {i: [(i + j) % n for j in range(-h, h + 1) if j] for i in range(n)}
  for mask in range(1 << n):
    kept = {i for i in range(n) if mask >> i & 1}
    comps = 0
    left = set(kept)
    while left:
      comps += 1
      frontier = [left.pop()]
      while frontier:
        frontier = [v for u in frontier for v in graph[u] if v in left]
        left.difference_update(frontier)
    runs, run = [], 0  # maximal runs of removed positions, cyclically
    start = next((i for i in range(n) if i in kept), None)
    if start is not None:
      for i in range(1, n + 1):
        if (start + i) % n in kept:
          runs.append(run)
          run = 0
        else:
          run += 1
    assert (comps > 1) == (sum(r >= h for r in runs) >= 2), sorted(kept)


def test_secagg_plus_parameters_meet_their_bounds_and_are_minimal():
  for n, dropout, corruption in [(100, 0.1, 0.0), (1000, 0.1, 0.1), (300, 0.05, 0.2)]:
    k, t = sa.secagg_plus_parameters(n, dropout, corruption)
    assert k and k % 2 == 0 and k / 2 < t <= k + 1
    assert sa._plus_failure(n, k, t, dropout, corruption, sa.SIGMA, sa.ETA) is None
    for smaller in range(2, k, 2):  # no smaller k passes with any t
      assert all(sa._plus_failure(n, smaller, u, dropout, corruption, sa.SIGMA, sa.ETA)
                 for u in range(smaller // 2 + 1, smaller + 2))
  # more dropout or more corruption never asks for fewer neighbours
  ks = [sa.secagg_plus_parameters(1000, r, c)[0] for r, c in [(0.05, 0), (0.1, 0), (0.1, 0.1),
                                                              (0.2, 0.1)]]
  assert ks == sorted(ks)
  with pytest.warns(UserWarning, match="falling back to full SecAgg"):
    assert sa.secagg_plus_parameters(20, 0.1, 0.0) == (0, 11)
  assert sa.secagg_plus_parameters(20, 0.0, 0.0) == (2, 2)  # nothing can go wrong


def test_config_refuses_neighbours_below_the_analysis():
  with pytest.raises(ValueError, match=r"neighbours=2, threshold=2 is outside the SecAgg\+ "
                                       r"analysis for n=20 at dropout 0.1"):
    sa.SecAggConfig(num_clients=20, threshold=2, dimension=4, neighbours=2, dropout=0.1)
  with pytest.raises(ValueError, match="threshold t=3 is too low"):
    sa.SecAggConfig(num_clients=1000, threshold=3, dimension=4, neighbours=4, corruption=0.2)
  k, t = sa.secagg_plus_parameters(100, 0.1, 0.0)
  sa.SecAggConfig(num_clients=100, threshold=t, dimension=4, neighbours=k, dropout=0.1)
  with pytest.raises(ValueError, match=f"neighbours={k - 2}"):
    sa.SecAggConfig(num_clients=100, threshold=t - 1, dimension=4, neighbours=k - 2, dropout=0.1)


def _ring(graph):
  """Client ids in ring order, walked along the edges of the k = 2 Harary graph (a cycle)."""
  order, prev = [1], None
  while len(order) < len(graph):
    u = order[-1]
    nxt = next(v for v in graph[u] if v != prev and v not in order)
    order.append(nxt)
    prev = u
  return order


def _isolated_pattern(n, k, t, seed):
  """A config, and a dropout pattern that isolates k consecutive ring positions by dropping
  k/2 clients on each side (k = 2: 2 clients, 2 dropouts; k = 4: 4 clients, 4 dropouts)."""
  cfg = sa.SecAggConfig(num_clients=n, threshold=t, dimension=16, bits=32, neighbours=k,
                        graph_seed=seed)
  ring = _ring(sa.harary_neighbours(n, 2, seed))  # same permutation for every k
  h = k // 2
  dropped, group = ring[:h] + ring[h + k:2 * h + k], ring[h:h + k]
  return cfg, set(dropped), group


@pytest.mark.parametrize("k,t", [(2, 2), (4, 3)])
def test_a_disconnecting_dropout_pattern_makes_clients_refuse_to_unmask(k, t, monkeypatch):
  n, seed = 20, b"\x07" * 32
  cfg, dropped, group = _isolated_pattern(n, k, t, seed)
  for u in group:  # the group is a component of the graph minus the dropped
    assert set(cfg.neighbourhood(u)) - set(group) <= dropped
  xs = _inputs(n, 16, 32)
  survivors = set(xs) - dropped
  assert sa.components(cfg, survivors) == [sorted(survivors - set(group)), sorted(group)]
  with pytest.raises(sa.SecAggAbort, match="refuses to unmask: the survivors' graph is "
                                           "disconnected"):
    sa.run(xs, cfg, drop_before={"masked_input": dropped})

  # Without the check, the server's view alone yields the group's partial sum.
  monkeypatch.setattr(sa, "components", lambda cfg, members: [sorted(members)])
  clients, server, inboxes = _rounds_to_masked_input(cfg, xs)
  request = server.masked_input([clients[u].masked_input(inboxes[u]) for u in sorted(survivors)])
  answers = [sa.unpack(clients[u].unmask(request), "test", "id", "b_shares", "s_shares")
             for u in sorted(survivors)]
  shares = {"b": {}, "s": {}}
  for a in answers:
    for kind in ("b", "s"):
      for v, share in a[f"{kind}_shares"].items():
        shares[kind].setdefault(v, {})[a["id"]] = shamir.from_bytes(share)
  partial = np.zeros(16, np.uint32)
  for u in group:
    y = server.view.masked[u] - sa.prg(shamir.reconstruct(shares["b"][u], t), 16, 32)
    for v in set(cfg.neighbourhood(u)) & dropped:
      s_sk = X25519PrivateKey.from_private_bytes(shamir.reconstruct(shares["s"][v], t))
      y = _strip_mask(y, u, v, s_sk, u, server, cfg)
    partial = partial + y
  np.testing.assert_array_equal(partial.astype(object), _expected(xs, group, 32))


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


def test_plain_encoding_rounds_without_bias_and_decodes_sums():
  enc = sa.PlainEncoding(1.0, 16, 4)
  step = 1 / enc.scale
  x = np.full((4, 20_000), 0.3 * step, np.float32)  # 30% of the way to the next level
  ints, metrics = enc.encode(x, seed=b"\x01" * 32)
  assert ints.dtype == np.uint32 and ints.max() < 2 ** 16 and metrics == {"secagg_clipped": 0.0}
  assert stats.binomtest(int(ints.sum()), ints.size, 0.3).pvalue > 1e-4
  np.testing.assert_array_equal(enc.encode(x, seed=b"\x01" * 32)[0], ints)  # seed-keyed
  assert not np.array_equal(enc.encode(x, seed=b"\x02" * 32)[0], ints)
  neg = enc.encode(np.array([[-1.0, 0.5], [-1.0, -0.25]], np.float32), seed=b"\x03" * 32)[0]
  total = neg.sum(axis=0) % 2 ** 16  # what the protocol returns
  np.testing.assert_allclose(enc.decode(total, 2, seed=b"\0" * 32), [-2.0, 0.25], atol=2 * step)
  with pytest.raises(ValueError, match="num_clients=4"):
    enc.encode(np.zeros((5, 2)), seed=b"\x00" * 32)


def test_noise_seed_run_is_reproducible_and_os_is_not():
  updates = {"w": jax.random.uniform(jax.random.key(3), (3, 200))}
  outs = {}
  for noise_seed in ("run", "os"):
    agg = sa.aggregator(sa.SecureAggregation(clip=1.0, bits=8), noise_seed=noise_seed)
    outs[noise_seed] = [np.asarray(agg.update(updates, jnp.ones(3), (), jax.random.key(0))[0]["w"])
                        for _ in range(2)]
  np.testing.assert_array_equal(*outs["run"])
  assert not np.array_equal(*outs["os"])
  with pytest.raises(ValueError, match="noise_seed"):
    sa.aggregator(sa.SecureAggregation(), noise_seed="fixed")


def test_hook_chooses_or_refuses_secagg_plus_neighbours():
  auto = sa.SecureAggregation(neighbours=sa.AUTO, dropout=0.1, corruption=0.1)
  cfg = auto.protocol(100, 8)
  k, t = sa.secagg_plus_parameters(100, 0.1, 0.1, threshold=0.6)
  assert (cfg.neighbours, cfg.threshold) == (k, t) and k > 0
  forced = sa.SecureAggregation(neighbours=2, dropout=0.1)
  with pytest.raises(ValueError, match="neighbours=2"):
    forced.protocol(20, 8)
  agg = sa.aggregator(forced)
  with pytest.raises(ValueError, match="neighbours=2"):  # at the first (traced) round
    agg.update({"w": jnp.zeros((20, 3))}, jnp.ones(20), (), jax.random.key(0))
  with pytest.raises(ValueError, match="neighbours must be"):
    sa.SecureAggregation(neighbours=3)


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
