"""Forward-diffusion noise: the noise it adds, the clipping, and its exact accounting."""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import dp_event
from scipy import stats

from privacy import accounting, federated as pfed, forward_noise as fn
from privacy.noise import tree_gaussian

C = 0.5
D = 6000


def _update(key, scale=3.0):
  k1, k2 = jax.random.split(key)
  return {"w": scale * jax.random.normal(k1, (D - 40,)), "b": scale * jax.random.normal(k2, (40,))}


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _clipped(update, c=C):
  return jax.tree.map(lambda u: u * min(1.0, c / np.linalg.norm(_flat(update))), update)


def test_noise_has_the_schedules_scale_and_nothing_else():
  z = 0.7
  mech = fn.ForwardNoise(clip_norm=C, schedule=fn.constant(z, 3), rescale=False)
  u = _update(jax.random.key(0))
  y = mech.defense()(u, jax.random.key(1), 2)
  abar = fn.alpha_bar_of(z)
  e = (_flat(y) - math.sqrt(abar) * _flat(_clipped(u))) / (math.sqrt(1 - abar) * C)
  assert stats.kstest(e, "norm").pvalue > 1e-3
  for wrong in (2 / 3, 3 / 2):
    assert stats.kstest(e / wrong, "norm").pvalue < 1e-6
  assert abs(e.mean()) < 4 / math.sqrt(D)


def test_keys_give_independent_noise_across_clients_and_rounds():
  mech = fn.ForwardNoise(clip_norm=C, schedule=fn.constant(1.0, 4))
  zero = jax.tree.map(jnp.zeros_like, _update(jax.random.key(0)))
  run = jax.random.key(7)
  noise = {(r, i): _flat(mech.defense()(zero, jax.random.fold_in(jax.random.fold_in(run, r), i), r))
           for r in range(2) for i in range(2)}
  for a, b in [((0, 0), (0, 1)), ((0, 0), (1, 0)), ((1, 1), (0, 1))]:
    assert abs(np.corrcoef(noise[a], noise[b])[0, 1]) < 4 / math.sqrt(D)


def test_the_clipped_part_has_norm_at_most_c_and_non_finite_updates_are_zeroed():
  mech = fn.ForwardNoise(clip_norm=C, schedule=fn.constant(0.5, 1))
  key = jax.random.key(3)
  u = _update(jax.random.key(2))
  xi = _flat(tree_gaussian(u, 1.0, key=key))
  signal = _flat(mech.defense()(u, key, 0)) - 0.5 * C * xi
  assert np.linalg.norm(signal) <= C * (1 + 1e-5)
  bad = jax.tree.map(lambda a: a.at[0].set(jnp.nan), u)
  signal = _flat(mech.defense()(bad, key, 0)) - 0.5 * C * xi
  np.testing.assert_allclose(signal, 0.0, atol=1e-5)


def test_rescaled_release_equals_dp_fedavgs_local_noise_for_the_same_key():
  z = 1.3
  u, key = _update(jax.random.key(4)), jax.random.key(5)
  y = fn.ForwardNoise(clip_norm=C, schedule=fn.constant(z, 1), rescale=False).defense()(u, key, 0)
  local = pfed.local_dp(clip_norm=C, noise_multiplier=z)(u, key)
  np.testing.assert_allclose(_flat(y) / math.sqrt(fn.alpha_bar_of(z)), _flat(local), rtol=1e-4,
                             atol=1e-5)


def test_round_index_picks_the_rounds_z():
  sched = fn.staircase([0.5, 4.0], 4)
  mech = fn.ForwardNoise(clip_norm=C, schedule=sched)
  zero = jax.tree.map(jnp.zeros_like, _update(jax.random.key(0)))
  step = jax.jit(mech.defense())
  stds = [np.std(_flat(step(zero, jax.random.key(r), r))) / C for r in range(4)]
  np.testing.assert_allclose(stds, [0.5, 0.5, 4.0, 4.0], rtol=0.05)


