"""A gradient-inversion experiment: victims -> observed updates -> attack -> scores, grid.

`run(config, workdir)` takes V victims (each a batch of B images from a dataset's test
split, or from a folder of image files), lets each one's client compute the update that
fljax's own `client_update` sends (FedSGD gradient or FedAvg delta) under the configured
defense, and attacks all V observations, with R restarts each, in one compiled
computation (`fljax.federated.batch_over`: vmap, or lax.map with a batch size; 'auto'
picks lax.map on CPU, where vmapped second-order convolution gradients are slow, and vmap
on accelerators).

Divergence: a restart whose loss or iterate became non-finite or exploded
(`inversion.attacks.healthy`) is never scored. Each victim keeps its restart with the
lowest final matching loss among the healthy ones (the ground truth is never looked at);
a victim with no healthy restart is attacked again with fresh keys, up to
`attack.retries` times, and is then reported as failed (and left out of the medians).

Outputs in `workdir`: `config.json`, `metrics.json` (a summary and per-victim scores),
`grid.png` (ground truth above each reconstruction, PSNR under it). The attack state is
saved every `chunk` steps (`attack_state.npz`), so a killed run resumes where it was.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fljax import classifier, datasets, models
from fljax import config as config_lib
from fljax import federated as fed
from fljax.partitions import Batch
from fljax.train import check_workdir
from inversion import adaptive, attacks, labels as label_inference, metrics
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


def _label_method(spec: AttackSpec, threat: ob.ThreatModel) -> str:
  if threat.labels_known:
    return "known"
  if spec.labels == "auto":
    return "idlg" if threat.batch_size == 1 else "bias_corrected"
  return spec.labels


def _per_restart(spec: AttackSpec) -> int | None:
  """The double-backward budget of one restart (the victim's budget split evenly)."""
  if spec.budget is None:
    return None
  per = spec.budget // spec.restarts
  if per < 1:
    raise ValueError(f"attack.budget {spec.budget} is smaller than attack.restarts {spec.restarts}")
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
  cfg = dlg.DLGConfig(optimizer=spec.optimizer, lr=spec.lr or defaults.lr,
                      objective=spec.objective or defaults.objective, labels=labels)
  budget = _per_restart(spec)
  steps = spec.steps or budget or 4000
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
  budget = _per_restart(spec)
  refine = spec.refine_steps
  steps = spec.steps or ((budget - refine) if budget else 100)
  if steps < 1:
    raise ValueError(f"attack.budget leaves no sampler steps after {refine} refinement steps")
  defaults = diffusion_guided.DiffusionAttackConfig()
  cfg = diffusion_guided.DiffusionAttackConfig(
      mode=mode, sampler="ddpm" if mode == "ggdm" else spec.sampler, num_steps=steps,
      scale=spec.scale if spec.scale is not None else (100.0 if mode == "ggdm" else defaults.scale),
      gradient_weight=spec.gradient_weight, loss=loss or spec.objective or defaults.loss,
      noise_std=std, adaptive=adapt, clip_norm=clip,
      feature_weight=spec.features if mode != "ggdm" else 0.0,
      guidance_weight=spec.guidance_weight, labels=_label_method(spec, threat),
      refine_steps=refine, refine_tv=spec.tv)
  prior = prior_lib.load(spec.prior) if spec.prior else prior_lib.load()
  attack = diffusion_guided.make(model.apply, threat, prior, cfg, features_fn=model.features)
  return AttackPlan(attack, diffusion_guided.labels, steps + refine, budget)


def _gifd_plan(model, threat, spec, defense):
  from inversion import gan as gan_lib
  adapt, loss, std, clip = _adaptation(spec, defense)
  budget = _per_restart(spec)
  defaults = gifd.GIFDConfig()
  total = spec.steps or budget or defaults.latent_steps + defaults.stages * defaults.feature_steps
  feature = max(1, int(total * 0.55) // defaults.stages)  # stages 1..3 share 55%,
  latent = max(1, total - defaults.stages * feature)      # the latent search the rest
  cfg = gifd.GIFDConfig(latent_steps=latent, feature_steps=feature, lr=spec.lr or defaults.lr,
                        tv=spec.tv, loss=loss or spec.objective or defaults.loss, noise_std=std,
                        adaptive=adapt, clip_norm=clip, labels=_label_method(spec, threat))
  g = gan_lib.load(spec.gan) if spec.gan else gan_lib.load()
  return AttackPlan(gifd.make(model.apply, threat, g, cfg), gifd.labels, cfg.num_steps, budget)


ATTACKS: dict[str, Callable[..., AttackPlan]] = {
    "dlg": lambda m, t, s, d: _dlg_plan(m, t, s, d, "known" if t.labels_known else "optimise"),
    "idlg": lambda m, t, s, d: _dlg_plan(m, t, s, d, _label_method(s, t)),
    "ig": lambda m, t, s, d: _ig_plan(m, t, s, d, _label_method(s, t)),
    "dps": lambda m, t, s, d: _diffusion_plan(m, t, s, d, "dps"),
    "dps_nojac": lambda m, t, s, d: _diffusion_plan(m, t, s, d, "dps_nojac"),
    "ggdm": lambda m, t, s, d: _diffusion_plan(m, t, s, d, "ggdm"),
    "gifd": lambda m, t, s, d: _gifd_plan(m, t, s, d),
}
CONTROLS = ("none", "random_observation")


# ----------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True, kw_only=True)
class VictimsConfig:
  """Whose data is attacked.

  Attributes:
    dataset: an fljax dataset (victims come from its test split; the model's optional
      training and the feature metric's classifier use its training split).
    data_dir: the dataset's folder (fashion_mnist, tfds:<name>).
    images: a folder of PNG/JPEG files to attack instead of the dataset's test split,
      resized to the model's input; labels from integer-named subfolders, else 0.
    image_size: square input size (pads or resizes the dataset; none: as stored).
    channels: input channels (1 -> 3 replicates; none: as stored).
    num: number of victims V (observed updates); each holds a batch of
      threat.batch_size images.
  """

  dataset: str = "mnist"
  data_dir: str | None = None
  images: str | None = None
  image_size: int | None = 32
  channels: int | None = 3
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

  name: str = "lenet"
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

  algorithm: str = "fedsgd"
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
    optimizer: dlg/idlg: lbfgs (the original's) or adam.
    steps: iterations, sampler steps for the diffusion attacks (none: from the budget,
      else 4000 for dlg/idlg, 2000 for ig, 100 for the diffusion attacks, 1100 for gifd).
    budget: double-backward evaluations per victim, restarts included: sizes every
      attack to the same count (DLG's L-BFGS line searches included: it stops there).
    lr: Adam's learning rate (none: the attack's default, 0.1).
    objective: l2, cosine or layer_cosine (none: l2 for dlg/idlg, cosine otherwise).
    labels: auto (idlg for B = 1, bias_corrected otherwise), idlg, bias_corrected or
      yin (every attack but dlg; known labels are used when threat.labels_known).
    tv: total-variation weight (ig, gifd, the diffusion attacks' refinement).
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
    prior: the diffusion prior folder (none: the shipped MNIST prior).
    gan: the GAN prior folder (none: the shipped MNIST DCGAN).
    denoise: the adaptive attacker's processing of the observed update before the attack,
      steps joined by '+' (`inversion.adaptive`): rescale, average (over `rounds`), svd,
      wiener, pca; none: the update as received.
    rounds: observations of the same client's update (same model, fresh defense noise
      each) that 'average' combines (A3).
    surrogates: clean updates on public data (the training split) at the same model, for
      'wiener' and 'pca'.
    pca_rank: principal components kept by 'pca'.
  """

  name: str = "idlg"
  optimizer: str = "lbfgs"
  steps: int | None = None
  budget: int | None = None
  lr: float | None = None
  objective: str | None = None
  labels: str = "auto"
  tv: float = 1e-4
  restarts: int = 1
  retries: int = 2
  scale: float | None = None
  gradient_weight: float = 1.0
  features: float = 1.0
  guidance_weight: float = 0.0
  sampler: str = "ddim"
  refine_steps: int = 0
  adaptive: bool = False
  control: str = "none"
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

  name: str = "none"
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

  victims: VictimsConfig = VictimsConfig()
  model: ModelSpec = ModelSpec()
  threat: ThreatSpec = ThreatSpec()
  attack: AttackSpec = AttackSpec()
  defense: DefenseSpec = DefenseSpec()
  seed: int = 0
  batching: str = "auto"
  map_batch_size: int = 0
  chunk: int = 100
  feature_metric: bool = True
  classifier_dir: str | None = None

  def __post_init__(self):
    if self.batching not in ("auto", "vmap", "map"):
      raise ValueError(f"batching must be auto, vmap or map, got {self.batching!r}")
    if self.chunk < 1:
      raise ValueError(f"chunk must be >= 1, got {self.chunk}")


# ----------------------------------------------------------------------------- pieces


def load_victims(cfg: VictimsConfig, batch_size: int, *, key: jax.Array
                 ) -> tuple[datasets.Dataset, np.ndarray, np.ndarray, list[str]]:
  """The dataset (for training and the feature metric) and the victims' images
  `[V, B, H, W, C]` and labels `[V, B]`, with a name for each victim.

  From the dataset, V x B distinct test images in a random order drawn with `key`. From a
  folder, its images in sorted order, V = min(num, N // B).
  """
  ds = datasets.load(cfg.dataset, image_size=cfg.image_size, channels=cfg.channels,
                     data_dir=cfg.data_dir)
  if cfg.images is not None:
    x, y, names = datasets.load_image_folder(cfg.images, ds.image_shape)
    if y.max() >= ds.num_classes:
      raise ValueError(f"{cfg.images} has class folders up to {y.max()}, but the model has "
                       f"{ds.num_classes} classes")
    v = min(cfg.num, len(y) // batch_size)
    if v == 0:
      raise ValueError(f"{cfg.images} holds {len(y)} images, fewer than one batch of "
                       f"{batch_size}; lower --threat.batch_size")
    names = [",".join(names[i * batch_size:(i + 1) * batch_size]) for i in range(v)]
  else:
    need = cfg.num * batch_size
    if need > len(ds.y_test):
      raise ValueError(f"{cfg.num} victims x batch {batch_size} need {need} test images; "
                       f"{cfg.dataset} has {len(ds.y_test)}")
    order = np.asarray(jax.random.permutation(key, len(ds.y_test)))[:need]
    x, y, v = ds.x_test[order], ds.y_test[order], cfg.num
    names = [f"test[{','.join(map(str, order[i * batch_size:(i + 1) * batch_size]))}]"
             for i in range(v)]
  shape = (v, batch_size) + x.shape[1:]
  return ds, x[:v * batch_size].reshape(shape), y[:v * batch_size].reshape(v, batch_size), names


def threat_model(spec: ThreatSpec, ds: datasets.Dataset, defense: str) -> ob.ThreatModel:
  return ob.ThreatModel(algorithm=spec.algorithm, batch_size=spec.batch_size,
                        input_shape=ds.image_shape, num_classes=ds.num_classes,
                        local_epochs=spec.local_epochs, local_batch_size=spec.local_batch_size,
                        local_lr=spec.local_lr, labels_known=spec.labels_known, defense=defense)


def observe_all(model: models.Model, params: Any, x: np.ndarray, y: np.ndarray,
                threat: ob.ThreatModel, defense: fed.DefenseFn, *, key: jax.Array,
                round_: int = 0) -> ob.Observation:
  """The V victims' observations: updates (and known labels) stacked `[V, ...]`, params
  shared. Victim i's client runs fljax's client update with `fold_in(key, i)` and the
  defense with its own fold of that key (`observation.observe`), folded again with the
  round for rounds > 0 (the same update, fresh defense noise)."""
  batch = Batch(x=jnp.asarray(x), y=jnp.asarray(y), mask=jnp.ones(y.shape, jnp.float32))
  ob.check_batch(batch.mask, threat)
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(len(y)))
  updates, labels = _observer(model, threat, defense)(params, batch, keys, round_)
  return ob.Observation(update=updates, params=params, labels=labels)


@functools.lru_cache(maxsize=32)
def _observer(model: models.Model, threat: ob.ThreatModel, defense: fed.DefenseFn):
  """The compiled `(params, batch, keys, round) -> (updates, labels)` of `observe_all`,
  one per (model, threat, defense), so that k rounds or many surrogate batches compile once."""
  fed_cfg = fed.FedConfig(algorithm=threat.algorithm, local_epochs=threat.local_epochs,
                          local_batch_size=threat.local_batch_size, local_lr=threat.local_lr)
  client_update = fed.make_client_update(fed.make_loss_fn(model.apply), fed_cfg)

  def one(params, data, k, round_):
    dkey = jax.random.fold_in(k, 1)
    dkey = jnp.where(round_ == 0, jax.random.key_data(dkey),
                     jax.random.key_data(jax.random.fold_in(dkey, round_)))
    o = ob.observe(client_update, params, data, k, threat, defense=defense,
                   defense_key=jax.random.wrap_key_data(dkey), round_=round_)
    return o.update, o.labels

  return jax.jit(jax.vmap(one, in_axes=(None, 0, 0, None)))


def random_observation(obs: ob.Observation, *, key: jax.Array) -> ob.Observation:
  """The control observation: each leaf of each update replaced by Gaussian noise with
  that leaf's own standard deviation (what an attack recovers from it comes from its
  prior and its label guess, not from the client's data)."""
  leaves, treedef = jax.tree.flatten(obs.update)
  noisy = [jax.vmap(lambda a, k: jnp.std(a) * jax.random.normal(k, a.shape, a.dtype))(
      leaf, jax.random.split(jax.random.fold_in(key, i), leaf.shape[0]))
      for i, leaf in enumerate(leaves)]
  return ob.Observation(update=jax.tree.unflatten(treedef, noisy), params=obs.params,
                        labels=obs.labels)


def _save_state(path: Path, state: Any, done: int, attempt: int) -> None:
  """The attack states (arrays only) after `done` steps of retry `attempt`, atomically."""
  tmp = path.with_name(path.stem + ".tmp.npz")
  np.savez(tmp, *[np.asarray(a) for a in jax.tree.leaves(state)], done=done, attempt=attempt)
  os.replace(tmp, path)


def _load_state(path: Path, like: Any, attempt: int) -> tuple[Any, int] | None:
  """The states saved by `_save_state` for this `attempt`, shaped like `like`, or None."""
  if not path.exists():
    return None
  data = np.load(path)
  if int(data["attempt"]) != attempt:
    return None
  leaves, treedef = jax.tree.flatten(like)
  restored = [jnp.asarray(data[f"arr_{i}"], leaf.dtype) for i, leaf in enumerate(leaves)]
  if any(a.shape != leaf.shape for a, leaf in zip(restored, leaves)):
    return None
  return jax.tree.unflatten(treedef, restored), int(data["done"])


def attack_batched(plan: AttackPlan, obs: ob.Observation, keys: jax.Array, *, mode: str,
                   map_batch_size: int = 0, chunk: int = 100,
                   progress: Callable[[int], Any] = lambda n: None,
                   checkpoint: Callable[[Any, int], None] | None = None,
                   restore: Callable[[Any], tuple[Any, int] | None] | None = None,
                   row_params: bool = False) -> Any:
  """Runs `plan` on N observations stacked on their leading axis (keys `[N]`), all in one
  compiled computation per `chunk` steps; returns the final states stacked `[N, ...]`.

  The model parameters are shared by every observation (`obs.params` unbatched), or, with
  `row_params`, stacked `[N, ...]` like the updates (observations of different models,
  e.g. a study's cells, attacked in one computation).
  `checkpoint(states, steps_done)` is called between chunks; `restore(initial_states)`
  may return `(states, steps_done)` saved by an earlier, interrupted call.
  """
  params = None if row_params else obs.params
  rows = ob.Observation(update=obs.update, params=obs.params if row_params else None,
                        labels=obs.labels)

  def with_params(o, params):
    return ob.Observation(update=o.update, params=o.params if row_params else params,
                          labels=o.labels)

  @jax.jit
  def init(keys, rows, params):
    one = lambda k, o: plan.attack.init(k, with_params(o, params))
    return fed.batch_over(one, mode, map_batch_size)(keys, rows)

  phases = plan.attack.phases or ((plan.attack.step, plan.steps),)
  ends = np.cumsum([n for _, n in phases])
  if ends[-1] != plan.steps:
    raise ValueError(f"the attack's phases take {ends[-1]} steps, its plan {plan.steps}")
  cap = plan.budget

  def capped(step):
    if cap is None:
      return step
    def run(s, o):  # a restart that has spent its double-backward budget stops where it is
      spent = s.counts[attacks.COUNTERS.index("double_backward_evals")] >= cap
      # lax.cond skips the step under lax.map (one restart at a time); vmap evaluates both.
      return jax.lax.cond(spent, lambda s: s, lambda s: step(s, o)[0], s), {}
    return run

  @functools.partial(jax.jit, static_argnums=(3, 4))
  def advance(states, rows, params, n, phase):
    step = capped(phases[phase][0])

    def one(s, o):
      o = with_params(o, params)
      return jax.lax.scan(lambda s, _: (step(s, o)[0], None), s, None, length=n)[0]
    return fed.batch_over(one, mode, map_batch_size)(states, rows)

  states, done = init(keys, rows, params), 0
  restored = None if restore is None else restore(states)
  if restored is not None:
    states, done = restored
  progress(done)
  while done < plan.steps:
    phase = int(np.searchsorted(ends, done, side="right"))
    n = min(chunk, plan.steps - done, int(ends[phase]) - done)
    states = advance(states, rows, params, n, phase)
    jax.block_until_ready(states)
    done += n
    progress(n)
    if checkpoint is not None and done < plan.steps:
      checkpoint(states, done)
  return states


def save_grid(path: Path, truth: np.ndarray, reconstruction: np.ndarray, psnr: np.ndarray,
              failed: np.ndarray, *, title: str = "") -> None:
  """Pairs of rows: ground truth above its (matched) reconstruction, PSNR under each.

  `truth`, `reconstruction` `[V, B, H, W, C]` in [0, 1]; `psnr` `[V, B]`; `failed` `[V]`.
  """
  from fljax.plots import _pyplot
  plt = _pyplot()
  v, b = truth.shape[:2]
  per_row = b * max(1, 16 // b) if b <= 16 else b
  cols = min(v * b, per_row)
  rows = -(-v * b // cols)
  fig, axes = plt.subplots(2 * rows, cols, figsize=(max(1.1 * cols, 4.5), 2.8 * rows + 0.4),
                           squeeze=False)
  for ax in axes.ravel():
    ax.axis("off")
  for i in range(v * b):
    j, k = divmod(i, b)
    r, c = divmod(i, cols)
    for ax, img in ((axes[2 * r, c], truth[j, k]), (axes[2 * r + 1, c], reconstruction[j, k])):
      ax.imshow(np.clip(img.squeeze(-1) if img.shape[-1] == 1 else img, 0, 1),
                cmap="gray" if img.shape[-1] == 1 else None, vmin=0, vmax=1)
    caption = "failed" if failed[j] else f"{psnr[j, k]:.1f} dB"
    axes[2 * r + 1, c].text(0.5, -0.06, caption, fontsize=7, ha="center", va="top",
                            transform=axes[2 * r + 1, c].transAxes)
    if k == 0:
      axes[2 * r, c].set_title(f"victim {j}", fontsize=7)
  if title:
    import textwrap
    fig.suptitle("\n".join(textwrap.wrap(title, 60)), fontsize=8)
  fig.tight_layout(h_pad=1.5)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _remove_attack_files(workdir: Path) -> None:
  """Drops an attack's resume files (after its report is written, or on --overwrite)."""
  for name in ("attack_state.npz", "attack_results.npz"):
    (workdir / name).unlink(missing_ok=True)


def _finite(values: list[float]) -> list[float]:
  return [float(v) for v in values if np.isfinite(v)]


def run(config: InversionConfig, workdir: str | os.PathLike, *, overwrite: bool = False,
        progress: bool = True) -> dict[str, Any]:
  """Runs (or resumes, or reports) the experiment; returns the summary in metrics.json."""
  from tqdm import tqdm
  workdir = Path(workdir)
  check_workdir(workdir, config, overwrite, extendable=())
  if (workdir / "metrics.json").exists() and not overwrite:
    summary = json.loads((workdir / "metrics.json").read_text())["summary"]
    print(f"nothing to do: {workdir} already holds this experiment's results "
          f"(median PSNR {summary['median_psnr']:.2f} dB); pass --overwrite to run it again")
    return summary
  if overwrite:
    _remove_attack_files(workdir)
  t_start = time.perf_counter()
  k_victims, k_model, k_train, k_clients, k_attack = jax.random.split(
      jax.random.key(config.seed), 5)
  spec = config.attack
  ds, x, y, names = load_victims(config.victims, config.threat.batch_size, key=k_victims)
  model = models.make(config.model.name, num_classes=ds.num_classes,
                      input_shape=ds.image_shape, init=config.model.init)
  params = classifier.train(model, model.init(k_model), ds.x_train, ds.y_train,
                            steps=config.model.train_steps,
                            optimizer=optax.sgd(config.model.train_lr), key=k_train)
  model_accuracy = classifier.accuracy(model, params, ds.x_test, ds.y_test)
  threat = threat_model(config.threat, ds, config.defense.name)
  defense = DEFENSES[config.defense.name](config.defense)
  obs = observe_all(model, params, x, y, threat, defense, key=k_clients)
  obs, extra = _adaptive_processing(config, model, params, ds, x, y, threat, defense, obs,
                                    key=k_clients)
  for i in range(len(y)):  # what the server received must be attackable
    row = jax.tree.map(lambda a: a[i], ob.Observation(update=obs.update, params=None,
                                                      labels=obs.labels))
    ob.check(ob.Observation(update=row.update, params=params, labels=row.labels), threat)
  if spec.control == "random_observation":
    obs = random_observation(obs, key=jax.random.fold_in(k_clients, 1 << 20))
  plan = ATTACKS[spec.name](model, threat, spec, config.defense)
  mode = fed.resolve_batching(config.batching)
  v, r = len(y), spec.restarts
  print(f"{ds.describe()}; {v} victims x batch {threat.batch_size} "
        f"({'images from ' + config.victims.images if config.victims.images else 'test split'}); "
        f"{config.model.name} ({config.model.init} init, {config.model.train_steps} training "
        f"steps, test accuracy {model_accuracy:.3f}); {threat.algorithm}, defense "
        f"{config.defense.name}; attack {spec.name}, {plan.steps} steps x {r} restarts, "
        f"batched by {mode} on {jax.default_backend()}")

  # Attack every pending victim (all at first), keep each one's best healthy restart, and
  # attack again with fresh keys the victims none of whose restarts stayed healthy.
  results_path, state_path = workdir / "attack_results.npz", workdir / "attack_state.npz"
  best_x = np.zeros(x.shape, np.float32)
  best_y = np.zeros(y.shape, np.int32)
  best_loss = np.full(v, np.inf)
  pending = np.ones(v, bool)
  attempts = np.zeros(v, np.int32)
  diverged_restarts = 0
  first_attempt = 0
  spent = np.zeros((v, len(attacks.COUNTERS)), np.int64)  # evaluations per victim, all restarts
  if results_path.exists():
    saved = np.load(results_path)
    best_x, best_y, best_loss = saved["x"], saved["y"], saved["loss"]
    pending, attempts, spent = saved["pending"], saved["attempts"], saved["spent"]
    diverged_restarts, first_attempt = int(saved["diverged"]), int(saved["next_attempt"])
  attack_seconds = 0.0
  bar = tqdm(total=plan.steps * (spec.retries + 1), desc="attack steps", dynamic_ncols=True,
             disable=None if progress else True, leave=False)
  try:
    for attempt in range(first_attempt, spec.retries + 1):
      ids = np.flatnonzero(pending)
      if len(ids) == 0:
        break
      rows = jax.tree.map(lambda a: jnp.repeat(a[ids], r, axis=0), obs.update)
      labels = None if obs.labels is None else jnp.repeat(obs.labels[ids], r, axis=0)
      batch_obs = ob.Observation(update=rows, params=params, labels=labels)
      k_try = jax.random.fold_in(k_attack, attempt)
      keys = jax.vmap(lambda i: jax.random.fold_in(k_try, i))(
          jnp.asarray((ids[:, None] * r + np.arange(r)).ravel()))
      t0 = time.perf_counter()
      states = attack_batched(
          plan, batch_obs, keys, mode=mode, map_batch_size=config.map_batch_size,
          chunk=config.chunk, progress=bar.update,
          checkpoint=lambda s, done: _save_state(state_path, s, done, attempt),
          restore=lambda like: _load_state(state_path, like, attempt))
      attack_seconds += time.perf_counter() - t0
      states = jax.tree.map(lambda a: a.reshape((len(ids), r) + a.shape[1:]), states)
      healthy = ~np.asarray(states.diverged) & np.isfinite(np.asarray(states.loss))
      spent[ids] += np.asarray(states.counts).sum(axis=1)
      diverged_restarts += int((~healthy).sum())
      chosen = jax.vmap(attacks.best)(states, jnp.where(healthy, states.loss, jnp.inf))
      ok = healthy.any(axis=1)
      best_x[ids[ok]] = np.asarray(chosen.x)[ok]
      best_y[ids[ok]] = np.asarray(plan.labels(chosen))[ok]
      best_loss[ids[ok]] = np.asarray(chosen.loss)[ok]
      attempts[ids] += 1
      pending[ids[ok]] = False
      np.savez(results_path, x=best_x, y=best_y, loss=best_loss, pending=pending,
               attempts=attempts, spent=spent, diverged=diverged_restarts,
               next_attempt=attempt + 1)
      if state_path.exists():
        state_path.unlink()
  finally:
    bar.close()
  failed = pending
  return _report(config, workdir, ds, model, x, y, names, best_x, best_y, best_loss, failed,
                 attempts, diverged_restarts, plan.steps, attack_seconds,
                 time.perf_counter() - t_start, model_accuracy, mode, spent, extra)


def _adaptive_processing(config: InversionConfig, model: models.Model, params: Any,
                         ds: datasets.Dataset, x: np.ndarray, y: np.ndarray,
                         threat: ob.ThreatModel, defense: fed.DefenseFn, obs: ob.Observation,
                         *, key: jax.Array) -> tuple[ob.Observation, dict[str, Any]]:
  """The attacker's denoising pipeline (`attack.denoise`) on the observations, and what to
  report about it: the cosine between the processed and the clean update, and the
  reconstruction-robustness ceiling (Kaissis et al. 2023) at the attacker's mu."""
  spec, d = config.attack, config.defense
  steps = adaptive.parse(spec.denoise)
  extra: dict[str, Any] = {"denoise": spec.denoise, "observed_rounds": spec.rounds}
  if steps:
    rounds = spec.rounds if "average" in steps else 1
    ys = [obs.update] + [observe_all(model, params, x, y, threat, defense, key=key,
                                     round_=i).update for i in range(1, rounds)]
    surrogates = None
    if "wiener" in steps or "pca" in steps:
      surrogates = _surrogate_updates(model, params, ds, threat, spec.surrogates,
                                      key=jax.random.fold_in(key, 1 << 21))
    update, _ = adaptive.process(jax.tree.map(lambda *a: jnp.stack(a), *ys), steps,
                                 declared_noise(d), batch_size=threat.batch_size,
                                 surrogates=surrogates, pca_rank=spec.pca_rank)
    obs = ob.Observation(update=update, params=obs.params, labels=obs.labels)
  if d.name != "none":
    clean = observe_all(model, params, x, y, threat, fed.identity_defense, key=key).update
    extra["update_cosine"] = float(np.median(np.asarray(adaptive.update_cosine(obs.update,
                                                                                clean))))
  z = {"forward_noise": d.noise_multiplier, "local_dp": d.noise_multiplier}.get(d.name, 0.0)
  if z > 0:  # per upload, replace-one: mu = 2 sqrt(k) / z over the k uploads the attack used
    k = spec.rounds if "average" in steps else 1
    extra["mu_per_upload"] = 2.0 * k ** 0.5 / z
    extra["rero_bound_kappa_1e-3"] = fn.rero_bound(extra["mu_per_upload"], 1e-3)
  return obs, extra


def _surrogate_updates(model: models.Model, params: Any, ds: datasets.Dataset,
                       threat: ob.ThreatModel, num: int, *, key: jax.Array) -> Any:
  """`num` clean updates `[K, ...]` of batches drawn from the training split (the
  attacker's public data, disjoint from the test-split victims) at the same model."""
  b = threat.batch_size
  if num * b > len(ds.y_train):
    raise ValueError(f"attack.surrogates={num} batches of {b} exceed the {len(ds.y_train)} "
                     f"training images")
  order = np.asarray(jax.random.permutation(jax.random.fold_in(key, 0), len(ds.y_train)))
  idx = order[:num * b]
  xs = ds.x_train[idx].reshape((num, b) + ds.x_train.shape[1:])
  ys = ds.y_train[idx].reshape(num, b)
  return observe_all(model, params, xs, ys, threat, fed.identity_defense,
                     key=jax.random.fold_in(key, 1)).update


def _report(config: InversionConfig, workdir: Path, ds: datasets.Dataset, model: models.Model,
            x: np.ndarray, y: np.ndarray, names: list[str], rec: np.ndarray, rec_y: np.ndarray,
            loss: np.ndarray, failed: np.ndarray, attempts: np.ndarray, diverged: int,
            steps: int, attack_seconds: float, wall_seconds: float, model_accuracy: float,
            mode: str, spent: np.ndarray, extra: dict[str, Any] | None = None
            ) -> dict[str, Any]:
  """Scores every victim (after Hungarian matching), writes metrics.json and grid.png."""
  features = None
  reference = {}
  if config.feature_metric:
    ref_model, ref_params, ref_acc = classifier.reference_classifier(
        ds, config.classifier_dir or workdir / "classifier")
    features = jax.jit(functools.partial(ref_model.features, ref_params))
    predict = jax.jit(functools.partial(ref_model.apply, ref_params))
    reference = {"reference_classifier": ref_model.module.__class__.__name__.lower(),
                 "reference_test_accuracy": ref_acc}
  rec = np.clip(rec, 0.0, 1.0)  # the valid image range (IG's box constraint; DLG unconstrained)
  victims, matched = [], np.zeros_like(rec)
  psnr = np.full(y.shape, np.nan)
  for i in range(len(y)):
    scores = metrics.score(rec[i], x[i], features=features)
    matched[i] = rec[i][scores["order"]]
    psnr[i] = scores["psnr"]
    entry = {"victim": i, "source": names[i], "labels": y[i].tolist(),
             "inferred_labels": rec_y[i].tolist(),
             "label_accuracy": metrics.label_accuracy(rec_y[i], y[i]),
             "failed": bool(failed[i]), "attempts": int(attempts[i]),
             "matching_loss": float(loss[i]),
             **{k: scores[k].tolist() for k in ("psnr", "ssim", "mse", "feature_distance")
                if k in scores}}
    if features is not None:
      entry["recognised"] = (np.asarray(predict(jnp.asarray(matched[i]))).argmax(-1)
                             == y[i]).tolist()
    victims.append(entry)
  ok = [e for e in victims if not e["failed"]]
  flat = lambda key: [value for e in ok for value in e.get(key, [])]  # noqa: E731
  finite_psnr = _finite(flat("psnr"))
  summary = {
      "victims": len(y), "batch_size": int(y.shape[1]), "failed": int(failed.sum()),
      "diverged_restarts": diverged, "retried_victims": int((attempts > 1).sum()),
      "median_psnr": float(np.median(flat("psnr"))) if ok else float("nan"),
      "mean_psnr": float(np.mean(finite_psnr)) if finite_psnr else float("nan"),
      "median_ssim": float(np.median(flat("ssim"))) if ok else float("nan"),
      "mean_ssim": float(np.mean(flat("ssim"))) if ok else float("nan"),
      "label_accuracy": float(np.mean([e["label_accuracy"] for e in victims])),
      "images_above_30db": int(np.sum(np.asarray(flat("psnr")) >= 30)),
      # reconstruction success (for the ReRo ceiling): an image at >= 20 dB, failures count
      "success_rate_20db": float(np.sum(np.asarray(flat("psnr")) >= 20) / y.size),
      **({"mean_feature_distance": float(np.mean(flat("feature_distance"))) if ok else float("nan"),
          "recognised": float(np.mean(flat("recognised"))) if ok else float("nan"),
          **reference} if features is not None else {}),
      "attack": config.attack.name, "steps": steps, "restarts": config.attack.restarts,
      "gradient_steps_per_victim": steps * config.attack.restarts * int(attempts.max()),
      **{f"{name}_per_victim": float(spent[:, i].mean()) for i, name in enumerate(attacks.COUNTERS)},
      "budget": config.attack.budget, "control": config.attack.control,
      "attack_seconds": attack_seconds, "wall_seconds": wall_seconds,
      "victim_attacks_per_hour": len(y) * 3600.0 / max(attack_seconds, 1e-9),
      "model_test_accuracy": model_accuracy, "batching": mode,
      "backend": jax.default_backend(), "devices": jax.device_count(),
      "jax": jax.__version__,
      **(extra or {}),
  }
  np.savez_compressed(workdir / "reconstructions.npz", truth=x, reconstruction=matched,
                      psnr=psnr, failed=failed)
  (workdir / "metrics.json").write_text(json.dumps(
      {"summary": summary, "config": config_lib.to_dict(config), "victims": victims},
      indent=2) + "\n")
  save_grid(workdir / "grid.png", x, matched, psnr, failed,
            title=f"{config.attack.name} on {config.model.name}, {config.threat.algorithm} "
                  f"B={y.shape[1]}, defense {config.defense.name}: median PSNR "
                  f"{summary['median_psnr']:.1f} dB")
  print(f"median PSNR {summary['median_psnr']:.2f} dB, mean SSIM {summary['mean_ssim']:.3f}, "
        f"label accuracy {summary['label_accuracy']:.3f}, {summary['failed']} failed, "
        f"{diverged} diverged restarts; attack {attack_seconds:.1f}s "
        f"({summary['victim_attacks_per_hour']:.0f} victim-attacks/hour); outputs in {workdir}")
  _remove_attack_files(workdir)
  return summary


def main(argv: list[str] | None = None) -> None:
  """The command line: one flag per config field, plus --workdir."""
  def extra(parser):
    parser.add_argument("--workdir", default="runs/invert",
                        help="output folder (default: runs/invert)")
    parser.add_argument("--overwrite", action="store_true",
                        help="discard the results in --workdir and run again")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  config, ns = config_lib.parse(InversionConfig, argv, extra=extra,
                                description="Gradient inversion (DLG, iDLG, Inverting Gradients) "
                                            "on what fljax's clients send; resumable.")
  try:
    run(config, ns.workdir, overwrite=ns.overwrite, progress=not ns.no_progress)
  except (datasets.DatasetError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None
  except KeyboardInterrupt:
    print(f"\ninterrupted: the attack state is saved every --chunk steps in {ns.workdir}; "
          f"rerun the same command to resume", file=sys.stderr)
    raise SystemExit(130) from None
