"""Secure aggregation (Bonawitz et al., CCS 2017) and SecAgg+ (Bell et al., CCS 2020).

Threat model: semi-honest (honest-but-curious). The server and a fraction `corruption` of
the clients, colluding, follow the protocol but pool everything they see; the other
clients may drop out at random (rate `dropout`) before any round. Guarantee: the
coalition learns nothing about the honest clients' inputs beyond the sum, mod R = 2^bits,
of the honest inputs that reach the masked-input round (U3), and the protocol outputs
that sum whenever it does not abort. Full SecAgg gives it as long as t > n/2 and fewer
than t clients are corrupted; SecAgg+ gives it except with probability 2^-sigma over the
public random graph, for the (k, t) that `secagg_plus_parameters` selects or
`SecAggConfig` accepts, and aborts on honest random dropouts with probability at most
2^-eta. Clients and the server are separate objects that exchange byte strings; `run`
plays the network, which can drop any client before any round. Every message is checked
field by field, and anything malformed raises `SecAggError` naming the sender and field.

Rounds (Bonawitz et al., Fig. 4; round 3, the consistency check against active
adversaries, is omitted in this semi-honest version):
  0 AdvertiseKeys  every client u sends two X25519 public keys: c_pk (encryption) and
                   s_pk (masks). The server broadcasts the roster U1 and a fresh session id.
  1 ShareKeys      u draws a self-mask seed b_u, t-of-(k+1) Shamir-shares b_u and its mask
                   secret key s_sk over its neighbours in U1 and itself, and sends each
                   neighbour v its two shares encrypted with AES-GCM under
                   HKDF(X25519(c_sk_u, c_pk_v)), bound (as associated data) to the session,
                   sender and recipient. The server refuses a message that lacks a
                   ciphertext for a neighbour in U1. U2 = senders; the server forwards to
                   each client its ciphertexts and the list U2.
  2 MaskedInput    u sends y_u = x_u + PRG(b_u) + sum_{v in N(u) & U2} +/- PRG(s_uv) mod R,
                   with s_uv = HKDF(X25519(s_sk_u, s_pk_v)) and + iff u < v. u aborts unless
                   it holds shares from exactly its neighbours in U2 (masks with any other
                   set would not cancel). U3 = senders.
  4 Unmask         every survivor reveals, for each neighbour v, the share of b_v if v is in
                   U3 and the share of s_sk_v if v dropped, never both for one client (a
                   client refuses a request that would reveal both). With >= t answers the
                   server removes the pairwise masks of the dropped and the self-masks of
                   the survivors.

Refusal rule (SecAgg+): every pair of neighbours in U2 shares a mask, so what the server can
unmask is the sum over any union of connected components of the graph induced on U3
(removing the masks of dropped clients is exactly what Unmask lets it do). Before
revealing any share, each client checks that this induced graph is connected and refuses
(`SecAggAbort`) otherwise: a disconnected U3 would let the server isolate a partial sum.
The analysis below makes that refusal (and a disconnection by corrupted clients, whose
inputs the coalition knows) happen with probability below 2^-eta (2^-sigma).

SecAgg+ (`neighbours=k`): clients mask and share only with their k neighbours in a
k-regular graph, the Harary graph C_n(1..k/2) (i ~ i +/- 1..k/2 mod n) relabelled by a
public random permutation, and the threshold applies per neighbourhood, so client and
server costs grow as n k = n log n instead of n^2. Bell et al. draw an Erdos-Renyi graph
and require it to be "good": (a) no honest client has t corrupted neighbours (else the
coalition holds t shares of both its secrets), (b) the graph minus the dropped and
corrupted clients stays connected (else a partial sum is isolated), (c) every client keeps
t surviving neighbours (else the round aborts). `secagg_plus_parameters` bounds (a)-(c) for
our Harary graph (the bounds are ours, see its docstring) and picks the smallest k.

Federated hook: `aggregator` runs the protocol each round on the host, around an
`Encoding` that maps float updates to integers mod 2^bits and the sum back:
`PlainEncoding` (fixed point, not DP) or a distributed-DP encoding (privacy/ddgauss.py).
This module adds no noise of its own.

Primitives come from `cryptography`: X25519, HKDF-SHA256, AES-GCM, and ChaCha20 as the PRG
(its keystream read straight into uint32/uint64 arrays, so mask expansion is vectorised).
Protocol randomness comes from the OS CSPRNG, an encoding's from the PRG keyed by a seed
(`aggregator`'s `noise_seed`); numpy.random is not used anywhere here.
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
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Protocol

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from privacy import shamir

SIGMA = 40  # statistical security: privacy fails with probability <= 2^-SIGMA
ETA = 30  # correctness: honest random dropouts abort a round with probability <= 2^-ETA
AUTO = -1  # `SecureAggregation.neighbours`: choose k with `secagg_plus_parameters`


class SecAggError(ValueError):
  """A protocol violation: a bad, tampered, replayed, malformed or unexpected message."""


class SecAggAbort(RuntimeError):
  """The round cannot finish safely: fewer than t clients remain somewhere, or the
  survivors' graph is disconnected (unmasking would expose a partial sum)."""


