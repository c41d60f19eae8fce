"""Noise schedules and the forward process: DDPM (Ho et al., NeurIPS 2020), the cosine
schedule (Nichol & Dhariwal, ICML 2021), and the continuous VP-SDE (Song et al., ICLR 2021).

Discrete time: T steps indexed t = 0 .. T-1 (diffusers' convention), betas `[T]`,
alpha_bar_t = prod_{s <= t} (1 - beta_s), and

    q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)      (`q_sample`).

A denoiser may predict the noise eps, the clean x_0, or v = sqrt(abar) eps - sqrt(1 - abar)
x_0 (Salimans & Ho 2022); `convert` maps any of them to any other given x_t and abar.

Continuous time: the VP-SDE dx = -1/2 beta(t) x dt + sqrt(beta(t)) dW on t in [0, 1] with
beta(t) = beta_min + t (beta_max - beta_min) has the Gaussian marginal
x_t | x_0 ~ N(m(t) x_0, (1 - m(t)^2) I), m(t) = exp(-t^2 (beta_max - beta_min) / 4 - t
beta_min / 2) (`VPSDE.marginal`); DDPM's linear schedule with beta_i = beta_min / T + (i /
(T - 1)) (beta_max - beta_min) / T is its discretisation. `noise_to` noises any array
(an image, or a flattened model update) to a diffusion time, and `noise_multiplier`
reads the result as a Gaussian mechanism: x_t / sqrt(abar) = x_0 + sqrt((1 - abar) / abar)
xi, noise multiplier z = sqrt((1 - abar) / abar) relative to the scale of x_0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class Schedule:
  """A discrete noise schedule: `betas`, `alphas = 1 - betas`, `alpha_bars`, each `[T]`."""

  betas: jax.Array
  alphas: jax.Array
  alpha_bars: jax.Array

  @property
  def num_steps(self) -> int:
    return self.betas.shape[0]


def from_betas(betas: np.ndarray | jax.Array) -> Schedule:
  """A schedule from its betas (computed in float64 on the host, stored as float32)."""
  betas = np.asarray(betas, np.float64)
  if betas.ndim != 1 or len(betas) < 1:
    raise ValueError(f"betas must be a non-empty vector, got shape {betas.shape}")
  if not np.all((betas > 0) & (betas < 1)):
    raise ValueError("every beta must lie in (0, 1)")
  alphas = 1.0 - betas
  return Schedule(betas=jnp.asarray(betas, jnp.float32), alphas=jnp.asarray(alphas, jnp.float32),
                  alpha_bars=jnp.asarray(np.cumprod(alphas), jnp.float32))


def linear_betas(num_steps: int = 1000, beta_start: float = 1e-4,
                 beta_end: float = 0.02) -> np.ndarray:
  """DDPM's linear betas from `beta_start` to `beta_end`, float64 `[T]`."""
  _check_steps(num_steps)
  return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)


def scaled_linear_betas(num_steps: int = 1000, beta_start: float = 0.00085,
                        beta_end: float = 0.012) -> np.ndarray:
  """Betas linear in sqrt(beta) (latent diffusion; diffusers' 'scaled_linear'), float64 `[T]`."""
  _check_steps(num_steps)
  return np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=np.float64) ** 2


