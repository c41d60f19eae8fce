"""A DCGAN image prior (Radford et al., ICLR 2016) for the GAN-prior attacks (GIFD, GGL).

The generator is the 32x32 DCGAN of GIAS's code (Jeon et al. 2021,
`genmodels/cifar10_dcgan/dcgan.py`: z -> 4x4 -> 8x8 -> 16x16 -> 32x32 transposed
convolutions with BatchNorm and ReLU, a 1x1 convolution and tanh), with `base` channels
at 32x32 (ngf) and `8 * base` at 4x4. Its blocks are exposed one by one so that GIFD can
optimise an intermediate feature map and run only the rest of the network:

    f = generate(gan, params, z, upto=k)      # block outputs: k = 0 is z itself,
    x = generate(gan, params, f, start=k)     # 1: [4, 4, 8b], 2: [8, 8, 4b], 3: [16, 16, 2b]

Images come out in [-1, 1] (`to_unit` maps them to [0, 1]). BatchNorm runs on its
running statistics outside training (GIFD keeps the generator in eval mode).

`train(config, workdir)` trains it, checkpointing and resuming like the diffusion trainer
(orbax, bit-for-bit deterministic from the seed); the generator is written to
`workdir/prior/` (`config.json`, `params.msgpack`) and `load` reads it back. The recipe
(the `GANTrainConfig` defaults), and why:

- DCGAN weight initialisation N(0, 0.02) for every generator layer, and the 1x1 output
  layer's bias started at the data's mean pixel (atanh of it). With Flax's default
  (LeCun) initialisation and a zero bias the generator starts by emitting saturated
  per-pixel noise around mid-grey. Its output layer has only `base` weights per pixel, so
  Adam (which moves each weight by about lr per step) would need thousands of steps to
  darken the background through it; the generator instead learned sample-independent
  spatial templates in its BatchNorm'd transposed convolutions (checkerboard speckle). Within
  50 steps the samples' pixel std across z fell from 0.31 to 0.05, the discriminator then
  won outright (non-saturating d_loss at its floor) and every sample was the same blob, in
  train-mode BatchNorm as in eval mode: a real mode collapse, not a running-statistics
  artefact. Instance noise on the discriminator's inputs (sigma 0.1 to 0.3), a minibatch-std
  feature in the discriminator, a 4x slower discriminator, lower learning rates and the
  hinge loss did not prevent it (measured in 50-300 step trials).
- Adam with beta1 0.5 (DCGAN), generator lr 5e-4 and discriminator lr 2e-4 (TTUR, Heusel
  et al. 2017, with the faster side here the generator, which has to move its output
  layer), the non-saturating loss with one-sided label smoothing (real targets 0.9,
  Salimans et al. 2016), batch 64, one generator step per discriminator step.
- The discriminator: three stride-2 convolutions, leaky ReLU, per-pixel layer norm on
  the hidden layers (no BatchNorm, which would mix the real and fake batches).
- Generator BatchNorm momentum 0.9, so its running statistics (used in eval mode, by the
  attacks and the sample grids) follow the last ~10 steps of a short run.

The other `GANTrainConfig` options (minibatch std, instance noise, the hinge loss, several
generator steps per discriminator step, discriminator width) are the alternatives tried,
kept for experiments; they are off by default.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from fljax import config as config_lib
from fljax import datasets, runs

MNIST_GAN = Path(__file__).resolve().parent / "priors" / "mnist_dcgan"
FASHION_MNIST_GAN = Path(__file__).resolve().parent / "priors" / "fashion_mnist_dcgan"
#: The shipped GAN priors by the dataset they model (`--attack.gan NAME`).
SHIPPED: dict[str, Path] = {"mnist": MNIST_GAN, "fashion_mnist": FASHION_MNIST_GAN}
NUM_STAGES = 4  # z, and the outputs of the three first blocks
INIT = nn.initializers.normal(0.02)  # Radford et al.'s weight initialisation


class GANError(ValueError):
  """A GAN prior folder that cannot be used (the message says what to do)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class GANConfig:
  """The DCGAN's shape: latent size, base channels, output channels."""

  latent_dim: int = 100
  base: int = 32
  channels: int = 1

  def stage_shape(self, k: int) -> tuple[int, ...]:
    """The shape of one sample's stage-k input: z, then the block outputs."""
    if k == 0:
      return (self.latent_dim,)
    size = 4 * 2 ** (k - 1)
    return (size, size, self.base * 2 ** (4 - k))


