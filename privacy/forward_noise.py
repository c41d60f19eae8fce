"""Forward-diffusion noise on client updates, its schedules over rounds, and its accounting.

The mechanism. A client clips its update to L2 norm C and releases the update forward-noised
to diffusion time t,

    y_t = sqrt(abar_t) * clip_C(u) + sqrt(1 - abar_t) * C * xi,    xi ~ N(0, I),

with a fresh key per (round, client). Dividing by sqrt(abar_t) is a bijection (free
post-processing), so y_t is exactly clip_C(u) + z_t C xi: **the Gaussian mechanism with noise
multiplier z_t = sqrt((1 - abar_t) / abar_t)** relative to C. The diffusion view brings
schedules, denoisers and attacks; it brings no privacy of its own. Without clipping (or with
noise relative to the update's own norm) there is no sensitivity bound and no guarantee:
such variants declare `NonPrivateDpEvent` (epsilon = inf, "empirical only").

Neighbouring relation: **replace one client's data** (user level). The client sends a noised
update in both worlds, its clipped part moves by at most 2C, and its own noise is in both;
dp_accounting's `GaussianDpEvent(z)` under `REPLACE_ONE` accounts exactly that (it equals
`GaussianDpEvent(z / 2)` under add/remove). Add/remove-one-client is *not* a valid relation
for local noise: removing the client also removes its noise, so unless other clients'
noise is trusted the two worlds differ by a point mass against a Gaussian (epsilon = inf),
and even with n honest noisers the variance changes by a factor (n + 1) / n, visible over
d coordinates. (Tables that compose `GaussianDpEvent(z)` under add/remove for local noise
under-report epsilon; ../shared/research/diffusion_defenses.md section 1 does so, and this
module does not.)

Threat models, each with its `dp_accounting` event (`ForwardNoise.dp_event` /
`upload_event`):

  model observer   sees the model (or the aggregate) but not the roster: per round
                   `ParticipationVisibleDpEvent(q, GaussianDpEvent(z_r))`, REPLACE_ONE. No
                   amplification by sampling: a client that is not sampled sends neither its
                   update nor its noise, so the aggregate's variance changes by (m + 1) / m
                   over d coordinates with its participation, which is therefore visible.
                   Exactly, delta(eps) = E_S[delta_GDP(eps; 2 sqrt(sum_{r in S} z_r^-2))]
                   over the random set S of rounds the client took part in (`visible_gdp_delta`;
                   for constant z, sum_k Bin(T, q)(k) delta_GDP(eps; 2 sqrt(k) / z));
  server           sees each upload: `GaussianDpEvent(z_r)` per round the client took part
                   in, REPLACE_ONE, no amplification;
  record level     one example of a client, add/remove: any change of a client's data moves
                   its clipped update by at most 2C, so the server's per-upload bound is a
                   record-level add/remove bound too; with DP-SGD inside the clients, the
                   smaller of it and DP-SGD's add/remove record-level epsilon
                   (`ScheduleAccountant`).
  model observer,  the trusted server tops each round's aggregate noise up to a total z_T C
  participation    that does not depend on who took part (`topup_aggregator`): the released
  hidden           sum is DP-FedAvg's Gaussian sum, so Poisson amplification holds:
                   `PoissonSampledDpEvent(q, GaussianDpEvent(z_T))`, add/remove one client
                   (`privacy.federated.dp_fedavg_event` at z_T, truncated when the slots are
                   capped); it needs z_T^2 >= m_max z_r^2 for the most clients m_max a round
                   can hold (`check_topup`).

Server post-processing (rescaling by 1/sqrt(abar), averaging, momentum, Wiener shrinkage, a
denoiser trained on public data) never changes the event.

Schedules (`NoiseSchedule`) are stored as z per round in float64 on the host (neither
diffusion grid can express z < 0.01, and composition depends on z only). Composition is
order-free, so a schedule's epsilon is governed by its smallest z's.

Data-level noising (PFDM, Patel, Zhang & Wang 2025) is `DataForwardNoise`: pixels clipped to
[-1, 1] and forward-noised once to t0, before training.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from dp_accounting import dp_event
from scipy import stats as scipy_stats

from diffusion import schedules
from diffusion.schedules import alpha_bar_of
from fljax.federated import DefenseFn
from privacy import accounting
from privacy.clipping import clip_update
from privacy.noise import tree_gaussian

SCALINGS = ("flat", "per_layer", "coordinate", "norm")
DIFFUSION_KINDS = ("linear", "cosine")
SHAPES = ("constant", "linear", "geometric", "cosine")
WEAK_Z = 0.3  # below this a round's noise gives no meaningful DP (epsilon per round >> 10)


class ScheduleWarning(UserWarning):
  """A schedule with rounds too weakly noised for a meaningful guarantee."""


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(message)


# ----------------------------------------------------------------------------- diffusion


def alpha_bars(kind: str, num_steps: int = 1000) -> np.ndarray:
  """`[T]` float64 alpha_bar_t for t = 1..T of `diffusion.schedules`' linear (DDPM's betas
  1e-4..0.02) or cosine (s = 0.008, betas capped at 0.999) schedule."""
  _check(kind in DIFFUSION_KINDS, f"diffusion schedule must be one of {DIFFUSION_KINDS}, "
                                  f"got {kind!r}")
  return schedules.alpha_bars(kind, num_steps)


def z_of_t(kind: str, t: Any, num_steps: int = 1000) -> np.ndarray:
  """z_t = sqrt((1 - abar_t) / abar_t) at integer diffusion times t in [1, T]."""
  t = np.asarray(t)
  _check(np.all(t == np.round(t)) and np.all((t >= 1) & (t <= num_steps)),
         f"diffusion time t must be an integer in [1, {num_steps}], got {t}")
  return schedules.noise_multiplier(alpha_bars(kind, num_steps)[t.astype(int) - 1])


def t_of_z(kind: str, z: float, num_steps: int = 1000) -> int:
  """The first diffusion time whose z_t reaches `z` (T if none does)."""
  zs = z_of_t(kind, np.arange(1, num_steps + 1), num_steps)
  return int(min(np.searchsorted(zs, z) + 1, num_steps))


# ----------------------------------------------------------------------------- schedules


@dataclasses.dataclass(frozen=True, eq=False)
class NoiseSchedule:
  """The noise multiplier z_r of every round r = 0..R-1 (float64, on the host).

  Build one with `constant`, `staircase`, `from_diffusion`, `annealed` or `calibrate`.
  """

  z: np.ndarray
  name: str = "custom"

  def __post_init__(self):
    z = np.asarray(self.z, np.float64)
    _check(z.ndim == 1 and len(z) >= 1, f"a schedule needs one z per round, got shape {z.shape}")
    _check(bool(np.all(np.isfinite(z) & (z > 0))),
           f"every round's noise multiplier z must be > 0 and finite, got min {z.min()}")
    object.__setattr__(self, "z", z)
    if z.min() < WEAK_Z:
      warnings.warn(f"schedule {self.name!r}: round {int(z.argmin())} has z = {z.min():.3g} < "
                    f"{WEAK_Z}: no meaningful DP (its own epsilon is in the tens or more); "
                    f"any protection there is empirical only", ScheduleWarning, stacklevel=3)

  @property
  def rounds(self) -> int:
    return len(self.z)

  @property
  def alpha_bar(self) -> np.ndarray:
    return alpha_bar_of(self.z)

  @property
  def z_equivalent(self) -> float:
    """(mean z^-2)^-1/2: the constant z with the same Gaussian-DP mu at q = 1."""
    return float(np.mean(self.z ** -2.0) ** -0.5)

  def check_rounds(self, rounds: int) -> None:
    _check(self.rounds == rounds, f"the noise schedule has {self.rounds} rounds but the run "
                                  f"has {rounds}; build the schedule for --rounds {rounds}")

  def scaled(self, c: float) -> NoiseSchedule:
    return NoiseSchedule(self.z * c, f"{self.name} x {c:.4g}")

  def reversed(self) -> NoiseSchedule:
    return NoiseSchedule(self.z[::-1].copy(), f"{self.name}, reversed")

  def to_json(self) -> dict[str, Any]:
    return {"name": self.name, "z": [float(v) for v in self.z]}

  def describe(self) -> str:
    return (f"{self.name}: z from {self.z.max():.4g} down to {self.z.min():.4g} over "
            f"{self.rounds} rounds (z_eq {self.z_equivalent:.4g})"
            if self.z.max() > self.z.min() else
            f"{self.name}: z = {self.z[0]:.4g} for {self.rounds} rounds")


def constant(z: float, rounds: int) -> NoiseSchedule:
  _check_rounds(rounds)
  return NoiseSchedule(np.full(rounds, float(z)), f"constant z={z:g}")


def staircase(levels: Sequence[float], rounds: int) -> NoiseSchedule:
  """`levels[i]` for the i-th of len(levels) (nearly) equal runs of rounds."""
  _check_rounds(rounds)
  _check(1 <= len(levels) <= rounds, f"a staircase needs 1..{rounds} levels, got {len(levels)}")
  index = np.arange(rounds) * len(levels) // rounds
  return NoiseSchedule(np.asarray(levels, np.float64)[index],
                       f"staircase {'/'.join(f'{v:g}' for v in levels)}")


def from_diffusion(kind: str, t_start: int, t_end: int, rounds: int, *,
                   num_steps: int = 1000) -> NoiseSchedule:
  """Round r at diffusion time t_r, linear from t_start (round 0) to t_end (last round),
  rounded to integers in [1, T]; z_r = z_{t_r} of the `kind` schedule."""
  _check_rounds(rounds)
  for t in (t_start, t_end):
    _check(1 <= t <= num_steps and t == int(t),
           f"diffusion time t must be an integer in [1, {num_steps}], got {t}")
  ts = np.rint(np.linspace(t_start, t_end, rounds)).astype(int)
  return NoiseSchedule(z_of_t(kind, ts, num_steps), f"{kind} t {t_start}->{t_end}")


def annealed(z_start: float, z_end: float, rounds: int, shape: str = "geometric") -> NoiseSchedule:
  """z from `z_start` (round 0) to `z_end` (last round): linear, geometric or cosine in r."""
  _check_rounds(rounds)
  _check(shape in SHAPES[1:], f"anneal shape must be one of {SHAPES[1:]}, got {shape!r}")
  _check(z_start > 0 and z_end > 0, f"z must be > 0, got {z_start} and {z_end}")
  u = np.linspace(0.0, 1.0, rounds)
  if shape == "linear":
    z = z_start + (z_end - z_start) * u
  elif shape == "geometric":
    z = z_start * (z_end / z_start) ** u
  else:
    z = z_end + (z_start - z_end) * 0.5 * (1 + np.cos(np.pi * u))
  return NoiseSchedule(z, f"{shape} anneal {z_start:g}->{z_end:g}")


def _check_rounds(rounds: int) -> None:
  _check(rounds >= 1 and rounds == int(rounds), f"rounds must be an integer >= 1, got {rounds}")


# ----------------------------------------------------------------------------- accounting


def round_event(z: float, q: float = 1.0) -> dp_event.DpEvent:
  """One round for the model observer: the Gaussian at z, its participation (rate q) visible."""
  accounting.check_sampling_rate(q)
  g = dp_event.GaussianDpEvent(float(z))
  return g if q == 1.0 else accounting.ParticipationVisibleDpEvent(q, g)


def schedule_event(z: Sequence[float], q: float = 1.0) -> dp_event.DpEvent:
  """All rounds of a schedule, equal z grouped (exact: composition is order-free)."""
  counts = collections.Counter(float(v) for v in np.asarray(z))
  return accounting.compose([(round_event(v, q), k) for v, k in sorted(counts.items())])


def schedule_epsilon(z: Sequence[float], delta: float, *, q: float = 1.0,
                     neighbouring: str = "replace_one", accountant: str = "pld",
                     discretization: float = 1e-4) -> float:
  """Epsilon of the rounds `z` against the model observer (participation rate q, visible;
  the server's view is q = 1), replace-one user level.

  PLD's grid is coarsened for weak schedules (privacy losses grow as z^-2, and so would the
  grid and its memory): pessimistic, so still an upper bound. `neighbouring` must be
  'replace_one': local noise has no add/remove guarantee (see the module docstring).
  """
  _check(neighbouring == "replace_one",
         f"neighbouring={neighbouring!r}: noise a client adds to its own upload has no "
         f"add/remove guarantee (removing the client removes its noise); use 'replace_one'")
  if len(z) == 0:
    return 0.0
  return accounting.epsilon(schedule_event(z, q), delta, accountant=accountant,
                            neighbouring=neighbouring,
                            discretization=pld_grid(np.min(z), discretization))


MAX_MIXTURE_TERMS = 200_000  # closed form over participation patterns up to this many terms


def _participation_mixture(z: Sequence[float], q: float) -> tuple[np.ndarray, np.ndarray] | None:
  """(probabilities, mu's) of the visible mixture: one entry per count vector (k_v) of
  participations among the rounds with z = v, k_v ~ Bin(n_v, q) independently, with
  mu = 2 sqrt(sum_v k_v v^-2) (replace-one). None when there are too many terms."""
  counts = collections.Counter(float(v) for v in np.asarray(z))
  if math.prod(n + 1 for n in counts.values()) > MAX_MIXTURE_TERMS:
    return None
  probs, mu2 = np.ones(1), np.zeros(1)
  for v, n in counts.items():
    k = np.arange(n + 1)
    probs = np.outer(probs, scipy_stats.binom.pmf(k, n, q)).ravel()
    mu2 = np.add.outer(mu2, 4.0 * k / v ** 2).ravel()
  return probs, np.sqrt(mu2)


def visible_gdp_delta(epsilon: float, z: Sequence[float], q: float) -> float:
  """delta(epsilon) of the rounds `z` with participation rate q, visible, replace-one: the
  mixture E[delta_GDP(epsilon; mu_S)] in closed form (exact; see the module docstring)."""
  mixture = _participation_mixture(z, q)
  _check(mixture is not None, f"the closed form needs at most {MAX_MIXTURE_TERMS} participation "
                              f"patterns; use schedule_epsilon (PLD)")
  probs, mus = mixture
  keep = (mus > 0) & (probs > 0)
  return float(np.sum(probs[keep] * gdp_delta(epsilon, mus[keep])))


def visible_gdp_epsilon(z: Sequence[float], q: float, delta: float) -> float:
  """The epsilon at which `visible_gdp_delta` is `delta` (bisection; delta falls in epsilon)."""
  accounting.check_delta(delta)
  accounting.check_sampling_rate(q)
  if visible_gdp_delta(0.0, z, q) <= delta:
    return 0.0
  hi = 1.0
  while visible_gdp_delta(hi, z, q) > delta:
    hi *= 2
  lo = 0.0
  while hi - lo > 1e-6 * hi:
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if visible_gdp_delta(mid, z, q) > delta else (lo, mid)
  return hi


def check_topup(z_total: float, z_local: Sequence[float], max_clients: int) -> None:
  """The top-up needs z_T^2 >= m_max z_r^2 in every round: the server can add noise, never
  remove it."""
  need = math.sqrt(max_clients) * float(np.max(z_local))
  _check(z_total >= need * (1 - 1e-9),
         f"topup noise multiplier z_T = {z_total:.4g} is below sqrt(m_max) * max z = {need:.4g} "
         f"(m_max = {max_clients} clients a round): raise it, cap the clients per round "
         f"(--fed.poisson_cap) or lower the local z")


def noised_mean(updates: Any, weights: jax.Array, stddev: Any, expected_clients: float, *,
                key: jax.Array) -> Any:
  """The sum of the real uploads (weight 1 each, not clipped again), plus N(0, stddev^2) per
  coordinate, over the public `expected_clients`: the server side of the hybrids."""
  real = (weights > 0).astype(jnp.float32)
  total = jax.tree.map(lambda u: jnp.tensordot(real, u, axes=1), updates)
  noise = tree_gaussian(total, stddev, key=key)
  return jax.tree.map(lambda s, e: (s + e) / expected_clients, total, noise)


def topup_aggregator(z_local: Sequence[float], z_total: float, clip_norm: float,
                     expected_clients: float):
  """The trusted server's aggregate for the top-up: the sum of the m real uploads (each
  clip_C(u) + N(0, (z_r C)^2)) plus N(0, (z_T^2 - m z_r^2) C^2), over the public
  `expected_clients`. The released sum's noise is N(0, (z_T C)^2) for every m
  (`check_topup` guarantees z_T^2 >= m z_r^2). The state counts rounds (for z_r)."""
  from fljax.federated import Aggregator
  zs = jnp.asarray(np.asarray(z_local, np.float64), jnp.float32)
  last = len(z_local) - 1

  def update(updates, weights, state, key):
    z = zs[jnp.clip(state, 0, last)]
    m = (weights > 0).sum()
    top = jnp.sqrt(jnp.maximum(z_total ** 2 - m * z * z, 0.0)) * clip_norm
    return (noised_mean(updates, weights, top, expected_clients, key=key), state + 1,
            {"topup_noise_std": top})

  return Aggregator(lambda params: jnp.zeros((), jnp.int32), update)


def pld_grid(z_min: float, base: float) -> float:
  """The PLD discretisation for a composition whose weakest round has `z_min`."""
  return float(min(0.05, base * max(1.0, (WEAK_Z / z_min) ** 2)))


def gdp_mu(z: Sequence[float], neighbouring: str = "add_remove") -> float:
  """mu of the composition at q = 1: sqrt(sum z^-2), doubled for replace-one (sensitivity 2C)."""
  mu = float(np.sqrt(np.sum(np.asarray(z, np.float64) ** -2.0)))
  return 2.0 * mu if neighbouring == "replace_one" else mu


def gdp_delta(epsilon: float, mu: Any) -> Any:
  """delta(epsilon) of mu-GDP: Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) (Dong et al.),
  the second term in log space (e^eps overflows for the epsilons of weak schedules).
  Vectorised over `mu` (an array gives an array)."""
  norm = scipy_stats.norm
  mu = np.asarray(mu, np.float64)
  first = norm.cdf(-epsilon / mu + mu / 2)
  out = first - np.exp(np.minimum(epsilon + norm.logcdf(-epsilon / mu - mu / 2), 0.0))
  return float(out) if out.ndim == 0 else out


def gdp_epsilon(mu: float, delta: float) -> float:
  """The epsilon at which mu-GDP has `delta` (closed form, solved by bisection)."""
  accounting.check_delta(delta)
  lo, hi = 0.0, max(1.0, mu * mu + 10 * mu)
  while gdp_delta(hi, mu) > delta:
    hi *= 2
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if gdp_delta(mid, mu) > delta else (lo, mid)
  return hi


def rero_bound(mu: float, kappa: float) -> float:
  """Kaissis et al. 2023: under mu-GDP, P(reconstruction succeeds) <= Phi(Phi^-1(kappa) + mu),
  where kappa is the attacker's success rate without the observation (its prior)."""
  _check(0 < kappa < 1, f"kappa must be in (0, 1), got {kappa}")
  return float(scipy_stats.norm.cdf(scipy_stats.norm.ppf(kappa) + mu))


