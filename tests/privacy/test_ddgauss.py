"""Tests of privacy/ddgauss.py: the exact discrete Gaussian sampler (chi-square against the
pmf, and against wrong sigmas), the rotation, the conditional rounding, encode/decode of a
secure sum (plain modular and through `secagg.run`), the accounting by hand, the visible
participation mixture, parameter choice and bad parameters."""

import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from privacy import accounting
from privacy import ddgauss as dg

SEED = bytes(range(32))


def _seed(i: int) -> bytes:
  return dg.derive_seed(SEED, b"test %d" % i)


def _chi_square(samples: np.ndarray, sigma2: float) -> float:
  """p-value of samples against N_Z(0, sigma2): one bin per integer with expected count
  >= 20, the two tails pooled."""
  sigma = math.sqrt(sigma2)
  support = np.arange(-int(60 * sigma) - 10, int(60 * sigma) + 11)
  pmf = np.exp(-support.astype(np.float64) ** 2 / (2 * sigma2))
  pmf /= pmf.sum()
  expected = pmf * samples.size
  inner = support[expected >= 20]
  lo, hi = inner[0], inner[-1]
  observed = [np.sum(samples < lo)] + [np.sum(samples == v) for v in inner] + [np.sum(samples > hi)]
  exp = [expected[support < lo].sum()] + list(expected[expected >= 20]) + \
        [expected[support > hi].sum()]
  return stats.chisquare(observed, exp).pvalue


@pytest.mark.parametrize("variance", [Fraction(16, 25), Fraction(2809, 100)])  # 0.8^2, 5.3^2
def test_sampler_matches_discrete_gaussian_pmf(variance):
  x = dg.sample_discrete_gaussian(100_000, variance, seed=_seed(1))
  assert x.dtype == np.int64
  assert _chi_square(x, float(variance)) > 1e-3


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_chi_square_rejects_a_wrong_sigma(factor):
  x = dg.sample_discrete_gaussian(100_000, Fraction(2809, 100), seed=_seed(2))
  assert _chi_square(x, 28.09 * factor**2) < 1e-6


def test_sampler_python_int_path_for_large_intermediates():
  # sigma^2 = (2^29 + 1) / 2^28 ~ 2: B = 2 N D t^2 ~ 2^60 fits, but |Y| D t - N squared
  # passes int64 once |Y| > 6, so a few percent of candidates take the exact big-int path.
  variance = Fraction(2**29 + 1, 2**28)
  x = dg.sample_discrete_gaussian(60_000, variance, seed=_seed(3))
  assert _chi_square(x, float(variance)) > 1e-3


def test_sampler_is_a_function_of_its_seed():
  a = dg.sample_discrete_gaussian(1000, Fraction(9), seed=_seed(4))
  np.testing.assert_array_equal(a, dg.sample_discrete_gaussian(1000, Fraction(9), seed=_seed(4)))
  assert np.any(a != dg.sample_discrete_gaussian(1000, Fraction(9), seed=_seed(5)))


def test_rational_variance_rounds_up_with_dyadic_denominator():
  for v in (0.3, 1.0, 28.09, 8314.2, 16777216.5):
    r = dg.rational_variance(v)
    assert r >= Fraction(v) and r - Fraction(v) <= Fraction(1, r.denominator)
    assert r.denominator & (r.denominator - 1) == 0


def test_rotation_is_orthogonal_and_inverted_on_non_power_of_two_dimension():
  x = np.random.default_rng(0).normal(size=(3, 13))
  y = dg.rotate(x, seed=_seed(6))
  assert y.shape == (3, 16)
  np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=1e-12)
  np.testing.assert_allclose(dg.unrotate(y, 13, seed=_seed(6)), x, atol=1e-12)
  assert not np.allclose(dg.rotate(x, seed=_seed(7)), y)  # the seed draws the signs


def test_rounded_norm_bound_by_hand():
  # norm 4, d 4, beta e^-2: min(4 + 2, sqrt(16 + 1 + 2 (4 + 1))) = sqrt(27)
  assert dg.rounded_norm_bound(4.0, 4, math.exp(-2)) == pytest.approx(math.sqrt(27))
  # norm 0.5, d 64, beta e^-2: min(8.5, sqrt(0.25 + 16 + 2 (0.5 + 4))) = sqrt(25.25)
  assert dg.rounded_norm_bound(0.5, 64, math.exp(-2)) == pytest.approx(math.sqrt(25.25))