class Generator(nn.Module):
  config: GANConfig

  @nn.compact
  def __call__(self, f: jax.Array, *, start: int = 0, upto: int = NUM_STAGES,
               train: bool = False) -> jax.Array:
    c = self.config
    norm = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)  # noqa: E731
    w = INIT  # DCGAN initialisation (the output starts near 0, not saturated noise)
    for k in range(start, upto):
      if k == 0:
        f = nn.Dense(4 * 4 * 8 * c.base, kernel_init=w, name="fc")(f).reshape(
            f.shape[0], 4, 4, 8 * c.base)
        f = nn.relu(norm("bn0")(f))
      else:
        f = nn.ConvTranspose(c.base * 2 ** (4 - k - 1), (4, 4), strides=(2, 2), padding="SAME",
                             kernel_init=w, name=f"up{k}")(f)
        f = nn.relu(norm(f"bn{k}")(f))
    if upto < NUM_STAGES:
      return f
    return jnp.tanh(nn.Conv(c.channels, (1, 1), kernel_init=w, name="out")(f))


class Discriminator(nn.Module):
  """conv 4x4 stride 2 (32 -> 16 -> 8 -> 4) with `base`, 2 `base`, 4 `base` channels,
  leaky ReLU, layer norm on the hidden layers, a linear logit."""

  config: GANConfig
  base: int | None = None  # channels of the first layer (default: the generator's base)
  minibatch_std: bool = False  # append the batch's feature std as a channel (anti-collapse)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b = self.base or self.config.base
    for i, ch in enumerate((b, 2 * b, 4 * b)):
      x = nn.Conv(ch, (4, 4), strides=(2, 2), padding="SAME", name=f"conv{i}")(x)
      if i:  # per-sample normalisation (BatchNorm would mix the real and fake batches)
        x = nn.LayerNorm(name=f"ln{i}")(x)
      x = nn.leaky_relu(x, 0.2)
    if self.minibatch_std:  # Karras et al. 2018: a batch of near-copies is easy to reject
      s = jnp.mean(jnp.std(x, axis=0)) * jnp.ones((*x.shape[:-1], 1), x.dtype)
      x = jnp.concatenate([x, s], -1)
    return nn.Dense(1, name="logit")(x.reshape(x.shape[0], -1))[:, 0]


@dataclasses.dataclass(frozen=True)
class GAN:
  """A trained generator: its config and variables ({'params', 'batch_stats'})."""

  config: GANConfig
  variables: Any

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (32, 32, self.config.channels)


def generate(gan: GAN, variables: Any, f: jax.Array, *, start: int = 0,
             upto: int = NUM_STAGES) -> jax.Array:
  """Runs the generator's blocks `start .. upto - 1` on `f` (eval mode)."""
  return Generator(gan.config).apply(variables, f, start=start, upto=upto)


def to_unit(x: jax.Array) -> jax.Array:
  """Generator output in [-1, 1] -> images in [0, 1]."""
  return (x + 1.0) / 2.0


def init(config: GANConfig, *, key: jax.Array, d_base: int | None = None,
         minibatch_std: bool = False) -> tuple[Any, Any]:
  """Fresh generator variables and discriminator params."""
  kg, kd = jax.random.split(key)
  g = Generator(config).init(kg, jnp.zeros((1, config.latent_dim)))
  d = Discriminator(config, d_base, minibatch_std).init(
      kd, jnp.zeros((2, 32, 32, config.channels)))["params"]
  return g, d


