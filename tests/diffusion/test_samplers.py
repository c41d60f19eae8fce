"""Samplers against a toy Gaussian data set whose optimal denoiser is known in closed form.

Data x_0 ~ N(mu, s^2 I). With x_t = a x_0 + b eps (a = sqrt(abar), b = sqrt(1 - abar)),
x_t ~ N(a mu, a^2 s^2 + b^2) and the optimal noise prediction is
E[eps | x_t] = b (x_t - a mu) / (a^2 s^2 + b^2). Every sampler driven by it must produce
N(mu, s^2) (up to discretisation), and deterministic DDIM must invert.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import samplers, schedules

MU = jnp.array([1.0, -0.5, 0.0, 0.25])
S = 0.5


def gaussian_eps(alpha_bar_of, mu=MU, s=S):
  """The optimal eps-prediction for N(mu, s^2) data; `alpha_bar_of(t)` maps model time."""
  def denoiser(x, t):
    abar = alpha_bar_of(t).reshape((-1,) + (1,) * (x.ndim - 1))
    a, b = jnp.sqrt(abar), jnp.sqrt(1 - abar)
    return b * (x - a * mu) / (a ** 2 * s ** 2 + b ** 2)
  return denoiser


SCHEDULE = schedules.linear(1000)
DENOISER = gaussian_eps(lambda t: SCHEDULE.alpha_bars[t.astype(jnp.int32)])


def _moments_ok(x, mu=MU, s=S, tol_mean=0.05, tol_std=0.05):
  x = np.asarray(x)
  np.testing.assert_allclose(x.mean(0), mu, atol=tol_mean)
  np.testing.assert_allclose(x.std(0), np.full(mu.shape, s), atol=tol_std)


def test_deterministic_ddim_reproduces_the_gaussian_data_in_50_steps():
  k_noise, k_run = jax.random.split(jax.random.key(0))
  x_T = jax.random.normal(k_noise, (4000, 4))
  x = jax.jit(lambda x, k: samplers.run(samplers.ddim(SCHEDULE, num_steps=50), DENOISER, x, key=k))(x_T, k_run)
  _moments_ok(x)


def test_ddim_with_eta_1_is_ddpm_on_the_same_grid():
  # Also: both use the posterior variance given x0 ('fixed_small'), which underestimates
  # the data's spread on a coarse grid (Bao et al. 2022); the gap closes with more steps.
  x_T = jax.random.normal(jax.random.key(0), (4000, 4))
  stds = []
  for n in (50, 200):
    a = samplers.run(samplers.ddim(SCHEDULE, num_steps=n, eta=1.0), DENOISER, x_T, key=jax.random.key(1))
    b = samplers.run(samplers.ddpm(SCHEDULE, num_steps=n, clip=None), DENOISER, x_T, key=jax.random.key(1))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)
    stds.append(float(np.mean(np.asarray(a).std(0))))
  assert stds[0] < stds[1] < S


def test_full_ddpm_chain_matches_the_marginal_unjitted_step():
  sampler = samplers.ddpm(SCHEDULE, clip=None)
  assert sampler.num_steps == 1000
  x_T = jax.random.normal(jax.random.key(1), (3000, 4))
  x = jax.jit(lambda x: samplers.run(sampler, DENOISER, x, key=jax.random.key(2)))(x_T)
  _moments_ok(x)
  # One step outside jit runs too and reports the x0 estimate.
  state, info = sampler.step(sampler.init(x_T[:5], key=jax.random.key(3)), DENOISER)
  assert info["x0_hat"].shape == (5, 4) and int(state.i) == 1


def test_ddim_eta0_is_deterministic_and_inverts():
  x0 = MU + S * jax.random.normal(jax.random.key(4), (64, 4))
  invert = samplers.ddim_inversion(SCHEDULE, num_steps=50, fixed_point_iterations=8)
  sample = samplers.ddim(SCHEDULE, num_steps=50)
  latent = samplers.run(invert, DENOISER, x0, key=jax.random.key(5))
  # The latent is Gaussian-like noise, far from the input.
  assert float(jnp.mean(jnp.abs(latent - x0))) > 0.3
  a = samplers.run(sample, DENOISER, latent, key=jax.random.key(6))
  b = samplers.run(sample, DENOISER, latent, key=jax.random.key(7))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_allclose(np.asarray(a), np.asarray(x0), atol=1e-3)


def test_plain_ddim_inversion_error_shrinks_with_more_steps():
  x0 = MU + S * jax.random.normal(jax.random.key(8), (64, 4))
  errors = []
  for n in (10, 50):
    latent = samplers.run(samplers.ddim_inversion(SCHEDULE, num_steps=n), DENOISER, x0, key=jax.random.key(0))
    back = samplers.run(samplers.ddim(SCHEDULE, num_steps=n), DENOISER, latent, key=jax.random.key(0))
    errors.append(float(jnp.max(jnp.abs(back - x0))))
  assert errors[1] < errors[0] / 3


@pytest.mark.parametrize("corrector_steps", [0, 1])
def test_vpsde_sampler_matches_the_gaussian_marginal(corrector_steps):
  sde = schedules.VPSDE()
  denoiser = gaussian_eps(lambda t: sde.alpha_bar(t / 999.0))
  sampler = samplers.vpsde(sde, num_steps=500, corrector_steps=corrector_steps)
  x_T = jax.random.normal(jax.random.key(9), (4000, 4))
  x = jax.jit(lambda x: samplers.run(sampler, denoiser, x, key=jax.random.key(10)))(x_T)
  _moments_ok(x)


def test_guidance_pulls_samples_toward_a_targets_low_pass_version():
  # 8x8 "images" with an uninformative prior N(0, 0.5^2); the guidance loss compares the
  # 2x2 average-pooled x0 estimate with the pooled target, differentiated through the
  # denoiser. Guided samples match the target's low-pass version; unguided ones do not;
  # the high frequencies stay free (the prior's spread remains).
  mu = jnp.zeros((8, 8, 1))
  denoiser = gaussian_eps(lambda t: SCHEDULE.alpha_bars[t.astype(jnp.int32)], mu=mu)
  pool = lambda x: x.reshape(x.shape[0], 4, 2, 4, 2, 1).mean((2, 4))  # noqa: E731
  target = jnp.broadcast_to(jnp.linspace(-0.8, 0.8, 8)[None, :, None], (8, 8, 1))[None]
  guidance = samplers.Guidance(loss=lambda x0, t: jnp.sum((pool(x0) - pool(target)) ** 2, (1, 2, 3)),
                               scale=lambda abar: 0.5 * abar)
  sampler = samplers.ddim(SCHEDULE, num_steps=50)
  x_T = jax.random.normal(jax.random.key(11), (64, 8, 8, 1))
  guided, infos = samplers.run(sampler, denoiser, x_T, key=jax.random.key(12), guidance=guidance,
                               trajectory=True)
  free = samplers.run(sampler, denoiser, x_T, key=jax.random.key(12))
  err = lambda x: float(jnp.mean((pool(x) - pool(target)) ** 2))  # noqa: E731
  assert err(guided) < 0.05 * err(free)
  assert infos["guidance_loss"].shape == (50, 64)
  assert float(infos["guidance_loss"][-1].mean()) < float(infos["guidance_loss"][0].mean())
  residual = guided - jnp.repeat(jnp.repeat(pool(guided), 2, 1), 2, 2)
  assert float(jnp.std(residual)) > 0.2


def test_leading_timesteps_follow_diffusers():
  np.testing.assert_array_equal(samplers.leading_timesteps(1000, 4), [750, 500, 250, 0])
  with pytest.raises(ValueError, match="num_steps"):
    samplers.leading_timesteps(10, 20)


def test_every_sampler_runs_a_unet_prior_with_guidance_through_the_denoiser():
  from diffusion import prior as prior_lib
  from diffusion import unet
  micro = unet.UNetConfig(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8,),
                          down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
                          layers_per_block=1, norm_num_groups=4, attention_head_dim=8, num_class_embeds=11)
  prior = prior_lib.Prior(unet_config=micro, params=unet.init(micro, key=jax.random.key(0)),
                          schedule=schedules.linear(1000), num_classes=10)
  denoiser = prior.denoiser(jnp.array([1, 2]), guidance_weight=1.0)
  x_T = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  guidance = samplers.Guidance(loss=lambda x0, t: jnp.sum(x0 ** 2, (1, 2, 3)), scale=lambda abar: 0.1 * abar)
  ddim = samplers.ddim(prior.schedule, num_steps=3)
  free = samplers.run(ddim, denoiser, x_T, key=jax.random.key(2))
  guided = samplers.run(ddim, denoiser, x_T, key=jax.random.key(2), guidance=guidance)
  assert float(jnp.sum(guided ** 2)) < float(jnp.sum(free ** 2))
  for sampler in (samplers.ddpm(prior.schedule, num_steps=2),
                  samplers.vpsde(schedules.VPSDE(), num_steps=2, corrector_steps=1)):
    guided = samplers.run(sampler, denoiser, x_T, key=jax.random.key(2), guidance=guidance)
    assert guided.shape == x_T.shape and bool(jnp.all(jnp.isfinite(guided)))
  with pytest.raises(ValueError, match="no guidance"):
    samplers.run(samplers.ddim_inversion(prior.schedule, num_steps=2), denoiser, x_T,
                 key=jax.random.key(0), guidance=guidance)
