"""Samplers as init/step pairs: DDPM ancestral sampling (Ho et al., NeurIPS 2020), DDIM
(Song, Meng & Ermon, ICLR 2021) and its inversion, and the VP-SDE's Euler-Maruyama and
predictor-corrector samplers (Song et al., ICLR 2021), each with a guidance hook
(diffusion posterior sampling, Chung et al., ICLR 2023).

A denoiser is `denoiser(x_t, t) -> prediction` with `x_t [B, ...]`, `t [B]` in the model's
timestep units (0 .. T-1 for a discrete schedule) and the prediction of kind
`prediction` ('epsilon', 'x0' or 'v'). A `Sampler` is a pair of pure functions

    state = sampler.init(x_T, key=key)        # x_T: the starting noise (or image to invert)
    state, info = sampler.step(state, denoiser, guidance)

`sampler.num_steps` steps take x_T to the final sample `state.x`; `run` scans them in one
compiled loop. `info` holds the step's x0 estimate `x0_hat` and, with guidance, the
guidance loss per image.

Guidance: `Guidance(loss, scale)` with `loss(x0_hat, t) -> [B]`. Each step differentiates
`sum(loss(x0_hat(x_t), t))` with respect to x_t *through the denoiser* and subtracts
`scale * gradient` from the step's result (DPS's update x'_{t-1} - zeta grad_{x_t} L).
`scale` is a number or a function of the step's alpha_bar_t. Variants: `jacobian=False`
skips the denoiser's Jacobian (grad_{x_t} ~ grad_{x0_hat} / sqrt(abar_t), exact as t -> 0);
`on='x_t'` evaluates the loss on the noisy iterate itself (classifier guidance on x_t, as
GGDM's original); `clip` clips the gradient elementwise before it is scaled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import schedules
from diffusion.schedules import Schedule, VPSDE

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Guidance:
  """A loss of the x0 estimate that steers sampling; see the module docstring.

  Attributes:
    loss: `loss(x0_hat [B, ...], t [B]) -> [B]`.
    scale: the step size zeta, or `scale(alpha_bar_t) -> zeta`.
  """

  loss: Callable[[jax.Array, jax.Array], jax.Array]
  scale: float | Callable[[jax.Array], jax.Array] = 1.0
  jacobian: bool = True
  on: str = "x0_hat"
  clip: float | None = None

  def __post_init__(self):
    if self.on not in ("x0_hat", "x_t"):
      raise ValueError(f"Guidance.on must be 'x0_hat' or 'x_t', got {self.on!r}")
    if self.clip is not None and self.clip <= 0:
      raise ValueError(f"Guidance.clip must be positive, got {self.clip}")

  def zeta(self, alpha_bar: jax.Array) -> jax.Array:
    return self.scale(alpha_bar) if callable(self.scale) else jnp.asarray(self.scale)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplerState:
  """`x`: the current iterate `[B, ...]`; `i`: steps taken; `key`: for the next step's noise."""

  x: jax.Array
  i: jax.Array
  key: jax.Array


class Sampler(NamedTuple):
  init: Callable[..., SamplerState]
  step: Callable[..., tuple[SamplerState, dict[str, jax.Array]]]
  num_steps: int


