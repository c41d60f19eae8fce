"""Baselines of a gradient-inversion table: what an attacker gets without the gradient.

A reconstruction counts only by how far it beats images that need no observed update:

  blank             an all-zero image (black; MNIST's background is 0, so on digits this
                    is a strong baseline: about 11 dB).
  mean_image        the mean image of the dataset's training split (what knowing the data
                    distribution's first moment gives).
  nearest_training  the training image nearest each victim image in pixel MSE: the best a
                    prior that memorised the training split could return without the
                    gradient (an upper-bound-like reference; it looks at the victim, which
                    no attacker can).
  prior_only        the diffusion prior's conditional sample at the labels the attack
                    infers: the diffusion-guided attack with `gradient_weight = 0` and
                    `feature_weight = 0` (labels are still read off the update, as the
                    attack does; no double-backward evaluation is spent).
  gan_sample        a random sample of the GAN prior (the GAN attacks' starting point).

Each is scored like an attack (`score`): per victim, its B images are matched to the
victim's by the Hungarian algorithm (`inversion.metrics.match`), and the victim's PSNR
and SSIM are the means over its B images. A PSNR of an exact copy is infinite; it is
capped at `PSNR_CAP` dB (`cap_psnr`) so that medians, intervals and JSON stay finite;
apply the same cap to the attacks' PSNRs before comparing them with `inversion.stats`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike

from inversion import engine, metrics
from inversion import gan as gan_lib
from inversion.attacks import diffusion_guided, to_victim
from inversion.attacks.diffusion_guided import DiffusionAttackConfig
from inversion.observation import Observation, ThreatModel
from inversion.specs import AttackPlan

PSNR_CAP = 100.0  # dB: an MSE of 1e-10 on [0, 1] images, far below float32 attack noise


def cap_psnr(values: ArrayLike, cap: float = PSNR_CAP) -> np.ndarray:
  """PSNRs with +inf (an exact copy) and anything above `cap` set to `cap`."""
  return np.minimum(np.asarray(values, np.float64), cap)


def _shape(x: np.ndarray) -> None:
  if x.ndim != 5:
    raise ValueError(f"victim images must be [V, B, H, W, C], got shape {x.shape}")


def mean_image(train: ArrayLike) -> np.ndarray:
  """The mean image `[H, W, C]` of the training images `[N, H, W, C]`."""
  train = np.asarray(train)
  if train.ndim != 4 or not len(train):
    raise ValueError(f"training images must be a non-empty [N, H, W, C], got shape {train.shape}")
  return train.mean(0, dtype=np.float64).astype(np.float32)


def nearest_training(x: ArrayLike, train: ArrayLike, *, chunk: int = 1024
                     ) -> tuple[np.ndarray, np.ndarray]:
  """For each victim image, the training image nearest in pixel MSE.

  Distances are computed in float64, `chunk` training images at a time (memory
  V B x chunk), so an image that is in the training split is found exactly; ties go to
  the lowest index.

  Args:
    x: the victims' images `[V, B, H, W, C]`.
    train: the training images `[N, H, W, C]`.
    chunk: training images compared at once.

  Returns:
    The nearest images `[V, B, H, W, C]` and their indices into `train` `[V, B]`.
  """
  x, train = np.asarray(x), np.asarray(train)
  _shape(x)
  if train.ndim != 4 or train.shape[1:] != x.shape[2:] or not len(train):
    raise ValueError(f"training images {train.shape} must be a non-empty [N, H, W, C] "
                     f"of the victims' image shape {x.shape[2:]}")
  if chunk < 1:
    raise ValueError(f"chunk must be >= 1, got {chunk}")
  q = x.reshape(-1, int(np.prod(x.shape[2:]))).astype(np.float64)
  t = train.reshape(len(train), -1)
  qq = np.sum(q * q, axis=1)
  best = np.full(len(q), np.inf)
  index = np.zeros(len(q), np.int64)
  for start in range(0, len(t), chunk):
    c = t[start:start + chunk].astype(np.float64)
    d = qq[:, None] - 2.0 * q @ c.T + np.sum(c * c, axis=1)[None, :]
    i = np.argmin(d, axis=1)
    v = d[np.arange(len(q)), i]
    closer = v < best
    best[closer], index[closer] = v[closer], start + i[closer]
  return train[index].reshape(x.shape), index.reshape(x.shape[:2])


class PriorSample(NamedTuple):
  """The prior-only baseline's output (`prior_only`).

  Attributes:
    x: the samples in the victim model's input space `[V, B, H, W, C]`.
    y: the labels they were sampled at (inferred from the update, or known) `[V, B]`.
    counts: each victim's evaluations `[V, 3]` (`inversion.attacks.COUNTERS`).
  """

  x: np.ndarray
  y: np.ndarray
  counts: np.ndarray


def prior_only(apply_fn: Callable[[Any, jax.Array], jax.Array], threat: ThreatModel, prior: Any,
               obs: Observation, *, key: jax.Array,
               cfg: DiffusionAttackConfig = DiffusionAttackConfig(), mode: str = "auto",
               map_batch_size: int = 0) -> PriorSample:
  """The diffusion prior's sample at the labels the attack infers, for V victims.

  Runs the diffusion-guided attack `cfg` (its sampler, `num_steps`, label method and
  classifier-free guidance weight) with `gradient_weight = 0`, `feature_weight = 0` and no
  refinement on the observations `obs` (updates stacked `[V, ...]`, params shared), one
  key per victim from `key`, batched by `mode` (`fljax.federated.batch_over`: 'auto' is
  lax.map on CPU and vmap elsewhere, as the attacks' `--batching auto`).

  Args:
    apply_fn: the victim model (to infer the labels and to report each sample's
      matching loss; it never guides the sampler).
    threat: the threat model of the observations.
    prior: a `diffusion.prior.Prior` (or anything `diffusion_guided.make` accepts).
    obs: the V observations.
    key: the sampling key.
    cfg: the diffusion attack whose prior-only control this is.
    mode: how the V victims are batched.
    map_batch_size: with 'map', victims run side by side under vmap (0: one at a time).
  """
  cfg = dataclasses.replace(cfg, gradient_weight=0.0, feature_weight=0.0, refine_steps=0)
  attack = diffusion_guided.make(apply_fn, threat, prior, cfg)
  plan = AttackPlan(attack, diffusion_guided.labels, cfg.num_steps)
  num = jax.tree.leaves(obs.update)[0].shape[0]
  states = engine.attack_batched(plan, obs, jax.random.split(key, num), mode=mode,
                                 map_batch_size=map_batch_size, chunk=cfg.num_steps)
  return PriorSample(np.asarray(states.x), np.asarray(states.y), np.asarray(states.counts))


def gan_sample(gan: gan_lib.GAN, threat: ThreatModel, num: int, *, key: jax.Array) -> np.ndarray:
  """`num` victims' worth `[num, B, H, W, C]` of the GAN prior's random samples
  (z ~ N(0, I)), mapped to the victim model's inputs as the GAN attacks map them."""
  b = threat.batch_size
  z = jax.random.normal(key, (num * b, gan.config.latent_dim))
  images = to_victim(gan.image_shape, threat.input_shape)(
      gan_lib.generate(gan, gan.variables, z))
  return np.asarray(jnp.clip(images, 0.0, 1.0)).reshape((num, b) + tuple(threat.input_shape))


def score(reconstructions: ArrayLike, x: ArrayLike) -> dict[str, list[float]]:
  """Per-image PSNR (capped, `cap_psnr`) and SSIM of `reconstructions` against the
  victims' images `x`, both `[V, B, H, W, C]`: each victim's batch matched (Hungarian),
  then one value per image, victim by victim (`[V * B]`, as the attacks report them)."""
  rec, x = np.asarray(reconstructions, np.float32), np.asarray(x, np.float32)
  _shape(x)
  if rec.shape != x.shape:
    raise ValueError(f"reconstructions {rec.shape} and victims {x.shape} differ in shape")
  aligned = np.stack([r[metrics.match(r, t)] for r, t in zip(rec, x)])
  v, b = x.shape[:2]
  flat = lambda a: jnp.asarray(a.reshape((v * b,) + a.shape[2:]))  # noqa: E731
  psnr = cap_psnr(np.asarray(metrics.psnr(flat(aligned), flat(x)))).reshape(v, b)
  ssim = np.asarray(metrics.ssim(flat(aligned), flat(x)), np.float64).reshape(v, b)
  return {"psnr": psnr.ravel().tolist(), "ssim": ssim.ravel().tolist()}


def evaluate(x: ArrayLike, train: ArrayLike, *, samples: Mapping[str, ArrayLike] | None = None,
             chunk: int = 1024) -> dict[str, dict[str, list]]:
  """Every baseline's per-image scores (victim by victim), as plain JSON-ready lists.

  Args:
    x: the victims' images `[V, B, H, W, C]` in [0, 1].
    train: the training images `[N, H, W, C]` (the split the priors were trained on).
    samples: further baselines' reconstructions `[V, B, H, W, C]` by name, e.g.
      `{'prior_only': prior_only(...).x, 'gan_sample': gan_sample(...)}`.
    chunk: training images compared at once by `nearest_training`.

  Returns:
    `{name: {'psnr': [V * B], 'ssim': [V * B]}}` for blank, mean_image, nearest_training (with
    'index': the training indices `[V][B]`) and each of `samples`.
  """
  x = np.asarray(x, np.float32)
  _shape(x)
  nearest, index = nearest_training(x, train, chunk=chunk)
  out = {"blank": score(np.zeros_like(x), x),
         "mean_image": score(np.broadcast_to(mean_image(train), x.shape), x),
         "nearest_training": {**score(nearest, x), "index": index.tolist()}}
  for name, rec in (samples or {}).items():
    out[name] = score(rec, x)
  return out
