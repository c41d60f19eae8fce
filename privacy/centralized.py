"""Centralized DP-SGD training (Abadi et al. 2016): the yardstick for the federated mechanisms.

`train_and_evaluate(CentralConfig, workdir)` trains a classifier with DP-SGD (see
`privacy.dpsgd`) on one fljax dataset, logs test accuracy and epsilon every epoch in
metrics.jsonl, checkpoints every epoch and resumes. With `target_epsilon`, sigma is
calibrated for the whole run first; `private=false` runs the non-private baseline with
the same sampling and optimizer (epsilon = inf).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fljax import config as config_lib
from fljax import datasets, models
from fljax import federated as fed
from fljax import train as fl_train
from fljax.checkpoint import Checkpointer
from fljax.partitions import Batch
from privacy import accounting, dpsgd

OPTIMIZERS = {
    "sgd": lambda c: optax.sgd(c.lr),
    "momentum": lambda c: optax.sgd(c.lr, momentum=c.momentum),
    "adam": lambda c: optax.adam(c.lr),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class CentralConfig:
  """A centralized (DP-)SGD run.

  Attributes:
    dataset: fljax dataset name (mnist is embedded).
    data_dir: folder for datasets that need one.
    model: the classifier.
    dpsgd: sampling, clipping and noise (noise_multiplier is overridden by calibration).
    private: false trains without clipping or noise (the epsilon = inf baseline).
    target_epsilon: calibrate sigma so that epsilon after all epochs is at most this.
    delta: the delta of every epsilon reported.
    accountant: pld or rdp (fixed-size sampling forces rdp).
    optimizer: sgd, momentum or adam.
    lr: learning rate.
    momentum: momentum for 'momentum'.
    epochs: passes over the data; an epoch is round(n / batch_size) steps.
    seed: seed of every random choice.
  """

  dataset: str = "mnist"
  data_dir: str | None = None
  model: fl_train.ModelConfig = fl_train.ModelConfig()
  dpsgd: dpsgd.DPSGDConfig = dpsgd.DPSGDConfig()
  private: bool = True
  target_epsilon: float | None = None
  delta: float = 1e-5
  accountant: str = "pld"
  optimizer: str = "momentum"
  lr: float = 0.1
  momentum: float = 0.9
  epochs: int = 20
  seed: int = 0

  def __post_init__(self):
    accounting.check_delta(self.delta)
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {self.optimizer!r}")
    if self.epochs < 1:
      raise ValueError(f"epochs must be >= 1, got {self.epochs}")


def _setup(config: CentralConfig, n: int) -> tuple[dpsgd.DPSGDConfig, int, str]:
  """The DP-SGD config with its final sigma, the steps per epoch, and the accountant."""
  steps_per_epoch = max(1, round(n / config.dpsgd.batch_size))
  accountant = "rdp" if config.dpsgd.sampling == "fixed" else config.accountant
  cfg = config.dpsgd
  if config.private and config.target_epsilon is not None:
    cfg = dpsgd.calibrate(cfg, n, steps_per_epoch * config.epochs, config.target_epsilon,
                          config.delta, accountant=accountant)
  return cfg, steps_per_epoch, accountant


def train_and_evaluate(config: CentralConfig, workdir: str | os.PathLike, *,
                       overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
  """Runs (or resumes) a centralized DP-SGD run; returns the last metrics record."""
  workdir = Path(workdir)
  # With a target epsilon, sigma depends on the run length, so the length is fixed too.
  fl_train.check_workdir(workdir, config, overwrite,
                         extendable=() if config.target_epsilon is not None else ("epochs",))
  k_init, k_run = jax.random.split(jax.random.key(config.seed))
  ds = datasets.load(config.dataset, data_dir=config.data_dir)
  n = ds.x_train.shape[0]
  cfg, steps_per_epoch, accountant = _setup(config, n)
  model = models.make(config.model.name, num_classes=ds.num_classes, input_shape=ds.image_shape,
                      init=config.model.init)
  k_noise, k_steps = jax.random.split(k_run)
  base = OPTIMIZERS[config.optimizer](config)
  opt = dpsgd.dp_optimizer(cfg, base, key=k_noise) if config.private else base
  step = jax.jit(dpsgd.make_step(fed.make_loss_fn(model.apply), cfg, opt, n,
                                 private=config.private), donate_argnums=(0, 1))
  evaluate = jax.jit(fed.make_evaluate(model.apply))
  data = Batch(x=jnp.asarray(ds.x_train), y=jnp.asarray(ds.y_train), mask=jnp.ones((n,)))

  params = model.init(k_init)
  state = fed.ServerState(params=params, opt_state=opt.init(params), round=jnp.zeros((), jnp.int32),
                          key=k_steps, noise_key=k_steps)
  ckpt = Checkpointer(workdir / "checkpoints")
  start = ckpt.latest_round() or 0
  if start:
    state = ckpt.restore(state)
  log = fl_train.MetricsLog(workdir / "metrics.jsonl", start)
  say = print if progress else (lambda *_: None)
  sigma_text = f"sigma={cfg.noise_multiplier:.4g}, C={cfg.clip_norm}" if config.private else "non-private"
  say(f"{ds.describe()}; {config.model.name}; DP-SGD {sigma_text}, B={cfg.batch_size} "
      f"({cfg.sampling}), {steps_per_epoch} steps/epoch x {config.epochs} epochs"
      + (f"; resuming at epoch {start}" if start else ""))
  record: dict[str, Any] = {}
  try:
    for epoch in range(start, config.epochs):
      t0 = time.perf_counter()
      params, opt_state, key = state.params, state.opt_state, state.key
      sums: dict[str, float] = {}
      for s in range(steps_per_epoch):
        params, opt_state, metrics = step(params, opt_state, data,
                                          jax.random.fold_in(key, epoch * steps_per_epoch + s))
        for k, v in jax.device_get(metrics).items():
          sums[k] = sums.get(k, 0.0) + float(v)
      state = fed.ServerState(params=params, opt_state=opt_state, round=jnp.asarray(epoch + 1),
                              key=key, noise_key=key)
      ev = jax.device_get(evaluate(params, jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)))
      steps_done = (epoch + 1) * steps_per_epoch
      record = {"epoch": epoch + 1, "round": epoch + 1, "steps": steps_done,
                **{k: v / steps_per_epoch for k, v in sums.items()},
                "test_accuracy": float(ev["accuracy"])}
      if config.private:  # a non-private run has no epsilon (infinite), so none is logged
        record["epsilon"] = accounting.epsilon(cfg.event(n, steps_done, accountant),
                                               config.delta, accountant=accountant)
        record["noise_multiplier"] = cfg.noise_multiplier
      record["epoch_seconds"] = time.perf_counter() - t0
      log.append(record)
      say(f"epoch {epoch + 1:3d}/{config.epochs}  loss {record['loss']:.4f}  "
          f"test_acc {record['test_accuracy']:.4f}  "
          + (f"eps {record['epsilon']:.3g}  " if config.private else "")
          + f"{record['epoch_seconds']:.1f}s")
      ckpt.save(state)
  finally:
    ckpt.close()
  if not record and log.records:
    record = log.records[-1]
  # epsilon null: not private (epsilon = infinity).
  (workdir / "result.json").write_text(json.dumps({
      "test_accuracy": record.get("test_accuracy"), "epsilon": record.get("epsilon"),
      "delta": config.delta if config.private else None,
      "accountant": accountant if config.private else None,
      "noise_multiplier": cfg.noise_multiplier if config.private else None}, indent=2) + "\n")
  return record


def main(argv: list[str] | None = None) -> None:
  def extra(parser):
    parser.add_argument("--workdir", default="runs/dpsgd", help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="start afresh in --workdir")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch lines")
  config, ns = config_lib.parse(CentralConfig, argv, extra=extra,
                                description="Centralized DP-SGD with exact accounting, resumable.")
  try:
    train_and_evaluate(config, ns.workdir, overwrite=ns.overwrite, progress=not ns.quiet)
  except (datasets.DatasetError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None