def calibrate(shape: NoiseSchedule, target_epsilon: float, delta: float, *, q: float = 1.0,
              neighbouring: str = "replace_one", discretization: float = 1e-3,
              rtol: float = 1e-3) -> NoiseSchedule:
  """`shape` scaled by the smallest c whose schedule meets `target_epsilon` (PLD bisection;
  epsilon falls monotonically in c). The coarse default grid is pessimistic, so the result
  meets the target at the finer default grid too."""
  accounting.check_delta(delta)
  accounting.check_sampling_rate(q)
  _check(target_epsilon > 0 and math.isfinite(target_epsilon),
         f"target_epsilon must be > 0 and finite, got {target_epsilon}")
  z0 = shape.z / shape.z.min()  # the shape with its smallest round at 1

  def eps(c):
    return schedule_epsilon(z0 * c, delta, q=q, neighbouring=neighbouring,
                            discretization=discretization)

  # Bracket from c = 1 outwards (PLDs of tiny z are slow and large), then bisect.
  lo = hi = 1.0
  while eps(hi) > target_epsilon:
    hi *= 2.0
    _check(hi < 1e5, f"target_epsilon={target_epsilon} is out of reach of schedule {shape.name!r}")
  while lo > 0.05 and eps(lo) <= target_epsilon:
    lo /= 2.0
  c = accounting.calibrate_noise(eps, target_epsilon, sigma_min=min(lo, hi / 2), sigma_max=hi,
                                 rtol=rtol)
  return NoiseSchedule(z0 * c, f"{shape.name}, calibrated to eps={target_epsilon:g}")


