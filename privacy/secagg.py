"""Secure aggregation (Bonawitz et al., CCS 2017) and SecAgg+ (Bell et al., CCS 2020).

Semi-honest setting: the server learns only the sum, mod R = 2^bits, of the inputs of the
clients that survive to the masked-input round, as long as at least t clients stay
until the end and t > n/2. Clients and the server are separate objects that exchange
byte strings; `run` plays the network, which can drop any client before any round.

Rounds (Bonawitz et al., Fig. 4; round 3, the consistency check against active
adversaries, is omitted in this semi-honest version):
  0 AdvertiseKeys  every client u sends two X25519 public keys: c_pk (encryption) and
                   s_pk (masks). The server broadcasts the roster U1 and a fresh session id.
  1 ShareKeys      u draws a self-mask seed b_u, t-of-n Shamir-shares b_u and its mask
                   secret key s_sk over its neighbours, and sends each neighbour v its two
                   shares encrypted with AES-GCM under HKDF(X25519(c_sk_u, c_pk_v)), bound
                   (as associated data) to the session, sender and recipient. U2 = senders.
  2 MaskedInput    u sends y_u = x_u + PRG(b_u) + sum_{v in U2, v != u} +/- PRG(s_uv)
                   mod R, with s_uv = HKDF(X25519(s_sk_u, s_pk_v)) and + iff u < v.
                   U3 = senders.
  4 Unmask         every survivor reveals, for each neighbour v, the share of b_v if v is in
                   U3 and the share of s_sk_v if v dropped, never both for one client (a
                   client refuses a request that would reveal both). With >= t answers the
                   server removes the pairwise masks of the dropped and the self-masks of
                   the survivors.

SecAgg+ (`neighbours=k`): clients mask and share only with their k neighbours in a random
k-regular graph (a Harary graph relabelled by a public random permutation), and the
threshold applies per neighbourhood, so client and server costs grow as n k = n log n
instead of n^2.

Primitives come from `cryptography`: X25519, HKDF-SHA256, AES-GCM, and ChaCha20 as the PRG
(its keystream read straight into uint32/uint64 arrays, so mask expansion is vectorised).
Randomness comes from the OS CSPRNG; numpy.random is not used anywhere here.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import math
import os
import struct
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from privacy import shamir


class SecAggError(ValueError):
  """A protocol violation: a bad, tampered, replayed or unexpected message."""


class SecAggAbort(RuntimeError):
  """Too few clients remain for the protocol to continue (fewer than the threshold t)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SecAggConfig:
  """Protocol parameters, public to everyone.

  Attributes:
    num_clients: n, the clients invited (ids 1..n).
    threshold: t, shares needed to reconstruct a secret (full SecAgg: t > n/2; SecAgg+:
      t > k/2 within each neighbourhood of k + 1 clients).
    dimension: d, the length of each input vector.
    bits: R = 2^bits (1..64); inputs are integers mod R.
    neighbours: k > 0 for SecAgg+ (k-regular graph, k even, k < n); 0 for full SecAgg.
    graph_seed: public seed of SecAgg+'s graph (the server draws it).
  """

  num_clients: int
  threshold: int
  dimension: int
  bits: int = 32
  neighbours: int = 0
  graph_seed: bytes = b"\x00" * 32

  def __post_init__(self):
    n, t, k = self.num_clients, self.threshold, self.neighbours
    if n < 2:
      raise ValueError(f"secure aggregation needs at least 2 clients, got {n}")
    if not 1 <= self.bits <= 64:
      raise ValueError(f"bits must be in [1, 64], got {self.bits}")
    if self.dimension < 1:
      raise ValueError(f"dimension must be >= 1, got {self.dimension}")
    if k:
      if k % 2 or not 2 <= k < n:
        raise ValueError(f"SecAgg+ needs an even number of neighbours k in [2, {n - 1}], got {k}")
      if not k / 2 < t <= k + 1:
        raise ValueError(f"SecAgg+ needs k/2 < t <= k + 1 (k={k}), got t={t}")
    elif not n / 2 < t <= n:
      raise ValueError(f"threshold t must satisfy n/2 < t <= n (n={n}), got t={t}: with t <= n/2 "
                       f"two disjoint groups could each unmask")

  @property
  def dtype(self) -> type:
    return np.uint32 if self.bits <= 32 else np.uint64

  def reduce(self, v: np.ndarray) -> np.ndarray:
    """v mod R (the dtype's wrap-around is mod 2^32 or 2^64, a multiple of R)."""
    if self.bits in (32, 64):
      return v
    return v & self.dtype((1 << self.bits) - 1)

  def neighbourhood(self, u: int) -> list[int]:
    """The clients u masks with and shares with (u itself excluded)."""
    if not self.neighbours:
      return [v for v in range(1, self.num_clients + 1) if v != u]
    return list(harary_neighbours(self.num_clients, self.neighbours, self.graph_seed)[u])


