"""Training a DDPM denoiser (Ho et al., NeurIPS 2020) on any fljax dataset, with
classifier-free label dropout (Ho & Salimans 2022) for class-conditional priors.

The loss is the simple DDPM objective in the chosen parameterisation: t ~ U{0..T-1},
x_t = q_sample(x_0, t, eps), loss = || f(x_t, t, y) - target ||^2 averaged over pixels,
target eps, x_0 or v. Images are mapped from fljax's [0, 1] to the model's [-1, 1]. A
class-conditional model reserves label `num_classes` as the null label; each training
label is replaced by it with probability `label_dropout`, so one network samples both
conditionally and unconditionally.

`train(config, workdir)`: optax Adam with linear warmup and global-norm clipping, an EMA
of the weights (what sampling uses), orbax checkpoints with resume (an unreadable newest
checkpoint is set aside and the previous one used), `metrics.jsonl`, and a PNG sample grid
(DDIM, EMA weights, one row per class) every `sample_every` steps. The trained prior is
`workdir/prior/`: `config.json` (this run's config), `unet.json` (diffusers-style UNet
config) and `params.msgpack` (EMA weights), loaded by `diffusion.prior.load`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion import prior as prior_lib
from diffusion import samplers, schedules, unet
from fljax import config as config_lib
from fljax import datasets, runs

Params = Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
  """The training images.

  Attributes:
    name: an fljax dataset ('mnist', 'digits', 'fashion_mnist', 'tfds:<name>').
    image_size: square size (MNIST 28 pads to 32); none: as stored.
    channels: image channels (1 or 3); none: as stored.
    train_subset: keep this many training images (stratified); none: all.
    data_dir: the dataset's folder or TFDS data_dir, where it needs one.
  """

  name: str = "mnist"
  image_size: int | None = 32
  channels: int | None = 1
  train_subset: int | None = None
  data_dir: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """A diffusion training run.

  Attributes:
    data: the training images.
    block_out_channels: UNet channels per resolution level.
    down_block_types: UNet down blocks (DownBlock2D / AttnDownBlock2D), one per level.
    up_block_types: UNet up blocks (UpBlock2D / AttnUpBlock2D), one per level.
    layers_per_block: ResNet blocks per down block.
    norm_num_groups: GroupNorm groups.
    attention_head_dim: channels per attention head.
    conditional: class-conditional with a null label (label dropout), else unconditional.
    label_dropout: probability of training on the null label.
    schedule: beta schedule (linear, scaled_linear, cosine).
    num_train_steps: diffusion steps T.
    prediction: what the UNet predicts (epsilon, x0, v).
    steps: optimizer steps.
    batch_size: images per step.
    lr: peak Adam learning rate.
    warmup: linear warmup steps.
    grad_clip: global gradient-norm clip.
    ema_decay: decay of the weights' exponential moving average.
    seed: the run's seed.
    log_every: steps between metrics.jsonl records.
    sample_every: steps between sample grids (0: only at the end).
    checkpoint_every: steps between checkpoints.
    sample_steps: DDIM steps for the grids.
  """

  data: DataConfig = DataConfig()
  block_out_channels: tuple[int, ...] = (32, 64, 128)
  down_block_types: tuple[str, ...] = ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D")
  up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")
  layers_per_block: int = 1
  norm_num_groups: int = 8
  attention_head_dim: int = 32
  conditional: bool = True
  label_dropout: float = 0.1
  schedule: str = "linear"
  num_train_steps: int = 1000
  prediction: str = "epsilon"
  steps: int = 5000
  batch_size: int = 64
  lr: float = 1e-3
  warmup: int = 200
  grad_clip: float = 1.0
  ema_decay: float = 0.999
  seed: int = 0
  log_every: int = 50
  sample_every: int = 500
  checkpoint_every: int = 250
  sample_steps: int = 50

  def __post_init__(self):
    if self.schedule not in schedules.SCHEDULES:
      raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {sorted(schedules.SCHEDULES)}")
    if self.prediction not in schedules.PARAMETERISATIONS:
      raise ValueError(f"prediction must be one of {schedules.PARAMETERISATIONS}, got {self.prediction!r}")
    if not 0 <= self.label_dropout < 1:
      raise ValueError(f"label_dropout must lie in [0, 1), got {self.label_dropout}")
    for name in ("steps", "batch_size", "num_train_steps", "log_every", "checkpoint_every",
                 "sample_steps"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    if not 0 <= self.ema_decay < 1:
      raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")

  def unet_config(self, image_shape: tuple[int, int, int], num_classes: int) -> unet.UNetConfig:
    h, w, c = image_shape
    if h != w:
      raise ValueError(f"the UNet needs square images, got {h}x{w}; set --data.image_size")
    return unet.UNetConfig(
        sample_size=h, in_channels=c, out_channels=c, block_out_channels=self.block_out_channels,
        down_block_types=self.down_block_types, up_block_types=self.up_block_types,
        layers_per_block=self.layers_per_block, norm_num_groups=self.norm_num_groups,
        attention_head_dim=self.attention_head_dim,
        num_class_embeds=num_classes + 1 if self.conditional else None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainState:
  step: jax.Array
  params: Params
  ema_params: Params
  opt_state: Any
  key: jax.Array


def to_model_range(x: jax.Array) -> jax.Array:
  """Images in [0, 1] -> the denoiser's [-1, 1]."""
  return 2.0 * x - 1.0