def save(gan: GAN, path: str | Path, *, run_config: dict | None = None) -> None:
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(
      {"gan": dataclasses.asdict(gan.config), **({"run": run_config} if run_config else {})},
      indent=2) + "\n")
  (path / "params.msgpack").write_bytes(serialization.to_bytes(gan.variables))


def load(path: str | Path = MNIST_GAN) -> GAN:
  """The generator saved in `path` (default: the shipped MNIST DCGAN)."""
  path = Path(path)
  if not (path / "config.json").exists() or not (path / "params.msgpack").exists():
    raise GANError(f"{path} is not a GAN prior folder (config.json and params.msgpack); "
                   f"train one with 'python scripts/train_gan.py --workdir DIR' and pass DIR/prior")
  return _load(path, runs.stamp(path, ("config.json", "params.msgpack")))


@functools.lru_cache(maxsize=4)  # a study loads the same generator for every cell
def _load(path: Path, stamp: tuple) -> GAN:
  del stamp  # the cache key: a rewritten file is read again
  config = GANConfig(**json.loads((path / "config.json").read_text())["gan"])
  template = Generator(config).init(jax.random.key(0), jnp.zeros((1, config.latent_dim)))
  try:
    variables = serialization.from_bytes(template, (path / "params.msgpack").read_bytes())
  except (ValueError, KeyError) as e:
    raise GANError(f"{path}/params.msgpack does not fit its config.json ({e})") from None
  return GAN(config, jax.tree.map(jnp.asarray, variables))


# ----------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True, kw_only=True)
class GANTrainConfig:
  """A DCGAN training run on an fljax dataset's training split (victims come from the
  test split, so the prior never sees them). See the module docstring for the recipe.

  Attributes:
    data: the training images.
    channels: generated channels (1: grayscale; attacks replicate to the victim's).
    latent_dim: z size.
    base: generator base channels.
    d_base: discriminator base channels (0: the generator's `base`).
    minibatch_std: give the discriminator the batch's feature standard deviation.
    steps: optimizer steps (one discriminator and `g_steps` generator updates each).
    batch_size: images per step.
    lr: generator Adam learning rate.
    d_lr: discriminator Adam learning rate (0: `lr`).
    beta1: Adam beta1 of both (0.5 as DCGAN).
    loss: 'nonsaturating' (the DCGAN loss) or 'hinge'.
    real_label: the discriminator's target for real images with the non-saturating loss
      (1.0: none; 0.9: one-sided label smoothing).
    g_steps: generator updates per discriminator update.
    instance_noise: std of the Gaussian noise added to the discriminator's real and fake
      inputs (images in [-1, 1]) at step 0, annealed linearly to 0 over `noise_steps`.
    noise_steps: steps of that annealing (0: `steps`).
    seed: initialisation and batch order.
    checkpoint_every: steps between checkpoints.
    sample_every: steps between sample grids.
  """

  data: datasets.Source = datasets.Source()
  channels: int = 1
  latent_dim: int = 100
  base: int = 32
  d_base: int = 0
  minibatch_std: bool = False
  steps: int = 2000
  batch_size: int = 64
  lr: float = 5e-4
  d_lr: float = 2e-4
  beta1: float = 0.5
  loss: str = "nonsaturating"
  real_label: float = 0.9
  g_steps: int = 1
  instance_noise: float = 0.0
  noise_steps: int = 0
  seed: int = 0
  checkpoint_every: int = 250
  sample_every: int = 250

  def __post_init__(self):
    if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.d_lr < 0:
      raise ValueError("steps >= 1, batch_size >= 1, lr > 0 and d_lr >= 0 are required")
    if self.channels not in (1, 3):
      raise ValueError(f"channels must be 1 or 3, got {self.channels}")
    if self.loss not in LOSSES:
      raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {self.loss!r}")
    if self.g_steps < 1 or self.instance_noise < 0 or self.noise_steps < 0 or self.d_base < 0:
      raise ValueError("g_steps >= 1, instance_noise >= 0, noise_steps >= 0, d_base >= 0 are required")
    if not 0.5 < self.real_label <= 1.0:
      raise ValueError(f"real_label must be in (0.5, 1], got {self.real_label}")