def test_per_layer_and_coordinate_scalings_and_their_events():
  u = _update(jax.random.key(6))
  shared = fn.ForwardNoise(clip_norm=C, schedule=fn.constant(2.0, 1), scaling="per_layer")
  prop = fn.ForwardNoise(clip_norm=C, schedule=fn.constant(2.0, 1), scaling="per_layer",
                         layer_noise="proportional")
  assert shared.dp_event(0, layers=2).noise_multiplier == 2.0
  assert prop.dp_event(0, layers=2).noise_multiplier == pytest.approx(2.0 / math.sqrt(2))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", fn.ScheduleWarning)
    tiny = fn.ForwardNoise(clip_norm=C, schedule=fn.constant(1e-6, 1), scaling="per_layer")
  out = tiny.defense()(u, jax.random.key(0), 0)
  for leaf in jax.tree.leaves(out):
    assert np.linalg.norm(leaf) <= C / math.sqrt(2) * (1 + 1e-4)
  scale = fn.public_scale({"w": jnp.full((D - 40,), 0.1), "b": jnp.zeros((40,))})
  assert np.mean(_flat(scale) ** 2) == pytest.approx(1.0, rel=1e-5)
  coord = fn.ForwardNoise(clip_norm=C, schedule=fn.constant(1.0, 1), scaling="coordinate",
                          coordinate_scale=scale)
  y = coord.defense()(jax.tree.map(jnp.zeros_like, u), jax.random.key(1), 0)
  assert np.std(np.asarray(y["w"])) == pytest.approx(C * float(scale["w"][0]), rel=0.05)


def test_norm_relative_and_unclipped_noise_declare_no_guarantee():
  norm = fn.ForwardNoise(clip_norm=None, schedule=fn.constant(1.0, 2), scaling="norm")
  unclipped = fn.ForwardNoise(clip_norm=None, schedule=fn.constant(1.0, 2))
  for mech in (norm, unclipped):
    assert not mech.private and mech.sensitivity is None
    assert accounting.epsilon(mech.dp_event(0, 0.1), 1e-5) == math.inf
  acc = fn.ScheduleAccountant(norm.event_z(), q=0.1, delta=1e-5, private=False)
  assert acc.epsilons(2)["epsilon"] == math.inf


def test_grouped_and_per_round_accounting_agree_and_order_does_not_matter():
  sched = fn.staircase([1.0, 2.0, 4.0], 9)
  running = accounting.Accountant("pld", "replace_one", 1e-5)
  for z in sched.z:
    running.compose(fn.round_event(z, 0.1))
  grouped = fn.schedule_epsilon(sched.z, 1e-5, q=0.1)
  assert running.epsilon() == pytest.approx(grouped, rel=1e-6)
  assert fn.schedule_epsilon(sched.reversed().z, 1e-5, q=0.1) == pytest.approx(grouped, rel=1e-9)


def test_pld_at_q1_matches_the_gaussian_dp_closed_form():
  sched = fn.staircase([1.0, 2.0, 4.0], 9)
  closed = fn.gdp_epsilon(fn.gdp_mu(sched.z, "replace_one"), 1e-5)
  assert fn.schedule_epsilon(sched.z, 1e-5) == pytest.approx(closed, rel=1e-4)
  # the same Gaussians under add/remove (a central mechanism's relation): mu halves
  add_remove = accounting.epsilon(fn.schedule_event(sched.z), 1e-5, neighbouring="add_remove")
  assert add_remove == pytest.approx(fn.gdp_epsilon(fn.gdp_mu(sched.z), 1e-5), rel=1e-4)


def test_local_noise_is_refused_under_add_remove():
  with pytest.raises(ValueError, match="no add/remove guarantee"):
    fn.schedule_epsilon([1.0] * 3, 1e-5, q=0.1, neighbouring="add_remove")


def test_replace_one_at_z_equals_add_remove_at_half_z():
  a = fn.schedule_epsilon([1.5] * 10, 1e-5)
  b = accounting.epsilon(fn.schedule_event([0.75] * 10), 1e-5, neighbouring="add_remove")
  assert a == pytest.approx(b, rel=1e-6)


def _binomial_mixture_delta(eps, z, rounds, q):
  """sum_k Bin(T, q)(k) delta_GDP(eps; 2 sqrt(k) / z), written out term by term with
  math.comb and the GDP formula (an independent computation of the visible mixture)."""
  total = 0.0
  for k in range(1, rounds + 1):
    mu = 2 * math.sqrt(k) / z
    d = (stats.norm.cdf(-eps / mu + mu / 2)
         - math.exp(eps + stats.norm.logcdf(-eps / mu - mu / 2)))
    total += math.comb(rounds, k) * q ** k * (1 - q) ** (rounds - k) * d
  return total


