"""Tests of privacy/accounting.py: dp-accounting 0.6.0 reference values, calibration,
heterogeneous composition, the running accountant, bad input."""

import contextlib
import math

import numpy as np

import pytest
from dp_accounting import dp_event

from privacy import accounting as acc

REFERENCES = [  # q, sigma, steps, RDP, PLD (delta = 1e-5, add/remove)
    (0.01, 4.0, 10_000, 1.035, 0.947),
    (256 / 60000, 1.12, 60 * 60000 // 256, 2.52, 2.31),
    (0.04, 1.5, 2250, 7.329, 6.77),
]


@pytest.mark.parametrize("q,sigma,steps,rdp,pld", REFERENCES)
def test_reference_epsilons(q, sigma, steps, rdp, pld):
  assert acc.dpsgd_epsilon(q, sigma, steps, 1e-5, accountant="rdp") == pytest.approx(rdp, abs=1e-2)
  assert acc.dpsgd_epsilon(q, sigma, steps, 1e-5, accountant="pld") == pytest.approx(pld, abs=1e-2)


def test_improved_conversion_is_tighter_than_abadi():
  # The classic conversion rdp + log(1/delta)/(a-1) on the same RDP curve gives Abadi's 1.26.
  curve = acc.rdp_curve(acc.dpsgd_event(0.01, 4.0, 10_000))
  classic = min(r + math.log(1e5) / (a - 1) for a, r in zip(acc.RDP_ORDERS, curve))
  assert classic == pytest.approx(1.26, abs=0.01)
  assert acc.rdp_epsilon(curve, 1e-5) == pytest.approx(1.035, abs=1e-2)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_calibration_round_trips(accountant):
  sigma = acc.calibrate_sigma(0.04, 500, 3.0, 1e-5, accountant=accountant)
  eps = acc.dpsgd_epsilon(0.04, sigma, 500, 1e-5, accountant=accountant)
  assert eps <= 3.0
  assert eps == pytest.approx(3.0, rel=5e-3)
  # a slightly smaller sigma misses the target: the calibration is the smallest one
  assert acc.dpsgd_epsilon(0.04, sigma * 0.99, 500, 1e-5, accountant=accountant) > 3.0


@pytest.mark.parametrize("eps_of, target, most", [
    (lambda s: 10 / s ** 1.3, 2.0, 7),                  # near-linear in log-log: few steps
    (lambda s: math.exp(5 / s) - 1, 0.7, 15),
    (lambda s: 3.0 if s < 2 else 1.0, 2.0, 18),          # a step: bisection's pace
    (lambda s: math.inf if s < 1 else 4 / s, 1.0, 18),   # an infinite end: bisection steps
])
def test_calibrate_noise_brackets_the_smallest_sigma_to_rtol(eps_of, target, most):
  calls = []
  sigma = acc.calibrate_noise(lambda s: calls.append(s) or eps_of(s), target)
  assert eps_of(sigma) <= target and eps_of(sigma / (1 + 1e-3)) > target
  assert len(calls) <= most


def test_unreachable_target_is_a_clear_error():
  with pytest.raises(ValueError, match="target_epsilon=1e-06 cannot be reached"):
    acc.calibrate_sigma(1.0, 10_000, 1e-6, 1e-5, sigma_max=10.0)


def test_heterogeneous_composition_adds_rdp_exactly():
  a = acc.dpsgd_event(0.01, 1.0, 300)
  b = acc.dpsgd_event(0.05, 2.0, 200)
  both = acc.compose([(a, 1), (b, 1)])
  assert acc.rdp_curve(both) == pytest.approx(acc.rdp_curve(a) + acc.rdp_curve(b), rel=1e-12)
  # and the epsilon of the composition lies between its parts' and their sum
  ea, eb, eab = (acc.epsilon(e, 1e-5, accountant="rdp") for e in (a, b, both))
  assert max(ea, eb) < eab < ea + eb


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_gaussian_composition_equals_one_gaussian(accountant):
  # N(0, s1^2) then N(0, s2^2) on a sensitivity-1 query = one Gaussian with
  # s = (s1^-2 + s2^-2)^-1/2: heterogeneous composition must agree.
  s1, s2 = 2.0, 3.0
  composed = acc.compose([(dp_event.GaussianDpEvent(s1), 1), (dp_event.GaussianDpEvent(s2), 1)])
  single = dp_event.GaussianDpEvent((s1 ** -2 + s2 ** -2) ** -0.5)
  assert acc.epsilon(composed, 1e-5, accountant=accountant) == pytest.approx(
      acc.epsilon(single, 1e-5, accountant=accountant), rel=2e-3)


def test_running_accountant_matches_batch_and_round_trips_json():
  running = acc.Accountant("pld", delta=1e-5)
  e1 = acc.dpsgd_event(0.02, 1.0, 1)
  e2 = acc.dpsgd_event(0.02, 2.0, 1)
  for _ in range(50):
    running.compose(e1)
  running.compose(e2, 30)
  assert running.steps == 80
  assert len(running.history) == 2  # run-length encoded
  expected = acc.epsilon(acc.compose([(e1, 50), (e2, 30)]), 1e-5, accountant="pld")
  assert running.epsilon() == pytest.approx(expected, rel=1e-6)
  again = acc.Accountant.from_json(running.to_json())
  assert again.epsilon() == pytest.approx(running.epsilon(), rel=1e-9)
  assert acc.Accountant("rdp").epsilon() == 0.0


def test_sampling_schemes_and_their_accountants():
  fixed = acc.dpsgd_event(0.01, 1.0, 100, sampling="fixed", dataset_size=1000, batch_size=10)
  assert acc.default_neighbouring(fixed) == "replace_one"
  # replace-one moves a clipped sum by 2C: accounted as a Gaussian of multiplier sigma / 2
  assert fixed.event == dp_event.SampledWithoutReplacementDpEvent(
      1000, 10, dp_event.GaussianDpEvent(0.5))
  assert math.isfinite(acc.epsilon(fixed, 1e-5, accountant="rdp"))
  with pytest.raises(ValueError, match="cannot account"):
    acc.epsilon(fixed, 1e-5, accountant="pld")
  truncated = acc.dpsgd_event(0.01, 1.0, 100, sampling="truncated_poisson", dataset_size=1000,
                              batch_size=40)
  with pytest.raises(ValueError, match="cannot account"):
    acc.epsilon(truncated, 1e-5, accountant="rdp")
  # with a generous cap, truncation costs (almost) nothing over plain Poisson
  poisson = acc.epsilon(acc.dpsgd_event(0.01, 1.0, 100), 1e-5, accountant="pld")
  assert acc.epsilon(truncated, 1e-5, accountant="pld") == pytest.approx(poisson, rel=1e-3)


def test_events_round_trip_through_json():
  event = acc.compose([
      (acc.dpsgd_event(0.1, 1.0, 3), 2),
      (acc.dpsgd_event(0.1, 1.0, 3, sampling="fixed", dataset_size=50, batch_size=5), 1),
      (acc.dpsgd_event(0.1, 1.0, 3, sampling="truncated_poisson", dataset_size=50, batch_size=9), 1),
      (dp_event.NonPrivateDpEvent(), 1), (dp_event.NoOpDpEvent(), 1)])
  assert acc.event_from_json(acc.event_to_json(event)) == event


@pytest.mark.parametrize("call,match", [
    (lambda: acc.dpsgd_epsilon(0.1, 1.0, 10, 0.0), "delta must be in"),
    (lambda: acc.dpsgd_epsilon(0.1, 1.0, 10, 1.0), "delta must be in"),
    (lambda: acc.dpsgd_epsilon(0.1, 0.0, 10, 1e-5), "sigma must be > 0"),
    (lambda: acc.dpsgd_epsilon(0.1, -1.0, 10, 1e-5), "sigma must be > 0"),
    (lambda: acc.dpsgd_epsilon(0.0, 1.0, 10, 1e-5), "q must be in"),
    (lambda: acc.dpsgd_epsilon(1.5, 1.0, 10, 1e-5), "q must be in"),
    (lambda: acc.check_clip_norm(0.0), "clip norm C must be > 0"),
    (lambda: acc.calibrate_sigma(0.1, 10, -1.0, 1e-5), "target_epsilon must be > 0"),
    (lambda: acc.make_accountant("moments"), "accountant must be"),
])
def test_bad_input_names_the_parameter(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_rdp_replace_one_gaussian_is_sensitivity_two_and_never_below_pld():
  # dp_accounting's RDP accountant ignores the relation for Gaussians (8.08 here); the
  # replace-one figure is the Gaussian at sigma / 2 under add/remove
  e = acc.compose([(dp_event.GaussianDpEvent(2.0), 10)])
  rdp = acc.epsilon(e, 1e-5, accountant="rdp", neighbouring="replace_one")
  pld = acc.epsilon(e, 1e-5, accountant="pld", neighbouring="replace_one")
  assert pld == pytest.approx(17.86, abs=0.01)
  assert rdp >= pld
  half = acc.compose([(dp_event.GaussianDpEvent(1.0), 10)])
  assert rdp == pytest.approx(acc.epsilon(half, 1e-5, accountant="rdp"), rel=1e-12)


def test_rdp_refuses_replace_one_events_it_cannot_account():
  e = dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(1.0))
  with pytest.raises(ValueError, match="cannot account"):
    acc.epsilon(e, 1e-5, accountant="rdp", neighbouring="replace_one")


def test_participation_visible_rdp_is_the_visible_mixture():
  curve = acc.rdp_curve(dp_event.GaussianDpEvent(1.0))
  assert acc.participation_visible_rdp(curve, 1.0) == pytest.approx(curve, rel=1e-12)
  mixed = acc.participation_visible_rdp(curve, 0.1)
  orders = np.asarray(acc.RDP_ORDERS)
  with np.errstate(over="ignore"):
    by_hand = np.log(0.9 + 0.1 * np.exp((orders - 1) * curve)) / (orders - 1)
  finite = np.isfinite(by_hand)  # e^((a-1) rdp) overflows at high orders; the module's does not
  assert finite.sum() > 20 and np.all(np.isfinite(mixed))
  np.testing.assert_allclose(mixed[finite], by_hand[finite], rtol=1e-9)
  assert np.all(mixed < curve)
  # the running accountants take the event and agree (RDP is the looser bound)
  visible = acc.compose([(acc.ParticipationVisibleDpEvent(0.2, dp_event.GaussianDpEvent(1.0)), 20)])
  rdp = acc.epsilon(visible, 1e-5, accountant="rdp", neighbouring="replace_one")
  pld = acc.epsilon(visible, 1e-5, accountant="pld", neighbouring="replace_one")
  assert pld <= rdp < 1.3 * pld
  assert acc.event_from_json(acc.event_to_json(visible)) == visible


@pytest.mark.parametrize("q", [1.0, 0.1])
@pytest.mark.parametrize("kind", ["ADD", "REMOVE", "REPLACE"])
def test_vectorised_gaussian_divergence_equals_dp_accountings(q, kind):
  from dp_accounting.pld import privacy_loss_mechanism as plm
  args = dict(sensitivity=1.0, sampling_prob=q, adjacency_type=plm.AdjacencyType[kind])
  eps = np.linspace(-4, 4, 801)
  if q < 1:  # the subsampling boundaries themselves, where the library returns limits
    eps = np.concatenate([eps, [math.log1p(-q), -math.log1p(-q)]])
    eps = eps[eps <= -math.log1p(-q)] if kind == "ADD" else eps
  for sd in (0.5, 2.0):
    np.testing.assert_array_equal(
        acc._VectorGaussianLoss(sd, **args).get_delta_for_epsilon(eps),
        plm.GaussianPrivacyLoss(sd, **args).get_delta_for_epsilon(eps))


def test_pld_epsilon_is_dp_accountings_own(monkeypatch):
  event = dp_event.SelfComposedDpEvent(
      dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(1.0)), 20)
  fast = acc.epsilon(event, 1e-5)
  monkeypatch.setattr(acc, "_vector_gaussian", contextlib.nullcontext)
  assert fast == acc.epsilon(event, 1e-5)