def cosine_betas(num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """Nichol & Dhariwal's cosine schedule, float64 `[T]`: alpha_bar(t) = f(t) / f(0), f(t) =
  cos^2(((t / T) + s) / (1 + s) pi / 2), betas clipped at `max_beta` (diffusers'
  'squaredcos_cap_v2')."""
  _check_steps(num_steps)
  f = lambda u: np.cos((u + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731
  i = np.arange(num_steps, dtype=np.float64)
  return np.minimum(1 - f((i + 1) / num_steps) / f(i / num_steps), max_beta)


def linear(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
  """DDPM's linear schedule (`linear_betas`)."""
  return from_betas(linear_betas(num_steps, beta_start, beta_end))


def scaled_linear(num_steps: int = 1000, beta_start: float = 0.00085,
                  beta_end: float = 0.012) -> Schedule:
  """The scaled-linear schedule (`scaled_linear_betas`)."""
  return from_betas(scaled_linear_betas(num_steps, beta_start, beta_end))


def cosine(num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Schedule:
  """The cosine schedule (`cosine_betas`)."""
  return from_betas(cosine_betas(num_steps, s, max_beta))


def _check_steps(num_steps: int) -> None:
  if num_steps < 1:
    raise ValueError(f"a schedule needs at least one step, got {num_steps}")


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "linear": linear,
    "scaled_linear": scaled_linear,
    "cosine": cosine,
}
BETAS: dict[str, Callable[..., np.ndarray]] = {
    "linear": linear_betas,
    "scaled_linear": scaled_linear_betas,
    "cosine": cosine_betas,
}


def alpha_bars(name: str, num_steps: int = 1000) -> np.ndarray:
  """alpha_bar_t = prod_{s <= t} (1 - beta_s), t = 0 .. T-1, of the schedule `name` with
  its default parameters, in float64 on the host (a `Schedule` stores float32; privacy
  accounting reads these)."""
  if name not in BETAS:
    raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(BETAS)}")
  return np.cumprod(1.0 - BETAS[name](num_steps))


def _bcast(a: jax.Array, like: jax.Array) -> jax.Array:
  """Per-example coefficients `[B]` shaped to broadcast against `like` `[B, ...]`."""
  a = jnp.asarray(a)
  return a.reshape(a.shape + (1,) * (like.ndim - a.ndim))


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise, for integer steps `t` `[B]` (or a
  scalar) and `noise` ~ N(0, I) shaped like `x0`."""
  abar = _bcast(schedule.alpha_bars[t], x0)
  return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise


PARAMETERISATIONS = ("epsilon", "x0", "v")


def convert(prediction: jax.Array, x_t: jax.Array, alpha_bar: jax.Array, *, source: str,
            target: str) -> jax.Array:
  """A denoiser's `prediction` of kind `source` as the equivalent of kind `target`.

  With a = sqrt(abar), b = sqrt(1 - abar) and x_t = a x_0 + b eps:
  x_0 = (x_t - b eps) / a, eps = (x_t - a x_0) / b, v = a eps - b x_0, and from v:
  x_0 = a x_t - b v, eps = b x_t + a v. `alpha_bar` is a scalar or per example `[B]`.
  """
  for kind in (source, target):
    if kind not in PARAMETERISATIONS:
      raise ValueError(f"parameterisation must be one of {PARAMETERISATIONS}, got {kind!r}")
  a = jnp.sqrt(_bcast(alpha_bar, x_t))
  b = jnp.sqrt(1.0 - _bcast(alpha_bar, x_t))
  if source == "epsilon":
    eps, x0 = prediction, (x_t - b * prediction) / a
  elif source == "x0":
    eps, x0 = (x_t - a * prediction) / b, prediction
  else:
    eps, x0 = b * x_t + a * prediction, a * x_t - b * prediction
  return {"epsilon": eps, "x0": x0, "v": a * eps - b * x0}[target]


def noise_multiplier(alpha_bar: float | np.ndarray | jax.Array) -> np.ndarray | jax.Array:
  """z = sqrt((1 - abar) / abar): x_t / sqrt(abar) = x_0 + z xi, a Gaussian mechanism with
  noise multiplier z relative to the scale (the clip norm) of x_0. NumPy input (such as
  `alpha_bars`' float64) is computed in NumPy, anything else in jax.numpy."""
  xp = np if isinstance(alpha_bar, (np.ndarray, np.generic)) else jnp
  alpha_bar = xp.asarray(alpha_bar)
  return xp.sqrt((1.0 - alpha_bar) / alpha_bar)


def alpha_bar_of(z: Any) -> Any:
  """abar = 1 / (1 + z^2), the inverse of `noise_multiplier` (any array type or a float)."""
  return 1.0 / (1.0 + z * z)


@dataclasses.dataclass(frozen=True, kw_only=True)
class VPSDE:
  """The variance-preserving SDE with a linear beta(t) on t in [0, 1].

  Attributes:
    beta_min: beta(0) (Song et al.: 0.1).
    beta_max: beta(1) (Song et al.: 20).
  """

  beta_min: float = 0.1
  beta_max: float = 20.0

  def __post_init__(self):
    if not 0 < self.beta_min < self.beta_max:
      raise ValueError(f"need 0 < beta_min < beta_max, got {self.beta_min}, {self.beta_max}")

  def beta(self, t: jax.Array) -> jax.Array:
    return self.beta_min + t * (self.beta_max - self.beta_min)

  def mean_coeff(self, t: jax.Array) -> jax.Array:
    """m(t) = exp(-1/4 t^2 (beta_max - beta_min) - 1/2 t beta_min)."""
    t = jnp.asarray(t)
    return jnp.exp(-0.25 * t ** 2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min)

  def alpha_bar(self, t: jax.Array) -> jax.Array:
    """The continuous alpha_bar(t) = m(t)^2."""
    return self.mean_coeff(t) ** 2

  def marginal(self, x0: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean, std) of x_t | x_0 at times `t` (scalar or `[B]`): (m(t) x_0, sqrt(1 - m(t)^2))."""
    m = _bcast(self.mean_coeff(t), x0)
    return m * x0, jnp.sqrt(1.0 - m ** 2)

  def sde(self, x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(drift, diffusion) of dx = -1/2 beta(t) x dt + sqrt(beta(t)) dW."""
    beta = _bcast(self.beta(t), x)
    return -0.5 * beta * x, jnp.sqrt(beta)

  def discretise(self, num_steps: int = 1000) -> Schedule:
    """DDPM's linear schedule that discretises this SDE with `num_steps` steps."""
    return linear(num_steps, self.beta_min / num_steps, self.beta_max / num_steps)


def noise_to(x: jax.Array, alpha_bar: float | jax.Array, *, key: jax.Array) -> jax.Array:
  """Any array forward-noised to the diffusion time where alpha_bar_t = `alpha_bar`:
  sqrt(abar) x + sqrt(1 - abar) xi, xi ~ N(0, I) drawn with `key`."""
  alpha_bar = jnp.asarray(alpha_bar)
  if not isinstance(alpha_bar, jax.core.Tracer) and not bool(jnp.all((alpha_bar > 0) & (alpha_bar <= 1))):
    raise ValueError(f"alpha_bar must lie in (0, 1], got {alpha_bar}")
  xi = jax.random.normal(key, jnp.shape(x), jnp.result_type(x))
  return jnp.sqrt(alpha_bar) * x + jnp.sqrt(1.0 - alpha_bar) * xi


DIFFUSERS_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear",
                       "squaredcos_cap_v2": "cosine"}


def from_diffusers_config(config: dict) -> tuple[Schedule, str]:
  """The schedule and the denoiser's parameterisation from a diffusers scheduler config
  (the dict of a `scheduler_config.json`, e.g. of DDPMScheduler or DDIMScheduler).

  Reads `num_train_timesteps`, `beta_schedule` ('linear', 'scaled_linear',
  'squaredcos_cap_v2'), `beta_start`, `beta_end`, `trained_betas` and `prediction_type`
  ('epsilon', 'sample' = x0, 'v_prediction'); anything else is refused by name.
  """
  steps = int(config.get("num_train_timesteps", 1000))
  prediction = {"epsilon": "epsilon", "sample": "x0", "v_prediction": "v"}.get(
      config.get("prediction_type", "epsilon"))
  if prediction is None:
    raise ValueError(f"unsupported diffusers prediction_type {config['prediction_type']!r}; "
                     f"supported: epsilon, sample, v_prediction")
  if config.get("trained_betas") is not None:
    return from_betas(config["trained_betas"]), prediction
  name = config.get("beta_schedule", "linear")
  if name not in DIFFUSERS_SCHEDULES:
    raise ValueError(f"unsupported diffusers beta_schedule {name!r}; supported: "
                     f"{sorted(DIFFUSERS_SCHEDULES)}")
  if name == "squaredcos_cap_v2":
    return cosine(steps), prediction
  defaults = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}[name]
  start, end = config.get("beta_start", defaults[0]), config.get("beta_end", defaults[1])
  return SCHEDULES[DIFFUSERS_SCHEDULES[name]](steps, start, end), prediction
