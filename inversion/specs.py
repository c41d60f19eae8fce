"""What a gradient-inversion experiment is made of: its config dataclasses and registries.

`DEFENSES` maps a defense name to its update-level defense (`privacy.defenses`,
`privacy.forward_noise`), `ATTACKS` an attack name to its `AttackPlan` builder (the
attack's init/step pair, how to read its labels, its step count and evaluation budget),
`CONTROLS` names the control observations. `InversionConfig` nests the specs of the
victims, the model, the threat model, the attack and the defense; `scripts/invert.py`
derives its flags from it (`fljax.config`).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax

from fljax import federated as fed
from fljax import models
from inversion import adaptive, attacks, labels as label_inference
from inversion import observation as ob
from inversion.attacks import diffusion_guided, dlg, gifd, ig
from privacy import defenses
from privacy import federated as pfed
from privacy import forward_noise as fn
from privacy.clipping import clip_update

# ----------------------------------------------------------------------------- registries


DEFENSES: dict[str, Callable[[DefenseSpec], fed.DefenseFn]] = {
    "none": lambda d: fed.identity_defense,
    "gaussian": lambda d: defenses.gaussian_noise(d.std),
    "prune": lambda d: defenses.topk_prune(d.fraction),
    "quantize": lambda d: defenses.quantize(d.quantize),
    "local_dp": lambda d: pfed.local_dp(clip_norm=d.clip_norm, noise_multiplier=d.noise_multiplier),
    "forward_noise": lambda d: _forward_noise(d),
}


def _forward_noise(d: DefenseSpec) -> fed.DefenseFn:
  """Forward noise at one z (z = 0: clipping only), the same at every observed round."""
  if d.noise_multiplier < 0:
    raise ValueError(f"defense.noise_multiplier must be >= 0, got {d.noise_multiplier}")
  if d.noise_multiplier == 0:
    return lambda update, key, round_=0: clip_update(update, d.clip_norm)[0]
  with warnings.catch_warnings():  # weak z is what these attack experiments measure
    warnings.simplefilter("ignore", fn.ScheduleWarning)
    schedule = fn.constant(d.noise_multiplier, 1)
  return fn.ForwardNoise(clip_norm=d.clip_norm, schedule=schedule, rescale=d.rescale).defense()


def declared_noise(d: DefenseSpec) -> adaptive.DeclaredNoise:
  """What the adaptive attacker knows of the defense's noise."""
  if d.name == "forward_noise":
    z = d.noise_multiplier
    return adaptive.DeclaredNoise(sigma=z * d.clip_norm, clip_norm=d.clip_norm,
                                  scale=1.0 if d.rescale else float(fn.alpha_bar_of(z)) ** 0.5)
  if d.name == "local_dp":
    return adaptive.DeclaredNoise(sigma=d.noise_multiplier * d.clip_norm, clip_norm=d.clip_norm)
  if d.name == "gaussian":
    return adaptive.DeclaredNoise(sigma=d.std)
  return adaptive.DeclaredNoise(sigma=0.0)


class AttackPlan(NamedTuple):
  attack: attacks.Attack
  labels: Callable[[Any], jax.Array]  # state -> the labels the attack used or found
  steps: int
  budget: int | None = None  # double-backward evaluations allowed per restart (None: no cap)


def label_method(spec: AttackSpec, threat: ob.ThreatModel) -> str:
  if threat.labels_known:
    return "known"
  if spec.labels == "auto":
    return "idlg" if threat.batch_size == 1 else "bias_corrected"
  return spec.labels


