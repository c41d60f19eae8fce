"""DP-SGD (Abadi et al., CCS 2016): sampled batches, per-example clipping, Gaussian noise.

One step: draw a batch (Poisson sampling at rate q = B/n into a static padded shape with
a mask, or B examples without replacement), sum the per-example gradients clipped to C
(`privacy.clipping.clipped_grad_sum`, or by ghost norms `privacy.ghost`), then the optax chain `gaussian_privatizer ->
optimizer` adds N(0, sigma^2 C^2) to the sum, divides by the expected batch size B and
steps.

Guarantee (record level). What is clipped: each example's gradient, to L2 norm C.
Sensitivity of the noised sum: C under add/remove-one (2C under replace-one).
Events per step (`DPSGDConfig.event`):
  - Poisson with a static size of n (no truncation): `PoissonSampledDpEvent(q,
    GaussianDpEvent(sigma))`, add/remove-one; RDP or PLD.
  - Poisson truncated to `max_batch_size` < n (a random subset kept when more join):
    `TruncatedSubsampledGaussianDpEvent(n, q, max_batch_size, sigma)`, add/remove-one;
    PLD only (dp_accounting's RDP accountant does not support it). The default size
    is the 1 - 1e-12 quantile of Binomial(n, q), where the two events give the same
    epsilon to the digits reported.
  - fixed size without replacement: `SampledWithoutReplacementDpEvent(n, B,
    GaussianDpEvent(sigma / 2))`, replace-one (dp_accounting's RDP accountant supports
    this event only under REPLACE_ONE, and PLD not at all). Replacing one example moves
    the clipped sum by up to 2C, hence sigma / 2; the noise is divided by the public B.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from dp_accounting import dp_event

from fljax.federated import poisson_slots
from fljax.partitions import Batch
from privacy import accounting
from privacy.clipping import LossFn
from privacy.ghost import CLIPPING
from privacy.noise import gaussian_privatizer

Params = Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPSGDConfig:
  """DP-SGD settings.

  Attributes:
    clip_norm: C, the per-example L2 clip norm.
    noise_multiplier: sigma, the noise std in units of C (0: clipping without noise).
    batch_size: B, the expected batch size (q = B / n).
    sampling: 'poisson' (static padded size, mask) or 'fixed' (B without replacement).
    max_batch_size: Poisson's static batch size (0: the 1 - 1e-12 quantile of the batch
      size, capped at n; equal to n means no truncation).
    per_layer: clip each parameter tensor to C / sqrt(L) instead of the whole gradient.
    microbatch_size: per-example gradients computed this many at a time (0: all at once).
    slices: the step's gradient computed as this many independent slices of the batch,
      summed (the same sums, in another order). XLA:CPU runs independent ops
      concurrently, and on a small model one slice per core keeps both cores busy where
      one batch's ops do not (`scripts/bench_cpu_split.py`: 1.13-1.24x on the LeNet and
      1.14-1.22x on the CNN on 2 cores). 0 (the default) is `auto_slices`: one per CPU
      core on a CPU backend while each slice keeps `MIN_SLICE_ROWS` rows and they divide
      the batch, else 1 (accelerators: 1). Each slice draws its own key, as each
      micro-batch does.
    clipping: how the per-example norms are found: 'vmap' (per-example gradients),
      'ghost' (from each layer's input and output gradient, `privacy.ghost`; the same sum)
      or 'auto' (the default: ghost where it covers the model, else vmap).
  """

  clip_norm: float = 1.0
  noise_multiplier: float = 1.0
  batch_size: int = 256
  sampling: str = "poisson"
  max_batch_size: int = 0
  per_layer: bool = False
  microbatch_size: int = 0
  slices: int = 0
  clipping: str = dataclasses.field(default="auto", metadata={"choices": tuple(CLIPPING)})

  def __post_init__(self):
    accounting.check_clip_norm(self.clip_norm)
    if self.clipping not in CLIPPING:
      raise ValueError(f"clipping must be one of {', '.join(CLIPPING)}, got {self.clipping!r}")
    if self.noise_multiplier < 0:
      raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
    if self.sampling not in ("poisson", "fixed"):
      raise ValueError(f"sampling must be 'poisson' or 'fixed', got {self.sampling!r}")
    if self.max_batch_size < 0 or self.microbatch_size < 0:
      raise ValueError("max_batch_size and microbatch_size must be >= 0")
    if self.slices < 0:
      raise ValueError(f"slices must be >= 1, or 0 for one per CPU core, got {self.slices}")

  def sampling_rate(self, n: int) -> float:
    if self.batch_size > n:
      raise ValueError(f"batch_size {self.batch_size} exceeds the dataset size {n}")
    return self.batch_size / n

  def static_batch_size(self, n: int) -> int:
    """Rows per step: B for 'fixed', Poisson's static size otherwise (a multiple of the
    micro-batch size times the slices, so that both divide it)."""
    if self.sampling == "fixed":
      size = self.batch_size
    else:
      size = self.max_batch_size or poisson_max_batch_size(n, self.sampling_rate(n))
      size = min(size, n)
    unit = (self.microbatch_size or 1) * (self.slices or 1)  # auto never pads
    return -(-size // unit) * unit

  def num_slices(self, rows: int) -> int:
    """The slices of a step on `rows` rows: `slices`, or for 0 `auto_slices`."""
    return self.slices or auto_slices(rows, self.microbatch_size or 1)

  def event(self, n: int, steps: int, accountant: str = "pld") -> dp_event.DpEvent:
    """The dp_accounting event of `steps` steps on a dataset of n examples."""
    q = self.sampling_rate(n)
    if self.sampling == "fixed":
      return accounting.dpsgd_event(q, self.noise_multiplier, steps, sampling="fixed",
                                    dataset_size=n, batch_size=self.batch_size)
    cap = self.static_batch_size(n)
    if cap >= n:
      return accounting.dpsgd_event(q, self.noise_multiplier, steps)
    if accountant == "rdp":
      raise ValueError(f"Poisson sampling truncated to {cap} of {n} examples is accounted only "
                       f"by PLD: use accountant 'pld', or max_batch_size={n} (no truncation)")
    return accounting.dpsgd_event(q, self.noise_multiplier, steps, sampling="truncated_poisson",
                                  dataset_size=n, batch_size=cap)


MIN_SLICE_ROWS = 32  # at batch 16 (8 rows a slice) the LeNet's split step was 1.2x slower


def auto_slices(rows: int, unit: int = 1) -> int:
  """One slice per CPU core this process may run on, on a CPU backend, as many as keep
  `MIN_SLICE_ROWS` rows each and divide `rows` into multiples of `unit` (the
  micro-batch size); 1 on accelerators, and where no split fits."""
  if jax.default_backend() != "cpu":
    return 1
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  for k in range(min(cores or 1, rows // MIN_SLICE_ROWS), 1, -1):
    if rows % (k * unit) == 0:
      return k
  return 1


def calibrate(cfg: DPSGDConfig, n: int, steps: int, target_epsilon: float, delta: float, *,
              accountant: str = "pld") -> DPSGDConfig:
  """`cfg` with the smallest noise multiplier whose `steps` steps on n examples meet
  (target_epsilon, delta) under the config's own event (truncation included)."""
  sigma = accounting.calibrate(
      lambda s: dataclasses.replace(cfg, noise_multiplier=s).event(n, steps, accountant),
      target_epsilon, delta, accountant=accountant)
  return dataclasses.replace(cfg, noise_multiplier=sigma)


