"""Privacy accounting on `dp_accounting` events: RDP (Mironov 2017) and PLD (Koskela et al. 2020).

Every mechanism in `privacy` declares the `dp_accounting.DpEvent` of one release; this
module turns events into (epsilon, delta):

  - `dpsgd_event` / `dpsgd_epsilon`: T steps of the subsampled Gaussian mechanism, with
    Poisson sampling (`PoissonSampledDpEvent`), Poisson sampling truncated to a static batch
    size (`TruncatedSubsampledGaussianDpEvent`, PLD only) or fixed-size sampling without
    replacement (`SampledWithoutReplacementDpEvent`, RDP only, REPLACE_ONE neighbours);
  - `epsilon(event, delta)`: any event, including heterogeneous compositions
    (`compose([(event_1, count_1), ...])`, for noise or sampling that change over rounds);
  - `calibrate`/`calibrate_sigma`/`calibrate_noise`: the smallest noise multiplier that meets a target
    epsilon, by bisection on a monotone epsilon(sigma);
  - `Accountant`: a running accountant that a training loop updates every round and
    that can be rebuilt from its JSON history when a run resumes;
  - `ParticipationVisibleDpEvent`: an event that happens with probability q *and whose
    happening is released too* (a client that adds noise to its own upload: whether it took
    part shows in the aggregate's variance and in the server's roster). Sampling then
    amplifies nothing but delta: the release is the mixture, with the index visible, of
    "nothing" and the event, whose privacy-loss distribution is the q-mixture of the
    event's and the identity's (PLD, exact up to discretisation) and whose Renyi divergence
    at order a is exactly (1/(a-1)) log(1 - q + q exp((a-1) rdp(a))) (RDP). Under
    replace-one with local Gaussian noise z the composition over T rounds has
    delta(eps) = sum_k Bin(T, q)(k) delta_GDP(eps; 2 sqrt(k) / z) (see
    `privacy.forward_noise.visible_gdp_delta`, the closed form the tests hold PLD to).

Neighbouring relations. dp_accounting's RDP accountant ignores the relation for Gaussian
events (it reports the add/remove figure under REPLACE_ONE); here a Gaussian under
replace-one is accounted as `GaussianDpEvent(sigma / 2)` (sensitivity 2C), which is exact,
and events whose replace-one RDP this module does not know (Poisson sampling, Laplace,
zCDP) are refused with a pointer to PLD.

Which RDP-to-(epsilon, delta) conversion: dp_accounting's `RdpAccountant` uses the improved
bound of Canonne, Kamath & Steinke 2020 (Prop. 12; also Asoodeh et al. 2021, Eq. 20),
    eps = min_a  rdp(a) + log1p(-1/a) - log(delta * a) / (a - 1),
not the original `rdp(a) + log(1/delta) / (a - 1)` (Mironov 2017, Prop. 3) behind the
moments-accountant numbers of Abadi et al. 2016. For q=0.01, sigma=4, 10k steps and
delta=1e-5 that is the difference between the 1.26 Abadi et al. published and the 1.035
computed here (the RDP curve is the same; only the conversion is tighter). PLD accounting
is tighter still (0.947): it composes the exact privacy-loss distribution, discretised
pessimistically (so the reported epsilon is an upper bound up to discretisation, which is
1e-4 in privacy-loss value by default).
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attr
import dp_accounting
import numpy as np
from absl import logging as absl_logging
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant as pld_lib
from dp_accounting.pld import privacy_loss_distribution as pld_dist
from dp_accounting.pld import privacy_loss_mechanism as plm
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

NeighborRel = dp_accounting.NeighboringRelation

NEIGHBOURING: dict[str, NeighborRel] = {
    "add_remove": NeighborRel.ADD_OR_REMOVE_ONE,
    "replace_one": NeighborRel.REPLACE_ONE,
}

# RDP orders: dp_accounting's defaults (the reference values above are computed on them).
RDP_ORDERS: tuple[float, ...] = tuple(rdp_lib.DEFAULT_RDP_ORDERS)

SAMPLINGS = ("poisson", "truncated_poisson", "fixed")


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(message)


def check_delta(delta: float) -> None:
  _check(0 < delta < 1, f"delta must be in (0, 1), got {delta}")


def check_noise_multiplier(sigma: float) -> None:
  _check(sigma > 0 and math.isfinite(sigma),
         f"noise multiplier sigma must be > 0 and finite, got {sigma}")


def check_sampling_rate(q: float) -> None:
  _check(0 < q <= 1, f"sampling rate q must be in (0, 1], got {q}")


def check_clip_norm(c: float) -> None:
  _check(c > 0 and math.isfinite(c), f"clip norm C must be > 0 and finite, got {c}")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
  """Silences dp_accounting's per-order RDP warnings (an order that fails to converge is
  excluded from the minimum, which only makes epsilon larger, never wrong)."""
  level = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    yield
  finally:
    absl_logging.set_verbosity(level)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ParticipationVisibleDpEvent(dp_event.DpEvent):
  """`event` with probability `sampling_probability`, and whether it ran is public.

  The release of a client that noises its own upload and is Poisson-sampled: the
  aggregate's noise (and the server's roster) reveal whether it took part, so this is not
  `PoissonSampledDpEvent` (whose amplification needs the participation hidden). Accounted
  exactly as the visible mixture (see the module docstring) by this module's accountants.
  """

  sampling_probability: float
  event: dp_event.DpEvent


def participation_visible_rdp(rdp: np.ndarray, q: float) -> np.ndarray:
  """The RDP over `RDP_ORDERS` of a release with RDP `rdp` that happens with probability q,
  its happening visible: (1/(a-1)) log(1 - q + q exp((a-1) rdp(a))), exact for a visible
  mixture (log-sum-exp, so large rdp(a) do not overflow)."""
  check_sampling_rate(q)
  orders = np.asarray(RDP_ORDERS, np.float64)
  rdp = np.asarray(rdp, np.float64)
  with np.errstate(divide="ignore"):
    terms = np.stack([np.full_like(rdp, math.log1p(-q) if q < 1 else -np.inf),
                      math.log(q) + (orders - 1) * rdp])
  return np.logaddexp(terms[0], terms[1]) / (orders - 1)


class _Compositions:
  """Routes compositions and `ParticipationVisibleDpEvent` through the subclass, so that
  nested events reach its `_visible` and `_leaf` (dp_accounting's own `_maybe_compose`
  would send them to its base implementation)."""

  def _maybe_compose(self, event, count, do_compose):
    if isinstance(event, dp_event.SelfComposedDpEvent):
      return self._maybe_compose(event.event, event.count * count, do_compose)
    if isinstance(event, dp_event.ComposedDpEvent):
      for e in event.events:
        error = self._maybe_compose(e, count, do_compose)
        if error is not None:
          return error
      return None
    if isinstance(event, ParticipationVisibleDpEvent):
      inner = self._fresh()
      error = inner._maybe_compose(event.event, 1, do_compose)
      if error is None and do_compose and count:
        self._visible(inner, event.sampling_probability, count)
      return error
    return self._leaf(event, count, do_compose)


class _RdpAccountant(_Compositions, rdp_lib.RdpAccountant):
  """dp_accounting's RDP accountant, exact under replace-one for Gaussians, and with
  `ParticipationVisibleDpEvent`."""

  def _fresh(self):
    return _RdpAccountant(list(RDP_ORDERS), self._neighboring_relation)

  def _visible(self, inner, q, count):
    self._rdp += count * participation_visible_rdp(inner._rdp, q)

  def _leaf(self, event, count, do_compose):
    base = rdp_lib.RdpAccountant._maybe_compose
    if self._neighboring_relation is NeighborRel.REPLACE_ONE:
      if isinstance(event, dp_event.GaussianDpEvent):
        # one replaced term moves a sum of terms clipped to C by 2C: sigma / 2 per unit
        return base(self, dp_event.GaussianDpEvent(event.noise_multiplier / 2.0), count,
                    do_compose)
      if isinstance(event, (dp_event.LaplaceDpEvent, dp_event.ZCDpEvent,
                            dp_event.PoissonSampledDpEvent)):
        return self.CompositionErrorDetails(
            invalid_event=event, error_message=f"no replace-one RDP for {type(event).__name__} "
                                               f"here; use the 'pld' accountant")
    return base(self, event, count, do_compose)


class _VectorGaussianLoss(plm.GaussianPrivacyLoss):
  """dp_accounting's (subsampled) Gaussian privacy loss, its hockey-stick divergence
  evaluated for every epsilon of an array in one numpy pass.

  Building a PLD by connect-the-dots evaluates the divergence at each of the ~10^6 values
  of the privacy-loss grid (1e-4 apart), and dp_accounting 0.6.0 inverts the privacy loss
  one Python call per value: about 3 s per subsampled Gaussian, most of a calibration's
  time. These are the same formulas (`_inverse_privacy_loss_add/remove/replace`) on
  arrays; the points the library treats specially (a privacy loss at the subsampling
  boundary, replace-one with subsampling) are left to it. Held equal to the library's
  divergences and epsilons in tests/privacy/test_accounting.py.
  """

  def _inverse_many(self, eps: np.ndarray) -> np.ndarray:
    s, var, q, kind = self.sensitivity, self._standard_deviation ** 2, self.sampling_prob, self.adjacency_type
    if q == 1.0:
      if kind == plm.AdjacencyType.REPLACE:
        return -eps * var / s / 2
      pl = eps
    else:  # log(1/q exp(+-eps) + 1 - 1/q), dp_accounting's log_a_times_exp_b_plus_c
      b = -eps if kind == plm.AdjacencyType.ADD else eps
      d = b + np.log(1 / q)
      with np.errstate(invalid="ignore", divide="ignore"):
        inner = np.where(b == 0, 0.0, d + np.log1p(-np.exp(np.log(-(1 - 1 / q)) - d)))
      pl = -inner if kind == plm.AdjacencyType.ADD else inner
    x = -0.5 * s - pl * var / s
    return x + s if kind == plm.AdjacencyType.ADD else x

  def get_delta_for_epsilon(self, epsilon):
    if (isinstance(epsilon, numbers.Number) or self.sampling_prob != 1.0
        and self.adjacency_type == plm.AdjacencyType.REPLACE):
      return super().get_delta_for_epsilon(epsilon)
    eps = np.asarray(epsilon, dtype=float)
    deltas = np.zeros_like(eps)
    q, kind = self.sampling_prob, self.adjacency_type
    inverse = np.ones_like(eps, dtype=bool)
    if q != 1.0 and kind == plm.AdjacencyType.ADD:
      inverse = eps < -math.log1p(-q)
    elif q != 1.0 and kind == plm.AdjacencyType.REMOVE:
      inverse = eps > math.log1p(-q)
      deltas[~inverse] = -np.expm1(eps[~inverse])
    e = eps[inverse]
    x = self._inverse_many(e)
    if q != 1.0:  # at the boundary the library returns the limit (+-inf): its own call
      edge = np.isclose(e, math.log(1 - q) * (-1 if kind == plm.AdjacencyType.ADD else 1),
                        rtol=1e-9, atol=0.0)
      x[edge] = [self.inverse_privacy_loss(v) for v in e[edge]]
    deltas[inverse] = self.mu_upper_cdf(x) - np.exp(e + self.mu_lower_log_cdf(x))
    return np.clip(deltas, 0, 1)


@contextlib.contextmanager
def _vector_gaussian() -> Iterator[None]:
  """dp_accounting builds Gaussian PLDs with `_VectorGaussianLoss` inside this block
  (`from_gaussian_mechanism` looks the class up in its module at each call)."""
  saved = plm.GaussianPrivacyLoss
  plm.GaussianPrivacyLoss = _VectorGaussianLoss
  try:
    yield
  finally:
    plm.GaussianPrivacyLoss = saved


class _PldAccountant(_Compositions, pld_lib.PLDAccountant):
  """dp_accounting's PLD accountant with `ParticipationVisibleDpEvent` (the q-mixture of
  the event's privacy-loss distribution and the identity's)."""

  def _fresh(self):
    return _PldAccountant(self._neighboring_relation, self._value_discretization_interval)

  def _visible(self, inner, q, count):
    if inner._contains_non_dp_event:
      self._contains_non_dp_event = True
      return
    nothing = pld_dist.identity(self._value_discretization_interval)
    mixed = inner._pld.compute_mixture(nothing, q)
    self._pld = self._pld.compose(mixed.self_compose(count))

  def _leaf(self, event, count, do_compose):
    with _vector_gaussian():
      return pld_lib.PLDAccountant._maybe_compose(self, event, count, do_compose)


def make_accountant(accountant: str = "pld", neighbouring: str = "add_remove", *,
                    discretization: float = 1e-4) -> dp_accounting.PrivacyAccountant:
  """A fresh dp_accounting accountant: 'rdp' or 'pld', for 'add_remove' or 'replace_one'.

  `discretization`: PLD's privacy-loss grid (pessimistic: a coarser grid only raises the
  reported epsilon, 1e-3 is ~10x faster for long heterogeneous compositions).
  """
  _check(neighbouring in NEIGHBOURING,
         f"neighbouring must be one of {sorted(NEIGHBOURING)}, got {neighbouring!r}")
  rel = NEIGHBOURING[neighbouring]
  if accountant == "rdp":
    return _RdpAccountant(list(RDP_ORDERS), rel)
  if accountant == "pld":
    return _PldAccountant(rel, discretization)
  raise ValueError(f"accountant must be 'rdp' or 'pld', got {accountant!r}")


def default_neighbouring(event: dp_event.DpEvent) -> str:
  """'replace_one' for events that only support it (sampling without replacement)."""
  if _contains(event, dp_event.SampledWithoutReplacementDpEvent):
    return "replace_one"
  return "add_remove"


def _contains(event: dp_event.DpEvent, kind: type) -> bool:
  if isinstance(event, kind):
    return True
  if isinstance(event, dp_event.SelfComposedDpEvent):
    return _contains(event.event, kind)
  if isinstance(event, dp_event.ComposedDpEvent):
    return any(_contains(e, kind) for e in event.events)
  return False


def dpsgd_event(q: float, sigma: float, steps: int = 1, *, sampling: str = "poisson",
                dataset_size: int | None = None, batch_size: int | None = None
                ) -> dp_event.DpEvent:
  """The event of `steps` DP-SGD steps (Gaussian noise sigma*C on a sum of clipped terms).

  Args:
    q: sampling rate (expected batch size / dataset size).
    sigma: noise multiplier (noise std / clip norm).
    steps: number of steps.
    sampling: 'poisson' (each record joins with probability q), 'truncated_poisson'
      (Poisson, then a uniformly random subset of `batch_size` kept when more join; needs
      `dataset_size` and `batch_size`), or 'fixed' (`batch_size` records without
      replacement out of `dataset_size`; REPLACE_ONE neighbours, sensitivity 2C: see
      `fixed_size_event`).
    dataset_size: n, for 'truncated_poisson' and 'fixed'.
    batch_size: the static batch size, for 'truncated_poisson' and 'fixed'.
  """
  check_sampling_rate(q)
  check_noise_multiplier(sigma)
  _check(steps >= 0 and int(steps) == steps, f"steps must be an integer >= 0, got {steps}")
  if sampling == "poisson":
    one = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma))
  elif sampling in ("truncated_poisson", "fixed"):
    _check(dataset_size is not None and batch_size is not None and 1 <= batch_size <= dataset_size,
           f"sampling={sampling!r} needs 1 <= batch_size <= dataset_size, got "
           f"batch_size={batch_size}, dataset_size={dataset_size}")
    if sampling == "fixed":
      one = fixed_size_event(dataset_size, batch_size, sigma)
    else:
      one = dp_event.TruncatedSubsampledGaussianDpEvent(
          dataset_size=dataset_size, sampling_probability=q, truncated_batch_size=batch_size,
          noise_multiplier=sigma)
  else:
    raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
  return dp_event.SelfComposedDpEvent(one, int(steps))


def fixed_size_event(dataset_size: int, batch_size: int, sigma: float) -> dp_event.DpEvent:
  """Fixed-size sampling without replacement of a sum of terms clipped to C, noise sigma*C.

  Under replace-one neighbours (the only relation dp_accounting supports for this
  sampling) one replaced term moves the sum by up to 2C, so the Gaussian's multiplier
  relative to the sensitivity is sigma / 2. (Passing sigma itself, as some libraries do,
  under-reports epsilon.)
  """
  return dp_event.SampledWithoutReplacementDpEvent(
      dataset_size, batch_size, dp_event.GaussianDpEvent(sigma / 2.0))


def compose(parts: Sequence[tuple[dp_event.DpEvent, int]]) -> dp_event.DpEvent:
  """The composition of `count_i` repetitions of `event_i` (heterogeneous events)."""
  return dp_event.ComposedDpEvent([dp_event.SelfComposedDpEvent(e, int(c)) for e, c in parts])


def epsilon(event: dp_event.DpEvent, delta: float, *, accountant: str = "pld",
            neighbouring: str | None = None, discretization: float = 1e-4) -> float:
  """The epsilon of `event` at `delta` (inf for a non-private event).

  Raises a ValueError naming the unsupported event when the chosen accountant cannot
  account it (e.g. 'rdp' with truncated Poisson, 'pld' with sampling without replacement).
  """
  check_delta(delta)
  acc = make_accountant(accountant, neighbouring or default_neighbouring(event),
                        discretization=discretization)
  if not acc.supports(event):
    other = "pld" if accountant == "rdp" else "rdp"
    raise ValueError(f"the {accountant!r} accountant ({acc.neighboring_relation.name}) cannot "
                     f"account {event}; use accountant={other!r} or another sampling scheme")
  with _quiet():
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def dpsgd_epsilon(q: float, sigma: float, steps: int, delta: float, *,
                  accountant: str = "rdp", sampling: str = "poisson",
                  dataset_size: int | None = None, batch_size: int | None = None) -> float:
  """Epsilon of DP-SGD: `steps` subsampled Gaussian steps (see `dpsgd_event`)."""
  return epsilon(dpsgd_event(q, sigma, steps, sampling=sampling, dataset_size=dataset_size,
                             batch_size=batch_size), delta, accountant=accountant)


def calibrate(make_event: Callable[[float], dp_event.DpEvent], target_epsilon: float,
              delta: float, *, accountant: str = "pld", neighbouring: str | None = None,
              **kwargs) -> float:
  """The smallest noise multiplier sigma with epsilon(make_event(sigma)) <= target_epsilon.

  For 'pld', the RDP calibration (cheap, and never below PLD's answer since RDP's epsilon
  is the larger) brackets the search first, which avoids PLDs of tiny sigma (slow).
  """
  check_delta(delta)

  def eps(name):
    return lambda s: epsilon(make_event(s), delta, accountant=name, neighbouring=neighbouring)

  if accountant == "pld":
    rdp = make_accountant("rdp", neighbouring or default_neighbouring(make_event(1.0)))
    if not rdp.supports(make_event(1.0)) and _contains(make_event(1.0), _TRUNCATED):
      return _calibrate_truncated(make_event, target_epsilon, delta, neighbouring, **kwargs)
    if rdp.supports(make_event(1.0)):
      hi = calibrate_noise(eps("rdp"), target_epsilon, **kwargs)
      floor = kwargs.get("sigma_min", 0.05)
      pld = eps("pld")
      eps_hi = pld(hi)
      if eps_hi <= target_epsilon and hi > floor:  # else PLD's grid is coarser than RDP here
        lo = max(hi / 1.5, floor)
        eps_lo = pld(lo)
        while eps_lo <= target_epsilon and lo > floor:  # walk down to a bracket
          hi, eps_hi, lo = lo, eps_lo, max(lo / 1.5, floor)
          eps_lo = pld(lo)
        if eps_lo <= target_epsilon:
          return lo
        return _bracket_search(pld, target_epsilon, lo, hi, eps_lo, eps_hi,
                               kwargs.get("rtol", 1e-3))
  return calibrate_noise(eps(accountant), target_epsilon, **kwargs)


_TRUNCATED = dp_event.TruncatedSubsampledGaussianDpEvent


def untruncated(event: dp_event.DpEvent) -> dp_event.DpEvent:
  """`event` with each truncated Poisson-subsampled Gaussian replaced by the untruncated
  one (`PoissonSampledDpEvent` of the same rate and sigma): the surrogate that PLD
  calibrates fast (RDP brackets it, and its Gaussian PLD is vectorised here), and whose
  epsilon matches the truncated event's when truncation is rare."""
  if isinstance(event, _TRUNCATED):
    return dp_event.PoissonSampledDpEvent(event.sampling_probability,
                                          dp_event.GaussianDpEvent(event.noise_multiplier))
  if isinstance(event, dp_event.SelfComposedDpEvent):
    return dp_event.SelfComposedDpEvent(untruncated(event.event), event.count)
  if isinstance(event, dp_event.ComposedDpEvent):
    return dp_event.ComposedDpEvent([untruncated(e) for e in event.events])
  if isinstance(event, ParticipationVisibleDpEvent):
    return ParticipationVisibleDpEvent(event.sampling_probability, untruncated(event.event))
  return event