@functools.lru_cache(maxsize=16)
def harary_neighbours(n: int, k: int, seed: bytes) -> dict[int, list[int]]:
  """A k-regular graph on ids 1..n: the Harary graph (i ~ i +/- 1..k/2 mod n) relabelled by
  a permutation drawn from `seed` with the PRG (public; Bell et al. 2020, Sec. 4)."""
  keys = prg(seed, n, 64, info=b"graph")
  perm = np.argsort(keys, kind="stable") + 1  # position -> client id
  out: dict[int, list[int]] = {}
  for pos in range(n):
    out[int(perm[pos])] = sorted(int(perm[(pos + j) % n]) for j in range(-k // 2, k // 2 + 1) if j)
  return out


# ----------------------------------------------------------------------------- primitives


def prg(seed: bytes, length: int, bits: int, *, info: bytes = b"mask") -> np.ndarray:
  """`length` uniform integers mod 2^bits from a 32-byte seed (ChaCha20 keystream)."""
  dtype = np.uint32 if bits <= 32 else np.uint64
  key = _hkdf(seed, b"fljax-secagg prg " + info)
  stream = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None).encryptor().update(
      bytes(length * np.dtype(dtype).itemsize))
  out = np.frombuffer(stream, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)
  if bits not in (32, 64):
    out &= dtype((1 << bits) - 1)
  return out


def _hkdf(secret: bytes, info: bytes) -> bytes:
  return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def _agree(private: X25519PrivateKey, public: bytes, info: bytes) -> bytes:
  try:
    peer = X25519PublicKey.from_public_bytes(public)
    return _hkdf(private.exchange(peer), info)
  except ValueError as e:  # malformed or low-order public key
    raise SecAggError(f"bad public key: {e}") from None


def _public(key: X25519PrivateKey) -> bytes:
  return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _private_bytes(key: X25519PrivateKey) -> bytes:
  return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                           serialization.NoEncryption())


def _pair_info(kind: bytes, session: bytes, u: int, v: int) -> bytes:
  a, b = sorted((u, v))
  return b"fljax-secagg " + kind + session + struct.pack(">II", a, b)


# ----------------------------------------------------------------------------- messages


def _pack(**fields) -> bytes:
  def enc(x):
    if isinstance(x, bytes):
      return {"b": base64.b64encode(x).decode()}
    if isinstance(x, dict):
      return {"d": {str(k): enc(v) for k, v in x.items()}}
    if isinstance(x, (list, tuple)):
      return {"l": [enc(v) for v in x]}
    return x
  return json.dumps({k: enc(v) for k, v in fields.items()}).encode()


def _unpack(data: bytes, *required: str) -> dict:
  def dec(x):
    if isinstance(x, dict):
      if "b" in x:
        return base64.b64decode(x["b"], validate=True)
      if "d" in x:
        return {int(k): dec(v) for k, v in x["d"].items()}
      if "l" in x:
        return [dec(v) for v in x["l"]]
    return x
  try:
    msg = {k: dec(v) for k, v in json.loads(data).items()}
  except (ValueError, TypeError, AttributeError) as e:
    raise SecAggError(f"malformed message: {e}") from None
  missing = [k for k in required if k not in msg]
  if missing:
    raise SecAggError(f"message lacks {missing}")
  return msg


# ----------------------------------------------------------------------------- client