def test_conditional_rounding_bound_holds_on_every_output():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(400, 64))
  x *= 3.0 / np.linalg.norm(x, axis=1, keepdims=True)
  bound = dg.rounded_norm_bound(3.0, 64, 0.99)  # beta near 1: a tight bound, retries happen
  ints, retries = dg.conditional_round(x, bound, seed=_seed(8))
  assert retries > 0
  assert np.all((ints * ints).sum(1) <= bound**2)
  assert np.all((ints == np.floor(x)) | (ints == np.floor(x) + 1))


def test_randomized_rounding_is_unbiased():
  x = np.array([0.1, 0.5, -0.3, 2.75, -7.9, 3.0])
  stream = dg._Stream(_seed(9))
  draws = np.stack([dg.randomized_round(x, stream) for _ in range(20_000)])
  sd = 0.5 / math.sqrt(draws.shape[0])
  np.testing.assert_allclose(draws.mean(0), x, atol=5 * sd)


def _small_mechanism(bits=16, variance=Fraction(4), gamma=0.01, n_min=2):
  return dg.DDGauss(clip=1.0, dimension=13, bits=bits, beta=math.exp(-0.5), gamma=gamma,
                    variance=variance, n_min=n_min, expected_clients=3)


def _updates(m=3, d=13):
  x = np.random.default_rng(2).normal(size=(m, d)).astype(np.float32)
  x *= 0.5 / np.linalg.norm(x, axis=1, keepdims=True)
  x[0] *= 10  # norm 5: clipped to norm 1
  return x


def _clipped_sum(x, c):
  x = x.astype(np.float64)
  n = np.linalg.norm(x, axis=1, keepdims=True)
  return (x * np.minimum(1, c / n)).sum(0)


def test_sum_of_encodings_decodes_to_sum_of_clipped_updates():
  mech = _small_mechanism()
  x = _updates()
  enc, metrics = mech.encode(x, seed=SEED)
  assert enc.shape == (3, 16) and enc.dtype == np.uint32 and enc.max() < 2**16
  assert metrics["ddgauss_clipped"] == 1 and metrics["ddgauss_overflow"] == 0
  assert set(metrics) == set(dg.DDGauss.metric_names)
  total = enc.astype(np.uint64).sum(0) % 2**16  # what secure aggregation returns
  est = mech.decode(total, rotation_seed=mech.rotation_seed(SEED))
  assert est.shape == (13,) and est.dtype == np.float32
  # Error bound (Kairouz et al. 2021, utility analysis; no wrap-around): the decoded error
  # is gamma (H D)^-1 (rounding errors + noise), orthogonal, so
  # E ||est - sum||^2 <= m d' gamma^2 (sigma^2 + 1/4); this fixed seed stays below twice it.
  err = est - _clipped_sum(x, 1.0)
  assert np.sum(err**2) <= 2 * 3 * 16 * 0.01**2 * (4 + 0.25)
  assert np.sum(err**2) > 0


def test_sum_through_secure_aggregation_equals_plaintext_modular_sum():
  from privacy import secagg
  mech = _small_mechanism(bits=20)
  x = _updates()
  enc, _ = mech.encode(x, seed=SEED)
  cfg = secagg.SecAggConfig(num_clients=3, threshold=2, dimension=16, bits=20)
  total, view = secagg.run({u + 1: enc[u].astype(cfg.dtype) for u in range(3)}, cfg)
  np.testing.assert_array_equal(total.astype(np.int64), enc.astype(np.int64).sum(0) % 2**20)
  est = mech.decode(total, rotation_seed=mech.rotation_seed(SEED))
  np.testing.assert_allclose(est, _clipped_sum(x, 1.0), atol=6 * 0.01 * math.sqrt(3 * 4.25))


def test_encoding_interface():
  mech = _small_mechanism()
  enc = dg.DDGaussEncoding(mech)
  assert enc.bits == 16 and enc.encoded_dimension(13) == 16
  assert enc.min_survivors(10) == 2
  assert enc.denominator(2, 3) == enc.denominator(3, 3) == 3.0  # public, not the survivors
  encoded, _ = enc.encode(_updates(), seed=SEED)
  total = encoded.astype(np.uint64).sum(0) % 2**16
  np.testing.assert_array_equal(enc.decode(total, 3, seed=SEED),
                                mech.decode(total, rotation_seed=mech.rotation_seed(SEED)))