def _calibrate_truncated(make_event, target_epsilon, delta, neighbouring, **kwargs):
  """PLD calibration of an event with truncated Poisson sampling, which RDP cannot
  bracket and whose PLD costs seconds per sigma: start from the untruncated surrogate's
  sigma (fast), widen a bracket around it by growing ratios under the exact event (the two
  usually agree within a percent: dp_accounting's truncated PLD is a slightly pessimistic
  bound), then shrink it as `calibrate_noise` does. About 3 to 6 exact evaluations."""
  rtol, floor = kwargs.get("rtol", 1e-3), kwargs.get("sigma_min", 0.05)
  ceiling = kwargs.get("sigma_max", 500.0)
  exact = lambda s: epsilon(make_event(s), delta, accountant="pld",  # noqa: E731
                            neighbouring=neighbouring)
  start = calibrate(lambda s: untruncated(make_event(s)), target_epsilon, delta,
                    accountant="pld", neighbouring=neighbouring, **kwargs)
  near, eps_near, ratio = start, exact(start), 1.01
  meets = eps_near <= target_epsilon
  while True:  # the far end moves away from `start` until the target lies in between
    far = max(near / ratio, floor) if meets else near * ratio
    if far > ceiling:
      raise ValueError(f"target_epsilon={target_epsilon} cannot be reached with a noise "
                       f"multiplier up to sigma_max={ceiling} under truncated Poisson sampling; "
                       f"raise the cap (--fed.poisson_cap) or target_epsilon")
    eps_far = exact(far)
    if (eps_far <= target_epsilon) != meets or (meets and far == floor):
      break
    near, eps_near, ratio = far, eps_far, ratio ** 2
  if meets and eps_far <= target_epsilon:
    return far  # the floor meets the target
  lo, hi, eps_lo, eps_hi = (far, near, eps_far, eps_near) if meets else (near, far, eps_near,
                                                                       eps_far)
  return _bracket_search(exact, target_epsilon, lo, hi, eps_lo, eps_hi, rtol)