# ----------------------------------------------------------------------------- the defense


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class ForwardNoise:
  """Clip to C, forward-noise to the round's diffusion time: `defense(update, key, round)`.

  Attributes:
    clip_norm: C (None: no clipping, which has no guarantee).
    schedule: z per round.
    scaling: how the noise is scaled:
      flat        clip ||u|| <= C, noise z C per coordinate (mu = 1/z per round);
      per_layer   clip each of the L tensors to C_l = C / sqrt(L) (sum C_l^2 = C^2); noise
                  z C per coordinate (`layer_noise='shared'`, mu = 1/z) or z C_l
                  (`'proportional'`, mu = sqrt(L)/z: every layer at its own budget);
      coordinate  a public, data-independent scale s (pytree like the update, e.g. from
                  the initial parameters): clip ||u / s|| <= C, release s * (clipped +
                  noise z C) (mu = 1/z);
      norm        noise z ||u|| relative to the update's own norm, unclipped: **not DP**
                  (unbounded sensitivity, and ||y|| reveals ||u||).
    rescale: the server's first post-processing step, y / sqrt(abar) (unbiased update), is
      applied here (free: post-processing). Without it the aggregate is shrunk by sqrt(abar).
    layer_noise: per_layer's 'shared' or 'proportional'.
    coordinate_scale: the public s for `coordinate`.
  """

  clip_norm: float | None
  schedule: NoiseSchedule
  scaling: str = "flat"
  rescale: bool = True
  layer_noise: str = "shared"
  coordinate_scale: Any = None

  def __post_init__(self):
    _check(self.scaling in SCALINGS, f"scaling must be one of {SCALINGS}, got {self.scaling!r}")
    if self.scaling != "norm" and self.clip_norm is not None:
      accounting.check_clip_norm(self.clip_norm)
    _check(self.scaling != "norm" or self.clip_norm is None,
           "scaling='norm' noises relative to the update's own norm and is unclipped: pass "
           "clip_norm=None (it has no DP guarantee)")
    _check(self.layer_noise in ("shared", "proportional"),
           f"layer_noise must be 'shared' or 'proportional', got {self.layer_noise!r}")
    _check(self.scaling != "coordinate" or self.coordinate_scale is not None,
           "scaling='coordinate' needs a public coordinate_scale (a pytree like the update)")

  # -- privacy declaration

  @property
  def private(self) -> bool:
    return self.clip_norm is not None and self.scaling != "norm"

  @property
  def sensitivity(self) -> float | None:
    """L2 sensitivity of one upload under replace-one (2C), or None (not DP)."""
    return 2.0 * self.clip_norm if self.private else None

  relation = "replace one client's data (user level); the client's own noise in both worlds"

  def _z_event(self, round_: int, layers: int) -> float:
    z = float(self.schedule.z[round_])
    if self.scaling == "per_layer" and self.layer_noise == "proportional":
      return z / math.sqrt(layers)
    return z

  def dp_event(self, round_: int, q: float = 1.0, *, layers: int = 1) -> dp_event.DpEvent:
    """Round `round_` for the model observer (REPLACE_ONE, client sampling q)."""
    if not self.private:
      return dp_event.NonPrivateDpEvent()
    return round_event(self._z_event(round_, layers), q)

  def upload_event(self, round_: int, *, layers: int = 1) -> dp_event.DpEvent:
    """One upload in round `round_` as the server sees it (REPLACE_ONE, no amplification)."""
    return self.dp_event(round_, 1.0, layers=layers)

  def event_z(self, layers: int = 1) -> np.ndarray:
    """The per-round Gaussian multipliers the events use (per_layer proportional: z/sqrt(L))."""
    return np.asarray([self._z_event(r, layers) for r in range(self.schedule.rounds)])

  # -- the hook

  def defense(self) -> DefenseFn:
    zs = jnp.asarray(self.schedule.z, jnp.float32)
    last = self.schedule.rounds - 1
    c = self.clip_norm

    def defense(update, key, round_=0):
      z = zs[jnp.clip(round_, 0, last)]
      abar = alpha_bar_of(z)
      signal, noise_scale = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
      if self.rescale:  # y / sqrt(abar): the clipped update plus z-scaled noise
        signal, noise_scale = jnp.ones_like(z), z
      xi = tree_gaussian(update, 1.0, key=key)
      if self.scaling == "norm":
        finite = jax.tree.map(lambda u: jnp.where(jnp.isfinite(u), u, 0.0), update)
        norm = jnp.sqrt(sum(jnp.sum(u * u) for u in jax.tree.leaves(finite)))
        return jax.tree.map(lambda u, e: signal * u + noise_scale * norm * e, finite, xi)
      if self.scaling == "flat":
        clipped = update if c is None else clip_update(update, c)[0]
        return jax.tree.map(lambda u, e: signal * u + noise_scale * c * e, clipped, xi)
      if self.scaling == "per_layer":
        leaves = jax.tree.leaves(update)
        cl = c / math.sqrt(len(leaves))
        clipped = jax.tree.map(lambda u: clip_update(u, cl)[0], update)
        std = cl if self.layer_noise == "proportional" else c
        return jax.tree.map(lambda u, e: signal * u + noise_scale * std * e, clipped, xi)
      s = self.coordinate_scale
      clipped = clip_update(jax.tree.map(jnp.divide, update, s), c)[0]
      return jax.tree.map(lambda u, e, si: si * (signal * u + noise_scale * c * e), clipped, xi, s)

    return defense