class Client:
  """One client u holding an encoded input x_u (integers mod R, shape [d])."""

  def __init__(self, cid: int, x: np.ndarray, cfg: SecAggConfig):
    if not 1 <= cid <= cfg.num_clients:
      raise ValueError(f"client id must be in [1, {cfg.num_clients}], got {cid}")
    x = np.asarray(x)
    if x.shape != (cfg.dimension,):
      raise ValueError(f"input must have shape ({cfg.dimension},), got {x.shape}")
    self.id, self.cfg = cid, cfg
    self.x = cfg.reduce(x.astype(cfg.dtype))
    self._c_sk = X25519PrivateKey.generate()
    self._s_sk = X25519PrivateKey.generate()
    self._b = os.urandom(32)
    self._revealed: dict[int, str] = {}

  # round 0
  def advertise(self) -> bytes:
    return _pack(id=self.id, c_pk=_public(self._c_sk), s_pk=_public(self._s_sk))

  # round 1
  def share_keys(self, roster: bytes) -> bytes:
    msg = _unpack(roster, "session", "keys")
    self._session, keys = msg["session"], msg["keys"]
    if self.id not in keys:
      raise SecAggError(f"client {self.id} is not in the roster")
    self._keys = {v: (k[0], k[1]) for v, k in keys.items()}
    peers = [v for v in self.cfg.neighbourhood(self.id) if v in self._keys]
    self._check_enough(len(peers) + 1, "ShareKeys")
    holders = peers + [self.id]
    s_shares = shamir.share(_private_bytes(self._s_sk), self.cfg.threshold, holders)
    b_shares = shamir.share(self._b, self.cfg.threshold, holders)
    self._own = (s_shares[self.id], b_shares[self.id])
    out = {}
    for v in peers:
      key = _agree(self._c_sk, self._keys[v][0], _pair_info(b"enc", self._session, self.id, v))
      nonce = os.urandom(12)
      plain = _pack(u=self.id, v=v, s=shamir.to_bytes(s_shares[v]), b=shamir.to_bytes(b_shares[v]))
      out[v] = nonce + AESGCM(key).encrypt(nonce, plain, self._aad(self.id, v))
    return _pack(id=self.id, ciphertexts=out)

  def _aad(self, sender: int, recipient: int) -> bytes:
    return self._session + struct.pack(">II", sender, recipient)

  def _check_enough(self, count: int, stage: str) -> None:
    if count < self.cfg.threshold:
      raise SecAggAbort(f"{stage}: only {count} clients in client {self.id}'s neighbourhood "
                        f"remain, fewer than the threshold t={self.cfg.threshold}")

  # round 2
  def masked_input(self, inbox: bytes) -> bytes:
    msg = _unpack(inbox, "ciphertexts")
    self._inbox = msg["ciphertexts"]
    peers = [v for v in self.cfg.neighbourhood(self.id) if v in self._inbox]
    for v in self._inbox:
      if v not in self._keys or v not in self.cfg.neighbourhood(self.id):
        raise SecAggError(f"client {self.id} received shares from unknown client {v}")
    self._check_enough(len(peers) + 1, "MaskedInput")
    y = self.x + prg(self._b, self.cfg.dimension, self.cfg.bits)
    for v in peers:
      mask = prg(_agree(self._s_sk, self._keys[v][1], _pair_info(b"mask", self._session, self.id, v)),
                 self.cfg.dimension, self.cfg.bits)
      y = y + mask if self.id < v else y - mask
    self._u2 = set(peers) | {self.id}
    return _pack(id=self.id, y=self.cfg.reduce(y).astype("<u8").tobytes())

  # round 4
  def unmask(self, request: bytes) -> bytes:
    msg = _unpack(request, "survivors", "dropped")
    survivors, dropped = set(msg["survivors"]), set(msg["dropped"])
    if survivors & dropped:
      raise SecAggError(f"clients {sorted(survivors & dropped)} cannot be both survivors and dropped")
    if self.id not in survivors:
      raise SecAggError(f"client {self.id} is asked to unmask but is not listed as a survivor")
    mine = self._u2
    self._check_enough(len(survivors & mine), "Unmask")
    b_out, s_out = {}, {}
    for v in sorted((survivors | dropped) & mine):
      kind = "b" if v in survivors else "s"
      if self._revealed.get(v, kind) != kind:
        raise SecAggError(f"client {self.id} already revealed the other secret of client {v}: "
                          f"refusing to reveal both")
      self._revealed[v] = kind
      if v == self.id:
        share = self._own[1] if kind == "b" else self._own[0]
      else:
        share = self._decrypt(v)[kind]
      (b_out if kind == "b" else s_out)[v] = shamir.to_bytes(share)
    return _pack(id=self.id, b_shares=b_out, s_shares=s_out)

  def _decrypt(self, v: int) -> dict[str, int]:
    if v not in self._inbox:
      raise SecAggError(f"client {self.id} holds no shares of client {v}")
    data = self._inbox[v]
    key = _agree(self._c_sk, self._keys[v][0], _pair_info(b"enc", self._session, v, self.id))
    try:
      plain = AESGCM(key).decrypt(data[:12], data[12:], self._aad(v, self.id))
    except (InvalidTag, ValueError):
      raise SecAggError(f"ciphertext from client {v} to client {self.id} failed authentication "
                        f"(tampered, replayed or misdirected)") from None
    msg = _unpack(plain, "u", "v", "s", "b")
    if (msg["u"], msg["v"]) != (v, self.id):
      raise SecAggError(f"ciphertext from client {v} names the wrong sender or recipient")
    return {"s": shamir.from_bytes(msg["s"]), "b": shamir.from_bytes(msg["b"])}