@pytest.mark.parametrize("z,rounds,q", [(0.3, 10, 0.1), (1.0, 20, 0.2), (2.0, 50, 0.05)])
def test_visible_participation_pld_matches_the_binomial_gdp_mixture(z, rounds, q):
  pld = fn.schedule_epsilon([z] * rounds, 1e-5, q=q, discretization=1e-3)
  closed = fn.visible_gdp_epsilon([z] * rounds, q, 1e-5)
  assert pld == pytest.approx(closed, rel=0.01)
  # and the closed form is the independent sum at its epsilon
  assert _binomial_mixture_delta(closed, z, rounds, q) == pytest.approx(1e-5, rel=1e-3)


def test_the_issues_forward_cell_value_and_no_amplification_of_epsilon():
  # the study's forward cell (z = 0.3, q = 0.1, 10 rounds): about 160, not the 36.6 that
  # crediting Poisson amplification gave
  eps = fn.schedule_epsilon([0.3] * 10, 1e-5, q=0.1)
  assert eps == pytest.approx(160.4, abs=0.5)
  poisson = accounting.epsilon(accounting.compose(
      [(dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(0.3)), 10)]), 1e-5,
      neighbouring="replace_one", discretization=0.05)
  assert poisson < 40 < eps
  # sampling lowers delta at a given epsilon, never below the single participation's
  assert fn.schedule_epsilon([1.0] * 10, 1e-5, q=0.5) < fn.schedule_epsilon([1.0] * 10, 1e-5)
  assert fn.schedule_epsilon([1.0] * 10, 1e-5, q=0.5) > fn.schedule_epsilon([1.0], 1e-5)


def test_heterogeneous_schedules_agree_between_pld_and_the_closed_form():
  z = fn.staircase([0.8, 1.6, 3.2], 12).z
  pld = fn.schedule_epsilon(z, 1e-5, q=0.3, discretization=1e-3)
  assert pld == pytest.approx(fn.visible_gdp_epsilon(z, 0.3, 1e-5), rel=0.01)


def test_topup_event_is_the_poisson_subsampled_gaussian_and_hides_participation():
  # the top-up is accounted as DP-FedAvg's round at z_T (privacy.train)
  from fljax.federated import FedConfig
  e, relation = pfed.dp_fedavg_event(FedConfig(clients_per_round=0.1, sampling="poisson"), 50, 1.5)
  assert relation == "add_remove"
  assert e == dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(1.5))
  assert accounting.epsilon(accounting.compose([(e, 10)]), 1e-5) == pytest.approx(
      accounting.dpsgd_epsilon(0.1, 1.5, 10, 1e-5, accountant="pld"), rel=1e-9)
  fn.check_topup(1.5, [0.5], 9)
  with pytest.raises(ValueError, match="below sqrt"):
    fn.check_topup(1.4, [0.5], 9)
  # the released noise has variance z_T^2 C^2 whatever the number of clients that took part
  agg = fn.topup_aggregator([0.5], 1.5, 2.0, 4.0)
  for m in (1, 5, 9):
    updates = {"w": jnp.zeros((9, 20_000))}
    weights = (jnp.arange(9) < m).astype(jnp.float32)
    own = 0.5 * 2.0 * jax.random.normal(jax.random.key(m), (9, 20_000)) * weights[:, None]
    out, _, _ = agg.update({"w": updates["w"] + own}, weights, agg.init(None), jax.random.key(9 + m))
    assert float(jnp.std(out["w"] * 4.0)) == pytest.approx(1.5 * 2.0, rel=0.02)


def test_diffusion_alpha_bars_match_the_diffusion_library():
  from diffusion import schedules
  for kind in fn.DIFFUSION_KINDS:
    ours = fn.alpha_bars(kind, 1000)
    theirs = np.asarray(getattr(schedules, kind)(1000).alpha_bars, np.float64)
    np.testing.assert_allclose(ours, theirs, rtol=2e-5, atol=1e-7)