def to_image_range(x: jax.Array) -> jax.Array:
  """The denoiser's [-1, 1] -> images in [0, 1] (clipped)."""
  return jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)


def make_loss_fn(model: unet.UNet, schedule: schedules.Schedule, *, prediction: str = "epsilon",
                 label_dropout: float = 0.0):
  """`loss_fn(params, batch, key) -> (loss, aux)`: the DDPM loss on `batch = (x, y)`, x in
  [0, 1] `[B, H, W, C]`; y `[B]` labels, or None for an unconditional model."""
  conditional = bool(model.config.num_class_embeds)

  def loss_fn(params, batch, key):
    x, y = batch
    x0 = to_model_range(x)
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    t = jax.random.randint(k_t, (x0.shape[0],), 0, schedule.num_steps)
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    x_t = schedules.q_sample(schedule, x0, t, noise)
    labels = None
    if conditional:
      drop = jax.random.bernoulli(k_drop, label_dropout, y.shape)
      labels = jnp.where(drop, unet.null_label(model.config), y)
    out = model.apply({"params": params}, x_t, t, labels)
    target = schedules.convert(noise, x_t, schedule.alpha_bars[t], source="epsilon", target=prediction)
    loss = jnp.mean((out - target) ** 2)
    return loss, {"loss": loss}

  return loss_fn


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  lr = optax.linear_schedule(0.0, config.lr, max(config.warmup, 1))
  return optax.chain(optax.clip_by_global_norm(config.grad_clip), optax.adam(lr))


def make_train_step(loss_fn, optimizer: optax.GradientTransformation, x: jax.Array, y: jax.Array,
                    *, batch_size: int, ema_decay: float):
  """A jit-able `step(state) -> (state, metrics)` that draws its batch from the arrays on device."""

  def step(state: TrainState):
    k_batch, k_loss = jax.random.split(jax.random.fold_in(state.key, state.step))
    idx = jax.random.randint(k_batch, (batch_size,), 0, x.shape[0])
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, (x[idx], y[idx]), k_loss)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, state.ema_params, params)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return dataclasses.replace(state, step=state.step + 1, params=params, ema_params=ema,
                               opt_state=opt_state), metrics

  return step