def _truncated(sigma, n=400, q=0.05, m=40):
  return dp_event.TruncatedSubsampledGaussianDpEvent(
      dataset_size=n, sampling_probability=q, truncated_batch_size=m, noise_multiplier=sigma)


def test_untruncated_replaces_every_truncated_leaf():
  nested = acc.compose([(_truncated(1.0), 3), (dp_event.GaussianDpEvent(2.0), 1)])
  plain = acc.untruncated(nested)
  assert plain == acc.compose([(dp_event.PoissonSampledDpEvent(0.05, dp_event.GaussianDpEvent(1.0)),
                                3), (dp_event.GaussianDpEvent(2.0), 1)])
  assert not acc._contains(plain, dp_event.TruncatedSubsampledGaussianDpEvent)


@pytest.mark.parametrize("m", [40, 24])  # a cap 4 sd above the mean (rare), and one at +1 sd
def test_truncated_calibration_is_exact_and_tight(m):
  make = lambda s: acc.compose([(_truncated(s, m=m), 30)])  # noqa: E731
  sigma = acc.calibrate(make, 2.0, 1e-5)
  assert acc.epsilon(make(sigma), 1e-5) <= 2.0  # under the exact (truncated) event
  assert acc.epsilon(make(sigma / 1.002), 1e-5) > 2.0  # and the smallest, to rtol
  if m == 40:  # rare truncation: the untruncated surrogate is within a percent
    surrogate = acc.calibrate(lambda s: acc.untruncated(make(s)), 2.0, 1e-5)
    assert sigma == pytest.approx(surrogate, rel=0.01)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_repeated_event_matches_the_accountant_in_any_order(accountant):
  event = _truncated(1.0) if accountant == "pld" else acc.dpsgd_event(0.05, 1.0)
  repeated = acc.RepeatedEvent(event, accountant=accountant)
  for r in [1, 2, 3, 4, 9, 8, 0, 5, 6]:  # consecutive (one composition each), jumps, back
    want = acc.Accountant(accountant).compose(event, r).epsilon() if r else 0.0
    assert repeated.epsilon(r) == pytest.approx(want, rel=1e-6)
  assert acc.RepeatedEvent(dp_event.NonPrivateDpEvent()).epsilon(2) == math.inf


def test_truncated_calibration_refuses_an_unreachable_target(monkeypatch):
  # a surrogate far more private than the exact event: the bracket grows past sigma_max
  monkeypatch.setattr(acc, "untruncated", lambda e: dp_event.GaussianDpEvent(1e3))
  make = lambda s: acc.compose([(_truncated(s), 30)])  # noqa: E731
  with pytest.raises(ValueError, match="cannot be reached .* under truncated Poisson"):
    acc.calibrate(make, 2.0, 1e-5, sigma_min=0.45, sigma_max=0.5)