# ----------------------------------------------------------------------------- SecAgg+ parameters


def _lg(x: float) -> float:
  return math.log2(x) if x > 0 else -math.inf


def _lg_tail(k: int, p: float, j: int) -> float:
  """log2 P[Binomial(k, p) >= j]."""
  if j <= 0 or p >= 1:
    return 0.0
  if j > k or p <= 0:
    return -math.inf
  terms = [math.lgamma(k + 1) - math.lgamma(i + 1) - math.lgamma(k - i + 1)
           + i * math.log(p) + (k - i) * math.log1p(-p) for i in range(j, k + 1)]
  top = max(terms)
  return (top + math.log(sum(math.exp(x - top) for x in terms))) / math.log(2)


def _lg_sum(*lgs: float) -> float:
  return _lg(sum(2.0 ** x for x in lgs))


def _private_enough(n: int, k: int, t: int, corruption: float, sigma: float) -> bool:
  """Condition (a): n C(k, t) q^t <= 2^-(sigma + 1), q = corruption n / (n - 1)."""
  q = min(1.0, corruption * n / (n - 1))
  return _lg(n) + _lg(math.comb(k, t)) + t * _lg(q) <= -(sigma + 1)


def _plus_failure(n: int, k: int, t: int, dropout: float, corruption: float, sigma: float,
                  eta: float) -> str | None:
  """Which bound of `secagg_plus_parameters` (k, t) misses, as a phrase, or None."""
  if not _private_enough(n, k, t, corruption, sigma):
    return (f"threshold t={t} is too low: a neighbourhood of {k} may hold t clients of the "
            f"corrupted fraction {corruption} (bound (a) above 2^-{sigma + 1})")
  pairs = _lg(n * (n - 1) / 2)
  if pairs + k * _lg(min(1.0, dropout + corruption)) > -(sigma + 1):
    return (f"neighbours k={k} is too small: dropped or corrupted runs of k/2 clients could "
            f"cut the survivors' graph and isolate a partial sum (bound (b) above "
            f"2^-{sigma + 1})")
  if _lg_sum(_lg(n) + _lg_tail(k, dropout, k - t + 1), pairs + k * _lg(dropout)) > -eta:
    return (f"neighbours k={k} with threshold t={t} would abort on honest dropouts at rate "
            f"{dropout} (bound (c) above 2^-{eta})")
  return None


