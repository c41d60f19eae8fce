"""Tests of diffusion/schedules.py: schedule shapes and known values, q_sample's marginal
(KS test), parameterisation round trips, the VP-SDE's marginal and its discretisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffusion import schedules as sch


def test_linear_and_cosine_known_values():
  lin = sch.linear(1000)
  np.testing.assert_allclose([lin.betas[0], lin.betas[-1]], [1e-4, 0.02], rtol=1e-6)
  np.testing.assert_allclose(lin.alpha_bars[0], 1 - 1e-4, rtol=1e-7)
  # DDPM's linear schedule ends at alpha_bar_T ~ 4.0e-5 (signal-to-noise ratio ~ 0)
  assert 3e-5 < float(lin.alpha_bars[-1]) < 5e-5
  cos = sch.cosine(1000)
  abar = np.asarray(cos.alpha_bars, np.float64)
  assert np.all(np.diff(abar) < 0) and float(cos.betas.max()) <= np.float32(0.999)
  f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
  np.testing.assert_allclose(abar[499], f(0.5) / f(0.0), rtol=1e-5)  # before the beta cap
  sl = sch.scaled_linear(10, 0.01, 0.04)
  np.testing.assert_allclose(np.sqrt(sl.betas), np.linspace(0.1, 0.2, 10), rtol=1e-6)
  assert set(sch.SCHEDULES) == {"linear", "scaled_linear", "cosine"}


@pytest.mark.parametrize("jit", [False, True])
def test_q_sample_has_the_right_marginal(jit):
  schedule = sch.linear(1000)
  t = 300
  x0 = jnp.full((4000,), 0.7)
  fn = jax.jit(sch.q_sample) if jit else sch.q_sample
  x = np.asarray(fn(schedule, x0, jnp.full((4000,), t), jax.random.normal(jax.random.key(0), (4000,))))
  abar = float(schedule.alpha_bars[t])
  mean, std = np.sqrt(abar) * 0.7, np.sqrt(1 - abar)
  assert stats.kstest(x, "norm", args=(mean, std)).pvalue > 1e-3
  assert stats.kstest(x, "norm", args=(mean, std * 2 / 3)).pvalue < 1e-3
  assert stats.kstest(x, "norm", args=(mean, std * 3 / 2)).pvalue < 1e-3


def test_q_sample_broadcasts_per_example_steps():
  schedule = sch.cosine(50)
  x0 = jnp.ones((3, 4, 4, 1))
  out = sch.q_sample(schedule, x0, jnp.array([0, 10, 49]), jnp.zeros_like(x0))
  np.testing.assert_allclose(out[:, 0, 0, 0], jnp.sqrt(schedule.alpha_bars[jnp.array([0, 10, 49])]),
                             rtol=1e-6)


def test_parameterisation_conversions_round_trip():
  k1, k2 = jax.random.split(jax.random.key(0))
  x0 = jax.random.normal(k1, (3, 5))
  eps = jax.random.normal(k2, (3, 5))
  abar = jnp.array([0.9, 0.5, 0.01])
  x_t = jnp.sqrt(abar)[:, None] * x0 + jnp.sqrt(1 - abar)[:, None] * eps
  truth = {"epsilon": eps, "x0": x0,
           "v": jnp.sqrt(abar)[:, None] * eps - jnp.sqrt(1 - abar)[:, None] * x0}
  for source in sch.PARAMETERISATIONS:
    for target in sch.PARAMETERISATIONS:
      out = sch.convert(truth[source], x_t, abar, source=source, target=target)
      np.testing.assert_allclose(out, truth[target], rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="parameterisation"):
    sch.convert(eps, x_t, abar, source="score", target="x0")


def test_vp_sde_marginal_and_its_ddpm_discretisation():
  sde = sch.VPSDE()
  # m(t) solves dm/dt = -beta(t) m / 2 with m(0) = 1: compare with numerical integration
  ts = np.linspace(0, 1, 100001)
  beta = sde.beta_min + ts * (sde.beta_max - sde.beta_min)
  log_m = -0.5 * np.concatenate([[0.0], np.cumsum((beta[1:] + beta[:-1]) / 2 * np.diff(ts))])
  np.testing.assert_allclose(np.asarray(sde.mean_coeff(jnp.asarray(ts[::5000]))),
                             np.exp(log_m[::5000]), rtol=1e-4, atol=1e-7)
  # The linear DDPM schedule with betas beta_min/N .. beta_max/N discretises the SDE.
  disc = sde.discretise(1000)
  t = (np.arange(1000) + 1) / 1000
  np.testing.assert_allclose(np.asarray(disc.alpha_bars), np.asarray(sde.alpha_bar(jnp.asarray(t))),
                             rtol=0.05, atol=1e-4)
  mean, std = sde.marginal(jnp.ones((2, 3)), jnp.array([0.0, 1.0]))
  np.testing.assert_allclose(mean[:, 0], [1.0, float(sde.mean_coeff(1.0))], rtol=1e-6)
  np.testing.assert_allclose(std[:, 0], [0.0, np.sqrt(1 - float(sde.alpha_bar(1.0)))], atol=1e-6)
  drift, diffusion = sde.sde(jnp.ones((1, 2)), jnp.array([0.5]))
  np.testing.assert_allclose(drift, -0.5 * float(sde.beta(0.5)), rtol=1e-6)
  np.testing.assert_allclose(diffusion[0, 0], np.sqrt(float(sde.beta(0.5))), rtol=1e-6)


def test_noise_to_is_a_gaussian_mechanism_with_the_stated_multiplier():
  abar = 0.2
  x = jnp.full((20000,), 0.5)
  y = np.asarray(sch.noise_to(x, abar, key=jax.random.key(1))) / np.sqrt(abar)  # rescaled
  z = float(sch.noise_multiplier(abar))
  np.testing.assert_allclose(z, 2.0, rtol=1e-6)  # sqrt(0.8 / 0.2)
  assert stats.kstest(y, "norm", args=(0.5, z)).pvalue > 1e-3
  assert stats.kstest(y, "norm", args=(0.5, z * 2 / 3)).pvalue < 1e-3
  with pytest.raises(ValueError, match="alpha_bar"):
    sch.noise_to(x, 0.0, key=jax.random.key(1))


def test_host_alpha_bars_are_the_schedules_in_float64():
  for name in sch.SCHEDULES:
    host = sch.alpha_bars(name, 100)
    assert host.dtype == np.float64
    np.testing.assert_array_equal(host.astype(np.float32), sch.SCHEDULES[name](100).alpha_bars)
  z = sch.noise_multiplier(host)  # NumPy in, float64 NumPy out
  assert z.dtype == np.float64 and isinstance(z, np.ndarray)
  np.testing.assert_allclose(sch.alpha_bar_of(z), host, rtol=1e-12)
  with pytest.raises(ValueError, match="unknown schedule"):
    sch.alpha_bars("sigmoid")


def test_bad_schedules_are_refused():
  with pytest.raises(ValueError, match="at least one step"):
    sch.linear(0)
  with pytest.raises(ValueError, match="in \\(0, 1\\)"):
    sch.from_betas([0.1, 1.0])
  with pytest.raises(ValueError, match="beta_min < beta_max"):
    sch.VPSDE(beta_min=1.0, beta_max=0.5)


def test_diffusers_scheduler_configs_are_read():
  # google/ddpm-cifar10-32's scheduler_config.json (DDPMScheduler)
  ddpm = {"_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "linear",
          "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000,
          "trained_betas": None, "variance_type": "fixed_large"}
  schedule, kind = sch.from_diffusers_config(ddpm)
  np.testing.assert_array_equal(schedule.betas, sch.linear(1000).betas)
  assert kind == "epsilon"
  cos, kind = sch.from_diffusers_config({"beta_schedule": "squaredcos_cap_v2",
                                         "num_train_timesteps": 50, "prediction_type": "v_prediction"})
  np.testing.assert_array_equal(cos.betas, sch.cosine(50).betas)
  assert kind == "v"
  given, kind = sch.from_diffusers_config({"trained_betas": [0.1, 0.2], "prediction_type": "sample"})
  np.testing.assert_allclose(given.alpha_bars, [0.9, 0.72], rtol=1e-6)
  assert kind == "x0"
  with pytest.raises(ValueError, match="'sigmoid'"):
    sch.from_diffusers_config({"beta_schedule": "sigmoid"})
  with pytest.raises(ValueError, match="'flow'"):
    sch.from_diffusers_config({"prediction_type": "flow"})