def test_calibration_meets_the_target_and_is_tight():
  shape = fn.staircase([3.0, 1.0], 20)
  cal = fn.calibrate(shape, 8.0, 1e-5, q=0.2)
  eps = fn.schedule_epsilon(cal.z, 1e-5, q=0.2)
  assert eps <= 8.0 and eps > 7.9
  np.testing.assert_allclose(cal.z / cal.z.min(), shape.z / shape.z.min())


def test_schedule_accountant_reports_three_threat_models():
  z = fn.constant(2.0, 10).z
  acc = fn.ScheduleAccountant(z, q=0.5, delta=1e-5, participations=np.minimum(np.arange(11), 6),
                              record_epsilon=lambda r: 0.1 * r, pld_every=5)
  out = acc.epsilons(10)
  assert out["epsilon"] == pytest.approx(fn.visible_gdp_epsilon(z, 0.5, 1e-5), rel=1e-9)
  assert out["epsilon"] == pytest.approx(fn.schedule_epsilon(z, 1e-5, q=0.5), rel=1e-4)
  # the server's view (q = 1) is exactly mu-GDP: closed form, which PLD approaches
  assert out["epsilon_server"] == pytest.approx(fn.gdp_epsilon(fn.gdp_mu(z[:6], "replace_one"),
                                                               1e-5), rel=1e-9)
  assert out["epsilon_server"] == pytest.approx(fn.schedule_epsilon(z[:6], 1e-5), rel=1e-4)
  assert out["epsilon_record"] == pytest.approx(1.0)
  assert acc.epsilons(0)["epsilon"] == 0.0
  assert out["pld_grid"] == 0.0  # closed form
  # 2^20 participation patterns: PLD, coarse between the pld_every rounds
  many = fn.ScheduleAccountant(np.linspace(2.0, 3.0, 20), q=0.5, delta=1e-5, pld_every=5)
  assert many.epsilons(18)["pld_grid"] == 1e-2 and many.epsilons(20)["pld_grid"] == 1e-3


def test_data_level_noising_accounting():
  data = fn.DataForwardNoise.at("linear", 750)
  eps = data.epsilons(28 * 28, 1e-5)
  assert eps["epsilon_image"] == pytest.approx(18.5, rel=0.05)  # research note, section 2(d)
  assert eps["epsilon_pixel"] == pytest.approx(0.40, abs=0.02)
  twice = fn.DataForwardNoise(z=data.z, releases=2)
  closed = fn.gdp_epsilon(math.sqrt(2) * 2 * 28 / data.z, 1e-5)
  assert accounting.epsilon(twice.image_event(28 * 28), 1e-5) == pytest.approx(closed, rel=1e-3)
  x = jnp.full((2, 4, 4, 1), 2.0)  # out of range: clipped to 1 before noising
  out = fn.DataForwardNoise(z=1e-3).apply(x, key=jax.random.key(0))
  np.testing.assert_allclose(np.asarray(out), 1.0, atol=1e-2)


@pytest.mark.parametrize("make, message", [
    (lambda: fn.ForwardNoise(clip_norm=0.0, schedule=fn.constant(1.0, 2)), "clip norm"),
    (lambda: fn.constant(0.0, 3), "must be > 0"),
    (lambda: fn.constant(-1.0, 3), "must be > 0"),
    (lambda: fn.round_event(1.0, 1.5), "sampling rate"),
    (lambda: fn.round_event(1.0, 0.0), "sampling rate"),
    (lambda: fn.schedule_epsilon([1.0], 1.0), "delta"),
    (lambda: fn.constant(1.0, 3).check_rounds(4), "3 rounds but the run has 4"),
    (lambda: fn.from_diffusion("linear", 0, 10, 5), "integer in \\[1, 1000\\]"),
    (lambda: fn.from_diffusion("linear", 10, 1001, 5), "integer in \\[1, 1000\\]"),
    (lambda: fn.from_diffusion("sigmoid", 10, 100, 5), "must be one of"),
    (lambda: fn.ForwardNoise(clip_norm=1.0, schedule=fn.constant(1.0, 2), scaling="x"), "scaling"),
])
def test_bad_input_is_rejected_with_one_clear_message(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_weak_schedules_warn():
  with pytest.warns(fn.ScheduleWarning, match="no meaningful DP"):
    fn.constant(0.1, 3)
