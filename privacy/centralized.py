"""Centralized DP-SGD training (Abadi et al. 2016): the yardstick for the federated mechanisms.

`train_and_evaluate(CentralConfig, workdir)` trains a classifier with DP-SGD (see
`privacy.dpsgd`) on one fljax dataset with `fljax.runs`' step loop: it logs test accuracy
and epsilon every epoch in metrics.jsonl, checkpoints every epoch and resumes. With
`target_epsilon`, sigma is calibrated for the whole run first; `private=false` runs the
non-private baseline with the same sampling and optimizer (epsilon = inf).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fljax import config as config_lib
from fljax import datasets, models, runs
from fljax import federated as fed
from fljax import train as fl_train
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
    data: the training data.
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

  data: datasets.Source = datasets.Source()
  model: fl_train.ModelConfig = fl_train.ModelConfig()
  dpsgd: dpsgd.DPSGDConfig = dpsgd.DPSGDConfig()
  private: bool = True
  target_epsilon: float | None = None
  delta: float = 1e-5
  accountant: str = "pld"
  optimizer: str = dataclasses.field(default="momentum", metadata={"choices": tuple(OPTIMIZERS)})
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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainState:
  """A DP-SGD run's state: `step` DP-SGD steps done; step s draws its batch and noise from
  `fold_in(key, s)` (the noise key of a private optimizer lives in `opt_state`)."""

  step: jax.Array
  params: Any
  opt_state: Any
  key: jax.Array


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
  """Runs (or resumes) a centralized DP-SGD run; returns the last metrics record (one per
  epoch: `step`, `epoch`, the epoch's mean step metrics, test accuracy, epsilon).

  Raises the faults of `fljax.runs` (WorkdirError, DivergenceError, CheckpointError,
  Interrupted) and datasets.DatasetError.
  """
  from tqdm import tqdm

  workdir = Path(workdir)
  # With a target epsilon, sigma depends on the run length, so the length is fixed too.
  runs.check_workdir(workdir, config, overwrite,
                     extendable=() if config.target_epsilon is not None else ("epochs",))
  k_init, k_run = jax.random.split(jax.random.key(config.seed))
  ds = config.data.load()
  n = ds.x_train.shape[0]
  cfg, steps_per_epoch, accountant = _setup(config, n)
  model = models.make(config.model.name, num_classes=ds.num_classes, input_shape=ds.image_shape,
                      init=config.model.init)
  k_noise, k_steps = jax.random.split(k_run)
  base = OPTIMIZERS[config.optimizer](config)
  opt = dpsgd.dp_optimizer(cfg, base, key=k_noise) if config.private else base
  dp_step = dpsgd.make_step(fed.make_loss_fn(model.apply), cfg, opt, n, private=config.private)

  def step(state: TrainState, data: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    params, opt_state, metrics = dp_step(state.params, state.opt_state, data,
                                         jax.random.fold_in(state.key, state.step))
    return dataclasses.replace(state, step=state.step + 1, params=params,
                               opt_state=opt_state), metrics

  step = jax.jit(step, donate_argnums=0)
  evaluate = jax.jit(fed.make_evaluate(model.apply))
  data = Batch(x=jnp.asarray(ds.x_train), y=jnp.asarray(ds.y_train), mask=jnp.ones((n,)))
  x_test, y_test = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)

  params = model.init(k_init)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt.init(params),
                     key=k_steps)
  state, ckpt, log = runs.resume(workdir, state)
  start = int(state.step) // steps_per_epoch
  say = tqdm.write
  sigma_text = f"sigma={cfg.noise_multiplier:.4g}, C={cfg.clip_norm}" if config.private else "non-private"
  say(f"{ds.describe()}; {config.model.name}; DP-SGD {sigma_text}, B={cfg.batch_size} "
      f"({cfg.sampling}), {steps_per_epoch} steps/epoch x {config.epochs} epochs"
      + (f"; resuming at epoch {start}" if start else ""))

  def on_log(state, record):
    epoch = record["step"] // steps_per_epoch
    ev = jax.device_get(evaluate(state.params, x_test, y_test))
    more = {"epoch": epoch, "test_accuracy": float(ev["accuracy"])}
    if config.private:  # a non-private run has no epsilon (infinite), so none is logged
      more["epsilon"] = accounting.epsilon(cfg.event(n, record["step"], accountant),
                                           config.delta, accountant=accountant)
      more["noise_multiplier"] = cfg.noise_multiplier
    say(f"epoch {epoch:3d}/{config.epochs}  loss {record['loss']:.4f}  "
        f"test_acc {more['test_accuracy']:.4f}"
        + (f"  eps {more['epsilon']:.3g}" if config.private else ""))
    return more

  _, record = runs.run_steps(
      state, lambda s: step(s, data), steps=config.epochs * steps_per_epoch, ckpt=ckpt, log=log,
      log_every=steps_per_epoch, checkpoint_every=steps_per_epoch, on_log=on_log,
      progress=progress,
      divergence=runs.Divergence(keys=("loss",), advice=f"lower --lr (now {config.lr:g})"))
  # epsilon null: not private (epsilon = infinity).
  (workdir / "result.json").write_text(json.dumps({
      "test_accuracy": record.get("test_accuracy"), "epsilon": record.get("epsilon"),
      "delta": config.delta if config.private else None,
      "accountant": accountant if config.private else None,
      "noise_multiplier": cfg.noise_multiplier if config.private else None}, indent=2) + "\n")
  return record


def main(argv: list[str] | None = None) -> None:
  config, ns = config_lib.parse(CentralConfig, argv,
                                extra=lambda p: runs.add_flags(p, workdir="runs/dpsgd"),
                                description="Centralized DP-SGD with exact accounting, resumable.")
  with runs.cli_errors():
    train_and_evaluate(config, ns.workdir, overwrite=ns.overwrite, progress=ns.progress)