def _estimate(denoiser: Denoiser, x: jax.Array, t: jax.Array, alpha_bar: jax.Array,
              prediction: str, clip: float | None, guidance: Guidance | None):
  """(eps_hat, x0_hat, guidance gradient or None, guidance loss or None) at x_t."""

  def predict(x):
    out = denoiser(x, t)
    x0 = schedules.convert(out, x, alpha_bar, source=prediction, target="x0")
    eps = schedules.convert(out, x, alpha_bar, source=prediction, target="epsilon")
    return eps, x0

  def summed(z):
    loss = guidance.loss(z, t)
    return jnp.sum(loss), loss

  if guidance is None:
    eps, x0 = predict(x)
    grad = loss = None
  elif guidance.on == "x_t":
    eps, x0 = predict(x)
    grad, loss = jax.grad(summed, has_aux=True)(x)
  elif not guidance.jacobian:
    eps, x0 = predict(x)
    grad, loss = jax.grad(summed, has_aux=True)(x0)
    grad = grad / jnp.sqrt(alpha_bar)
  else:
    def total(x):
      eps, x0 = predict(x)
      s, loss = summed(x0)
      return s, (eps, x0, loss)
    grad, (eps, x0, loss) = jax.grad(total, has_aux=True)(x)
  if guidance is not None and guidance.clip is not None:
    grad = jnp.clip(grad, -guidance.clip, guidance.clip)
  if clip is not None:
    # diffusers' clip_sample: the x0 estimate is clipped; eps stays the model's.
    x0 = jnp.clip(x0, -clip, clip)
  return eps, x0, grad, loss


def _apply_guidance(x_next, grad, loss, guidance, alpha_bar, info):
  if guidance is None:
    return x_next, info
  return x_next - guidance.zeta(alpha_bar) * grad, {**info, "guidance_loss": loss}