def poisson_max_batch_size(n: int, q: float, tail: float = 1e-12) -> int:
  """The smallest m with P(Binomial(n, q) > m) <= tail (at most n)."""
  from scipy import stats
  return int(min(n, stats.binom.isf(tail, n, q) + 1))


def sample_batch(n: int, cfg: DPSGDConfig, *, key: jax.Array
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Indices `[m]`, mask `[m]` and the number of sampled examples dropped by truncation."""
  m = cfg.static_batch_size(n)
  if cfg.sampling == "fixed":
    idx = jax.random.choice(key, n, (cfg.batch_size,), replace=False).astype(jnp.int32)
    pad = m - cfg.batch_size
    mask = jnp.concatenate([jnp.ones((cfg.batch_size,)), jnp.zeros((pad,))])
    return jnp.concatenate([idx, jnp.zeros((pad,), jnp.int32)]), mask, jnp.zeros((), jnp.int32)
  return poisson_slots(n, cfg.sampling_rate(n), m, key=key)


def dp_optimizer(cfg: DPSGDConfig, optimizer: optax.GradientTransformation, *,
                 key: jax.Array) -> optax.GradientTransformation:
  """`optax.chain(gaussian_privatizer, optimizer)`: from clipped sums to private steps."""
  return optax.chain(
      gaussian_privatizer(clip_norm=cfg.clip_norm, noise_multiplier=cfg.noise_multiplier,
                          expected_batch_size=cfg.batch_size, key=key),
      optimizer)


StepFn = Callable[[Params, optax.OptState, Batch, jax.Array],
                  tuple[Params, optax.OptState, dict[str, jax.Array]]]


def make_batch_step(loss_fn: LossFn, cfg: DPSGDConfig, optimizer: optax.GradientTransformation,
                    *, private: bool = True) -> StepFn:
  """`step(params, opt_state, batch, key) -> (params, opt_state, metrics)` on one given
  batch (no sampling: `make_step` samples, then calls this; benchmarks time it directly).

  With `private=True`, `optimizer` must be `dp_optimizer(cfg, ...)`: the step feeds it the
  sum of the examples' gradients, each clipped by `cfg.clipping` (`CLIPPING`). With
  `private=False` it feeds the plain mean gradient. Metrics: `loss` (mean over the
  batch), `batch_size` (realised), and for the private step `nonfinite` (examples
  dropped), `clipped_fraction`, `grad_norm`: diagnostics of the raw batch, not private.
  """
  grad_fn = jax.grad(loss_fn, has_aux=True)

  def slices(batch, key):
    """The batch's slices (`cfg.num_slices`) and their keys (one: the batch and `key`)."""
    n = batch.mask.shape[0]
    k = cfg.num_slices(n)
    if k == 1:
      return [batch], [key]
    if n % k:
      raise ValueError(f"a batch of {n} rows does not split into {k} slices; "
                       f"pad it to a multiple (DPSGDConfig.static_batch_size does)")
    size = n // k
    return ([jax.tree.map(lambda a, i=i: a[i * size:(i + 1) * size], batch)
             for i in range(k)], list(jax.random.split(key, k)))

  def step(params, opt_state, batch, key):
    # Each slice's share is weighted by its rows over all rows: with one slice the factor
    # is exactly 1, so the unsliced step is unchanged.
    parts, keys = slices(batch, key)
    if private:
      outs = [CLIPPING[cfg.clipping](
          loss_fn, params, p, k, clip_norm=cfg.clip_norm, per_layer=cfg.per_layer,
          microbatch_size=cfg.microbatch_size) for p, k in zip(parts, keys)]
      grads = _add_all([g for g, _ in outs])
      count, nonfinite, clipped, loss_sum = (_add_all([m[k] for _, m in outs]) for k in
                                             ("count", "nonfinite", "clipped", "loss_sum"))
      used = jnp.maximum(count - nonfinite, 1.0)
      metrics = {"loss": loss_sum / used, "nonfinite": nonfinite,
                 "clipped_fraction": clipped / jnp.maximum(count, 1.0),
                 "grad_norm": _add_all([m["grad_norm"] * (jnp.maximum(
                     m["count"] - m["nonfinite"], 1.0) / used) for _, m in outs])}
    else:
      outs = [grad_fn(params, p, k) for p, k in zip(parts, keys)]
      count = _add_all([aux["count"] for _, aux in outs])
      total = jnp.maximum(count, 1.0)
      grads = _add_all([jax.tree.map(lambda x, w=aux["count"] / total: x * w, g)
                        for g, aux in outs])
      metrics = {"loss": _add_all([aux["loss_sum"] for _, aux in outs]) / total}
    updates, opt_state = optimizer.update(grads, opt_state, params)
    metrics.update(batch_size=count)
    return optax.apply_updates(params, updates), opt_state, metrics

  return step


def _add_all(trees: list[Any]) -> Any:
  """The leafwise sum of `trees` (one tree: itself, unchanged)."""
  return functools.reduce(lambda a, b: jax.tree.map(jnp.add, a, b), trees)


def make_step(loss_fn: LossFn, cfg: DPSGDConfig, optimizer: optax.GradientTransformation,
              n: int, *, private: bool = True) -> StepFn:
  """`step(params, opt_state, data, key) -> (params, opt_state, metrics)` on n examples.

  `data` is the whole training set as a `Batch` (mask all ones); each step samples from
  it (`sample_batch`) and runs `make_batch_step` on the sample: with `private=True`,
  `optimizer` must be `dp_optimizer(cfg, ...)`; with `private=False` (the non-private
  baseline) the step takes the plain mean gradient of the same sampled batch.

  Metrics: `make_batch_step`'s, and `truncated`. These are diagnostics computed from the
  raw batch: the DP guarantee covers the parameters, not them (don't publish them as
  private).
  """
  batch_step = make_batch_step(loss_fn, cfg, optimizer, private=private)

  def step(params, opt_state, data, key):
    sample_key, loss_key = jax.random.split(key)
    idx, mask, truncated = sample_batch(n, cfg, key=sample_key)
    batch = Batch(x=data.x[idx], y=data.y[idx], mask=mask * data.mask[idx])
    params, opt_state, metrics = batch_step(params, opt_state, batch, loss_key)
    metrics.update(truncated=truncated.astype(jnp.float32))
    return params, opt_state, metrics

  return step