# ----------------------------------------------------------------------------- server


@dataclasses.dataclass
class ServerView:
  """Everything the server saw: what an honest-but-curious server can attack.

  `masked` holds each survivor's masked input y_u (uniform mod R on its own); `total` is
  the unmasked sum over `survivors`, the only function of the inputs it learns.
  """

  rosters: dict[str, list[int]]
  masked: dict[int, np.ndarray]
  total: np.ndarray | None = None


class Server:
  """The aggregation server: routes messages, tracks U1..U5, unmasks the sum."""

  def __init__(self, cfg: SecAggConfig):
    self.cfg = cfg
    self.session = os.urandom(16)
    self.view = ServerView(rosters={}, masked={})

  def _senders(self, messages: Iterable[bytes], stage: str, allowed: set[int], *required: str
               ) -> dict[int, dict]:
    out = {}
    for data in messages:
      msg = _unpack(data, "id", *required)
      u = msg["id"]
      if u not in allowed:
        raise SecAggError(f"{stage}: message from unknown or excluded client {u}")
      if u in out:
        raise SecAggError(f"{stage}: client {u} sent twice")
      out[u] = msg
    if len(out) < self.cfg.threshold:
      raise SecAggAbort(f"{stage}: only {len(out)} clients remain, fewer than the threshold "
                        f"t={self.cfg.threshold}; the round is aborted")
    self.view.rosters[stage] = sorted(out)
    return out

  def advertise(self, messages: Iterable[bytes]) -> bytes:
    msgs = self._senders(messages, "U1", set(range(1, self.cfg.num_clients + 1)), "c_pk", "s_pk")
    self._keys = {u: [m["c_pk"], m["s_pk"]] for u, m in msgs.items()}
    return _pack(session=self.session, keys=self._keys)

  def share_keys(self, messages: Iterable[bytes]) -> dict[int, bytes]:
    msgs = self._senders(messages, "U2", set(self._keys), "ciphertexts")
    inbox: dict[int, dict[int, bytes]] = {u: {} for u in msgs}
    for u, m in msgs.items():
      for v, ct in m["ciphertexts"].items():
        if v not in self.cfg.neighbourhood(u):
          raise SecAggError(f"U2: client {u} sent shares to client {v}, not its neighbour")
        if v in inbox:
          inbox[v][u] = ct
    self._u2 = set(msgs)
    return {u: _pack(ciphertexts=box) for u, box in inbox.items()}

  def masked_input(self, messages: Iterable[bytes]) -> bytes:
    msgs = self._senders(messages, "U3", self._u2, "y")
    for u, m in msgs.items():
      y = np.frombuffer(m["y"], dtype="<u8")
      if y.shape != (self.cfg.dimension,):
        raise SecAggError(f"U3: client {u} sent a vector of length {y.size}, not {self.cfg.dimension}")
      self.view.masked[u] = y.astype(self.cfg.dtype)
    self._u3 = set(msgs)
    self._dropped = self._u2 - self._u3
    return _pack(survivors=sorted(self._u3), dropped=sorted(self._dropped))

  def unmask(self, messages: Iterable[bytes]) -> np.ndarray:
    msgs = self._senders(messages, "U5", self._u3, "b_shares", "s_shares")
    b_shares: dict[int, dict[int, int]] = {}
    s_shares: dict[int, dict[int, int]] = {}
    for u, m in msgs.items():
      for target, kinds in ((b_shares, m["b_shares"]), (s_shares, m["s_shares"])):
        for v, share in kinds.items():
          if v not in self._u2 or (v != u and v not in self.cfg.neighbourhood(u)):
            raise SecAggError(f"U5: client {u} sent a share of unknown client {v}")
          target.setdefault(v, {})[u] = shamir.from_bytes(share)
    total = np.zeros(self.cfg.dimension, self.cfg.dtype)
    for u in self._u3:
      total = total + self.view.masked[u]
      total = total - prg(self._reconstruct(b_shares, u, "self-mask seed"), self.cfg.dimension,
                          self.cfg.bits)
    for v in self._dropped:
      s_sk = X25519PrivateKey.from_private_bytes(self._reconstruct(s_shares, v, "mask key"))
      for u in self.cfg.neighbourhood(v):
        if u in self._u3:  # u added sign(u, v) * PRG(s_uv); take it out
          mask = prg(_agree(s_sk, self._keys[u][1], _pair_info(b"mask", self.session, u, v)),
                     self.cfg.dimension, self.cfg.bits)
          total = total - mask if u < v else total + mask
    total = self.cfg.reduce(total)
    self.view.total = total
    return total

  def _reconstruct(self, shares: Mapping[int, Mapping[int, int]], v: int, what: str) -> bytes:
    got = shares.get(v, {})
    if len(got) < self.cfg.threshold:
      raise SecAggAbort(f"Unmask: {len(got)} shares of client {v}'s {what}, fewer than the "
                        f"threshold t={self.cfg.threshold}")
    try:
      return shamir.reconstruct(got, self.cfg.threshold)
    except shamir.ShamirError as e:
      raise SecAggError(f"Unmask: client {v}'s {what}: {e}") from None