def _nonsaturating(real_label: float):
  def d_loss(l_real, l_fake):
    # real_label < 1: one-sided label smoothing (Salimans et al. 2016).
    real = real_label * jax.nn.softplus(-l_real) + (1 - real_label) * jax.nn.softplus(l_real)
    return jnp.mean(real) + jnp.mean(jax.nn.softplus(l_fake))
  return d_loss, lambda l_fake: jnp.mean(jax.nn.softplus(-l_fake))


def _hinge(real_label: float):
  del real_label
  d_loss = lambda l_real, l_fake: jnp.mean(nn.relu(1 - l_real)) + jnp.mean(nn.relu(1 + l_fake))  # noqa: E731
  return d_loss, lambda l_fake: -jnp.mean(l_fake)


LOSSES = {"nonsaturating": _nonsaturating, "hinge": _hinge}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class GANTrainState:
  step: jax.Array
  g_vars: Any
  d_params: Any
  g_opt: Any
  d_opt: Any
  key: jax.Array


def make_train_step(config: GANConfig, x: jax.Array, *, train: GANTrainConfig,
                    g_optimizer: optax.GradientTransformation,
                    d_optimizer: optax.GradientTransformation):
  """`step(state) -> (state, metrics)`: one discriminator update and `train.g_steps`
  generator updates with `train.loss`, on batches drawn from `x` (in [-1, 1]) on device,
  the discriminator's inputs noised by the annealed instance noise."""
  gen, disc = Generator(config), Discriminator(config, train.d_base or None, train.minibatch_std)
  d_loss_fn, g_loss_fn = LOSSES[train.loss](train.real_label)
  n, noise_steps = train.batch_size, train.noise_steps or train.steps

  def fake(g_params, batch_stats, z):
    return gen.apply({"params": g_params, "batch_stats": batch_stats}, z, train=True,
                     mutable=["batch_stats"])

  def logits(d_params, images, sigma, key):
    return disc.apply({"params": d_params}, images + sigma * jax.random.normal(key, images.shape))

  def d_loss(d_params, real, fakes, sigma, key):
    k_r, k_f = jax.random.split(key)
    l_real, l_fake = logits(d_params, real, sigma, k_r), logits(d_params, fakes, sigma, k_f)
    return d_loss_fn(l_real, l_fake), (jnp.mean(l_real), jnp.mean(l_fake))

  def g_loss(g_params, batch_stats, d_params, z, sigma, key):
    fakes, updates = fake(g_params, batch_stats, z)
    return g_loss_fn(logits(d_params, fakes, sigma, key)), updates

  def step(state: GANTrainState):
    keys = jax.random.split(jax.random.fold_in(state.key, state.step), 3 + 2 * train.g_steps)
    sigma = train.instance_noise * jnp.clip(1.0 - state.step / noise_steps, 0.0, 1.0)
    real = x[jax.random.randint(keys[0], (n,), 0, x.shape[0])]
    g_params, stats = state.g_vars["params"], state.g_vars["batch_stats"]
    fakes, _ = fake(g_params, stats, jax.random.normal(keys[1], (n, config.latent_dim)))
    (ld, (l_real, l_fake)), gd = jax.value_and_grad(d_loss, has_aux=True)(
        state.d_params, real, jax.lax.stop_gradient(fakes), sigma, keys[2])
    upd, d_opt = d_optimizer.update(gd, state.d_opt, state.d_params)
    d_params = optax.apply_updates(state.d_params, upd)
    g_opt, lg = state.g_opt, 0.0
    for i in range(train.g_steps):
      z = jax.random.normal(keys[3 + 2 * i], (n, config.latent_dim))
      (lg, new_stats), gg = jax.value_and_grad(g_loss, has_aux=True)(
          g_params, stats, d_params, z, sigma, keys[4 + 2 * i])
      upd, g_opt = g_optimizer.update(gg, g_opt, g_params)
      g_params, stats = optax.apply_updates(g_params, upd), new_stats["batch_stats"]
    g_vars = {"params": g_params, "batch_stats": stats}
    metrics = {"d_loss": ld, "g_loss": lg, "d_real_logit": l_real, "d_fake_logit": l_fake,
               "noise": sigma}
    return dataclasses.replace(state, step=state.step + 1, g_vars=g_vars, d_params=d_params,
                               g_opt=g_opt, d_opt=d_opt), metrics

  return step