def calibrate_noise(epsilon_of_sigma: Callable[[float], float], target_epsilon: float, *,
                    sigma_min: float = 0.05, sigma_max: float = 500.0, rtol: float = 1e-3
                    ) -> float:
  """The smallest sigma in [sigma_min, sigma_max] with epsilon_of_sigma(sigma) <= target.

  A bracketing search in log(sigma) (epsilon falls as sigma grows): regula falsi on
  log(epsilon) with the Illinois correction, each step kept at least rtol/2 inside the
  bracket and a bisection step whenever an end is not finite, until the bracket's ratio is
  at most 1 + rtol. The returned sigma is the bracket's upper end, so it always meets the
  target and is within rtol of the smallest one. A PLD epsilon costs about a second, and
  log(epsilon) is nearly linear in log(sigma): the search takes about 5 evaluations where
  bisection took 10 to 13.
  """
  _check(target_epsilon > 0 and math.isfinite(target_epsilon),
         f"target_epsilon must be > 0 and finite, got {target_epsilon}")
  _check(0 < sigma_min < sigma_max, f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
  top = epsilon_of_sigma(sigma_max)
  if top > target_epsilon:
    raise ValueError(f"target_epsilon={target_epsilon} cannot be reached with a noise multiplier "
                     f"up to sigma_max={sigma_max} (epsilon there is {top:.4g}); raise "
                     f"target_epsilon or delta, or sample less / run fewer steps")
  if epsilon_of_sigma(sigma_min) <= target_epsilon:
    return sigma_min
  return _bracket_search(epsilon_of_sigma, target_epsilon, sigma_min, sigma_max,
                         epsilon_of_sigma(sigma_min), top, rtol)


def _bracket_search(epsilon_of_sigma, target, lo, hi, eps_lo, eps_hi, rtol):
  """The upper end of [lo, hi] shrunk to ratio 1 + rtol around the crossing of `target`
  (eps_lo > target >= eps_hi throughout)."""
  def gap(eps):  # > 0 above the target, <= 0 at or below it; None when not finite
    return math.log(eps / target) if 0 < eps < math.inf else None

  g_lo, g_hi = gap(eps_lo), gap(eps_hi)
  side = 0  # which end the last two steps replaced (Illinois: halve the other's weight)
  while hi / lo > 1 + rtol:
    a, b = math.log(lo), math.log(hi)
    if g_lo is None or g_hi is None or g_lo <= g_hi:
      x = 0.5 * (a + b)
    else:
      x = a + (b - a) * g_lo / (g_lo - g_hi)
      margin = 0.5 * math.log1p(rtol)
      x = min(max(x, a + margin), b - margin)
    mid = math.exp(x)
    eps = epsilon_of_sigma(mid)
    if eps <= target:
      hi, g_hi = mid, gap(eps)
      if side == 1 and g_lo is not None:
        g_lo /= 2
      side = 1
    else:
      lo, g_lo = mid, gap(eps)
      if side == -1 and g_hi is not None:
        g_hi /= 2
      side = -1
  return hi


def calibrate_sigma(q: float, steps: int, target_epsilon: float, delta: float, *,
                    accountant: str = "rdp", sampling: str = "poisson",
                    dataset_size: int | None = None, batch_size: int | None = None,
                    **kwargs) -> float:
  """The DP-SGD noise multiplier that reaches `target_epsilon` after `steps` steps."""
  check_sampling_rate(q)
  return calibrate(lambda s: dpsgd_event(q, s, steps, sampling=sampling,
                                         dataset_size=dataset_size, batch_size=batch_size),
                   target_epsilon, delta, accountant=accountant, **kwargs)


def rdp_epsilon(rdp: np.ndarray, delta: float) -> float:
  """Epsilon from an RDP curve over `RDP_ORDERS` (the conversion described above)."""
  check_delta(delta)
  return float(rdp_lib.compute_epsilon(list(RDP_ORDERS), list(rdp), delta)[0])


def rdp_curve(event: dp_event.DpEvent, neighbouring: str | None = None) -> np.ndarray:
  """The RDP of `event` at `RDP_ORDERS`; curves of independent releases add up."""
  acc = make_accountant("rdp", neighbouring or default_neighbouring(event))
  with _quiet():
    acc.compose(event)
  return np.asarray(acc._rdp, np.float64)  # pylint: disable=protected-access


# ----------------------------------------------------------------------------- events as JSON


def event_to_json(event: dp_event.DpEvent) -> Any:
  """A JSON-able form of the events used here (for checkpoints and metrics files)."""
  if isinstance(event, dp_event.NoOpDpEvent):
    return {"noop": {}}
  if isinstance(event, dp_event.NonPrivateDpEvent):
    return {"non_private": {}}
  if isinstance(event, dp_event.GaussianDpEvent):
    return {"gaussian": {"noise_multiplier": event.noise_multiplier}}
  if isinstance(event, dp_event.PoissonSampledDpEvent):
    return {"poisson": {"q": event.sampling_probability, "event": event_to_json(event.event)}}
  if isinstance(event, dp_event.SampledWithoutReplacementDpEvent):
    return {"without_replacement": {"n": event.source_dataset_size, "m": event.sample_size,
                                    "event": event_to_json(event.event)}}
  if isinstance(event, dp_event.TruncatedSubsampledGaussianDpEvent):
    return {"truncated_poisson": {"n": event.dataset_size, "q": event.sampling_probability,
                                  "m": event.truncated_batch_size,
                                  "noise_multiplier": event.noise_multiplier}}
  if isinstance(event, ParticipationVisibleDpEvent):
    return {"participation_visible": {"q": event.sampling_probability,
                                      "event": event_to_json(event.event)}}
  if isinstance(event, dp_event.SelfComposedDpEvent):
    return {"self_composed": {"event": event_to_json(event.event), "count": event.count}}
  if isinstance(event, dp_event.ComposedDpEvent):
    return {"composed": [event_to_json(e) for e in event.events]}
  raise ValueError(f"no JSON form for {event}")


def event_from_json(data: Any) -> dp_event.DpEvent:
  """Inverse of `event_to_json`."""
  (kind, v), = data.items()
  builders = {
      "noop": lambda: dp_event.NoOpDpEvent(),
      "non_private": lambda: dp_event.NonPrivateDpEvent(),
      "gaussian": lambda: dp_event.GaussianDpEvent(v["noise_multiplier"]),
      "poisson": lambda: dp_event.PoissonSampledDpEvent(v["q"], event_from_json(v["event"])),
      "without_replacement": lambda: dp_event.SampledWithoutReplacementDpEvent(
          v["n"], v["m"], event_from_json(v["event"])),
      "truncated_poisson": lambda: dp_event.TruncatedSubsampledGaussianDpEvent(
          dataset_size=v["n"], sampling_probability=v["q"], truncated_batch_size=v["m"],
          noise_multiplier=v["noise_multiplier"]),
      "participation_visible": lambda: ParticipationVisibleDpEvent(
          v["q"], event_from_json(v["event"])),
      "self_composed": lambda: dp_event.SelfComposedDpEvent(event_from_json(v["event"]),
                                                            v["count"]),
      "composed": lambda: dp_event.ComposedDpEvent([event_from_json(e) for e in v]),
  }
  if kind not in builders:
    raise ValueError(f"unknown event kind {kind!r} in {data}")
  return builders[kind]()


# ----------------------------------------------------------------------------- running


class RepeatedEvent:
  """epsilon(r) after r repetitions of one event, for any r and in any order (a function
  of r alone, so a resumed run reports the same figures).

  A training loop asks for r = 1, 2, 3, ...: PLD builds the event's distribution once and
  composes it once more per round (about 0.1 s), where `Accountant` would rebuild and
  self-compose it each time (seconds for a truncated Poisson event, whose PLD is not
  vectorised). Other r self-compose. RDP is cheap either way and goes through
  `Accountant`. Both paths discretise pessimistically, so the figures agree with
  `Accountant`'s to the grid.
  """

  def __init__(self, event: dp_event.DpEvent, *, accountant: str = "pld",
               neighbouring: str = "add_remove", delta: float = 1e-5,
               discretization: float = 1e-4):
    check_delta(delta)
    self.event, self.accountant, self.neighbouring, self.delta = (event, accountant,
                                                                  neighbouring, delta)
    self._discretization = discretization
    self._one = None  # PLD of one event
    self._last: tuple[int, Any] = (0, None)  # (r, PLD of r events)

  def epsilon(self, rounds: int) -> float:
    _check(rounds >= 0 and int(rounds) == rounds, f"rounds must be an integer >= 0, got {rounds}")
    if rounds == 0:
      return 0.0
    if self.accountant != "pld":
      return Accountant(self.accountant, self.neighbouring, self.delta).compose(
          self.event, rounds).epsilon()
    if self._one is None:
      acc = make_accountant("pld", self.neighbouring, discretization=self._discretization)
      with _quiet():
        acc.compose(self.event)
      if acc._contains_non_dp_event:
        return math.inf
      self._one = acc._pld
    done, pld = self._last
    if done != rounds:
      pld = (pld.compose(self._one) if done == rounds - 1 and pld is not None
             else self._one.self_compose(rounds))
      self._last = (rounds, pld)
    return float(pld.get_epsilon_for_delta(self.delta))


class Accountant:
  """A running accountant: `compose` each release as a run goes, read `epsilon()` any time.

  Consecutive equal events are stored run-length encoded, so the JSON `history` stays
  short for long runs and a resumed run rebuilds the same state with `from_json`.

  Args:
    accountant: 'pld' (tighter) or 'rdp' (cheaper, supports sampling without replacement).
    neighbouring: 'add_remove' or 'replace_one'.
    delta: the delta at which `epsilon()` reports.
  """

  def __init__(self, accountant: str = "pld", neighbouring: str = "add_remove",
               delta: float = 1e-5):
    check_delta(delta)
    self.accountant, self.neighbouring, self.delta = accountant, neighbouring, delta
    self._checker = make_accountant(accountant, neighbouring)
    self.history: list[tuple[dp_event.DpEvent, int]] = []
    self._cached: dict[float, float] = {}

  @property
  def steps(self) -> int:
    """How many events have been composed."""
    return sum(c for _, c in self.history)

  def compose(self, event: dp_event.DpEvent, count: int = 1) -> Accountant:
    """Adds `count` repetitions of `event` (cheap: the accounting runs in `epsilon`)."""
    if count == 0:
      return self
    if not self._checker.supports(event):
      raise ValueError(f"the {self.accountant!r} accountant ({self.neighbouring}) cannot "
                       f"account {event}")
    if self.history and self.history[-1][0] == event:
      self.history[-1] = (event, self.history[-1][1] + count)
    else:
      self.history.append((event, count))
    self._cached = {}
    return self

  def epsilon(self, delta: float | None = None) -> float:
    """Epsilon so far at `delta` (the accountant's delta by default).

    Each run of equal events is self-composed at once (PLD: by FFT powers), so this costs
    about as much as a handful of compositions whatever the number of rounds.
    """
    delta = self.delta if delta is None else delta
    check_delta(delta)
    if not self.history:
      return 0.0
    if delta not in self._cached:
      acc = make_accountant(self.accountant, self.neighbouring)
      with _quiet():
        acc.compose(compose(self.history))
        self._cached[delta] = float(acc.get_epsilon(delta))
    return self._cached[delta]

  def to_json(self) -> str:
    return json.dumps({"accountant": self.accountant, "neighbouring": self.neighbouring,
                       "delta": self.delta,
                       "history": [[event_to_json(e), c] for e, c in self.history]})

  @classmethod
  def from_json(cls, text: str) -> Accountant:
    data = json.loads(text)
    acc = cls(data["accountant"], data["neighbouring"], data["delta"])
    for e, c in data["history"]:
      acc.compose(event_from_json(e), c)
    return acc