def public_scale(params: Any) -> Any:
  """A data-independent per-coordinate scale for `scaling='coordinate'`: each tensor's RMS
  in `params` (the initial parameters, public), normalised to mean square 1 over all
  coordinates; zero tensors (biases) get the mean."""
  leaves, treedef = jax.tree.flatten(params)
  rms = [float(np.sqrt(np.mean(np.square(np.asarray(x, np.float64))))) for x in leaves]
  positive = [r for r in rms if r > 0] or [1.0]
  rms = [r if r > 0 else float(np.mean(positive)) for r in rms]
  sizes = [x.size for x in leaves]
  norm = math.sqrt(sum(r * r * n for r, n in zip(rms, sizes)) / sum(sizes))
  return jax.tree.unflatten(treedef, [jnp.full(x.shape, r / norm, jnp.float32)
                                      for x, r in zip(leaves, rms)])


# ----------------------------------------------------------------------------- data level


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataForwardNoise:
  """PFDM-style data-level noising (Patel, Zhang & Wang 2025): every training image, mapped
  to [-1, 1] and clipped there, is released once forward-noised to t0,
  x_t0 = sqrt(abar) x + sqrt(1 - abar) xi, and the client trains on x_t0 (mapped back by
  (x_t0 + 1) / 2, post-processing).

  Guarantee (replace one image, or one pixel): an image of d values in [-1, 1] moves by at
  most 2 sqrt(d) in L2, so one release is mu = 2 sqrt(d) / z per image (2 / z per pixel),
  z = z_t0; k fresh releases multiply mu by sqrt(k). Events: `GaussianDpEvent(z / (2
  sqrt(d)))` per image, `GaussianDpEvent(z / 2)` per pixel, add/remove form.
  """

  z: float
  releases: int = 1

  def __post_init__(self):
    accounting.check_noise_multiplier(self.z)
    _check(self.releases >= 1, f"releases must be >= 1, got {self.releases}")

  @classmethod
  def at(cls, kind: str, t0: int, **kwargs) -> DataForwardNoise:
    return cls(z=float(z_of_t(kind, t0)), **kwargs)

  def apply(self, x: jax.Array, *, key: jax.Array) -> jax.Array:
    """Images in [0, 1] -> their noised release, mapped back to the [0, 1] affine range."""
    abar = alpha_bar_of(self.z)
    x = jnp.clip(2.0 * x - 1.0, -1.0, 1.0)
    x_t = math.sqrt(abar) * x + math.sqrt(1 - abar) * jax.random.normal(key, x.shape, x.dtype)
    return (x_t + 1.0) / 2.0

  def image_event(self, pixels: int) -> dp_event.DpEvent:
    return dp_event.SelfComposedDpEvent(
        dp_event.GaussianDpEvent(self.z / (2.0 * math.sqrt(pixels))), self.releases)

  def pixel_event(self) -> dp_event.DpEvent:
    return dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(self.z / 2.0), self.releases)

  def epsilons(self, pixels: int, delta: float) -> dict[str, float]:
    return {"epsilon_image": accounting.epsilon(self.image_event(pixels), delta),
            "epsilon_pixel": accounting.epsilon(self.pixel_event(), delta)}