def _per_restart(spec: AttackSpec, need: int = 1, *, one: str = "one step",
                 lower: tuple[str, ...] = ()) -> int | None:
  """The double-backward budget of one restart (the victim's budget split evenly).

  Raises a ValueError naming the attack, the smallest budget and the flags to change when
  a restart would get fewer than `need` evaluations, what `one` step of the attack takes.
  """
  if spec.budget is None:
    return None
  per = spec.budget // spec.restarts
  if per < need:
    lower += ("--attack.restarts",) if spec.restarts > 1 else ()
    raise ValueError(
        f"attack {spec.name} needs --attack.budget >= {need * spec.restarts} ({need} per "
        f"restart for {one}, {spec.restarts} restart{'s' * (spec.restarts > 1)}), got "
        f"{spec.budget}; raise --attack.budget" + "".join(f" or lower {f}" for f in lower[:1])
        + "".join(f" or {f}" for f in lower[1:]))
  return per


def _adaptation(spec: AttackSpec, defense: DefenseSpec
                ) -> tuple[str, str | None, float, float | None]:
  """(adaptive mode, matching loss override, declared noise std, clip norm) of an attack,
  from what the defense declares (`declared_noise`)."""
  if not spec.adaptive:
    return "none", None, 0.0, None
  if defense.name == "prune":
    return "prune", None, 0.0, None
  noise = declared_noise(defense)
  std = noise.sigma
  if defense.name == "forward_noise" and "average" in adaptive.parse(spec.denoise):
    std /= spec.rounds ** 0.5  # the noise left after the attacker's averaging
  return ("none" if noise.clip_norm is None else "clip", "l2_noise_aware" if std > 0 else None,
          std, noise.clip_norm)


def _dlg_plan(model, threat, spec, defense, labels):
  defaults = dlg.DLGConfig()
  cfg = dlg.DLGConfig(optimizer=spec.optimizer, lr=spec.lr,
                      objective=spec.objective or defaults.objective, labels=labels,
                      restart=spec.lbfgs_restart, restart_after=spec.lbfgs_restart_after)
  budget = _per_restart(spec, 2, one="its first evaluation and one step")
  steps = spec.steps or (budget - 1 if budget else 4000)  # each step spends >= 1 evaluation
  return AttackPlan(dlg.make(model.apply, threat, cfg), dlg.labels, steps, budget)


def _ig_plan(model, threat, spec, defense, labels):
  defaults = ig.IGConfig()
  budget = _per_restart(spec)
  steps = spec.steps or budget or 2000
  cfg = ig.IGConfig(steps=steps, lr=spec.lr or defaults.lr, tv=spec.tv,
                    objective=spec.objective or defaults.objective, labels=labels)
  return AttackPlan(ig.make(model.apply, threat, cfg), lambda s: s.y, steps, budget)


def _diffusion_plan(model, threat, spec, defense, mode):
  from diffusion import prior as prior_lib
  adapt, loss, std, clip = _adaptation(spec, defense)
  refine = spec.refine_steps
  budget = _per_restart(spec, refine + 1, lower=("--attack.refine_steps",) if refine else (),
                        one=f"one sampler step and {refine} refinement step"
                        + "s" * (refine > 1) if refine else "one sampler step")
  steps = spec.steps or ((budget - refine) if budget else 100)
  prior = prior_lib.load(prior_folder(spec))
  most = prior.schedule.num_steps
  if steps > most:
    raise ValueError(
        f"attack {spec.name} takes at most {most} sampler steps (its prior's schedule), got "
        f"{steps}" + (f" from --attack.budget {spec.budget}; lower --attack.budget to "
                      f"{(most + refine) * spec.restarts} or spend the rest on "
                      f"--attack.refine_steps" if not spec.steps else "; lower --attack.steps"))
  defaults = diffusion_guided.DiffusionAttackConfig()
  cfg = diffusion_guided.DiffusionAttackConfig(
      mode=mode, sampler="ddpm" if mode == "ggdm" else spec.sampler, num_steps=steps,
      scale=spec.scale if spec.scale is not None else (100.0 if mode == "ggdm" else defaults.scale),
      gradient_weight=spec.gradient_weight, loss=loss or spec.objective or defaults.loss,
      noise_std=std, adaptive=adapt, clip_norm=clip,
      feature_weight=spec.features if mode != "ggdm" else 0.0,
      guidance_weight=spec.guidance_weight, labels=label_method(spec, threat),
      refine_steps=refine, refine_tv=spec.tv)
  attack = diffusion_guided.make(model.apply, threat, prior, cfg, features_fn=model.features)
  return AttackPlan(attack, diffusion_guided.labels, steps + refine, budget)