def train(config: GANTrainConfig, workdir: str | os.PathLike, *, overwrite: bool = False,
          progress: bool = True) -> dict[str, Any]:
  """Runs (or resumes) a DCGAN training run; returns the last metrics record."""
  from tqdm import tqdm

  from fljax import plots

  workdir = Path(workdir)
  runs.check_workdir(workdir, config, overwrite,
                     extendable=("steps", "sample_every", "checkpoint_every"))
  ds = config.data.load(image_size=32, channels=config.channels)
  gcfg = GANConfig(latent_dim=config.latent_dim, base=config.base, channels=config.channels)
  g_optimizer = optax.adam(config.lr, b1=config.beta1)
  d_optimizer = optax.adam(config.d_lr or config.lr, b1=config.beta1)
  k_init, k_train, k_sample = jax.random.split(jax.random.key(config.seed), 3)
  g_vars, d_params = init(gcfg, key=k_init, d_base=config.d_base or None,
                          minibatch_std=config.minibatch_std)
  # The output bias starts at the data's mean pixel (pre-tanh): the 1x1 output layer has
  # few weights, and Adam would need thousands of steps to darken the background alone.
  mean = float(np.clip(2.0 * np.mean(ds.x_train) - 1.0, -0.95, 0.95))
  g_vars["params"]["out"]["bias"] = jnp.full_like(g_vars["params"]["out"]["bias"], np.arctanh(mean))
  state = GANTrainState(step=jnp.zeros((), jnp.int32), g_vars=g_vars, d_params=d_params,
                        g_opt=g_optimizer.init(g_vars["params"]),
                        d_opt=d_optimizer.init(d_params), key=k_train)
  state, ckpt, log = runs.resume(workdir, state)
  if int(state.step) >= config.steps:
    tqdm.write(f"{workdir} already finished {int(state.step)} steps; pass a larger --steps to "
               f"train on")
  elif int(state.step):
    tqdm.write(f"resuming {workdir} at step {int(state.step)}")
  step_fn = jax.jit(make_train_step(gcfg, 2.0 * jnp.asarray(ds.x_train) - 1.0, train=config,
                                    g_optimizer=g_optimizer, d_optimizer=d_optimizer),
                    donate_argnums=0)
  z_grid = jax.random.normal(k_sample, (64, gcfg.latent_dim))

  def export(state):
    gan = GAN(gcfg, state.g_vars)
    save(gan, workdir / "prior", run_config=config_lib.to_dict(config))
    grid = np.asarray(to_unit(generate(gan, state.g_vars, z_grid))).reshape(8, 8, 32, 32, -1)
    plots.save_image_grid(workdir / f"samples_{int(state.step):06d}.png", grid)

  _, record = runs.run_steps(
      state, step_fn, steps=config.steps, ckpt=ckpt, log=log, log_every=50,
      checkpoint_every=config.checkpoint_every, export=export, export_every=config.sample_every,
      progress=progress,
      divergence=runs.Divergence(keys=("d_loss", "g_loss"),
                                 advice=f"lower --lr (now {config.lr:g}) and --d_lr"))
  return record


def main(argv: list[str] | None = None) -> None:
  config, ns = config_lib.parse(GANTrainConfig, argv, description=__doc__.splitlines()[0],
                                extra=lambda p: runs.add_flags(p, workdir=None))
  with runs.cli_errors():
    record = train(config, ns.workdir, overwrite=ns.overwrite, progress=ns.progress)
  print(json.dumps(record))
