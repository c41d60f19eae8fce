"""GIFD: generative gradient inversion via intermediate-feature domains (Fang et al., ICCV
2023), on the DCGAN prior of `inversion.gan`.

Read from the authors' code (`ffhibnese/GIFD_Gradient_Inversion_Attack`,
`inversefed/reconstruction_algorithms.py`): stage 0 searches the generator's latent z
with Adam under the ILO learning-rate ramp (5% warm-up, cosine decay over the last 75%;
read at the middle of each step, (i + 0.5) / steps, where GIFD's i / steps gives step 0 a
learning rate of 0: an evaluation charged to the budget that moves nothing),
z projected back onto the sphere of radius sqrt(dim) after each step; stage k >= 1 then
optimises the output of the generator's block k - 1 (initialised from the previous stage's
result) and runs only the blocks after it, projecting the feature's *deviation from its
initial value* onto a per-sample l1 ball after every step (`inversion.projection`). Each
stage's loss is the matching loss (GIFD's `sim_cmpr0` = the global cosine distance by
default) plus `tv` x total variation plus `image_norm` x ||x||_2 / (H W). The result is
the image of the stage with the lowest matching loss (GIFD's best layer): the ground truth
is never looked at.

Differences from the original, stated: the generator is a 32x32 DCGAN (GIAS's shape)
with 3 feature stages (4x4, 8x8, 16x16) instead of BigGAN's 13 or StyleGAN2's 8; the
l1 radius of stage k is `radii[k-1]` times the initial feature's own l1 norm (GIFD's radii
are absolute, tuned to BigGAN's feature scales); restarts run independently and the best
is chosen at the end by matching loss (GIFD keeps the best restart at every stage).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from inversion import gan as gan_lib
from inversion import labels as label_inference
from inversion import objectives
from inversion.attacks import Attack, Phase, counted, guard, healthy, no_counts, to_victim
from inversion.observation import Observation, ThreatModel, forward
from inversion.projection import l1_ball_batch

LABELS = ("known",) + label_inference.METHODS


@dataclasses.dataclass(frozen=True, kw_only=True)
class GIFDConfig:
  """GIFD settings.

  Attributes:
    latent_steps: stage-0 (latent search) steps.
    feature_steps: steps of each feature stage.
    stages: feature stages after the latent search (0 .. 3).
    lr: Adam's peak learning rate (every stage).
    radii: l1 radius of each feature stage's deviation, relative to the l1 norm of the
      feature it starts from.
    tv: total-variation weight.
    image_norm: weight of ||x||_2 / (H W).
    loss: matching loss (cosine, layer_cosine, l2, l2_noise_aware).
    noise_std: the declared noise std, for l2_noise_aware.
    adaptive: none, prune or clip (the declared defense applied to trial gradients).
    clip_norm: the declared clip norm C for adaptive clip (None: the observed norm).
    labels: known, or inferred: idlg (B = 1), bias_corrected or yin.
  """

  latent_steps: int = 500
  feature_steps: int = 200
  stages: int = 3
  lr: float = 0.1
  radii: tuple[float, ...] = (0.05, 0.1, 0.2)
  tv: float = 1e-4
  image_norm: float = 1e-6
  loss: str = "cosine"
  noise_std: float = 0.0
  adaptive: str = "none"
  clip_norm: float | None = None
  labels: str = "idlg"

  def __post_init__(self):
    if self.latent_steps < 1 or self.feature_steps < 1 or self.lr <= 0:
      raise ValueError("latent_steps >= 1, feature_steps >= 1 and lr > 0 are required")
    if not 0 <= self.stages < gan_lib.NUM_STAGES:
      raise ValueError(f"stages must be in [0, {gan_lib.NUM_STAGES - 1}], got {self.stages}")
    if len(self.radii) < self.stages or min(self.radii, default=1) <= 0:
      raise ValueError(f"radii needs {self.stages} positive entries, got {self.radii}")
    if self.labels not in LABELS:
      raise ValueError(f"labels must be one of {LABELS}, got {self.labels!r}")
    objectives.matching(self.loss, noise_std=self.noise_std, adapt_to=self.adaptive,
                        clip_norm=self.clip_norm)

  @property
  def num_steps(self) -> int:
    """Optimisation steps plus one transition step per stage (and one to finish)."""
    return self.latent_steps + self.stages * self.feature_steps + self.stages + 1


class GIFDState(NamedTuple):
  x: jax.Array                  # [B, H, W, C] the best stage's image (victim space, [0, 1])
  y: jax.Array                  # [B] labels used
  domains: tuple[jax.Array, ...]  # z and each stage's feature, [B, *stage_shape(k)]
  anchors: tuple[jax.Array, ...]  # each feature stage's starting point
  opt_states: tuple[Any, ...]   # one Adam state per domain
  current: jax.Array            # [B, H, W, C] the current stage's image
  current_loss: jax.Array       # its matching loss
  loss: jax.Array               # the best stage's matching loss (selection uses it alone)
  stage: jax.Array              # index of the stage being optimised
  best_stage: jax.Array
  diverged: jax.Array
  counts: jax.Array


def ilo_ramp(progress: jax.Array, rampdown: float = 0.75, rampup: float = 0.05) -> jax.Array:
  """ILO's learning-rate factor at `progress` in [0, 1] (GIFD's `get_lr`)."""
  ramp = jnp.minimum(1.0, (1.0 - progress) / rampdown)
  ramp = 0.5 - 0.5 * jnp.cos(ramp * math.pi)
  return ramp * jnp.minimum(1.0, progress / rampup)


def learning_rate(lr: float, steps: int) -> Callable[[jax.Array], jax.Array]:
  """A stage's learning rate at step i of `steps`: `lr` x the ILO ramp at the middle of the
  step, (i + 0.5) / steps (GIFD's i / steps gives step 0 a rate of 0: an evaluation charged
  to the budget that moves nothing, and a one-step stage on which lr has no effect)."""
  return lambda i: lr * ilo_ramp((i + 0.5) / steps)


def make(apply_fn: Callable[[Any, jax.Array], jax.Array], threat: ThreatModel,
         gan: gan_lib.GAN, cfg: GIFDConfig = GIFDConfig()) -> Attack:
  """The GIFD attack with the generator `gan` on observations under `threat`."""
  label_inference.check(cfg.labels, threat.batch_size)
  image_of = to_victim(gan.image_shape, threat.input_shape)
  update_of = forward(apply_fn, threat)
  match = objectives.matching(cfg.loss, noise_std=cfg.noise_std, adapt_to=cfg.adaptive,
                                 clip_norm=cfg.clip_norm)
  hw = threat.input_shape[0] * threat.input_shape[1]

  def adam(steps):
    return optax.adam(learning_rate(cfg.lr, steps))

  optimisers = [adam(cfg.latent_steps)] + [adam(cfg.feature_steps)] * cfg.stages
  radius_z = math.sqrt(gan.config.latent_dim)

  def render(k, f):
    return image_of(gan_lib.generate(gan, gan.variables, f, start=k))

  def matching_loss(x, y, obs):
    return match(update_of(obs.params, x, jax.nn.one_hot(y, threat.num_classes)), obs.update)

  def objective(f, k, y, obs):
    x = render(k, f)
    d = matching_loss(x, y, obs)
    reg = cfg.tv * objectives.total_variation(x) + cfg.image_norm * jnp.sqrt(jnp.sum(x ** 2)) / hw
    return d + reg, (x, d)

  def sphere(z):
    return z * radius_z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)

  def init(key: jax.Array, obs: Observation) -> GIFDState:
    k_labels, k_z = jax.random.split(key)
    y = label_inference.from_observation(cfg.labels, apply_fn, obs, threat, key=k_labels)
    b = threat.batch_size
    z = sphere(jax.random.normal(k_z, (b, gan.config.latent_dim)))
    feats = tuple(jnp.zeros((b,) + gan.config.stage_shape(k)) for k in range(1, cfg.stages + 1))
    domains = (z,) + feats
    x = render(0, z)
    loss = matching_loss(x, y, obs)
    return GIFDState(x=x, y=y, domains=domains, anchors=feats,
                     opt_states=tuple(o.init(d) for o, d in zip(optimisers, domains)),
                     current=x, current_loss=loss, loss=loss, stage=jnp.zeros((), jnp.int32),
                     best_stage=jnp.zeros((), jnp.int32), diverged=jnp.zeros((), bool),
                     counts=counted(no_counts(), grad=1, prior=1))

  def optimise(k: int):
    """One step on domain k."""
    def step(state: GIFDState, obs: Observation):
      f = state.domains[k]
      (_, (x, d)), grad = jax.value_and_grad(objective, has_aux=True)(f, k, state.y, obs)
      updates, opt_state = optimisers[k].update(grad, state.opt_states[k], f)
      f_new = optax.apply_updates(f, updates)
      if k == 0:
        f_new = sphere(f_new)
      else:
        start = state.anchors[k - 1]
        radius = cfg.radii[k - 1] * jnp.sum(jnp.abs(start).reshape(start.shape[0], -1), axis=-1)
        f_new = start + l1_ball_batch(f_new - start, radius)
      counts = counted(state.counts, double_backward=1, prior=1)
      domains = state.domains[:k] + (f_new,) + state.domains[k + 1:]
      opt_states = state.opt_states[:k] + (opt_state,) + state.opt_states[k + 1:]
      # x, d belong to the iterate before this step: the loss the step was computed at.
      new = state._replace(domains=domains, opt_states=opt_states, current=x, current_loss=d,
                           counts=counts)
      new = guard(new, state, healthy(d, f_new))._replace(counts=counts)
      return new, {"loss": d, "diverged": new.diverged}
    return step

  def close_stage(state: GIFDState, obs: Observation, k: int) -> GIFDState:
    """Scores the final iterate of stage k; keeps it if it beats the best stage so far."""
    x = render(k, state.domains[k])
    d = matching_loss(x, state.y, obs)
    better = jnp.isfinite(d) & (d < state.loss)
    return state._replace(
        x=jnp.where(better, x, state.x), loss=jnp.where(better, d, state.loss),
        best_stage=jnp.where(better, k, state.best_stage), current=x, current_loss=d,
        counts=counted(state.counts, grad=1, prior=1))

  def advance(k: int):
    """Closes stage k - 1 and starts stage k from its result."""
    def step(state: GIFDState, obs: Observation):
      state = close_stage(state, obs, k - 1)
      f = gan_lib.generate(gan, gan.variables, state.domains[k - 1], start=k - 1, upto=k)
      counts = counted(state.counts, prior=1)
      domains = state.domains[:k] + (f,) + state.domains[k + 1:]
      anchors = state.anchors[:k - 1] + (f,) + state.anchors[k:]
      opt_states = state.opt_states[:k] + (optimisers[k].init(f),) + state.opt_states[k + 1:]
      state = state._replace(domains=domains, anchors=anchors, opt_states=opt_states,
                             stage=jnp.asarray(k, jnp.int32), counts=counts)
      return state, {"loss": state.loss, "diverged": state.diverged}
    return step

  def finish(state: GIFDState, obs: Observation):
    state = close_stage(state, obs, cfg.stages)
    return state, {"loss": state.loss, "diverged": state.diverged}

  # Closing a stage spends no double-backward evaluation: it runs after the budget is spent.
  phases = (Phase(optimise(0), cfg.latent_steps),)
  for k in range(1, cfg.stages + 1):
    phases += (Phase(advance(k), 1, always=True), Phase(optimise(k), cfg.feature_steps))
  phases += (Phase(finish, 1, always=True),)
  return Attack(init, phases[0].step, phases)


def labels(state: GIFDState) -> jax.Array:
  return state.y