def sample_grid(prior: prior_lib.Prior, *, key: jax.Array, per_class: int = 8,
                num_steps: int = 50, guidance_weight: float = 0.0) -> np.ndarray:
  """Images in [0, 1] `[rows, per_class, H, W, C]`: one row per class (a conditional
  prior) or rows of unconditional samples, by DDIM with `num_steps` steps."""
  cfg = prior.unet_config
  rows = prior.num_classes or 4
  labels = jnp.repeat(jnp.arange(rows), per_class) if prior.num_classes else None
  k_noise, k_sample = jax.random.split(key)
  x_T = jax.random.normal(k_noise, (rows * per_class, *cfg.input_shape))
  denoiser = prior.denoiser(labels, guidance_weight=guidance_weight)
  x = samplers.run(samplers.ddim(prior.schedule, num_steps=num_steps, prediction=prior.prediction),
                   denoiser, x_T, key=k_sample)
  return np.asarray(to_image_range(x)).reshape(rows, per_class, *cfg.input_shape)


def train(config: TrainConfig, workdir: str | os.PathLike, *, overwrite: bool = False,
          progress: bool = True) -> dict[str, Any]:
  """Runs (or resumes) a training run in `workdir`; returns the last metrics record.

  Raises the faults of `fljax.runs` (WorkdirError, DivergenceError, CheckpointError,
  Interrupted), datasets.DatasetError and unet.ConfigError.
  """
  from tqdm import tqdm

  from fljax import plots

  workdir = Path(workdir)
  runs.check_workdir(workdir, config, overwrite, extendable=("steps", "sample_every", "log_every",
                                                             "checkpoint_every"))
  ds = datasets.load(config.data.name, image_size=config.data.image_size,
                     channels=config.data.channels, train_subset=config.data.train_subset,
                     data_dir=config.data.data_dir)
  ucfg = config.unet_config(ds.image_shape, ds.num_classes)
  schedule = schedules.SCHEDULES[config.schedule](config.num_train_steps)
  model = unet.UNet(ucfg)
  optimizer = make_optimizer(config)
  k_init, k_train, k_sample = jax.random.split(jax.random.key(config.seed), 3)
  params = unet.init(ucfg, key=k_init)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     ema_params=jax.tree.map(jnp.copy, params),
                     opt_state=optimizer.init(params), key=k_train)
  state, ckpt, log = runs.resume(workdir, state)
  start = int(state.step)
  if start >= config.steps:
    tqdm.write(f"{workdir} already finished {start} steps; pass a larger --steps to train on")
  tqdm.write(f"UNet {unet.count_params(params):,} parameters; {ds.name} {ds.image_shape}, "
             f"{len(ds.x_train)} training images" + (f"; resuming at step {start}" if start else ""))

  loss_fn = make_loss_fn(model, schedule, prediction=config.prediction,
                         label_dropout=config.label_dropout)
  step_fn = jax.jit(make_train_step(loss_fn, optimizer, jnp.asarray(ds.x_train),
                                    jnp.asarray(ds.y_train), batch_size=config.batch_size,
                                    ema_decay=config.ema_decay), donate_argnums=0)

  def export(state):
    prior = prior_lib.Prior(unet_config=ucfg, params=state.ema_params, schedule=schedule,
                            prediction=config.prediction, num_classes=ds.num_classes if config.conditional else 0,
                            schedule_config={"name": config.schedule, "num_train_steps": config.num_train_steps})
    prior_lib.save(prior, workdir / "prior", run_config=config_lib.to_dict(config))
    grid = sample_grid(prior, key=jax.random.fold_in(k_sample, int(state.step)),
                       num_steps=config.sample_steps)
    plots.save_image_grid(workdir / f"samples_{int(state.step):06d}.png", grid)

  _, record = runs.run_steps(
      state, step_fn, steps=config.steps, ckpt=ckpt, log=log, log_every=config.log_every,
      checkpoint_every=config.checkpoint_every, export=export, export_every=config.sample_every,
      progress=progress,
      divergence=runs.Divergence(keys=("loss",), advice=f"lower --lr (now {config.lr:g}) or "
                                                        f"--grad_clip (now {config.grad_clip:g})"))
  return record


def main(argv: list[str] | None = None) -> None:
  config, ns = config_lib.parse(TrainConfig, argv, description=__doc__.splitlines()[0],
                                extra=lambda p: runs.add_flags(p, workdir=None))
  with runs.cli_errors():
    record = train(config, ns.workdir, overwrite=ns.overwrite, progress=ns.progress)
  print(json.dumps(record))
