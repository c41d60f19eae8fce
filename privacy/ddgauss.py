"""The distributed discrete Gaussian mechanism (DDGauss; Kairouz, Liu & Steinke, ICML 2021).

Secure aggregation's DP mechanism: every client discretises its own update and adds its own
share of integer noise, so that the server, which sees only the sum mod 2^bits, sees a sum
of at least `n_min` noise shares (Kairouz et al. 2021, arXiv:2102.06387, Algorithm 1).

Client (`DDGauss.encode`):
  1. clip the update to L2 norm c and scale by 1/gamma (gamma: the granularity);
  2. flatten it with a randomized Hadamard rotation: pad d to d' = 2^ceil(log2 d), multiply
     by a random +/-1 diagonal D drawn from a *public* per-round seed (the same for all the
     round's clients), apply the normalised Walsh-Hadamard transform H (H D is orthogonal);
  3. conditional randomized rounding: unbiased randomized rounding to Z^d', repeated until
     the rounded vector's L2 norm is at most `rounded_norm_bound(c/gamma, d', beta)`
         min(c/gamma + sqrt(d'),
             sqrt((c/gamma)^2 + d'/4 + sqrt(2 log(1/beta)) (c/gamma + sqrt(d')/2)))
     (Kairouz et al. 2021, the conditional rounding of Algorithm 1 and the norm bound of
     their end-to-end privacy theorem, as google-research `distributed_dp/accounting_utils.py`
     `rounded_l2_norm_bound` implements it; one try fails with probability at most beta);
  4. add N_Z(0, sigma^2) per coordinate, sigma^2 a rational (in the scaled domain), drawn
     by the exact sampler of Canonne, Kamath & Steinke ("The Discrete Gaussian for
     Differential Privacy", NeurIPS 2020, Algorithms 1-3: a discrete Laplace proposal
     and a Bernoulli(exp(-bias)) rejection built from exact Bernoulli(p/q) draws), with
     integer arithmetic only and a ChaCha20 keystream (`cryptography`) as the randomness;
  5. reduce mod 2^bits.
Server (`DDGauss.decode`; `DDGaussEncoding` is the secure-aggregation interface): centre
the protocol's sum mod 2^bits in [-2^(bits-1), 2^(bits-1)), undo the rotation, multiply by
gamma: an estimate of the *sum* of the clipped updates (unbiased but for the conditional
rounding's small bias). The federated server divides by a public fixed denominator, the
expected number of clients per round (never the realised survivors).

Guarantee (`rdp_curve`, `epsilon`):
  - what is clipped: each client's whole update, to L2 norm c (before scaling/rotation);
  - neighbouring relation: *replace one client's data* (the client takes part in both
    worlds, with its own noise share). Add/remove-one-client is not the relation: every
    client adds a noise share, so removing one changes the number of shares, which the
    server sees (the roster and the aggregate's variance);
  - sensitivity (scaled integer domain): both rounded vectors have L2 norm <= r =
    `rounded_norm_bound(c/gamma, d', beta)` (enforced by the rounding's final check, so
    float error upstream cannot break it), hence Delta2 = 2 r and, the difference being an
    integer vector, Delta1 = min(sqrt(d') Delta2, Delta2^2);
  - accounting: Kairouz et al. 2021, Theorem 1 (privacy of sums of discrete Gaussians): if
    n >= n_min independent N_Z(0, sigma^2)^d' shares are added to an integer vector whose
    change has L1 norm <= Delta1 and L2 norm <= Delta2, then for every order a >= 1,
    D_a <= a eps^2 / 2 (1/2 eps^2-concentrated DP) with
        eps = min(sqrt(Delta2^2 / (n sigma^2) + tau Delta1 / 2),
                  Delta2 / (sqrt(n) sigma) + tau Delta1).
    google-research's implementation of the paper's accounting
    (`distributed_dp/accounting_utils.py`, `compute_rdp_dgaussian`) puts the dimension d
    where Delta1 stands; we use Delta1, which is never smaller here (the rounding bound gives
    Delta2 >= sqrt(d'), so Delta1 >= d'), so the bound is at least as conservative as
    either reading. At the default scaled sigma (4096) tau is 0 in float64 and eps =
    Delta2 / (sqrt(n) sigma), the continuous Gaussian's; small scaled sigmas (coarse bits)
    pay the tau term. Provenance caveat: the paper's own text could not be read when
    this was written; the statement is that of google-research's code and of the lead's
    reading of the paper, taken in its more conservative form;
  - more survivors than n_min only add independent noise (post-processing), so the
    protocol aborts rounds with fewer than n_min survivors (`min_survivors`);
  - participation is visible (the roster, and the variance of the aggregate), so Poisson
    client sampling with rate q gives no amplification of the per-round epsilon: a round
    is the visible mixture, RDP (1/(a-1)) log(1 - q + q exp((a-1) rdp(a)))
    (`privacy.accounting.participation_visible_rdp`); T rounds add their RDP and
    `privacy.accounting.rdp_epsilon` converts to (epsilon, delta).

Parameters (`DDGauss.create`, as google-research's `ddgauss_params`/`heuristic_scale_factor`
and the paper's Sec. on parameter selection): gamma is the smallest granularity for which
a k-sigma bound holds on every coordinate of the sum of m = expected_clients encodings:
(2^(bits-1) - m) gamma >= k sqrt(m^2 c^2 / d' + m sigma_real^2) (rotated signal, sub-Gaussian
with variance proxy ||sum x||^2/d' <= (m c)^2/d'; noise, N_Z(0, s^2) being s-sub-Gaussian
(Canonne et al. 2020); rounding, at most 1 per client and coordinate), with k by default
sqrt(2 log(2 d' / max_overflow)) + 0.01, which makes the union bound over the d' coordinates,
`overflow_probability` = 2 d' exp(-(2^(bits-1) - m)^2 / (2 v)), at most `max_overflow`
(the paper and google-research use k = 4, a heuristic that the union bound does not
cover for large d'; pass k=4 and a larger max_overflow to reproduce it).
gamma is never below sigma_real / `MAX_SCALED_SIGMA` (the scaled noise std stays <= 4096:
finer granularity buys a rounding variance below 1.5e-8 of the noise's and would push the
exact sampler's integers past int64).
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import ClassVar

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from privacy import accounting

# The scaled local noise std never exceeds this (see the module docstring).
MAX_SCALED_SIGMA = 4096.0
# |a| below this squares without overflowing int64: isqrt(2^63 - 1).
_SQRT_INT64 = math.isqrt(2**63 - 1)
_MAX_RETRIES = 10_000


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(message)


# ----------------------------------------------------------------------------- randomness


def derive_seed(seed: bytes, info: bytes) -> bytes:
  """A 32-byte sub-seed of `seed` for one purpose (HKDF-SHA256, `info` names the purpose)."""
  _check(isinstance(seed, bytes) and len(seed) == 32,
         f"seed must be 32 bytes, got {type(seed).__name__} of length {len(seed)}")
  return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
              info=b"fljax-ddgauss " + info).derive(seed)


class _Stream:
  """Exact uniform integers from a ChaCha20 keystream keyed by 32 bytes (zero nonce: every
  key is derived for a single purpose)."""

  def __init__(self, key: bytes):
    self._cipher = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None).encryptor()

  def words(self, count: int) -> np.ndarray:
    """`count` uniform uint64."""
    return np.frombuffer(self._cipher.update(bytes(8 * count)), "<u8").astype(np.uint64)

  def below(self, n: int, size: int) -> np.ndarray:
    """`size` uniform integers in [0, n) (int64; 1 <= n < 2^63).

    A power of two is masked; otherwise the 64-bit words below 2^64 mod n are rejected (as
    OpenBSD's arc4random_uniform): the accepted words are a multiple of n in number, so
    w mod n is exactly uniform.
    """
    n = int(n)
    if n & (n - 1) == 0:
      return (self.words(size) & np.uint64(n - 1)).astype(np.int64)
    threshold = np.uint64((1 << 64) % n)
    w = self.words(size)
    bad = np.flatnonzero(w < threshold)
    while bad.size:
      w[bad] = self.words(bad.size)
      bad = bad[w[bad] < threshold]
    return (w % np.uint64(n)).astype(np.int64)

  def unit(self, size: int) -> np.ndarray:
    """Uniform floats k / 2^53 in [0, 1) (for randomized rounding only)."""
    return (self.words(size) >> np.uint64(11)).astype(np.float64) * 2.0**-53


# ----------------------------------------------------------------------------- exact sampler


def _bernoulli_exp_frac(num: np.ndarray, den: int, stream: _Stream) -> np.ndarray:
  """Bernoulli(exp(-num/den)) elementwise for 0 <= num <= den (Canonne et al. 2020, Alg. 1,
  first part).

  K = 1, 2, ... while Bernoulli(x / K) succeeds; the result is 1 iff the final K is odd,
  which happens with probability exp(-x). Bernoulli(x / K) is drawn as Bernoulli(num/den)
  AND Bernoulli(1/K), so den K never has to fit in an int64; the elements still going all
  share the same K, so every draw has a scalar range.
  """
  out = np.zeros(num.shape[0], bool)
  active = np.arange(num.shape[0])
  k = 1
  while active.size:
    if den == 1:  # num in {0, 1}
      hit = num[active] == 1
    else:
      hit = stream.below(den, active.size) < num[active]
    if k > 1:
      hit &= stream.below(k, active.size) == 0
    out[active[~hit]] = k % 2 == 1
    active = active[hit]
    k += 1
  return out


def _bernoulli_exp(whole: np.ndarray, rem: np.ndarray, den: int,
                   stream: _Stream) -> np.ndarray:
  """Bernoulli(exp(-(whole + rem/den))), 0 <= rem < den (Canonne et al. 2020, Alg. 1):
  `whole` Bernoulli(exp(-1)) draws and one Bernoulli(exp(-rem/den)), stopping at the first
  failure (exp(-x) = exp(-1)^floor(x) exp(-frac(x)))."""
  out = np.ones(whole.shape[0], bool)
  whole = whole.copy()
  active = np.flatnonzero(whole > 0)
  while active.size:
    ok = _bernoulli_exp_frac(np.ones(active.size, np.int64), 1, stream)
    out[active[~ok]] = False
    whole[active] -= 1
    active = active[ok & (whole[active] > 0)]
  rest = np.flatnonzero(out)
  if rest.size:
    out[rest] = _bernoulli_exp_frac(rem[rest], den, stream)
  return out


def _discrete_laplace(size: int, t: int, stream: _Stream) -> np.ndarray:
  """`size` draws of the discrete Laplace P(y) ~ exp(-|y|/t), integer t >= 1 (Canonne et
  al. 2020, Alg. 2 with scale t/1: Y = sign * (U + t V), U ~ U[0, t) kept with probability
  exp(-U/t), V ~ Geometric(1 - exp(-1)); (negative, 0) rejected)."""
  out = np.empty(size, np.int64)
  todo = np.arange(size)
  while todo.size:
    m = todo.size
    u = stream.below(t, m)
    keep = _bernoulli_exp_frac(u, t, stream)
    v = np.zeros(m, np.int64)
    going = np.flatnonzero(keep)
    while going.size:
      more = _bernoulli_exp_frac(np.ones(going.size, np.int64), 1, stream)
      v[going[more]] += 1
      going = going[more]
    x = u + t * v
    negative = stream.below(2, m) == 1
    good = keep & ~(negative & (x == 0))
    out[todo[good]] = np.where(negative, -x, x)[good]
    todo = todo[~good]
  return out


def rational_variance(variance: float, *, bits: int = 24) -> Fraction:
  """sigma^2 as a rational N / 2^p, rounded *up* (the noise is never below what is
  accounted), with p such that N ~ 2^bits (p = 0 for variance >= 2^bits)."""
  _check(variance > 0 and math.isfinite(variance),
         f"variance must be > 0 and finite, got {variance}")
  p = max(0, bits - math.ceil(math.log2(variance)))
  den = 1 << p
  num = math.ceil(Fraction(variance) * den)
  return Fraction(num, den)


def _sampler_constants(variance: Fraction) -> tuple[int, int, int]:
  num, den = variance.numerator, variance.denominator
  _check(num > 0, f"variance must be > 0, got {variance}")
  t = math.isqrt(num // den) + 1  # floor(sqrt(sigma^2)) + 1
  _check(2 * num * den * t * t < 2**63,
         f"variance {variance} is too large (or its denominator too fine) for the exact "
         f"sampler's int64 arithmetic: need 2 N D t^2 < 2^63 for sigma^2 = N/D")
  return num, den, t


def _discrete_gaussian(size: int, variance: Fraction, stream: _Stream) -> np.ndarray:
  """`size` exact draws of N_Z(0, sigma^2), sigma^2 = N/D (Canonne et al. 2020, Alg. 3).

  Candidate Y ~ discrete Laplace with scale t = floor(sigma) + 1, accepted with probability
  exp(-(|Y| - sigma^2/t)^2 / (2 sigma^2)) = exp(-A^2 / B), A = |Y| D t - N, B = 2 N D t^2,
  all integers. A^2 is split into floor(A^2/B) and A^2 mod B; the rare |A| whose square
  passes int64 are split with Python integers (a quotient >= 2^62, probability of
  acceptance < exp(-2^62), is rejected outright).
  """
  num, den, t = _sampler_constants(variance)
  b = 2 * num * den * t * t
  out = np.empty(size, np.int64)
  todo = np.arange(size)
  safe_y = (_SQRT_INT64 + num) // (den * t)  # |Y| <= safe_y  =>  |A| <= isqrt(2^63 - 1)
  while todo.size:
    m = todo.size
    y = _discrete_laplace(m, t, stream)
    ay = np.abs(y)
    small = ay <= safe_y
    whole = np.zeros(m, np.int64)
    rem = np.zeros(m, np.int64)
    a = ay[small] * (den * t) - num
    a2 = a * a
    whole[small] = a2 // b
    rem[small] = a2 % b
    possible = np.ones(m, bool)
    for i in np.flatnonzero(~small):
      big = (int(ay[i]) * den * t - num) ** 2
      q, r = divmod(big, b)
      if q >= 2**62:
        possible[i] = False
      else:
        whole[i], rem[i] = q, r
    idx = np.flatnonzero(possible)
    accept = np.zeros(m, bool)
    accept[idx] = _bernoulli_exp(whole[idx], rem[idx], b, stream)
    out[todo[accept]] = y[accept]
    todo = todo[~accept]
  return out


def sample_discrete_gaussian(size: int, variance: Fraction | float, *, seed: bytes
                             ) -> np.ndarray:
  """`size` exact i.i.d. draws of the discrete Gaussian N_Z(0, sigma^2), P(y) ~
  exp(-y^2 / (2 sigma^2)) on the integers (Canonne, Kamath & Steinke 2020).

  Args:
    size: how many draws.
    variance: sigma^2, a `Fraction` used exactly (a float is first rounded up to a dyadic
      rational by `rational_variance`).
    seed: 32 bytes keying the ChaCha20 keystream that drives every decision.

  Returns:
    int64 array [size].
  """
  if not isinstance(variance, Fraction):
    variance = rational_variance(float(variance))
  return _discrete_gaussian(int(size), variance, _Stream(derive_seed(seed, b"noise")))


# ----------------------------------------------------------------------------- rotation


def padded_dimension(d: int) -> int:
  """d' = the smallest power of two >= d."""
  _check(int(d) == d and d >= 1, f"dimension must be an integer >= 1, got {d}")
  return 1 << (int(d) - 1).bit_length()


def _fwht(x: np.ndarray) -> np.ndarray:
  """The normalised Walsh-Hadamard transform over the last axis (a power of two);
  symmetric and orthogonal, hence its own inverse."""
  lead, n = x.shape[:-1], x.shape[-1]
  y = x.reshape(-1, n).astype(np.float64, copy=True)
  h = 1
  while h < n:
    y = y.reshape(y.shape[0], -1, 2, h)
    a, b = y[:, :, 0, :], y[:, :, 1, :]
    y = np.stack([a + b, a - b], axis=2).reshape(-1, n)
    h *= 2
  return (y / math.sqrt(n)).reshape(*lead, n)


def _signs(n: int, seed: bytes) -> np.ndarray:
  bits = np.frombuffer(Cipher(algorithms.ChaCha20(derive_seed(seed, b"signs"), b"\x00" * 16),
                              mode=None).encryptor().update(bytes(n)), np.uint8) & 1
  return 1.0 - 2.0 * bits


def rotate(x: np.ndarray, *, seed: bytes) -> np.ndarray:
  """H D x on the last axis, padded with zeros from d to d' (float64, [..., d']).

  Args:
    x: [..., d] real vectors.
    seed: the round's public rotation seed (32 bytes; the same for all its clients).
  """
  d = x.shape[-1]
  n = padded_dimension(d)
  pad = np.zeros((*x.shape[:-1], n), np.float64)
  pad[..., :d] = x
  return _fwht(pad * _signs(n, seed))


def unrotate(y: np.ndarray, dimension: int, *, seed: bytes) -> np.ndarray:
  """(H D)^-1 y = D H y, truncated to the first `dimension` coordinates ([..., d])."""
  n = y.shape[-1]
  _check(n == padded_dimension(n), f"rotated vectors have a power-of-two length, got {n}")
  return (_fwht(np.asarray(y, np.float64)) * _signs(n, seed))[..., :dimension]


# ----------------------------------------------------------------------------- rounding


def rounded_norm_bound(norm: float, dimension: int, beta: float) -> float:
  """The L2 norm bound the conditional randomized rounding enforces on Z^dimension.

  min(norm + sqrt(d), sqrt(norm^2 + d/4 + sqrt(2 log(1/beta)) (norm + sqrt(d)/2))) for a
  vector of L2 norm <= `norm` (Kairouz et al. 2021; the second bound holds for one
  unconditional try with probability >= 1 - beta, the first always).
  """
  _check(0 < beta < 1, f"beta must be in (0, 1), got {beta}")
  _check(norm > 0, f"norm must be > 0, got {norm}")
  d = float(dimension)
  second = norm**2 + d / 4 + math.sqrt(2 * math.log(1 / beta)) * (norm + math.sqrt(d) / 2)
  return min(norm + math.sqrt(d), math.sqrt(second))


def randomized_round(x: np.ndarray, stream: _Stream) -> np.ndarray:
  """Unbiased randomized rounding to the integers: floor(x) + Bernoulli(x - floor(x))."""
  low = np.floor(x)
  up = stream.unit(x.size).reshape(x.shape) < (x - low)
  return (low + up).astype(np.int64)


def conditional_round(x: np.ndarray, bound: float, *, seed: bytes) -> tuple[np.ndarray, int]:
  """Randomized rounding of each row of x [m, d'], redrawn until ||row||_2 <= bound.

  The check is exact (integer squared norm against floor(bound^2)). Returns the int64
  rows and the total number of redraws.
  """
  x = np.asarray(x, np.float64)
  limit = math.floor(bound * bound)
  stream = _Stream(derive_seed(seed, b"rounding"))
  out = randomized_round(x, stream)
  bad = np.flatnonzero((out * out).sum(-1) > limit)
  retries = 0
  while bad.size:
    retries += bad.size
    _check(retries <= _MAX_RETRIES * x.shape[0],
           f"conditional rounding failed {retries} times: the input norm exceeds the bound "
           f"{bound} it was sized for")
    out[bad] = randomized_round(x[bad], stream)
    bad = bad[(out[bad] * out[bad]).sum(-1) > limit]
  return out, retries


# ----------------------------------------------------------------------------- accounting


def sensitivities(clip_scaled: float, dimension: int, beta: float) -> tuple[float, float]:
  """(Delta1, Delta2) of one client's rounded scaled vector under replace-one neighbours.

  Delta2 = 2 r with r = `rounded_norm_bound(c/gamma, d', beta)` (both worlds' vectors have
  norm <= r); Delta1 = min(sqrt(d') Delta2, Delta2^2) (an integer vector v has
  ||v||_1 <= ||v||_2^2).

  Args:
    clip_scaled: c / gamma.
    dimension: d, the unpadded dimension (d' is derived).
    beta: the rounding's failure-probability parameter.
  """
  n = padded_dimension(dimension)
  delta2 = 2 * rounded_norm_bound(clip_scaled, n, beta)
  return min(math.sqrt(n) * delta2, delta2**2), delta2


def tau(variance: float, n: int) -> float:
  """tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1)) (Kairouz et al. 2021, Thm 1):
  how far a sum of n N_Z(0, sigma^2) is from N_Z(0, n sigma^2)."""
  return 10 * sum(math.exp(-2 * math.pi**2 * variance * k / (k + 1)) for k in range(1, n))


def concentrated_epsilon(*, l1: float, l2: float, variance: float, n: int,
                         dimension: int) -> float:
  """eps with D_a <= a eps^2 / 2 at every order (Kairouz et al. 2021, Thm 1; see the module
  docstring): the sum of n N_Z(0, variance)^d' shares hides an integer change with L1 <= l1
  and L2 <= l2. `dimension` is kept for the callers' signature (the bound uses l1)."""
  # sigma >= 1/2: a conservative domain for the bound (mechanisms built here have sigma >= 1)
  _check(variance >= 0.25, f"the local variance (scaled) must be >= 1/4, got {variance}")
  _check(int(n) == n and n >= 1, f"n_min must be an integer >= 1, got {n}")
  del dimension
  t = tau(variance, n)
  scale = math.sqrt(n * variance)
  return min(math.sqrt(l2**2 / scale**2 + t * l1 / 2), l2 / scale + t * l1)


def rdp_curve(*, clip: float, gamma: float, variance: float, n_min: int, dimension: int,
              beta: float) -> np.ndarray:
  """RDP over `accounting.RDP_ORDERS` of one round for a client that took part.

  a eps^2 / 2 with eps = `concentrated_epsilon` of the replace-one sensitivities of the
  rounded vector (`sensitivities(clip / gamma, ...)`) and n_min noise shares.

  Args:
    clip: c (real units).
    gamma: the granularity.
    variance: sigma^2 of each client's noise in the scaled (integer) domain.
    n_min: the fewest noise shares a completed round holds.
    dimension: d (unpadded).
    beta: the rounding parameter.
  """
  _check(clip > 0, f"clip c must be > 0, got {clip}")
  _check(gamma > 0, f"gamma must be > 0, got {gamma}")
  l1, l2 = sensitivities(clip / gamma, dimension, beta)
  eps = concentrated_epsilon(l1=l1, l2=l2, variance=variance, n=n_min, dimension=dimension)
  return np.asarray(accounting.RDP_ORDERS, np.float64) * eps**2 / 2


def epsilon(rounds: int, q: float, delta: float, *, clip: float, gamma: float,
            variance: float, n_min: int, dimension: int, beta: float) -> float:
  """Epsilon after `rounds` rounds, each client Poisson-sampled with rate q, participation
  visible (`accounting.participation_visible_rdp`, no amplification), RDP composed and
  converted by `accounting.rdp_epsilon`."""
  _check(int(rounds) == rounds and rounds >= 0, f"rounds must be an integer >= 0, got {rounds}")
  one = rdp_curve(clip=clip, gamma=gamma, variance=variance, n_min=n_min, dimension=dimension,
                  beta=beta)
  return accounting.rdp_epsilon(int(rounds) * accounting.participation_visible_rdp(one, q),
                                delta)


def choose_gamma(*, clip: float, local_sigma: float, dimension: int, clients: int, bits: int,
                 k: float) -> float:
  """The granularity: the smallest gamma with (2^(bits-1) - m) gamma >= k sqrt(m^2 c^2/d' +
  m sigma^2) (m = clients, sigma = local noise std in real units), and gamma >=
  sigma / MAX_SCALED_SIGMA."""
  half = 2.0 ** (bits - 1)
  _check(half > clients + 1, f"bits={bits} too small: 2^(bits-1) must exceed the {clients} "
                             f"clients' rounding error")
  n = padded_dimension(dimension)
  spread = math.sqrt(clients**2 * clip**2 / n + clients * local_sigma**2)
  return max(k * spread / (half - clients), local_sigma / MAX_SCALED_SIGMA)


def overflow_bound(*, clip: float, gamma: float, variance: float, dimension: int, clients: int,
                   bits: int) -> float:
  """A bound on P(some coordinate of the sum of `clients` encodings leaves [-2^(bits-1),
  2^(bits-1))): 2 d' exp(-(2^(bits-1) - m)^2 / (2 v)), v = m^2 (c/gamma)^2/d' + m sigma^2
  (sub-Gaussian tails of the rotated signal and the noise, |rounding error| < m, union
  over d')."""
  n = padded_dimension(dimension)
  margin = 2.0 ** (bits - 1) - clients
  if margin <= 0:
    return 1.0
  v = clients**2 * (clip / gamma) ** 2 / n + clients * variance
  return min(1.0, 2 * n * math.exp(-margin**2 / (2 * v)))


# ----------------------------------------------------------------------------- mechanism


@dataclasses.dataclass(frozen=True, kw_only=True)
class DDGauss:
  """The distributed discrete Gaussian mechanism: parameters, accounting, encode/decode
  (`DDGaussEncoding` adapts it to secure aggregation's `Encoding` interface).

  Guarantee: see the module docstring (replace-one-client neighbours, Delta2 = 2 r of the
  rounded scaled vector, Kairouz et al. 2021 Thm 1 with n_min shares, visible
  participation). Build with `DDGauss.create`.

  Attributes:
    clip: c, the L2 clip norm of each client's update.
    dimension: d, the length of an update (the encoding has d' = `padded_dimension(d)`).
    bits: the modulus 2^bits of the secure sum (2..32).
    beta: the conditional rounding's parameter, in (0, 1).
    gamma: the granularity (one integer step in real units).
    variance: sigma^2, each client's noise variance in the scaled integer domain (exact).
    n_min: the fewest survivors whose noise the guarantee counts; rounds with fewer abort.
    expected_clients: the public denominator of the mean, and the m the range is sized for.
    rotation_info: HKDF purpose under which the round's public rotation seed is derived
      from the round seed (shared by all clients); rounding and noise use per-client
      sub-streams.
  """

  clip: float
  dimension: int
  bits: int
  beta: float
  gamma: float
  variance: Fraction
  n_min: int
  expected_clients: int
  rotation_info: bytes = b"rotation"

  metric_names: ClassVar[tuple[str, ...]] = (
      "ddgauss_clipped", "ddgauss_rounding_retries", "ddgauss_overflow")

  def __post_init__(self):
    _check(self.clip > 0 and math.isfinite(self.clip), f"clip c must be > 0, got {self.clip}")
    _check(int(self.dimension) == self.dimension and self.dimension >= 1,
           f"dimension d must be an integer >= 1, got {self.dimension}")
    _check(int(self.bits) == self.bits and 2 <= self.bits <= 32,
           f"bits must be an integer in [2, 32], got {self.bits}")
    _check(0 < self.beta < 1, f"beta must be in (0, 1), got {self.beta}")
    _check(self.gamma > 0 and math.isfinite(self.gamma), f"gamma must be > 0, got {self.gamma}")
    _check(isinstance(self.variance, Fraction) and self.variance >= Fraction(1, 4),
           f"variance must be a Fraction >= 1/4 (scaled domain), got {self.variance!r}")
    _sampler_constants(self.variance)
    _check(int(self.n_min) == self.n_min and self.n_min >= 1,
           f"n_min must be an integer >= 1, got {self.n_min}")
    _check(int(self.expected_clients) == self.expected_clients and self.expected_clients >= 1,
           f"expected_clients must be an integer >= 1, got {self.expected_clients}")

  # -------------------------------------------------------------------------- construction

  @classmethod
  def create(cls, *, clip: float, dimension: int, n_min: int, expected_clients: int,
             bits: int, beta: float = math.exp(-0.5), noise_multiplier: float | None = None,
             target_epsilon: float | None = None, rounds: int | None = None,
             q: float | None = None, delta: float | None = None, k: float | None = None,
             max_overflow: float = 1e-6) -> DDGauss:
    """The mechanism for a noise multiplier z, or the smallest z meeting a target epsilon.

    z = sqrt(n_min) sigma_real / c: the std of the n_min shares' summed noise over c. Each
    client's noise std is sigma_real = z c / sqrt(n_min); gamma = `choose_gamma` for m =
    expected_clients; sigma^2 = (sigma_real / gamma)^2 rounded up to a dyadic rational.

    Args:
      clip, dimension, n_min, expected_clients, bits, beta: see the attributes.
      noise_multiplier: z; give it or `target_epsilon` (with rounds, q, delta).
      target_epsilon: calibrate z (bisection, `accounting.calibrate_noise`).
      rounds, q, delta: T rounds, the client sampling rate, delta.
      k: the k-sigma factor of the range; default sqrt(2 log(2 d' / max_overflow)) + 0.01.
      max_overflow: the largest acceptable `overflow_probability`.

    Raises:
      ValueError naming the parameter: c <= 0, beta outside (0, 1), n_min < 1, bits too
      small for the clients and noise, an overflow probability above `max_overflow`, or an
      unreachable target epsilon.
    """
    _check(clip > 0 and math.isfinite(clip), f"clip c must be > 0, got {clip}")
    _check(0 < beta < 1, f"beta must be in (0, 1), got {beta}")
    _check(int(n_min) == n_min and n_min >= 1, f"n_min must be an integer >= 1, got {n_min}")
    _check(int(expected_clients) == expected_clients and expected_clients >= 1,
           f"expected_clients must be an integer >= 1, got {expected_clients}")
    _check(int(bits) == bits and 2 <= bits <= 32, f"bits must be an integer in [2, 32], got {bits}")
    _check(0 < max_overflow < 1, f"max_overflow must be in (0, 1), got {max_overflow}")
    _check((noise_multiplier is None) != (target_epsilon is None),
           "give exactly one of noise_multiplier and target_epsilon")
    if k is None:  # + 0.01: room for the variance's rounding up to a dyadic rational
      k = math.sqrt(2 * math.log(2 * padded_dimension(dimension) / max_overflow)) + 0.01
    _check(k > 0, f"k must be > 0, got {k}")
    common = dict(clip=clip, dimension=dimension, n_min=n_min,
                  expected_clients=expected_clients, bits=bits, beta=beta, k=k)
    if target_epsilon is not None:
      _check(None not in (rounds, q, delta), "target_epsilon needs rounds, q and delta")
      noise_multiplier = calibrate(target_epsilon, rounds, q, delta, **common)
    _check(noise_multiplier > 0 and math.isfinite(noise_multiplier),
           f"noise_multiplier z must be > 0, got {noise_multiplier}")
    mech = cls._from_noise_multiplier(noise_multiplier, **common)
    p = mech.overflow_probability
    _check(p <= max_overflow, f"bits={bits} too small (or k={k:.3g} too small): the modular "
                              f"overflow probability bound {p:.3g} exceeds max_overflow="
                              f"{max_overflow:.3g}")
    return mech

  @classmethod
  def _from_noise_multiplier(cls, z: float, *, clip, dimension, n_min, expected_clients, bits,
                             beta, k) -> DDGauss:
    sigma = z * clip / math.sqrt(n_min)
    gamma = choose_gamma(clip=clip, local_sigma=sigma, dimension=dimension,
                         clients=expected_clients, bits=bits, k=k)
    scaled = (sigma / gamma) ** 2
    _check(scaled >= 1, f"bits={bits} too small for {expected_clients} clients and noise "
                        f"multiplier {z:.4g}: the scaled noise std sigma/gamma = "
                        f"{math.sqrt(scaled):.3g} < 1")
    return cls(clip=clip, dimension=dimension, bits=bits, beta=beta, gamma=gamma,
               variance=rational_variance(scaled), n_min=n_min,
               expected_clients=expected_clients)

  # -------------------------------------------------------------------------- properties

  @property
  def padded_dimension(self) -> int:
    """d'."""
    return padded_dimension(self.dimension)

  @property
  def noise_multiplier(self) -> float:
    """z = sqrt(n_min) gamma sigma / c (the actual, rounded-up variance)."""
    return math.sqrt(self.n_min * float(self.variance)) * self.gamma / self.clip

  @property
  def rounding_variance(self) -> float:
    """Expected extra variance per coordinate and client from rounding: <= gamma^2 / 4
    (real units; the decoded sum of m clients: m gamma^2 (sigma^2 + 1/4) in all)."""
    return self.gamma**2 / 4

  @property
  def sensitivities(self) -> tuple[float, float]:
    """(Delta1, Delta2), replace-one, scaled integer domain."""
    return sensitivities(self.clip / self.gamma, self.dimension, self.beta)

  def overflow_bound(self, clients: int) -> float:
    """`overflow_bound` for a round of `clients` encodings."""
    return overflow_bound(clip=self.clip, gamma=self.gamma, variance=float(self.variance),
                          dimension=self.dimension, clients=clients, bits=self.bits)

  @property
  def overflow_probability(self) -> float:
    """Bound on P(any coordinate of the sum of `expected_clients` encodings wraps)."""
    return self.overflow_bound(self.expected_clients)

  def rdp(self) -> np.ndarray:
    """`rdp_curve` of one round for a participating client."""
    return rdp_curve(clip=self.clip, gamma=self.gamma, variance=float(self.variance),
                     n_min=self.n_min, dimension=self.dimension, beta=self.beta)

  def epsilon(self, rounds: int, q: float, delta: float) -> float:
    """`epsilon` of this mechanism."""
    return epsilon(rounds, q, delta, clip=self.clip, gamma=self.gamma,
                   variance=float(self.variance), n_min=self.n_min, dimension=self.dimension,
                   beta=self.beta)

  def describe(self) -> str:
    """One line with every parameter, the relation and the accounting method."""
    l1, l2 = self.sensitivities
    return (f"DDGauss(c={self.clip:g}, d={self.dimension}, d'={self.padded_dimension}, "
            f"bits={self.bits}, beta={self.beta:.4g}, gamma={self.gamma:.4g}, "
            f"sigma^2={self.variance.numerator}/{self.variance.denominator} "
            f"(scaled; local std {math.sqrt(float(self.variance)) * self.gamma:.4g} real), "
            f"z={self.noise_multiplier:.4g}, n_min={self.n_min}, "
            f"denominator=expected_clients={self.expected_clients}, "
            f"P[overflow]<={self.overflow_probability:.3g}, "
            f"rounding var<={self.rounding_variance:.3g}/coord/client); neighbours: replace "
            f"one client (Delta2={l2:.4g}, Delta1={l1:.4g} scaled); accounting: RDP "
            f"a*eps^2/2 of Kairouz et al. 2021 Thm 1 "
            f"(tau={tau(float(self.variance), self.n_min):.3g}), "
            f"participation visible (no amplification), composed, rdp_epsilon")

  # -------------------------------------------------------------------------- encoding

  def encoded_dimension(self, d: int) -> int:
    _check(d == self.dimension, f"this DDGauss is for dimension {self.dimension}, got {d}")
    return self.padded_dimension

  def min_survivors(self, clients: int) -> int:
    return self.n_min

  def denominator(self, survivors: int, clients: int) -> float:
    return float(self.expected_clients)

  def encode(self, x: np.ndarray, *, seed: bytes) -> tuple[np.ndarray, dict[str, float]]:
    """Each row (a client's update) -> its encoding mod 2^bits, and host metrics.

    Args:
      x: [m, d] float32, one row per real client of the round.
      seed: 32 bytes for the round; the public rotation seed is HKDF(seed, rotation_info),
        client i's rounding and noise streams HKDF(seed, "client i ...").

    Returns:
      [m, d'] uint32 in [0, 2^bits), and metrics: `ddgauss_clipped` (clients whose norm
      exceeded c), `ddgauss_rounding_retries` (conditional rounding redraws, all clients),
      `ddgauss_overflow` (coordinates where the sum of all m encodings, as if every client
      survived, leaves the centred range: a simulation-side diagnostic).
    """
    x = np.asarray(x, np.float64)
    _check(x.ndim == 2 and x.shape[1] == self.dimension,
           f"x must be [m, {self.dimension}], got {x.shape}")
    norms = np.linalg.norm(x, axis=1)
    clipped = int((norms > self.clip).sum())
    x = x * np.minimum(1.0, self.clip / np.maximum(norms, 1e-300))[:, None]
    rotated = rotate(x / self.gamma, seed=self.rotation_seed(seed))
    bound = rounded_norm_bound(self.clip / self.gamma, self.padded_dimension, self.beta)
    ints = np.empty(rotated.shape, np.int64)
    retries = 0
    for i in range(x.shape[0]):
      client = derive_seed(seed, b"client %d" % i)
      r, extra = conditional_round(rotated[i:i + 1], bound, seed=client)
      retries += extra
      ints[i] = r[0] + sample_discrete_gaussian(self.padded_dimension, self.variance,
                                                seed=client)
    half = 1 << (self.bits - 1)
    total = ints.sum(0)
    overflow = int(((total >= half) | (total < -half)).sum())
    encoded = (ints & ((1 << self.bits) - 1)).astype(np.uint32)
    return encoded, {"ddgauss_clipped": float(clipped),
                     "ddgauss_rounding_retries": float(retries),
                     "ddgauss_overflow": float(overflow)}

  def rotation_seed(self, seed: bytes) -> bytes:
    """The round's public rotation seed, HKDF(seed, rotation_info): the same for every
    client of the round, and all the server needs to decode."""
    return derive_seed(seed, self.rotation_info)

  def decode(self, total: np.ndarray, *, rotation_seed: bytes) -> np.ndarray:
    """The protocol's sum mod 2^bits [d'] -> the float32 estimate [d] of the *sum* of the
    survivors' clipped updates: centre in [-2^(bits-1), 2^(bits-1)), undo the rotation,
    times gamma."""
    total = np.asarray(total).astype(np.int64) & ((1 << self.bits) - 1)
    half = 1 << (self.bits - 1)
    centred = np.where(total >= half, total - (1 << self.bits), total)
    back = unrotate(centred.astype(np.float64), self.dimension, seed=rotation_seed)
    return (back * self.gamma).astype(np.float32)


class DDGaussEncoding:
  """`DDGauss` behind secure aggregation's `Encoding` interface (host side, NumPy).

  `decode(total, survivors, seed=...)` takes the round's `encode` seed and uses only the
  public rotation seed derived from it; `denominator` is the public expected count,
  `min_survivors` is n_min.
  """

  def __init__(self, mechanism: DDGauss):
    self.mechanism = mechanism
    self.bits = mechanism.bits
    self.metric_names = DDGauss.metric_names

  def encoded_dimension(self, d: int) -> int:
    return self.mechanism.encoded_dimension(d)

  def encode(self, x: np.ndarray, *, seed: bytes) -> tuple[np.ndarray, dict[str, float]]:
    return self.mechanism.encode(x, seed=seed)

  def decode(self, total: np.ndarray, survivors: int, *, seed: bytes) -> np.ndarray:
    del survivors
    return self.mechanism.decode(total, rotation_seed=self.mechanism.rotation_seed(seed))

  def denominator(self, survivors: int, clients: int) -> float:
    return self.mechanism.denominator(survivors, clients)

  def min_survivors(self, clients: int) -> int:
    return self.mechanism.min_survivors(clients)

  def __repr__(self) -> str:
    return f"DDGaussEncoding({self.mechanism.describe()})"


def calibrate(target_epsilon: float, rounds: int, q: float, delta: float, *, clip: float,
              dimension: int, n_min: int, expected_clients: int, bits: int, beta: float,
              k: float | None = None, max_overflow: float = 1e-6, z_min: float = 0.05,
              z_max: float = 500.0) -> float:
  """The smallest noise multiplier z (to rtol 1e-3) whose `DDGauss` meets `target_epsilon`
  after `rounds` rounds at sampling rate q (`accounting.calibrate_noise`; gamma is re-chosen
  for each z, so the rounding's inflation of the sensitivity is included; k as in
  `DDGauss.create`)."""
  if k is None:
    k = math.sqrt(2 * math.log(2 * padded_dimension(dimension) / max_overflow)) + 0.01

  def eps(z):
    try:
      mech = DDGauss._from_noise_multiplier(z, clip=clip, dimension=dimension, n_min=n_min,
                                            expected_clients=expected_clients, bits=bits,
                                            beta=beta, k=k)
    except ValueError:
      return math.inf
    return mech.epsilon(rounds, q, delta)

  top = eps(z_max)
  _check(top <= target_epsilon,
         f"target_epsilon={target_epsilon} cannot be reached with bits={bits} (and "
         f"n_min={n_min}, {rounds} rounds, q={q}): even z={z_max} gives epsilon {top:.4g}, "
         f"the rounding to the granularity dominating; raise bits or target_epsilon")
  return accounting.calibrate_noise(eps, target_epsilon, sigma_min=z_min, sigma_max=z_max)
