"""Diffusion-guided gradient inversion: a diffusion prior's sampler steered by gradient
matching, conditioned on the labels and last-layer features read off the update.

The forward operator is fljax's own client update (`inversion.observation.forward`: the
FedSGD gradient, or FedAvg's local steps unrolled), so the guidance matches exactly what
the simulated client sends. Every sampler step estimates x0_hat(x_t) with the prior's
denoiser, maps it to the victim model's inputs (`attacks.to_victim`) and scores it:

    L(x0_hat) = lambda_g D(A(x0_hat, y_hat), g_obs) / D(0, g_obs) + lambda_f(t) ||phi(x0_hat) - h_hat||^2 / ||h_hat||^2

with D a matching loss of `inversion.objectives.matching` (global or per-layer cosine,
L2, or the noise-aware L2 when the observation is declared noisy; optionally adapted to
the declared defense, GGL's adaptive mode; D is measured in units of its value for a zero
trial update, so under DPS's normalised step the noise-aware loss's constant weight
1 / 2 sigma^2 cancels and it guides as a relative L2 loss), y_hat the labels (known, or inferred: iDLG
for B = 1, the batch estimators otherwise), h_hat the last layer's input features
recovered analytically (`inversion.features`: exact for B = 1, the batch approximation
for B > 1), phi the victim's penultimate layer, and lambda_f(t) annealed linearly to 0
over the last `feature_anneal` of the trajectory. The class-conditional prior is sampled
at y_hat (classifier-free guidance weight `guidance_weight`).

Modes (`mode`):
  dps        DPS (Chung et al., ICLR 2023): x_{t-1} = sampler step - zeta grad_{x_t} sqrt(L),
             the gradient taken through the denoiser. Differentiating the square root is the
             paper's normalised step zeta / ||y - A(x0_hat)|| (official code,
             `condition_methods.PosteriorSampling`).
  dps_nojac  the same without the denoiser's Jacobian: grad_{x_t} ~ grad_{x0_hat} / sqrt(abar_t)
             (one prior evaluation, no backward through it; exact as t -> 0).
  ggdm       GGDM (Gu et al., WWW 2024) as read from its abstract and from LeakPro's
             reimplementation (`presets/ggdm.py`, `SimilarityGuidance`), not from the paper,
             whose text we could not read: DDPM steps whose mean is shifted by
             -gamma sigma_t^2 clip(grad_{x_t} D, +-1), D the cosine distance (`scale` is
             gamma, default 100), evaluated on x0_hat through the denoiser (LeakPro's
             'corrected' default) or on the noisy x_t (`ggdm_on='x_t'`, the original).
             As in LeakPro (and diffusers' DDPM), x0_hat is clamped to [-1, 1], in the
             step's mean and where the loss reads it: unclamped, a pixel pushed out of
             range keeps its gradient and the shift feeds on itself (shipped MNIST prior,
             100 steps, untrained CNN: gamma 1e3 diverged on 2 of 4 victims, 1e4 on all;
             clamped, 19.9 and 28.5 dB; docs/generative_attacks.md, GGDM at this scale).

With `refine_steps > 0` a short pixel-space Inverting-Gradients refinement (Adam on the
signed gradient, TV prior, box [0, 1]) follows the sampler (the driver reports it as its
own attack, `dps+refine`). The state's `loss` is the plain matching loss D of the current
image (no feature or TV term): restarts are selected by it alone, never by ground truth.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion import samplers
from diffusion.prior import Prior
from inversion import features as feature_recovery
from inversion import labels as label_inference
from inversion import objectives
from inversion.attacks import Attack, Phase, counted, guard, healthy, no_counts, to_victim
from inversion.observation import Observation, ThreatModel, forward, gradient_signal

MODES = ("dps", "dps_nojac", "ggdm")
LABELS = ("known",) + label_inference.METHODS


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiffusionAttackConfig:
  """Settings of the diffusion-guided attack (see the module docstring).

  Attributes:
    mode: dps, dps_nojac or ggdm.
    sampler: ddim or ddpm (ggdm always uses DDPM steps).
    num_steps: sampler steps (one double-backward evaluation each with gradient guidance,
      and one prior evaluation: the UNet's forward, its backward not counted again; two
      under classifier-free guidance).
    eta: DDIM's stochasticity (1: DDPM-like; the spec's default).
    scale: zeta (dps modes; 32 was the best of 0.5..512 on 4 MNIST victims of an untrained
      LeNet, B = 1, seed 0) or gamma (ggdm; LeakPro's 100, too weak for the shipped
      MNIST prior at 100 steps, where 1e4 was the best of 1e1..1e5 on 4 victims).
    gradient_weight: lambda_g of the gradient-matching term (0: no gradient guidance).
    loss: cosine, layer_cosine, l2 or l2_noise_aware.
    noise_std: the declared noise std, for l2_noise_aware.
    adaptive: none, prune or clip: apply the declared defense to trial gradients.
    clip_norm: the declared clip norm C for adaptive clip (None: the observed norm).
    feature_weight: lambda_f of the feature-matching term (0: no feature conditioning).
    feature_anneal: fraction of the final steps over which lambda_f falls to 0.
    conditional: sample the class-conditional prior at the labels (else unconditionally).
    guidance_weight: classifier-free guidance weight w of the conditional prior.
    labels: known, or inferred: idlg (B = 1), bias_corrected or yin.
    ggdm_on: x0_hat or x_t: where ggdm evaluates the matching loss.
    refine_steps: Inverting-Gradients steps after sampling (0: none).
    refine_lr: their Adam learning rate.
    refine_tv: their total-variation weight.
  """

  mode: str = "dps"
  sampler: str = "ddim"
  num_steps: int = 100
  eta: float = 1.0
  scale: float = 32.0
  gradient_weight: float = 1.0
  loss: str = "cosine"
  noise_std: float = 0.0
  adaptive: str = "none"
  clip_norm: float | None = None
  feature_weight: float = 1.0
  feature_anneal: float = 0.3
  conditional: bool = True
  guidance_weight: float = 0.0
  labels: str = "idlg"
  ggdm_on: str = "x0_hat"
  refine_steps: int = 0
  refine_lr: float = 0.01
  refine_tv: float = 1e-4

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
    if self.sampler not in ("ddim", "ddpm"):
      raise ValueError(f"sampler must be ddim or ddpm, got {self.sampler!r}")
    if self.num_steps < 1 or self.refine_steps < 0:
      raise ValueError("num_steps >= 1 and refine_steps >= 0 are required")
    if min(self.scale, self.gradient_weight, self.feature_weight, self.refine_tv) < 0:
      raise ValueError("scale, gradient_weight, feature_weight and refine_tv must be >= 0")
    if not 0 < self.feature_anneal <= 1:
      raise ValueError(f"feature_anneal must be in (0, 1], got {self.feature_anneal}")
    if self.labels not in LABELS:
      raise ValueError(f"labels must be one of {LABELS}, got {self.labels!r}")
    if self.ggdm_on not in ("x0_hat", "x_t"):
      raise ValueError(f"ggdm_on must be x0_hat or x_t, got {self.ggdm_on!r}")
    objectives.matching(self.loss, noise_std=self.noise_std, adapt_to=self.adaptive,
                        clip_norm=self.clip_norm)

  @property
  def uses_gradient(self) -> bool:
    return self.gradient_weight > 0

  @property
  def uses_features(self) -> bool:
    return self.feature_weight > 0 and self.mode != "ggdm"


class DiffusionState(NamedTuple):
  x: jax.Array                  # [B, H, W, C] the victim-space image (current x0 estimate)
  y: jax.Array                  # [B] labels used
  sample: samplers.SamplerState  # the prior-space sampler state
  h: jax.Array                  # [B, F] recovered features (zeros [B, 0] when unused)
  opt_state: Any                # the refinement's Adam state
  loss: jax.Array               # the matching loss D of x (selection uses it alone)
  diverged: jax.Array
  counts: jax.Array


def recovered_features(obs: Observation, threat: ThreatModel, labels: jax.Array) -> jax.Array:
  """h_hat `[B, F]` from the observed update's last layer (`inversion.features`)."""
  grads = gradient_signal(obs.update, threat)
  if threat.batch_size == 1:
    return feature_recovery.last_layer_features(grads, threat.num_classes)[None]
  return feature_recovery.batch_features(grads, threat.num_classes, labels)