def leading_timesteps(num_train_steps: int, num_steps: int, offset: int = 0) -> np.ndarray:
  """diffusers' 'leading' spacing, descending: (num_steps - 1 .. 0) * (T // num_steps) + offset."""
  if not 1 <= num_steps <= num_train_steps:
    raise ValueError(f"num_steps must be in [1, {num_train_steps}] for a {num_train_steps}-step "
                     f"schedule, got {num_steps}")
  return (np.arange(num_steps)[::-1] * (num_train_steps // num_steps) + offset).astype(np.int32)


def _init(x: jax.Array, *, key: jax.Array) -> SamplerState:
  return SamplerState(x=jnp.asarray(x), i=jnp.zeros((), jnp.int32), key=key)


def _lookup(schedule: Schedule, timesteps: np.ndarray, prev: np.ndarray, final_alpha_bar: float):
  ts = jnp.asarray(timesteps)
  abar = schedule.alpha_bars[ts]
  abar_prev = jnp.where(jnp.asarray(prev) >= 0, schedule.alpha_bars[jnp.maximum(jnp.asarray(prev), 0)],
                        final_alpha_bar)
  return ts, abar, abar_prev


def ddpm(schedule: Schedule, *, num_steps: int | None = None, prediction: str = "epsilon",
         clip: float | None = 1.0) -> Sampler:
  """DDPM ancestral sampling (diffusers' DDPMScheduler with variance 'fixed_small').

  With `num_steps < T` the steps are spaced as diffusers' 'leading' spacing and each uses
  the effective beta 1 - abar_t / abar_prev. `clip` clips the x0 estimate (None: no clip).
  """
  timesteps = leading_timesteps(schedule.num_steps, num_steps or schedule.num_steps)
  ratio = schedule.num_steps // len(timesteps)
  ts, abars, abars_prev = _lookup(schedule, timesteps, timesteps - ratio, 1.0)

  def step(state: SamplerState, denoiser: Denoiser, guidance: Guidance | None = None):
    t, abar, abar_prev = ts[state.i], abars[state.i], abars_prev[state.i]
    batch = state.x.shape[0]
    eps, x0, grad, loss = _estimate(denoiser, state.x, jnp.full((batch,), t), abar, prediction,
                                    clip, guidance)
    beta = 1.0 - abar / abar_prev
    mean = (jnp.sqrt(abar_prev) * beta / (1 - abar)) * x0 + (
        jnp.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar)) * state.x
    variance = jnp.maximum((1 - abar_prev) / (1 - abar) * beta, 1e-20)
    key, k_noise = jax.random.split(state.key)
    noise = jax.random.normal(k_noise, state.x.shape, state.x.dtype)
    x_next = mean + jnp.where(t > 0, jnp.sqrt(variance), 0.0) * noise
    x_next, info = _apply_guidance(x_next, grad, loss, guidance, abar, {"x0_hat": x0})
    return SamplerState(x=x_next, i=state.i + 1, key=key), info

  return Sampler(_init, step, len(timesteps))


def ddim(schedule: Schedule, *, num_steps: int = 50, eta: float = 0.0, prediction: str = "epsilon",
         clip: float | None = None, set_alpha_to_one: bool = True) -> Sampler:
  """DDIM with `num_steps` 'leading'-spaced steps and stochasticity `eta` (0: deterministic).

  x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z with
  sigma = eta sqrt((1 - abar_prev) / (1 - abar) (1 - abar / abar_prev)). After the last
  step abar_prev = 1 (`set_alpha_to_one`, diffusers' default) or abar_0.
  """
  timesteps = leading_timesteps(schedule.num_steps, num_steps)
  ratio = schedule.num_steps // num_steps
  final = 1.0 if set_alpha_to_one else schedule.alpha_bars[0]
  ts, abars, abars_prev = _lookup(schedule, timesteps, timesteps - ratio, final)

  def step(state: SamplerState, denoiser: Denoiser, guidance: Guidance | None = None):
    t, abar, abar_prev = ts[state.i], abars[state.i], abars_prev[state.i]
    batch = state.x.shape[0]
    eps, x0, grad, loss = _estimate(denoiser, state.x, jnp.full((batch,), t), abar, prediction,
                                    clip, guidance)
    sigma = eta * jnp.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
    key, k_noise = jax.random.split(state.key)
    x_next = jnp.sqrt(abar_prev) * x0 + jnp.sqrt(jnp.maximum(1 - abar_prev - sigma ** 2, 0.0)) * eps
    if eta:
      x_next = x_next + sigma * jax.random.normal(k_noise, state.x.shape, state.x.dtype)
    x_next, info = _apply_guidance(x_next, grad, loss, guidance, abar, {"x0_hat": x0})
    return SamplerState(x=x_next, i=state.i + 1, key=key), info

  return Sampler(_init, step, num_steps)


def ddim_inversion(schedule: Schedule, *, num_steps: int = 50, prediction: str = "epsilon",
                   fixed_point_iterations: int = 0) -> Sampler:
  """Deterministic DDIM run forward: from an image x_0 to the latent x_T that `ddim(...,
  eta=0)` with the same `num_steps` maps back to it.

  Each step goes from grid timestep t - T / num_steps (x_0 for the first) to t:
  x_next = sqrt(abar_t) x0_hat + sqrt(1 - abar_t) eps_hat. The usual approximation
  (Mokady et al. 2023) takes eps_hat = denoiser(x, t) at the point the step starts from,
  an O(1 / num_steps) error in the round trip; `fixed_point_iterations` k > 0 re-evaluates
  it at the point reached, k times, which solves the DDIM step backwards exactly once the
  iteration has converged (Pan et al. 2023).
  """
  timesteps = leading_timesteps(schedule.num_steps, num_steps)[::-1].copy()
  ratio = schedule.num_steps // num_steps
  ts_next, abars_next, abars = _lookup(schedule, timesteps, timesteps - ratio, 1.0)

  def step(state: SamplerState, denoiser: Denoiser, guidance: Guidance | None = None):
    if guidance is not None:
      raise ValueError("DDIM inversion takes no guidance")
    t, abar, abar_next = ts_next[state.i], abars[state.i], abars_next[state.i]
    t = jnp.full((state.x.shape[0],), t)

    def advance(x_eval):
      eps = schedules.convert(denoiser(x_eval, t), x_eval, abar_next, source=prediction,
                              target="epsilon")
      x0 = (state.x - jnp.sqrt(1 - abar) * eps) / jnp.sqrt(abar)
      return jnp.sqrt(abar_next) * x0 + jnp.sqrt(1 - abar_next) * eps, x0

    x_next, x0 = advance(state.x)
    x_next, x0 = jax.lax.fori_loop(0, fixed_point_iterations, lambda _, c: advance(c[0]), (x_next, x0))
    return SamplerState(x=x_next, i=state.i + 1, key=state.key), {"x0_hat": x0}

  return Sampler(_init, step, num_steps)


def vpsde(sde: VPSDE, *, num_steps: int = 1000, model_steps: int = 1000, prediction: str = "epsilon",
          corrector_steps: int = 0, snr: float = 0.16, eps: float = 1e-3,
          denoise_last: bool = True) -> Sampler:
  """Euler-Maruyama on the reverse VP-SDE from t = 1 to `eps`, with `corrector_steps`
  Langevin corrector steps (signal-to-noise ratio `snr`) before each predictor step.

  The denoiser is called at model time t (T - 1) with T = `model_steps` (Song et al.'s
  mapping of a discrete DDPM onto the SDE); its output gives the score -eps_hat / std(t).
  With `denoise_last` the final state is the x0 estimate at t = `eps` (Song et al.'s
  'noise removal').
  """
  times = jnp.linspace(1.0, eps, num_steps)
  dt = (1.0 - eps) / (num_steps - 1) if num_steps > 1 else 1.0 - eps

  def score_and_x0(x, t, denoiser, guidance):
    abar = sde.alpha_bar(t)
    e, x0, grad, loss = _estimate(denoiser, x, jnp.full((x.shape[0],), t * (model_steps - 1)),
                                  abar, prediction, None, guidance)
    return -e / jnp.sqrt(1 - abar), x0, grad, loss, abar

  def step(state: SamplerState, denoiser: Denoiser, guidance: Guidance | None = None):
    t = times[state.i]
    key, k_corr, k_pred = jax.random.split(state.key, 3)
    x = state.x

    def correct(j, x):
      score, *_ = score_and_x0(x, t, denoiser, None)
      z = jax.random.normal(jax.random.fold_in(k_corr, j), x.shape, x.dtype)
      norm = lambda a: jnp.sqrt(jnp.mean(jnp.sum(a.reshape(a.shape[0], -1) ** 2, -1)))  # noqa: E731
      step_size = 2 * (snr * norm(z) / norm(score)) ** 2
      return x + step_size * score + jnp.sqrt(2 * step_size) * z

    x = jax.lax.fori_loop(0, corrector_steps, correct, x)
    score, x0, grad, loss, abar = score_and_x0(x, t, denoiser, guidance)
    drift, diffusion = sde.sde(x, t)
    last = state.i == num_steps - 1
    z = jax.random.normal(k_pred, x.shape, x.dtype)
    x_next = x - (drift - diffusion ** 2 * score) * dt + diffusion * jnp.sqrt(dt) * z
    if denoise_last:
      x_next = jnp.where(last, x0, x_next)
    x_next, info = _apply_guidance(x_next, grad, loss, guidance, abar, {"x0_hat": x0})
    return SamplerState(x=x_next, i=state.i + 1, key=key), info

  return Sampler(_init, step, num_steps)


def run(sampler: Sampler, denoiser: Denoiser, x_T: jax.Array, *, key: jax.Array,
        guidance: Guidance | None = None, trajectory: bool = False) -> Any:
  """All of `sampler`'s steps from `x_T` in one `lax.scan`; the final sample, and with
  `trajectory` also the stacked per-step `info` (x0 estimates, guidance losses)."""

  def body(state, _):
    state, info = sampler.step(state, denoiser, guidance)
    return state, (info if trajectory else None)

  state, infos = jax.lax.scan(body, sampler.init(x_T, key=key), None, length=sampler.num_steps)
  return (state.x, infos) if trajectory else state.x


SAMPLERS = {"ddpm": ddpm, "ddim": ddim}