# ----------------------------------------------------------------------------- network


ROUNDS = ("advertise", "share_keys", "masked_input", "unmask")


def run(inputs: Mapping[int, np.ndarray], cfg: SecAggConfig, *,
        drop_before: Mapping[str, Iterable[int]] | None = None,
        timings: dict[str, float] | None = None) -> tuple[np.ndarray, ServerView]:
  """One protocol instance over a simulated network; returns the sum and the server's view.

  Args:
    inputs: client id -> its encoded input (integers mod R, shape [d]).
    cfg: the public parameters.
    drop_before: round name -> clients that drop out just before sending in that round
      (and stay out). Rounds: 'advertise', 'share_keys', 'masked_input', 'unmask'.
    timings: if given, seconds spent in client and in server code are added to its
      'client' and 'server' entries (all clients together; they run one after another).

  Returns:
    The sum mod R of the inputs of the clients that sent their masked input (U3).

  Raises:
    SecAggAbort: fewer than t clients remain at some round.
  """
  drop_before = {k: set(v) for k, v in (drop_before or {}).items()}
  unknown = set(drop_before) - set(ROUNDS)
  if unknown:
    raise ValueError(f"unknown rounds {sorted(unknown)}; rounds are {ROUNDS}")
  clock = timings if timings is not None else {}
  clock.setdefault("client", 0.0)
  clock.setdefault("server", 0.0)

  def timed(side: str, fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    clock[side] += time.perf_counter() - t0
    return out

  clients = {u: timed("client", Client, u, x, cfg) for u, x in inputs.items()}
  server = timed("server", Server, cfg)
  alive = set(clients)

  def live(round_name: str) -> list[int]:
    alive.difference_update(drop_before.get(round_name, ()))
    return sorted(alive)

  roster = timed("server", server.advertise,
                 [timed("client", clients[u].advertise) for u in live("advertise")])
  inboxes = timed("server", server.share_keys,
                  [timed("client", clients[u].share_keys, roster) for u in live("share_keys")])
  request = timed("server", server.masked_input,
                  [timed("client", clients[u].masked_input, inboxes[u])
                   for u in live("masked_input") if u in inboxes])
  total = timed("server", server.unmask,
                [timed("client", clients[u].unmask, request) for u in live("unmask")
                 if u in server.view.masked])
  return total, server.view


# ----------------------------------------------------------------------------- encoding


def encoding_scale(num_clients: int, clip: float, bits: int) -> float:
  """The largest scale s such that n values in [-c s, c s] (after rounding) sum without
  wrapping around mod 2^bits: n (c s + 1) <= 2^(bits - 1) - 1."""
  return ((2 ** (bits - 1) - 1) / num_clients - 1) / clip


# ----------------------------------------------------------------------------- federated hook


SERVER_OBSERVES = "aggregate"  # what a secure-aggregation round shows the server


@dataclasses.dataclass(frozen=True, kw_only=True)
class SecureAggregation:
  """Secure aggregation as the federated round's `aggregate` hook (see `aggregator`).

  Attributes:
    clip: c, each coordinate of an update is clipped to [-c, c] before encoding (clipped
      coordinates are counted in `secagg_clipped`).
    bits: R = 2^bits (at most 32 inside jit).
    threshold: t as a fraction of the clients in the round (> 1/2; SecAgg+: of k + 1).
    neighbours: k for SecAgg+ (0: full SecAgg); rounded to an even number < m.
    dropout: probability that a sampled client drops out before sending its masked input.
    noise_multiplier: distributed DP: each client adds N(0, (z C)^2 / t_noise) to its
      update clipped to L2 norm `l2_clip` = C before encoding, so that the sum of any
      >= t_noise survivors carries N(0, (z C)^2) (see `aggregator`). 0: no noise.
    l2_clip: C for distributed DP.
  """

  clip: float = 1.0
  bits: int = 32
  threshold: float = 0.6
  neighbours: int = 0
  dropout: float = 0.0
  noise_multiplier: float = 0.0
  l2_clip: float = 1.0

  def __post_init__(self):
    if self.clip <= 0 or self.l2_clip <= 0:
      raise ValueError("clip and l2_clip must be > 0")
    if not 2 <= self.bits <= 32:
      raise ValueError(f"bits must be in [2, 32] inside the federated round, got {self.bits}")
    if not 0.5 < self.threshold <= 1:
      raise ValueError(f"threshold must be a fraction in (1/2, 1], got {self.threshold}")
    if not 0 <= self.dropout < 1:
      raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
    if self.noise_multiplier < 0:
      raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")

  def protocol(self, m: int, dimension: int) -> SecAggConfig:
    """The protocol parameters for a round of m clients."""
    k = 0
    if self.neighbours and m > 3:
      k = max(2, min(self.neighbours, m - 1))
      k -= k % 2
    group = k + 1 if k else m
    t = min(group, max(math.ceil(self.threshold * group), group // 2 + 1))
    return SecAggConfig(num_clients=m, threshold=t, dimension=dimension, bits=self.bits,
                        neighbours=k, graph_seed=os.urandom(32))


def effective_noise_multiplier(z: float, survivors: Any, t_noise: Any) -> Any:
  """The noise multiplier of the decoded sum when `survivors` clients each added their share
  N(0, (z C)^2 / t_noise): z sqrt(survivors / t_noise). It is z when exactly t_noise survive
  (what the guarantee assumes) and falls with every further dropout, which is why a round
  with fewer survivors aborts."""
  return z * (survivors / t_noise) ** 0.5


def aggregator(settings: SecureAggregation):
  """A stateless `fljax.federated.Aggregator` that runs the real protocol each round.

  Inside the jitted round, each client's update (a pytree, flattened to d numbers) is
  clipped per coordinate to [-c, c] (and, with distributed DP, first L2-clipped to C and
  noised), scaled by `encoding_scale`, stochastically rounded to integers and taken mod
  R; a `jax.pure_callback` then runs the protocol on the host among the round's real
  clients (weight > 0), each dropping with probability `dropout` before its masked input.
  The server decodes the sum and divides by the number of survivors: every surviving
  client counts once (size weights would have to be sent in the clear).

  A round that aborts (fewer survivors than the threshold; with distributed DP, fewer
  than the t_noise = max(ceil(threshold r), r // 2 + 1) of its r clients that the noise
  level assumed) leaves
  the model unchanged and is counted in `secagg_aborted`. Metrics: `secagg_survivors`,
  `secagg_clipped` (coordinates clipped to [-c, c]), `secagg_aborted`, `secagg_z_eff`
  (the noise multiplier the survivors' shares add up to, `effective_noise_multiplier`).

  Threat model: the server learns the sum only (`SERVER_OBSERVES`), so an attack on a
  secure-aggregation round must be given the aggregate, never a client's update.

  Distributed DP (`noise_multiplier` z > 0), each client adding N(0, (z C)^2 / t_noise):
  what is clipped: each client's update, to L2
  norm C (then per coordinate to c, which must be wide enough not to bind: the guarantee
  below assumes `secagg_clipped` stays 0). Sensitivity of the sum: C (add/remove one
  client). Event per round: as DP-FedAvg's (`privacy.federated.dp_fedavg_event` with z),
  since the survivors' noise adds up to at least N(0, (z C)^2).
  """
  import jax
  import jax.numpy as jnp
  from jax.flatten_util import ravel_pytree

  from fljax.federated import Aggregator

  def update(updates, weights, state, key):
    m = weights.shape[0]
    flat = jax.vmap(lambda u: ravel_pytree(u)[0])(updates)
    unravel = ravel_pytree(jax.tree.map(lambda u: u[0], updates))[1]
    d = flat.shape[1]
    real = weights > 0
    # The noise is calibrated for the fewest survivors a completed round can have:
    # t_noise = max(ceil(threshold * r), r // 2 + 1) of the r clients in the round.
    r = real.sum()
    t_noise = jnp.maximum(jnp.ceil(settings.threshold * r), r // 2 + 1)
    scale = encoding_scale(m, settings.clip, settings.bits)
    k_noise, k_round, k_drop = jax.random.split(key, 3)
    if settings.noise_multiplier:
      norms = jnp.linalg.norm(flat, axis=1, keepdims=True)
      flat = flat * jnp.minimum(1.0, settings.l2_clip / jnp.maximum(norms, 1e-30))
      std = settings.noise_multiplier * settings.l2_clip / jnp.sqrt(jnp.maximum(t_noise, 1.0))
      flat = flat + std * jax.random.normal(k_noise, flat.shape)
    clipped = ((jnp.abs(flat) > settings.clip) & real[:, None]).sum()
    z = jnp.clip(flat, -settings.clip, settings.clip) * scale
    low = jnp.floor(z)
    ints = (low + (jax.random.uniform(k_round, z.shape) < z - low)).astype(jnp.int32)
    encoded = jax.lax.bitcast_convert_type(ints, jnp.uint32)
    drops = jax.random.uniform(k_drop, (m,)) < settings.dropout

    def host(encoded, real, drops):
      encoded, real, drops = np.asarray(encoded), np.asarray(real), np.asarray(drops)
      ids = [i for i in range(m) if real[i]]
      aborted = (np.zeros(d, np.uint32), np.int32(0), np.int32(1))
      if len(ids) < 2:  # fewer than two clients: nothing can be hidden, nothing is sent
        return aborted
      cfg = settings.protocol(len(ids), d)
      inputs = {j + 1: encoded[i].astype(cfg.dtype) for j, i in enumerate(ids)}
      dropped = {j + 1 for j, i in enumerate(ids) if drops[i]}
      try:
        total, view = run(inputs, cfg, drop_before={"masked_input": dropped})
      except SecAggAbort:
        return aborted
      survivors = len(view.rosters["U3"])
      t_noise = max(math.ceil(settings.threshold * len(ids)), len(ids) // 2 + 1)
      if settings.noise_multiplier and survivors < t_noise:
        return aborted
      return total.astype(np.uint32), np.int32(survivors), np.int32(0)

    total, survivors, aborted = jax.pure_callback(
        host, (jax.ShapeDtypeStruct((d,), jnp.uint32), jax.ShapeDtypeStruct((), jnp.int32),
               jax.ShapeDtypeStruct((), jnp.int32)), encoded, real, drops)
    signed = jax.lax.bitcast_convert_type(total, jnp.int32)
    if settings.bits < 32:  # sign-extend from `bits`
      shift = 32 - settings.bits
      signed = jax.lax.shift_right_arithmetic(jax.lax.shift_left(signed, shift), shift)
    mean = signed.astype(jnp.float32) / scale / jnp.maximum(survivors, 1).astype(jnp.float32)
    metrics = {"secagg_survivors": survivors.astype(jnp.float32),
               # the noise multiplier the survivors' shares actually add up to
               "secagg_z_eff": effective_noise_multiplier(
                   settings.noise_multiplier, survivors.astype(jnp.float32), t_noise),
               "secagg_clipped": clipped.astype(jnp.float32),
               "secagg_aborted": aborted.astype(jnp.float32)}
    return unravel(mean), state, metrics

  return Aggregator(init=lambda params: (), update=update)