def _variance_of(schedule, timesteps: np.ndarray) -> Callable[[jax.Array], jax.Array]:
  """sigma_t^2 of a DDPM step (fixed_small) as a function of its abar_t, by lookup."""
  abars = jnp.asarray(schedule.alpha_bars)
  ratio = schedule.num_steps // len(timesteps)
  prev = jnp.where(timesteps - ratio >= 0, abars[np.maximum(timesteps - ratio, 0)], 1.0)
  abar = abars[timesteps]
  var = (1 - prev) / (1 - abar) * (1 - abar / prev)
  order = jnp.argsort(abar)
  return lambda a: jnp.interp(a, abar[order], var[order])


def make(apply_fn: Callable[[Any, jax.Array], jax.Array], threat: ThreatModel, prior: Prior,
         cfg: DiffusionAttackConfig = DiffusionAttackConfig(), *,
         features_fn: Callable[[Any, jax.Array], jax.Array] | None = None) -> Attack:
  """The diffusion-guided attack on observations under `threat`, with `prior`'s denoiser
  (a `diffusion.prior.Prior`, or anything with its `image_shape`, `num_classes`,
  `schedule`, `prediction` and `denoiser(labels, guidance_weight=)`).

  `features_fn(params, x) -> [B, F]` is the victim's penultimate layer (`Model.features`);
  it is needed when `cfg.feature_weight > 0`.
  """
  label_inference.check(cfg.labels, threat.batch_size)
  if cfg.uses_features and features_fn is None:
    raise ValueError("feature conditioning needs the victim's penultimate layer (features_fn); "
                     "pass Model.features or set feature_weight=0")
  if cfg.conditional and prior.num_classes not in (0, threat.num_classes):
    raise ValueError(f"the prior has {prior.num_classes} classes but the victim model "
                     f"{threat.num_classes}; use conditional=False")
  conditional = cfg.conditional and prior.num_classes > 0
  image_of = to_victim(prior.image_shape, threat.input_shape)
  update_of = forward(apply_fn, threat)
  match = objectives.matching(cfg.loss, noise_std=cfg.noise_std, adapt_to=cfg.adaptive,
                                 clip_norm=cfg.clip_norm)
  ggdm = cfg.mode == "ggdm"
  clamp = ggdm and cfg.ggdm_on == "x0_hat"  # LeakPro's x0_pred.clamp(-1, 1)
  if ggdm or cfg.sampler == "ddpm":
    sampler = samplers.ddpm(prior.schedule, num_steps=cfg.num_steps, prediction=prior.prediction,
                            clip=1.0 if ggdm else None)
  else:
    sampler = samplers.ddim(prior.schedule, num_steps=cfg.num_steps, eta=cfg.eta,
                            prediction=prior.prediction)
  total_t = prior.schedule.num_steps
  cfg_nfe = 2 if conditional and cfg.guidance_weight else 1
  if ggdm:
    variance = _variance_of(prior.schedule, samplers.leading_timesteps(total_t, cfg.num_steps))
    scale = lambda abar: cfg.scale * variance(abar)  # noqa: E731
  else:
    scale = cfg.scale
  tv_opt = optax.adam(cfg.refine_lr)

  def matching_loss(x, y, obs):
    return match(update_of(obs.params, x, jax.nn.one_hot(y, threat.num_classes)), obs.update)

  def guidance_for(y, h, obs) -> samplers.Guidance:
    # The matching term in units of its value for a zero trial update (1 for the cosine
    # distances, ||y||^2 for L2, ||y||^2 / 2 sigma^2 for the noise-aware L2), so that one
    # step size zeta serves every loss under DPS's normalised step.
    reference = jnp.maximum(match(jax.tree.map(jnp.zeros_like, obs.update), obs.update), 1e-20)

    def loss(x0_hat, t):
      x = image_of(jnp.clip(x0_hat, -1.0, 1.0) if clamp else x0_hat)
      total = jnp.zeros(())
      if cfg.uses_gradient:
        total = total + cfg.gradient_weight * matching_loss(x, y, obs) / reference
      if cfg.uses_features:
        ramp = jnp.clip(t[0] / (cfg.feature_anneal * total_t), 0.0, 1.0)
        err = jnp.sum((features_fn(obs.params, x) - h) ** 2) / jnp.maximum(jnp.sum(h ** 2), 1e-12)
        total = total + cfg.feature_weight * ramp * err
      if not ggdm:  # DPS's normalised step: the gradient of the residual's norm
        total = jnp.sqrt(jnp.maximum(total, 1e-20))
      return jnp.full((x.shape[0],), total / x.shape[0])  # the batch's loss, shared per image

    return samplers.Guidance(loss=loss, scale=scale, jacobian=cfg.mode != "dps_nojac",
                             on=cfg.ggdm_on if ggdm else "x0_hat", clip=1.0 if ggdm else None)

  guided = cfg.uses_gradient or cfg.uses_features
  step_counts = dict(grad=1, double_backward=int(cfg.uses_gradient), prior=cfg_nfe)

  def init(key: jax.Array, obs: Observation) -> DiffusionState:
    k_labels, k_noise, k_sampler = jax.random.split(key, 3)
    y = label_inference.from_observation(cfg.labels, apply_fn, obs, threat, key=k_labels)
    h = recovered_features(obs, threat, y) if cfg.uses_features else jnp.zeros((threat.batch_size, 0))
    x_T = jax.random.normal(k_noise, (threat.batch_size,) + tuple(prior.image_shape))
    x = jnp.clip(image_of(x_T), 0.0, 1.0)
    return DiffusionState(x=x, y=y, sample=sampler.init(x_T, key=k_sampler), h=h,
                          opt_state=tv_opt.init(x), loss=matching_loss(x, y, obs),
                          diverged=jnp.zeros((), bool), counts=counted(no_counts(), grad=1))

  def sample_step(state: DiffusionState, obs: Observation):
    denoiser = prior.denoiser(state.y if conditional else None,
                              guidance_weight=cfg.guidance_weight if conditional else 0.0)
    guidance = guidance_for(state.y, state.h, obs) if guided else None
    sample, info = sampler.step(state.sample, denoiser, guidance)
    last = sample.i == sampler.num_steps
    # The image the attack holds: the step's x0 estimate, and the sample itself at the end.
    x = jnp.clip(image_of(jnp.where(last, sample.x, info["x0_hat"])), 0.0, 1.0)
    loss = matching_loss(x, state.y, obs)
    counts = counted(state.counts, **(step_counts if guided else dict(grad=1, prior=cfg_nfe)))
    ok = healthy(loss, sample.x)
    new = guard(state._replace(x=x, sample=sample, loss=loss, counts=counts), state, ok)
    return new._replace(counts=counts), {"loss": loss, "diverged": new.diverged}

  def refine_step(state: DiffusionState, obs: Observation):
    def objective(x):
      return matching_loss(x, state.y, obs) + cfg.refine_tv * objectives.total_variation(x)
    value, grad = jax.value_and_grad(objective)(state.x)
    updates, opt_state = tv_opt.update(jnp.sign(grad), state.opt_state, state.x)
    x = jnp.clip(optax.apply_updates(state.x, updates), 0.0, 1.0)
    loss = matching_loss(x, state.y, obs)
    counts = counted(state.counts, grad=1, double_backward=1)
    ok = healthy(value, x)
    new = guard(state._replace(x=x, opt_state=opt_state, loss=loss, counts=counts), state, ok)
    return new._replace(counts=counts), {"loss": loss, "diverged": new.diverged}

  phases = (Phase(sample_step, sampler.num_steps),)
  if cfg.refine_steps:
    phases += (Phase(refine_step, cfg.refine_steps),)
  return Attack(init, sample_step, phases)


def labels(state: DiffusionState) -> jax.Array:
  return state.y