def _plus_threshold(n: int, k: int, corruption: float, sigma: float, threshold: float) -> int:
  """The smallest t with t > k/2, t >= threshold (k + 1) and bound (a); k + 1 if none."""
  low = max(k // 2 + 1, math.ceil(threshold * (k + 1)))
  return next((t for t in range(low, k + 1) if _private_enough(n, k, t, corruption, sigma)),
              k + 1)


@functools.lru_cache(maxsize=256)
def secagg_plus_parameters(n: int, dropout_rate: float, corruption_rate: float, *,
                           sigma: float = SIGMA, eta: float = ETA,
                           threshold: float = 0.5) -> tuple[int, int]:
  """SecAgg+'s neighbourhood size k and threshold t for n clients (Bell et al., CCS 2020).

  Bell et al. ("Secure Single-Server Aggregation with (Poly)Logarithmic Overhead") show
  that SecAgg run over a sparse random graph is secure and correct whenever the graph is
  "good" for the corrupted set C and the dropped set D: (a) every honest client has fewer
  than t neighbours in C (its two secrets are t-of-(k + 1) shared, and the coalition
  holds its corrupted neighbours' shares of both), (b) the graph minus C u D is connected
  (else the coalition unmasks the sum of a component, a partial sum), (c) every client
  keeps >= t neighbours outside D (else its secret cannot be rebuilt and the round
  aborts). They draw an Erdos-Renyi graph and pick k, t so that (a)-(b) fail with
  probability <= 2^-sigma (statistical security parameter) and (c) with probability
  <= 2^-eta (correctness parameter). That framework is theirs; the bounds below are ours,
  for our graph, the Harary graph C_n(1..k/2) relabelled by a public uniform permutation.

  Model: the coalition corrupts at most corruption_rate n clients, chosen before the
  graph is drawn; each client drops independently with probability dropout_rate. For a
  fixed set S of ring positions, P[S inside C] <= corruption^|S| (sampling without
  replacement) and P[S inside C u D] <= p^|S| with p = corruption + dropout.

  (a) Honest client i's k neighbours are a uniform k-subset of the other n - 1 clients, so
      P[>= t of them in C] <= C(k, t) q^t, q = corruption n / (n - 1); a union bound over
      i gives n C(k, t) q^t <= 2^-(sigma + 1).
  (b) Removing vertices R from C_n(1..h), h = k/2, leaves the rest connected unless the
      cyclic order holds two maximal runs of >= h consecutive removed vertices: survivors
      that are consecutive in the cyclic order are adjacent iff fewer than h removed lie
      between them, and a single long run only cuts the cycle into a path. Each long run
      contains a window of h positions starting at its start, the two windows are disjoint,
      so a union bound over pairs of windows gives n (n - 1) / 2 p^k <= 2^-(sigma + 1).
      (a) + (b) bound the privacy failure by 2^-sigma.
  (c) Client u's secret must be rebuilt from its surviving neighbours alone when u is
      absent (dropped, or silent in Unmask); their number is Binomial(k, 1 - dropout), so
      fewer than t remain with probability P[Binomial(k, dropout) >= k - t + 1]. The
      clients' refusal of a disconnected U3 adds (b)'s bound with p = dropout. Union over
      u: n P[...] + n (n - 1) / 2 dropout^k <= 2^-eta.

  Besides (a), t > k/2 (as full SecAgg's t > n/2: no two disjoint groups of a neighbourhood
  can both reach t) and t >= threshold (k + 1). The selection returns the smallest even
  k < n for which the smallest such t meets (a) and the pair meets (b) and (c); if no k < n
  does (small n, high rates), it falls back to full SecAgg, k = 0 with
  t = max(n // 2 + 1, ceil(threshold n)), and warns. Full SecAgg has no graph to cut; its
  own conditions (t > corrupted clients, t survivors) are the caller's.

  Args:
    n: clients in the round (>= 2).
    dropout_rate: probability that a client drops before its masked input, in [0, 1).
    corruption_rate: fraction of clients colluding with the server, in [0, 1/2).
    sigma: statistical security parameter (privacy fails with probability <= 2^-sigma).
    eta: correctness parameter (honest dropouts abort with probability <= 2^-eta).
    threshold: a floor on t as a fraction of the k + 1 holders, in [1/2, 1].

  Returns:
    (k, t): k even in [2, n - 1] with t in (k/2, k + 1], or (0, t) for full SecAgg.
  """
  _check_rates(n, dropout_rate, corruption_rate, sigma, eta)
  if not 0.5 <= threshold <= 1:
    raise ValueError(f"threshold must be a fraction in [1/2, 1], got {threshold}")
  for k in range(2, n, 2):
    t = _plus_threshold(n, k, corruption_rate, sigma, threshold)
    if _plus_failure(n, k, t, dropout_rate, corruption_rate, sigma, eta) is None:
      return k, t
  warnings.warn(f"no SecAgg+ neighbourhood k < n={n} meets Bell et al.'s conditions at "
                f"dropout {dropout_rate} and corruption {corruption_rate}; falling back to "
                f"full SecAgg (k = 0)", stacklevel=2)
  return 0, min(n, max(n // 2 + 1, math.ceil(threshold * n)))


def _check_rates(n: int, dropout: float, corruption: float, sigma: float, eta: float) -> None:
  if not isinstance(n, int) or n < 2:
    raise ValueError(f"secure aggregation needs at least 2 clients, got n={n}")
  if not 0 <= dropout < 1:
    raise ValueError(f"dropout must be in [0, 1), got {dropout}")
  if not 0 <= corruption < 0.5:
    raise ValueError(f"corruption must be in [0, 1/2), got {corruption}")
  if sigma <= 0 or eta <= 0:
    raise ValueError(f"sigma and eta must be > 0, got sigma={sigma}, eta={eta}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SecAggConfig:
  """Protocol parameters, public to everyone.

  Attributes:
    num_clients: n, the clients invited (ids 1..n).
    threshold: t, shares needed to reconstruct a secret (full SecAgg: n/2 < t <= n;
      SecAgg+: k/2 < t <= k + 1 within each neighbourhood of k + 1 clients, and within
      the analysis of `secagg_plus_parameters`).
    dimension: d, the length of each input vector.
    bits: R = 2^bits (1..64); inputs are integers mod R.
    neighbours: k > 0 for SecAgg+ (k-regular graph, k even, k < n); 0 for full SecAgg.
    graph_seed: public seed of SecAgg+'s graph (the server draws it).
    dropout: the dropout rate SecAgg+'s (k, t) must tolerate (see `secagg_plus_parameters`).
    corruption: the fraction of clients colluding with the server that SecAgg+ must
      tolerate. With dropout = corruption = 0 any k >= 2 is accepted, and the clients'
      refusal of a disconnected survivors' graph is what keeps partial sums hidden.
    sigma: statistical security parameter of the SecAgg+ analysis.
    eta: correctness parameter of the SecAgg+ analysis.
  """

  num_clients: int
  threshold: int
  dimension: int
  bits: int = 32
  neighbours: int = 0
  graph_seed: bytes = b"\x00" * 32
  dropout: float = 0.0
  corruption: float = 0.0
  sigma: float = SIGMA
  eta: float = ETA

  def __post_init__(self):
    n, t, k = self.num_clients, self.threshold, self.neighbours
    _check_rates(n, self.dropout, self.corruption, self.sigma, self.eta)
    if not 1 <= self.bits <= 64:
      raise ValueError(f"bits must be in [1, 64], got {self.bits}")
    if self.dimension < 1:
      raise ValueError(f"dimension must be >= 1, got {self.dimension}")
    if not k:
      if not n / 2 < t <= n:
        raise ValueError(f"threshold t must satisfy n/2 < t <= n (n={n}), got t={t}: with "
                         f"t <= n/2 two disjoint groups could each unmask")
      return
    if k % 2 or not 2 <= k < n:
      raise ValueError(f"SecAgg+ needs an even number of neighbours k in [2, {n - 1}], got {k}")
    if not k / 2 < t <= k + 1:
      raise ValueError(f"SecAgg+ needs k/2 < t <= k + 1 (k={k}), got threshold t={t}")
    why = _plus_failure(n, k, t, self.dropout, self.corruption, self.sigma, self.eta)
    if why:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the message says k = 0 means full SecAgg
        best = secagg_plus_parameters(n, self.dropout, self.corruption, sigma=self.sigma,
                                      eta=self.eta)
      raise ValueError(f"neighbours={k}, threshold={t} is outside the SecAgg+ analysis for "
                       f"n={n} at dropout {self.dropout} and corruption {self.corruption}: "
                       f"{why}; secagg_plus_parameters selects (k, t) = {best} "
                       f"(k = 0: full SecAgg)")

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


def components(cfg: SecAggConfig, members: Iterable[int]) -> list[list[int]]:
  """The connected components (sorted, largest first) of the public graph induced on
  `members`: the partial sums a server holding every member's unmasking could isolate."""
  left, out = set(members), []
  if not cfg.neighbours:  # the complete graph
    return [sorted(left)] if left else []
  while left:
    frontier = [left.pop()]
    comp = set(frontier)
    while frontier:
      nxt = [v for u in frontier for v in cfg.neighbourhood(u) if v in left]
      left.difference_update(nxt)
      comp.update(nxt)
      frontier = nxt
    out.append(sorted(comp))
  return sorted(out, key=lambda c: (-len(c), c))


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
  except ValueError as e:  # low-order public key (the length is checked on receipt)
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


def pack(**fields) -> bytes:
  """One protocol message on the wire: JSON, bytes as base64, maps keyed by client id.

  Public, like `unpack`, because the wire format is what a malicious party controls: the
  tests forge messages with it."""
  def enc(x):
    if isinstance(x, bytes):
      return {"b": base64.b64encode(x).decode()}
    if isinstance(x, dict):
      return {"d": {str(k): enc(v) for k, v in x.items()}}
    if isinstance(x, (list, tuple)):
      return {"l": [enc(v) for v in x]}
    return x
  return json.dumps({k: enc(v) for k, v in fields.items()}).encode()


def _is_id(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2 ** 32


def _nbytes(size: int) -> Callable[[Any], bool]:
  return lambda x: isinstance(x, bytes) and len(x) == size


def _map(value_ok: Callable[[Any], bool]) -> Callable[[Any], bool]:
  return lambda x: isinstance(x, dict) and all(_is_id(k) and value_ok(v) for k, v in x.items())


def _ids(x) -> bool:
  return isinstance(x, list) and all(_is_id(v) for v in x)


_SHARE = _nbytes(shamir.SHARE_BYTES)
_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {  # every field of every message
    "id": (_is_id, "an integer client id"),
    "u": (_is_id, "an integer client id"),
    "v": (_is_id, "an integer client id"),
    "session": (_nbytes(16), "a 16-byte session id"),
    "c_pk": (_nbytes(32), "a 32-byte X25519 public key"),
    "s_pk": (_nbytes(32), "a 32-byte X25519 public key"),
    "keys": (_map(lambda p: isinstance(p, list) and len(p) == 2 and all(map(_nbytes(32), p))),
             "a map from client ids to two 32-byte public keys"),
    "ciphertexts": (_map(lambda c: isinstance(c, bytes) and len(c) >= 28),
                    "a map from client ids to AES-GCM ciphertexts (nonce + tag >= 28 bytes)"),
    "u2": (_ids, "a list of client ids"),
    "survivors": (_ids, "a list of client ids"),
    "dropped": (_ids, "a list of client ids"),
    "y": (lambda y: isinstance(y, bytes) and len(y) % 8 == 0, "bytes of 8-byte words"),
    "s": (_SHARE, f"a {shamir.SHARE_BYTES}-byte Shamir share"),
    "b": (_SHARE, f"a {shamir.SHARE_BYTES}-byte Shamir share"),
    "s_shares": (_map(_SHARE), f"a map from client ids to {shamir.SHARE_BYTES}-byte shares"),
    "b_shares": (_map(_SHARE), f"a map from client ids to {shamir.SHARE_BYTES}-byte shares"),
}


def unpack(data: bytes, where: str, *fields: str) -> dict:
  """The message's `fields`, each decoded and checked against `_FIELDS` (otherwise a
  `SecAggError` naming the field). `where` names the receiver and stage; a valid 'id'
  field names the sender in every later error."""
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
    raw = json.loads(data)
  except (ValueError, TypeError) as e:
    raise SecAggError(f"{where}: malformed message: {e}") from None
  if not isinstance(raw, dict):
    raise SecAggError(f"{where}: malformed message: not a JSON object")
  if "id" in fields and _is_id(raw.get("id")):
    where = f"{where}: client {raw['id']}'s message"
  missing = [k for k in fields if k not in raw]
  if missing:
    raise SecAggError(f"{where} lacks {missing}")
  msg = {}
  for k in fields:
    ok, what = _FIELDS[k]
    try:
      msg[k] = dec(raw[k])
    except (ValueError, TypeError, AttributeError):  # bad base64, non-integer map keys
      msg[k] = raw[k]
    if not ok(msg[k]):
      raise SecAggError(f"{where}: field {k!r} must be {what}")
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
    return pack(id=self.id, c_pk=_public(self._c_sk), s_pk=_public(self._s_sk))

  # round 1
  def share_keys(self, roster: bytes) -> bytes:
    msg = unpack(roster, f"client {self.id}: ShareKeys roster", "session", "keys")
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
      plain = pack(u=self.id, v=v, s=shamir.to_bytes(s_shares[v]), b=shamir.to_bytes(b_shares[v]))
      out[v] = nonce + AESGCM(key).encrypt(nonce, plain, self._aad(self.id, v))
    return pack(id=self.id, ciphertexts=out)

  def _aad(self, sender: int, recipient: int) -> bytes:
    return self._session + struct.pack(">II", sender, recipient)

  def _check_enough(self, count: int, stage: str) -> None:
    if count < self.cfg.threshold:
      raise SecAggAbort(f"{stage}: only {count} clients in client {self.id}'s neighbourhood "
                        f"remain, fewer than the threshold t={self.cfg.threshold}")

  # round 2
  def masked_input(self, inbox: bytes) -> bytes:
    msg = unpack(inbox, f"client {self.id}: MaskedInput inbox", "u2", "ciphertexts")
    u2, self._inbox = set(msg["u2"]), msg["ciphertexts"]
    if self.id not in u2 or not u2 <= set(self._keys):
      raise SecAggError(f"client {self.id}: the declared U2 must contain it and lie within "
                        f"the roster U1")
    peers = set(self.cfg.neighbourhood(self.id)) & u2 - {self.id}
    unknown, missing = set(self._inbox) - peers, peers - set(self._inbox)
    if unknown:
      raise SecAggError(f"client {self.id} received shares from clients {sorted(unknown)}, "
                        f"not its neighbours in U2")
    if missing:
      raise SecAggError(f"client {self.id} lacks the shares of its U2 neighbours "
                        f"{sorted(missing)}: its masks would not cancel")
    self._check_enough(len(peers) + 1, "MaskedInput")
    y = self.x + prg(self._b, self.cfg.dimension, self.cfg.bits)
    for v in sorted(peers):
      mask = prg(_agree(self._s_sk, self._keys[v][1], _pair_info(b"mask", self._session, self.id, v)),
                 self.cfg.dimension, self.cfg.bits)
      y = y + mask if self.id < v else y - mask
    self._u2, self._mine = u2, peers | {self.id}
    return pack(id=self.id, y=self.cfg.reduce(y).astype("<u8").tobytes())

  # round 4
  def unmask(self, request: bytes) -> bytes:
    msg = unpack(request, f"client {self.id}: Unmask request", "survivors", "dropped")
    survivors, dropped = set(msg["survivors"]), set(msg["dropped"])
    if survivors & dropped:
      raise SecAggError(f"clients {sorted(survivors & dropped)} cannot be both survivors and dropped")
    if self.id not in survivors:
      raise SecAggError(f"client {self.id} is asked to unmask but is not listed as a survivor")
    if survivors | dropped != self._u2:
      raise SecAggError(f"client {self.id}: survivors and dropped must partition the declared "
                        f"U2 {sorted(self._u2)}")
    self._check_enough(len(survivors & self._mine), "Unmask")
    parts = components(self.cfg, survivors)
    if len(parts) > 1:
      raise SecAggAbort(f"client {self.id} refuses to unmask: the survivors' graph is "
                        f"disconnected, the server could isolate the partial sum of clients "
                        f"{parts[-1]}")
    b_out, s_out = {}, {}
    for v in sorted((survivors | dropped) & self._mine):
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
    return pack(id=self.id, b_shares=b_out, s_shares=s_out)

  def _decrypt(self, v: int) -> dict[str, int]:
    data = self._inbox[v]
    key = _agree(self._c_sk, self._keys[v][0], _pair_info(b"enc", self._session, v, self.id))
    try:
      plain = AESGCM(key).decrypt(data[:12], data[12:], self._aad(v, self.id))
    except (InvalidTag, ValueError):
      raise SecAggError(f"ciphertext from client {v} to client {self.id} failed authentication "
                        f"(tampered, replayed or misdirected)") from None
    msg = unpack(plain, f"client {self.id}: shares from client {v}", "u", "v", "s", "b")
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

  def _senders(self, messages: Iterable[bytes], stage: str, allowed: set[int], *fields: str
               ) -> dict[int, dict]:
    out = {}
    for data in messages:
      msg = unpack(data, stage, "id", *fields)
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
    return pack(session=self.session, keys=self._keys)

  def share_keys(self, messages: Iterable[bytes]) -> dict[int, bytes]:
    msgs = self._senders(messages, "U2", set(self._keys), "ciphertexts")
    u2 = sorted(msgs)
    for u, m in msgs.items():
      due = set(self.cfg.neighbourhood(u)) & set(self._keys)
      stray, missing = set(m["ciphertexts"]) - due, due - set(m["ciphertexts"])
      if stray:
        raise SecAggError(f"U2: client {u} sent shares to clients {sorted(stray)}, not its "
                          f"neighbours in U1")
      if missing:
        raise SecAggError(f"U2: client {u}'s ShareKeys message lacks ciphertexts for its "
                          f"neighbours {sorted(missing)}")
    self._u2 = set(u2)
    return {v: pack(u2=u2, ciphertexts={u: msgs[u]["ciphertexts"][v] for u in u2
                                         if v in msgs[u]["ciphertexts"]})
            for v in u2}

  def masked_input(self, messages: Iterable[bytes]) -> bytes:
    msgs = self._senders(messages, "U3", self._u2, "y")
    for u, m in msgs.items():
      if len(m["y"]) != 8 * self.cfg.dimension:
        raise SecAggError(f"U3: client {u}'s message: field 'y' holds {len(m['y']) // 8} "
                          f"words, not the dimension {self.cfg.dimension}")
      self.view.masked[u] = np.frombuffer(m["y"], dtype="<u8").astype(self.cfg.dtype)
    self._u3 = set(msgs)
    self._dropped = self._u2 - self._u3
    return pack(survivors=sorted(self._u3), dropped=sorted(self._dropped))

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
      secret = shamir.reconstruct(got, self.cfg.threshold)
    except shamir.ShamirError as e:
      raise SecAggError(f"Unmask: client {v}'s {what}: {e}") from None
    if len(secret) != 32:
      raise SecAggError(f"Unmask: client {v}'s {what} has {len(secret)} bytes, not 32")
    return secret


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
    SecAggAbort: fewer than t clients remain at some round, or the survivors' graph is
      disconnected (the clients refuse to unmask).
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


class Encoding(Protocol):
  """How a round's float updates become integers mod 2^bits, and the decoded sum back
  (host side, NumPy).

  Attributes:
    bits: the protocol's modulus 2^bits (<= 32 inside the round).
    metric_names: the names of `encode`'s metrics (fixed, so the round's shapes are static).
  """

  bits: int
  metric_names: tuple[str, ...]

  def encoded_dimension(self, d: int) -> int:
    """d', the length of an encoded update of d floats."""

  def encode(self, x: np.ndarray, *, seed: bytes) -> tuple[np.ndarray, dict[str, float]]:
    """x: [m, d] float32, one row per real client of the round -> ([m, d'] unsigned ints in
    [0, 2^bits), host metrics keyed by `metric_names`). `seed`: 32 bytes keying a CSPRNG
    for every random choice of the encoding."""

  def decode(self, total: np.ndarray, survivors: int, *, seed: bytes) -> np.ndarray:
    """The protocol's sum mod 2^bits [d'] -> the float32 estimate of the *sum* [d]; `seed`
    is the round's `encode` seed (for public choices such as a shared rotation)."""

  def denominator(self, survivors: int, clients: int) -> float:
    """What the decoded sum is divided by (the round's update is the quotient)."""

  def min_survivors(self, clients: int) -> int:
    """Rounds with fewer survivors abort (the model is left unchanged)."""


@dataclasses.dataclass(frozen=True)
class PlainEncoding:
  """Fixed-point encoding without noise (not DP: the server learns the exact sum).

  Each coordinate is clipped to [-clip, clip] (clipped or non-finite coordinates are
  counted in `secagg_clipped`), scaled by `encoding_scale(num_clients, clip, bits)`,
  rounded stochastically and without bias (up to 2^-53) with uniforms from `prg`, and
  taken mod 2^bits in two's complement; the sum of up to `num_clients` such rows cannot
  wrap, so `decode` sign-extends and unscales it exactly.
  """

  clip: float
  bits: int
  num_clients: int
  metric_names: ClassVar[tuple[str, ...]] = ("secagg_clipped",)

  def __post_init__(self):
    if not self.clip > 0:
      raise ValueError(f"clip must be > 0, got {self.clip}")
    if not 2 <= self.bits <= 32:
      raise ValueError(f"bits must be in [2, 32], got {self.bits}")
    if not 1 <= self.num_clients or self.scale <= 0:
      raise ValueError(f"num_clients must be in [1, 2^(bits - 1) - 2] so that sums cannot "
                       f"wrap mod 2^{self.bits}, got {self.num_clients}")

  @property
  def scale(self) -> float:
    return encoding_scale(self.num_clients, self.clip, self.bits)

  def encoded_dimension(self, d: int) -> int:
    return d

  def encode(self, x: np.ndarray, *, seed: bytes) -> tuple[np.ndarray, dict[str, float]]:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or not 1 <= x.shape[0] <= self.num_clients:
      raise ValueError(f"encode takes [m, d] updates with m <= num_clients="
                       f"{self.num_clients}, got shape {x.shape}")
    bad = ~(np.abs(x) <= self.clip)  # clipped, or NaN
    z = np.clip(np.nan_to_num(x), -self.clip, self.clip) * self.scale
    low = np.floor(z)
    uniform = (prg(seed, z.size, 64, info=b"rounding") >> np.uint64(11)) * 2.0 ** -53
    ints = (low + (uniform.reshape(z.shape) < z - low)).astype(np.int64)
    return (ints & ((1 << self.bits) - 1)).astype(np.uint32), {"secagg_clipped": float(bad.sum())}

  def decode(self, total: np.ndarray, survivors: int, *, seed: bytes) -> np.ndarray:
    del survivors, seed
    v = np.asarray(total).astype(np.int64)
    v = np.where(v >= 1 << (self.bits - 1), v - (1 << self.bits), v)
    return (v / self.scale).astype(np.float32)

  def denominator(self, survivors: int, clients: int) -> float:
    del clients
    return float(survivors)

  def min_survivors(self, clients: int) -> int:
    del clients
    return 0


# ----------------------------------------------------------------------------- federated hook


SERVER_OBSERVES = "aggregate"  # what a secure-aggregation round shows the server


@dataclasses.dataclass(frozen=True, kw_only=True)
class SecureAggregation:
  """Secure aggregation as the federated round's `aggregate` hook (see `aggregator`).

  Attributes:
    clip: c, the default `PlainEncoding` clips each coordinate to [-c, c].
    bits: R = 2^bits of the default `PlainEncoding` (at most 32 inside jit); a given
      `Encoding` brings its own.
    threshold: a floor on t as a fraction of the clients in the round (> 1/2; SecAgg+: of
      the k + 1 holders of a neighbourhood); SecAgg+ may raise it to meet bound (a) of
      `secagg_plus_parameters`.
    neighbours: 0: full SecAgg; AUTO (-1): SecAgg+ with the smallest k that
      `secagg_plus_parameters` accepts for the round's m clients, `dropout` and `corruption`
      (full SecAgg when none does); an even k >= 2: SecAgg+ with that k (full SecAgg when
      k >= m - 1, where the graph is complete), refused with a ValueError when k is outside
      the analysis for m.
    dropout: probability that a sampled client drops out before sending its masked input
      (simulated, and the rate SecAgg+ is sized for).
    corruption: fraction of clients assumed to collude with the server (SecAgg+ sizing).
    sigma: statistical security parameter of the SecAgg+ analysis.
    eta: correctness parameter of the SecAgg+ analysis.
  """

  clip: float = 1.0
  bits: int = 32
  threshold: float = 0.6
  neighbours: int = 0
  dropout: float = 0.0
  corruption: float = 0.0
  sigma: float = SIGMA
  eta: float = ETA

  def __post_init__(self):
    if not 0.5 < self.threshold <= 1:
      raise ValueError(f"threshold must be a fraction in (1/2, 1], got {self.threshold}")
    if not (self.neighbours in (0, AUTO) or (self.neighbours >= 2 and self.neighbours % 2 == 0)):
      raise ValueError(f"neighbours must be 0 (full SecAgg), {AUTO} (auto) or an even k >= 2, "
                       f"got {self.neighbours}")
    _check_rates(2, self.dropout, self.corruption, self.sigma, self.eta)
    PlainEncoding(self.clip, self.bits, 1)  # checks clip and bits

  def protocol(self, m: int, dimension: int, bits: int | None = None) -> SecAggConfig:
    """The protocol parameters for a round of m clients (raises ValueError when a fixed
    `neighbours` is outside the SecAgg+ analysis for m)."""
    k = self.neighbours
    if k == AUTO:
      k, t = secagg_plus_parameters(m, self.dropout, self.corruption, sigma=self.sigma,
                                    eta=self.eta, threshold=self.threshold)
    elif k >= m - 1:
      k = 0
    else:
      t = _plus_threshold(m, k, self.corruption, self.sigma, self.threshold)
    if not k:
      t = min(m, max(m // 2 + 1, math.ceil(self.threshold * m)))
    return SecAggConfig(num_clients=m, threshold=t, dimension=dimension,
                        bits=self.bits if bits is None else bits, neighbours=k,
                        graph_seed=os.urandom(32), dropout=self.dropout,
                        corruption=self.corruption, sigma=self.sigma, eta=self.eta)


def aggregator(settings: SecureAggregation, encoding: Encoding | None = None, *,
               noise_seed: str = "run"):
  """A stateless `fljax.federated.Aggregator` that runs the real protocol each round.

  Inside the jitted round, the updates are only flattened (d numbers each); a
  `jax.pure_callback` then, on the host, encodes the rows of the round's real clients
  (weight > 0) with `encoding` (default: `PlainEncoding(clip, bits, m)` for the round's m
  slots), runs the protocol among them (each dropping with probability `dropout` before its
  masked input, drawn on device from the round's key), decodes the sum and divides it by
  `encoding.denominator(survivors, clients)`: every surviving client counts once (size
  weights would have to be sent in the clear).

  A round with fewer than 2 real clients, or that aborts (`SecAggAbort`, fewer survivors
  than `encoding.min_survivors`, or a fixed `neighbours` outside the analysis for this
  round's client count), leaves the model unchanged and is counted in `secagg_aborted`.
  Metrics: `secagg_survivors`, `secagg_aborted` and the encoding's `metric_names`.

  Threat model: the server learns the sum only (`SERVER_OBSERVES`), so an attack on a
  secure-aggregation round must be given the aggregate, never a client's update. This
  hook adds no noise of its own: any DP guarantee is the encoding's.

  Args:
    settings: the protocol settings.
    encoding: float updates <-> integers mod 2^bits (e.g. a distributed discrete Gaussian).
    noise_seed: where the encoding's 32-byte seed comes from: 'run' derives it with HKDF
      from the round's key (reproducible from the run's seed: research); 'os' draws it
      from os.urandom (deployment: nobody who knows the run's seed can regenerate the
      encoding's noise).

  Returns:
    An `Aggregator` whose update is the decoded mean (zero when the round aborts).
  """
  import jax
  import jax.numpy as jnp
  from jax.flatten_util import ravel_pytree

  from fljax.federated import Aggregator

  if noise_seed not in ("run", "os"):
    raise ValueError(f"noise_seed must be 'run' or 'os', got {noise_seed!r}")
  if encoding is not None and not 1 <= encoding.bits <= 32:
    raise ValueError(f"encoding.bits must be in [1, 32] inside the round, got {encoding.bits}")

  def update(updates, weights, state, key):
    m = weights.shape[0]
    flat = jax.vmap(lambda u: ravel_pytree(u)[0])(updates).astype(jnp.float32)
    unravel = ravel_pytree(jax.tree.map(lambda u: u[0], updates))[1]
    d = flat.shape[1]
    enc = encoding if encoding is not None else PlainEncoding(settings.clip, settings.bits, m)
    d_enc = enc.encoded_dimension(d)
    if m >= 2:
      settings.protocol(m, d_enc, enc.bits)  # refuses a fixed `neighbours` outside the analysis
    k_encode, k_drop = jax.random.split(key)
    drops = jax.random.uniform(k_drop, (m,)) < settings.dropout
    names = tuple(enc.metric_names)

    def host(flat, real, drops, key_data):
      ids = np.flatnonzero(np.asarray(real))
      metrics = np.zeros(len(names), np.float32)
      aborted = lambda: (np.zeros(d, np.float32), np.int32(0), np.int32(1), metrics)  # noqa: E731
      if len(ids) < 2:  # fewer than two clients: nothing can be hidden, nothing is sent
        return aborted()
      seed = (_hkdf(np.asarray(key_data).tobytes(), b"fljax-secagg encoding seed")
              if noise_seed == "run" else os.urandom(32))
      encoded, values = enc.encode(np.asarray(flat)[ids], seed=seed)
      metrics = np.array([values[k] for k in names], np.float32)
      try:
        cfg = settings.protocol(len(ids), d_enc, enc.bits)
      except ValueError:  # a fixed k, accepted for m slots, is outside the analysis for r
        return aborted()
      inputs = {j + 1: np.asarray(row).astype(cfg.dtype) for j, row in enumerate(encoded)}
      dropped = {j + 1 for j, i in enumerate(ids) if drops[i]}
      try:
        total, view = run(inputs, cfg, drop_before={"masked_input": dropped})
      except SecAggAbort:
        return aborted()
      survivors = len(view.rosters["U3"])
      if survivors < enc.min_survivors(len(ids)):
        return aborted()
      mean = enc.decode(total, survivors, seed=seed) / enc.denominator(survivors, len(ids))
      return mean.astype(np.float32), np.int32(survivors), np.int32(0), metrics

    shapes = (jax.ShapeDtypeStruct((d,), jnp.float32), jax.ShapeDtypeStruct((), jnp.int32),
              jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((len(names),), jnp.float32))
    mean, survivors, aborted, metrics = jax.pure_callback(
        host, shapes, flat, weights > 0, drops, jax.random.key_data(k_encode))
    out = {"secagg_survivors": survivors.astype(jnp.float32),
           "secagg_aborted": aborted.astype(jnp.float32)}
    out.update({name: metrics[i] for i, name in enumerate(names)})
    return unravel(mean), state, out

  return Aggregator(init=lambda params: (), update=update)