# ----------------------------------------------------------------------------- running


class ScheduleAccountant:
  """Epsilon after round r for the threat models of a forward-noise schedule.

  - `epsilon` (model observer, replace-one user level, participation visible): rounds
    0..r-1 as `ParticipationVisibleDpEvent(q, GaussianDpEvent(z))`; in closed form
    (`visible_gdp_epsilon`, exact) while the participation patterns number at most
    `MAX_MIXTURE_TERMS`, else PLD (`schedule_epsilon`) on a 10x coarser grid every round and
    on the `discretization` grid every `pld_every` rounds and at the last; `pld_grid` logs
    the grid (0: closed form).
  - `epsilon_server` (per upload, the worst client, replace-one user level): the uploads of
    the client that took part most often, k_max(r) times, bounded above by taking the k_max
    smallest z's among rounds 0..r-1 (exact for constant schedules); mu-GDP, closed form.
  - `epsilon_record` (one example, add/remove): the server's bound read at record level (a
    changed example changes one client's data, which moves its clipped update by at most 2C
    while its participation and noise stay: the same Gaussian at sensitivity 2C), or, when
    clients run DP-SGD inside (`record_epsilon(r)`, add/remove one example), the smaller of
    the two. Both terms are add/remove-one-example bounds; no user-level add/remove figure
    enters.

  Values depend on r only, so a resumed run logs the same numbers.
  """

  def __init__(self, event_z: np.ndarray, *, q: float, delta: float,
               participations: np.ndarray | None = None, record_epsilon=None,
               pld_every: int = 10, discretization: float = 1e-3, private: bool = True):
    accounting.check_sampling_rate(q)
    accounting.check_delta(delta)
    self.z, self.q, self.delta = np.asarray(event_z, np.float64), q, delta
    self.rounds = len(self.z)
    # participations[r] = the most rounds any one client took part in among 0..r-1
    self.k_max = (np.arange(self.rounds + 1) if participations is None
                  else np.asarray(participations, int))
    self.record_epsilon = record_epsilon
    self.pld_every, self.discretization, self.private = pld_every, discretization, private

  def _pld(self, r: int) -> bool:
    return r == self.rounds or (self.pld_every > 0 and r % self.pld_every == 0)

  def _model_observer(self, r: int) -> tuple[float, float]:
    z = self.z[:r]
    if self.q == 1.0:
      return gdp_epsilon(gdp_mu(z, "replace_one"), self.delta), 0.0
    if _participation_mixture(z, self.q) is not None:
      return visible_gdp_epsilon(z, self.q, self.delta), 0.0
    grid = self.discretization if self._pld(r) else 10 * self.discretization
    return schedule_epsilon(z, self.delta, q=self.q, discretization=grid), grid

  def epsilons(self, r: int) -> dict[str, float]:
    if not self.private:
      return {"epsilon": math.inf, "epsilon_server": math.inf, "epsilon_record": math.inf}
    if r == 0:
      return {"epsilon": 0.0, "epsilon_server": 0.0, "epsilon_record": 0.0, "pld_grid": 0.0}
    model, grid = self._model_observer(r)
    k = int(self.k_max[r])
    server = gdp_epsilon(gdp_mu(np.sort(self.z[:r])[:k], "replace_one"), self.delta) if k else 0.0
    record = server
    if self.record_epsilon is not None:
      record = min(record, float(self.record_epsilon(r)))
    return {"epsilon": model, "epsilon_server": server, "epsilon_record": record,
            "pld_grid": grid}