def test_epsilon_by_hand():
  # c = 1, gamma = 1, d = d' = 1, beta = e^-2 (sqrt(2 log(1/beta)) = 2), n = 8, sigma^2 = 2.
  # r = min(1 + 1, sqrt(1 + 1/4 + 2 (1 + 1/2))) = min(2, sqrt(4.25)) = 2
  # Delta2 = 2 r = 4, Delta1 = min(sqrt(1) 4, 4^2) = 4
  # tau = 10 sum_{k=1}^{7} exp(-2 pi^2 2 k/(k+1))
  # eps = min(sqrt(16/(8*2) + 4 tau/2), 4/sqrt(16) + 4 tau) = sqrt(1 + 2 tau)
  tau = 10 * sum(math.exp(-4 * math.pi**2 * k / (k + 1)) for k in range(1, 8))
  assert dg.tau(2.0, 8) == pytest.approx(tau, rel=1e-12)
  assert dg.sensitivities(1.0, 1, math.exp(-2)) == pytest.approx((4.0, 4.0))
  eps = math.sqrt(1 + 2 * tau)
  kw = dict(clip=1.0, gamma=1.0, variance=2.0, n_min=8, dimension=1, beta=math.exp(-2))
  curve = dg.rdp_curve(**kw)
  orders = np.asarray(accounting.RDP_ORDERS)
  i = list(orders).index(2.0)
  assert curve[i] == pytest.approx(2 * eps**2 / 2, rel=1e-12)  # RDP(2) = 1 + 2 tau
  # 5 rounds at q = 0.2, participation visible: per round (1/(a-1)) log(0.8 + 0.2 e^{(a-1) rdp})
  # (log-sum-exp form of log(0.8 + 0.2 e^y), y = (a-1) a eps^2/2, which overflows exp)
  per_round = np.logaddexp(math.log(0.8), math.log(0.2) + (orders - 1) * orders * eps**2 / 2
                           ) / (orders - 1)
  total = 5 * per_round
  # conversion (Canonne, Kamath & Steinke 2020, Prop. 12):
  #   eps = min_a rdp(a) + log1p(-1/a) - log(delta a) / (a - 1)
  delta = 1e-5
  by_hand = min(r + math.log1p(-1 / a) - math.log(delta * a) / (a - 1)
                for a, r in zip(orders, total) if a > 1.01)
  assert dg.epsilon(5, 0.2, delta, **kw) == pytest.approx(by_hand, rel=1e-9)


def test_visible_participation_mixture_bounds():
  kw = dict(clip=0.5, gamma=1e-3, variance=250_000.0, n_min=6, dimension=100, beta=0.5)
  full = dg.rdp_curve(**kw)
  np.testing.assert_allclose(accounting.participation_visible_rdp(full, 1.0), full, rtol=1e-12)
  for q in (0.01, 0.1, 0.5):
    mixed = accounting.participation_visible_rdp(full, q)
    assert np.all(mixed < full) and np.all(mixed >= q * full * (1 - 1e-12))
  # no amplification: epsilon falls with q far slower than the hidden-participation q^2 rate
  e1, e01 = dg.epsilon(10, 1.0, 1e-5, **kw), dg.epsilon(10, 0.1, 1e-5, **kw)
  assert e01 < e1 and e01 > 0.3 * e1


def test_create_calibrates_to_target_and_sizes_the_range():
  kw = dict(clip=0.5, dimension=300, n_min=6, expected_clients=10, bits=16)
  mech = dg.DDGauss.create(**kw, target_epsilon=4.0, rounds=10, q=0.1, delta=1e-5)
  assert mech.epsilon(10, 0.1, 1e-5) <= 4.0
  smaller = dg.DDGauss.create(**kw, noise_multiplier=mech.noise_multiplier * 0.99)
  assert smaller.epsilon(10, 0.1, 1e-5) > 4.0
  assert mech.overflow_probability <= 1e-6
  assert mech.overflow_bound(40) > mech.overflow_probability
  assert mech.variance >= Fraction(1)
  line = mech.describe()
  assert "\n" not in line and "replace one client" in line and "gamma=" in line


@pytest.mark.parametrize("change, name", [
    (dict(clip=0.0), "clip"), (dict(clip=-1.0), "clip"), (dict(beta=0.0), "beta"),
    (dict(beta=1.0), "beta"), (dict(n_min=0), "n_min"), (dict(bits=4), "bits"),
    (dict(k=2.0), "overflow"),
])
def test_bad_parameters_raise(change, name):
  kw = dict(clip=0.5, dimension=300, n_min=6, expected_clients=10, bits=16, beta=0.5,
            noise_multiplier=1.0)
  with pytest.raises(ValueError, match=name):
    dg.DDGauss.create(**{**kw, **change})


def test_unreachable_target_names_bits():
  with pytest.raises(ValueError, match="bits=8"):
    dg.DDGauss.create(clip=0.5, dimension=26_000, n_min=6, expected_clients=10, bits=8,
                      target_epsilon=8.0, rounds=10, q=0.1, delta=1e-5)