FEATURE_SHARE = 0.55  # gifd's default share of its steps for the feature stages


def _gifd_plan(model, threat, spec, defense):
  from inversion import gan as gan_lib
  adapt, loss, std, clip = _adaptation(spec, defense)
  defaults = gifd.GIFDConfig()
  need = 1 + defaults.stages
  one = f"one latent step and one step in each of its {defaults.stages} feature stages"
  budget = _per_restart(spec, need, one=one)
  if spec.steps is not None and spec.steps < need:
    raise ValueError(f"attack gifd needs --attack.steps >= {need} ({one}), got {spec.steps}; "
                     f"raise --attack.steps")
  total = spec.steps or budget or defaults.latent_steps + defaults.stages * defaults.feature_steps
  share = FEATURE_SHARE if spec.feature_share is None else spec.feature_share
  feature = max(1, int(total * share) // defaults.stages)  # stages 1..3 share this,
  latent = max(1, total - defaults.stages * feature)       # the latent search the rest
  cfg = gifd.GIFDConfig(latent_steps=latent, feature_steps=feature, lr=spec.lr or defaults.lr,
                        tv=spec.tv, loss=loss or spec.objective or defaults.loss, noise_std=std,
                        adaptive=adapt, clip_norm=clip, labels=label_method(spec, threat))
  g = gan_lib.load(prior_folder(spec))
  return AttackPlan(gifd.make(model.apply, threat, g, cfg), gifd.labels, cfg.num_steps, budget)


def prior_folder(spec: AttackSpec) -> Path | None:
  """The folder of the generative prior the attack samples (`--attack.prior`, `--attack.gan`,
  else the shipped one); None for the attacks without one (dlg, idlg, ig)."""
  if spec.name in diffusion_guided.MODES:
    from diffusion import prior as prior_lib
    if spec.prior in prior_lib.SHIPPED:
      return prior_lib.shipped(spec.prior)
    return Path(spec.prior) if spec.prior else prior_lib.MNIST_PRIOR
  if spec.name == "gifd":
    from inversion import gan as gan_lib
    return gan_lib.SHIPPED.get(spec.gan) or (Path(spec.gan) if spec.gan else gan_lib.MNIST_GAN)
  return None


ATTACKS: dict[str, Callable[..., AttackPlan]] = {
    "dlg": lambda m, t, s, d: _dlg_plan(m, t, s, d, "known" if t.labels_known else "optimise"),
    "idlg": lambda m, t, s, d: _dlg_plan(m, t, s, d, label_method(s, t)),
    "ig": lambda m, t, s, d: _ig_plan(m, t, s, d, label_method(s, t)),
    "dps": lambda m, t, s, d: _diffusion_plan(m, t, s, d, "dps"),
    "dps_nojac": lambda m, t, s, d: _diffusion_plan(m, t, s, d, "dps_nojac"),
    "ggdm": lambda m, t, s, d: _diffusion_plan(m, t, s, d, "ggdm"),
    "gifd": lambda m, t, s, d: _gifd_plan(m, t, s, d),
}
CONTROLS = ("none", "random_observation")


# ----------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSpec:
  """The data: where the victims come from, and what the model is built for.

  Attributes:
    name: an fljax dataset: mnist (embedded), digits, fashion_mnist or tfds:<name>. The
      victims come from its test split; the model's optional training and the feature
      metric's classifier use its training split; it sets the classes and input shape.
    data_dir: the dataset's folder (fashion_mnist, tfds:<name>).
    images: a folder of PNG/JPEG files to attack instead of the test split, read in sorted
      order and resized to the model's input. Images directly in it get label 0; with
      class subfolders (torchvision's ImageFolder layout, images/<class>/<file>) an
      image's label is its folder's index among the subfolders in sorted name order
      (empty folders count: folders 0 ... 9 keep digit labels). Files that cannot be
      read are named in a warning and skipped.
    image_size: square input size (pads or resizes the dataset; none: as stored).
    channels: input channels (1 -> 3 replicates; none: as stored).
  """

  name: str = "mnist"
  data_dir: str | None = None
  images: str | None = None
  image_size: int | None = 32
  channels: int | None = 3


@dataclasses.dataclass(frozen=True, kw_only=True)
class VictimsConfig:
  """Whose data is attacked.

  Attributes:
    num: number of victims V (observed updates); each holds a batch of
      threat.batch_size images (from data.images: at most as many as it holds).
  """

  num: int = 16

  def __post_init__(self):
    if self.num < 1:
      raise ValueError(f"victims.num must be >= 1, got {self.num}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpec:
  """The attacked model.

  Attributes:
    name: lenet (DLG's), mlp, cnn or resnet.
    init: uniform (DLG's uniform(-0.5, 0.5)) or default.
    train_steps: train the model this many SGD steps (batch 64) on the training split
      before the attack (0: untrained).
    train_lr: the learning rate of that training.
  """

  name: str = dataclasses.field(default="lenet", metadata={"choices": tuple(models.MODELS)})
  init: str = "uniform"
  train_steps: int = 0
  train_lr: float = 0.1


@dataclasses.dataclass(frozen=True, kw_only=True)
class ThreatSpec:
  """What the client sends and what the attacker knows (see `inversion.observation`).

  Attributes:
    algorithm: fedsgd (a gradient) or fedavg (a model delta after local SGD).
    batch_size: B, the examples behind each observed update.
    local_epochs: FedAvg's E.
    local_batch_size: FedAvg's local batch size.
    local_lr: FedAvg's local learning rate.
    labels_known: the attacker is given the labels.
  """

  algorithm: str = dataclasses.field(default="fedsgd", metadata={"choices": ("fedsgd", "fedavg")})
  batch_size: int = 1
  local_epochs: int = 1
  local_batch_size: int = 1
  local_lr: float = 0.1
  labels_known: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttackSpec:
  """The attack.

  Attributes:
    name: dlg (labels optimised jointly), idlg (labels inferred first: iDLG for B = 1,
      the bias-corrected batch estimator otherwise), ig (Inverting Gradients), dps,
      dps_nojac or ggdm (diffusion-guided, `inversion.attacks.diffusion_guided`) or gifd
      (GAN prior, `inversion.attacks.gifd`).
    optimizer: dlg/idlg: lbfgs (the original DLG's, torch's L-BFGS: a fixed step of
      attack.lr, default 1, and one evaluation per step), lbfgs_zoom (optax's L-BFGS: a
      zoom line search of 1 to 20 evaluations per step, no lr) or adam.
    lbfgs_restart: dlg/idlg with lbfgs: when L-BFGS ends its run (it can never move
      again) with budget left, start again from a fresh random image; the lowest
      matching loss over the starts is reported.
    lbfgs_restart_after: with lbfgs_restart, also start again once a start has spent this
      many evaluations (none: only when it ends).
    steps: iterations, sampler steps for the diffusion attacks (none: from the budget,
      else 4000 for dlg/idlg, 2000 for ig, 100 for the diffusion attacks, 1100 for gifd).
    budget: double-backward evaluations per victim, restarts included: sizes every
      attack to the same count (DLG's L-BFGS line searches included: it stops there).
      Each restart needs enough for one step (dlg/idlg 2, gifd 4: a step per stage, the
      diffusion attacks refine_steps + 1), and the diffusion attacks take at most their
      prior's sampler steps (1000) plus refine_steps.
    lr: Adam's learning rate (none: the attack's default, 0.1).
    objective: l2, cosine or layer_cosine (none: l2 for dlg/idlg, cosine otherwise).
    labels: auto (idlg for B = 1, bias_corrected otherwise), idlg, bias_corrected or
      yin (every attack but dlg; known labels are used when threat.labels_known).
    tv: total-variation weight (ig, gifd, the diffusion attacks' refinement).
    feature_share: gifd: the share of its steps that its feature stages take together,
      the latent search the rest (none: 0.55).
    restarts: R independent initialisations (seeds) per victim; the lowest final
      matching loss wins.
    retries: a victim whose every restart diverged is attacked again with fresh keys
      this many times before it is reported as failed.
    scale: the diffusion guidance step (dps: zeta, default 32; ggdm: gamma, default 100).
    gradient_weight: weight of gradient matching in the diffusion guidance (0: the
      prior-only control, with the feature term too when features = 0).
    features: weight of the diffusion attacks' feature-matching term (0: off).
    guidance_weight: classifier-free guidance weight of the conditional prior.
    sampler: ddim (eta 1) or ddpm, for dps and dps_nojac.
    refine_steps: Inverting-Gradients steps after sampling (diffusion attacks).
    adaptive: adapt to the declared defense: noise-aware L2 under Gaussian noise,
      trial gradients pruned where the observed ones are zero, clipped to the observed
      norm under local DP (diffusion attacks and gifd).
    control: none, or random_observation: attack a random Gaussian update with the
      observed one's per-layer scale instead (what the prior and labels alone give).
    prior: the diffusion prior: a folder, or a shipped prior's dataset name
      (`diffusion.prior.SHIPPED`: mnist, fashion_mnist); none: the shipped MNIST prior.
    gan: the GAN prior: a folder, or a shipped GAN's dataset name (`inversion.gan.SHIPPED`);
      none: the shipped MNIST DCGAN.
    denoise: the adaptive attacker's processing of the observed update before the attack,
      steps joined by '+' (`inversion.adaptive`): rescale, average (over `rounds`), svd,
      wiener, pca; none: the update as received.
    rounds: observations of the same client's update (same model, fresh defense noise
      each) that 'average' combines (A3).
    surrogates: clean updates on public data (the training split) at the same model, for
      'wiener' and 'pca'.
    pca_rank: principal components kept by 'pca'.
  """

  name: str = dataclasses.field(default="idlg", metadata={"choices": tuple(ATTACKS)})
  optimizer: str = dataclasses.field(default="lbfgs", metadata={"choices": dlg.OPTIMIZERS})
  lbfgs_restart: bool = False
  lbfgs_restart_after: int | None = None
  steps: int | None = None
  budget: int | None = None
  lr: float | None = None
  objective: str | None = None
  labels: str = dataclasses.field(default="auto",
                                  metadata={"choices": ("auto", *label_inference.METHODS)})
  tv: float = 1e-4
  feature_share: float | None = None
  restarts: int = 1
  retries: int = 2
  scale: float | None = None
  gradient_weight: float = 1.0
  features: float = 1.0
  guidance_weight: float = 0.0
  sampler: str = dataclasses.field(default="ddim", metadata={"choices": ("ddim", "ddpm")})
  refine_steps: int = 0
  adaptive: bool = False
  control: str = dataclasses.field(default="none", metadata={"choices": CONTROLS})
  prior: str | None = None
  gan: str | None = None
  denoise: str = "none"
  rounds: int = 1
  surrogates: int = 128
  pca_rank: int = 32

  def __post_init__(self):
    adaptive.parse(self.denoise)
    if min(self.rounds, self.surrogates, self.pca_rank) < 1:
      raise ValueError("attack.rounds, attack.surrogates and attack.pca_rank must be >= 1")
    if self.name not in ATTACKS:
      raise ValueError(f"attack.name must be one of {sorted(ATTACKS)}, got {self.name!r}")
    if self.labels != "auto" and self.labels not in label_inference.METHODS:
      raise ValueError(f"attack.labels must be auto or one of {label_inference.METHODS}")
    if self.restarts < 1 or self.retries < 0:
      raise ValueError("attack.restarts must be >= 1 and attack.retries >= 0")
    if self.steps is not None and self.steps < 1:
      raise ValueError(f"attack.steps must be >= 1, got {self.steps}")
    if self.budget is not None and self.budget < 1:
      raise ValueError(f"attack.budget must be >= 1, got {self.budget}")
    if self.control not in CONTROLS:
      raise ValueError(f"attack.control must be one of {CONTROLS}, got {self.control!r}")
    if self.sampler not in ("ddim", "ddpm"):
      raise ValueError(f"attack.sampler must be ddim or ddpm, got {self.sampler!r}")
    if self.feature_share is not None and not 0 < self.feature_share < 1:
      raise ValueError(f"attack.feature_share must lie strictly between 0 and 1 (the "
                       f"feature stages' share of gifd's steps), got {self.feature_share}")
    if min(self.gradient_weight, self.features, self.guidance_weight, self.refine_steps) < 0:
      raise ValueError("attack.gradient_weight, features, guidance_weight and refine_steps "
                       "must be >= 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DefenseSpec:
  """The defense applied to each client's update before the server sees it.

  Attributes:
    name: none, gaussian (N(0, std^2) added, not DP), prune (top-k, not DP), quantize
      (not DP), local_dp (clip to clip_norm, add N(0, (noise_multiplier clip_norm)^2)) or
      forward_noise (clip, then forward-noise to z = noise_multiplier: sqrt(abar) u +
      sqrt(1 - abar) C xi; z = 0 clips only).
    std: gaussian's noise std.
    fraction: prune's fraction of entries zeroed.
    quantize: fp16 or int8.
    clip_norm: local_dp's and forward_noise's C.
    noise_multiplier: local_dp's sigma, forward_noise's z.
    rescale: forward_noise: the upload is already divided by sqrt(abar).
  """

  name: str = dataclasses.field(default="none", metadata={"choices": tuple(DEFENSES)})
  std: float = 1e-3
  fraction: float = 0.9
  quantize: str = "int8"
  clip_norm: float = 1.0
  noise_multiplier: float = 1.0
  rescale: bool = False

  def __post_init__(self):
    if self.name not in DEFENSES:
      raise ValueError(f"defense.name must be one of {sorted(DEFENSES)}, got {self.name!r}")
    DEFENSES[self.name](self)  # validates the parameters with the defense's own message


@dataclasses.dataclass(frozen=True, kw_only=True)
class InversionConfig:
  """One gradient-inversion experiment.

  Attributes:
    seed: seed of every random choice (victims, model, clients, defense, attack).
    batching: how victims x restarts are batched: auto (map on CPU, vmap elsewhere),
      vmap or map.
    map_batch_size: with map, how many run side by side under vmap (0: one at a time).
    chunk: attack steps per compiled call (progress bar and checkpoint granularity).
    feature_metric: score reconstructions in the feature space of a classifier trained
      on the dataset's training split (`fljax.classifier.reference_classifier`).
    classifier_dir: where that classifier is cached (none: the workdir's classifier/);
      share one folder between runs to train it once.
  """

  data: DataSpec = DataSpec()
  victims: VictimsConfig = VictimsConfig()
  model: ModelSpec = ModelSpec()
  threat: ThreatSpec = ThreatSpec()
  attack: AttackSpec = AttackSpec()
  defense: DefenseSpec = DefenseSpec()
  seed: int = 0
  batching: str = dataclasses.field(default="auto",
                                    metadata={"choices": ("auto", "vmap", "map")})
  map_batch_size: int = 0
  chunk: int = 100
  feature_metric: bool = True
  classifier_dir: str | None = None

  def __post_init__(self):
    if self.batching not in ("auto", "vmap", "map"):
      raise ValueError(f"batching must be auto, vmap or map, got {self.batching!r}")
    if self.chunk < 1:
      raise ValueError(f"chunk must be >= 1, got {self.chunk}")
