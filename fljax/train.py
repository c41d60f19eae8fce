"""Federated training runs: `train_and_evaluate(config, workdir)` and its command line.

A run loads a dataset, partitions it over clients, trains a model with FedAvg/FedSGD,
evaluates on the test split and writes to `workdir`:

  config.json          the resolved config (a rerun with another config is refused)
  metrics.jsonl        one JSON record per round (train loss, test accuracy, wall time)
  accuracy.png         test accuracy per round
  label_histogram.txt  labels per client (and .png)
  checkpoints/         orbax checkpoints of the server state every `checkpoint_every` rounds

Rerunning the same command resumes from the newest readable checkpoint; the resumed run
ends with parameters bit-identical to an uninterrupted one. Ctrl-C saves a checkpoint
first; a diverging loss stops the run with advice (see `fljax.runs`, whose step loop and
workdir rules this uses).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from fljax import config as config_lib
from fljax import datasets, models, partitions, plots, runs
from fljax import federated as fed
from fljax.runs import check_workdir


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
  """Which data, and how it is split over clients.

  Attributes:
    name: dataset: mnist (embedded), digits, fashion_mnist, or tfds:<name>.
    data_dir: folder for fashion_mnist IDX files or a prepared TFDS data_dir.
    image_size: resize/pad images to this square size (none: native).
    channels: convert to this many channels (none: native).
    train_subset: keep this many training examples, stratified (none: all).
    test_subset: keep this many test examples, stratified (none: all).
    num_clients: number of clients C.
    partition: iid, dirichlet (NIID-Bench's per-class draw), dirichlet_per_client (each
      client's class mix drawn, equal sizes: the one that fits thousands of small
      clients), shards or quantity_skew.
    alpha: Dirichlet label-skew concentration (partition=dirichlet or dirichlet_per_client).
    min_size: minimum examples per client (partition=dirichlet). NIID-Bench uses 10, which
      100 clients on the 4,000 embedded digits cannot meet at alpha=0.1.
    shards_per_client: k label-sorted shards per client (partition=shards).
    quantity_method: dirichlet or lognormal client sizes (partition=quantity_skew).
    quantity_beta: Dirichlet concentration of client sizes (quantity_method=dirichlet).
    quantity_sigma: log-normal sigma of client sizes (quantity_method=lognormal).
    pad_pow2: pad the clients' example axis to the next power of two (masked), so that
      runs over different seeds and partitions share compiled shapes (a study's cells hit
      the compilation cache) at the cost of some padded local steps.
  """

  name: str = "mnist"
  data_dir: str | None = None
  image_size: int | None = None
  channels: int | None = None
  train_subset: int | None = None
  test_subset: int | None = None
  num_clients: int = 100
  partition: str = "iid"
  alpha: float = 0.5
  min_size: int = 2
  shards_per_client: int = 2
  quantity_method: str = "dirichlet"
  quantity_beta: float = 0.5
  quantity_sigma: float = 1.0
  pad_pow2: bool = False

  def partition_kwargs(self) -> dict[str, Any]:
    return {
        "iid": {},
        "dirichlet": {"alpha": self.alpha, "min_size": self.min_size},
        "dirichlet_per_client": {"alpha": self.alpha},
        "shards": {"k": self.shards_per_client},
        "quantity_skew": {"method": self.quantity_method, "beta": self.quantity_beta,
                          "sigma": self.quantity_sigma},
    }.get(self.partition, {})


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """The classifier.

  Attributes:
    name: lenet (DLG), mlp, cnn (TF-Privacy/Opacus MNIST CNN) or resnet (GroupNorm).
    init: default (Flax/LeCun) or uniform (DLG's uniform(-0.5, 0.5)).
  """

  name: str = "cnn"
  init: str = "default"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
  """One federated training run.

  Attributes:
    rounds: number of federated rounds.
    seed: seed of every random choice in the run (partition, init, sampling, clients).
    eval_every: evaluate on the test split every this many rounds (and at the end).
    checkpoint_every: save the server state every this many rounds (and at the end).
    devices: shard the client axis over this many local devices (0: all of them).
    snapshot_rounds: also write the global model after each of these rounds, as
      `params_round<r>.msgpack` (for attacks on a model midway through training).
  """

  data: DataConfig = DataConfig()
  model: ModelConfig = ModelConfig()
  fed: fed.FedConfig = fed.FedConfig()
  rounds: int = 50
  seed: int = 0
  eval_every: int = 1
  checkpoint_every: int = 10
  devices: int = 1
  snapshot_rounds: tuple[int, ...] = ()

  def __post_init__(self):
    for name in ("rounds", "eval_every", "checkpoint_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    bad = [r for r in self.snapshot_rounds if not 1 <= r <= self.rounds]
    if bad:
      raise ValueError(f"snapshot_rounds must be rounds in [1, {self.rounds}], got {bad[0]}")
    if self.devices < 0:
      raise ValueError(f"devices must be >= 0, got {self.devices}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunContext:
  """What a run has built before training, handed to a `Plugins` factory."""

  config: ExperimentConfig
  dataset: datasets.Dataset
  clients: partitions.Batch
  model: models.Model
  loss_fn: fed.LossFn
  run_key: jax.Array  # the ServerState key: round r's keys are derived from it
  workdir: Path | None = None  # where a plugin may write its own records (e.g. privacy.json)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plugins:
  """What a layer above fljax (privacy, defenses) plugs into a run; None keeps the default.

  Attributes:
    client_update: replaces `make_client_update(loss_fn, config.fed)`.
    clients: `clients(Batch) -> Batch`, applied once to every client's data before
      training (data-level defenses: what leaves the device is the transformed data).
    defense: the per-update `defense` hook.
    aggregate: the server's `aggregate` hook (a function or a stateful `Aggregator`).
    noise_key: the key of everything a round draws but its client sampling (local
      training, defense, aggregation): None derives it from the run's seed (reproducible);
      a privacy layer passes one from OS entropy for deployments (see `ServerState`). It is
      saved in the checkpoints, so a resumed run continues the same noise.
    round_metrics: host-side `round_metrics(r) -> dict` after round r (e.g. epsilon so
      far), called for every round run in this session; it must depend on r only (not on
      the order of calls), so that a resumed run logs the same values.
    description: one line for the run's log.
  """

  client_update: fed.ClientUpdateFn | None = None
  clients: Any = None
  defense: fed.DefenseFn | None = None
  aggregate: Any = None
  noise_key: jax.Array | None = None
  round_metrics: Any = None
  description: str = ""


def load_clients(cfg: DataConfig, *, key: jax.Array
                 ) -> tuple[datasets.Dataset, partitions.Batch, np.ndarray]:
  """The dataset, its clients as a padded `Batch [C, N_max, ...]`, and their label histogram.

  The last `CLIENT_CACHE_SIZE` partitions built are kept per (config, key) in the process
  (a study builds each partition once per seed for many runs); the arrays are shared,
  never modified."""
  data = np.asarray(jax.random.key_data(key))
  return _cached_clients(cfg, str(jax.random.key_impl(key)), data.shape, data.tobytes())


CLIENT_CACHE_SIZE = 4


@functools.lru_cache(maxsize=CLIENT_CACHE_SIZE)
def _cached_clients(cfg: DataConfig, impl: str, shape: tuple[int, ...], key_data: bytes
                    ) -> tuple[datasets.Dataset, partitions.Batch, np.ndarray]:
  key = jax.random.wrap_key_data(np.frombuffer(key_data, np.uint32).reshape(shape), impl=impl)
  ds = datasets.load(cfg.name, image_size=cfg.image_size, channels=cfg.channels,
                     train_subset=cfg.train_subset, test_subset=cfg.test_subset,
                     data_dir=cfg.data_dir)
  parts = partitions.partition(cfg.partition, ds.y_train, cfg.num_clients, key=key,
                               **cfg.partition_kwargs())
  n_max = max(len(p) for p in parts)
  clients = partitions.make_clients(ds.x_train, ds.y_train, parts,
                                    n_max=1 << (n_max - 1).bit_length() if cfg.pad_pow2 else None)
  return ds, clients, partitions.label_histogram(ds.y_train, parts, ds.num_classes)


SETUP_FILES = ("label_histogram.txt", "label_histogram.png", "privacy.json")  # before round 1


def train_and_evaluate(config: ExperimentConfig, workdir: str | os.PathLike, *,
                       overwrite: bool = False, progress: bool = True,
                       plugins: Any = None, figures: bool = True,
                       extendable: tuple[str, ...] = ("rounds",)) -> dict[str, Any]:
  """Runs (or resumes) a federated training run; returns the last metrics record.

  `plugins`, if given, is `plugins(RunContext) -> Plugins`: how a privacy layer swaps in
  its client update, defense, aggregation and per-round metrics. `figures=False` skips the
  label-histogram and accuracy PNGs (a study's many short runs). `extendable`: the config
  fields a rerun in the same workdir may change (by default the number of rounds, to
  extend a run).

  Raises:
    runs.WorkdirError, runs.DivergenceError, fljax.checkpoint.CheckpointError,
    runs.Interrupted, datasets.DatasetError, ValueError (see `fljax.runs`).
  """
  from tqdm import tqdm

  workdir = Path(workdir)
  check_workdir(workdir, config, overwrite, extendable=extendable, setup_files=SETUP_FILES)
  k_partition, k_init, k_run = jax.random.split(jax.random.key(config.seed), 3)

  # With several processes (jax.distributed) all compute, the first one writes files.
  primary = jax.process_index() == 0
  say = tqdm.write if primary else (lambda *_: None)
  ds, clients, hist = load_clients(config.data, key=k_partition)
  if primary:
    (workdir / "label_histogram.txt").write_text(partitions.format_histogram(hist) + "\n")
  if primary and figures:
    plots.plot_label_histogram(hist, str(workdir / "label_histogram.png"),
                               title=f"{config.data.partition} over {config.data.num_clients} clients")
  model = models.make(config.model.name, num_classes=ds.num_classes,
                      input_shape=ds.image_shape, init=config.model.init)

  mesh = None
  if config.devices != 1:
    mesh = fed.make_mesh(config.devices or None)
  loss_fn = fed.make_loss_fn(model.apply)
  extra = plugins(RunContext(config=config, dataset=ds, clients=clients, model=model,
                             loss_fn=loss_fn, run_key=k_run, workdir=workdir)) if plugins else Plugins()
  if extra.clients is not None:
    clients = extra.clients(clients)
  client_update = extra.client_update or fed.make_client_update(loss_fn, config.fed)
  aggregate = extra.aggregate or fed.weighted_mean
  round_step = jax.jit(fed.make_round_step(
      client_update, config.fed, clients.num_clients, defense=extra.defense or fed.identity_defense,
      aggregate=aggregate, mesh=mesh), donate_argnums=0)
  evaluate = jax.jit(fed.make_evaluate(model.apply))

  state = fed.init_server_state(model.init(k_init), config.fed, key=k_run, aggregate=aggregate,
                                noise_key=extra.noise_key)
  state, ckpt, log = runs.resume(workdir, state, counter="round", write=primary,
                                 warn=runs.warn if primary else say)
  start = int(state.round)
  clients = fed.replicate(jax.tree.map(jnp.asarray, clients), mesh)
  state = fed.replicate(state, mesh)
  x_test, y_test = fed.replicate((jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)), mesh)

  say(f"{ds.describe()}; {config.data.partition} over {config.data.num_clients} clients; "
      f"{config.model.name} with {models.num_params(state.params):,} parameters; "
      f"{config.fed.algorithm}, {fed.num_sampled(config.fed, clients.num_clients)} client slots/round"
      + (f"; {extra.description}" if extra.description else "")
      + (f"; resuming at round {start}" if start else ""))

  def on_log(state, record):
    r = record["round"]
    more = dict(extra.round_metrics(r)) if extra.round_metrics is not None else {}
    if primary and r in config.snapshot_rounds:
      (workdir / f"params_round{r}.msgpack").write_bytes(
          flax.serialization.to_bytes(jax.device_get(state.params)))
    if r % config.eval_every == 0 or r == config.rounds:
      ev = jax.device_get(evaluate(state.params, x_test, y_test))
      more.update(test_accuracy=float(ev["accuracy"]), test_loss=float(ev["loss"]))
      say(f"round {r:4d}/{config.rounds}  train_loss {record['train_loss']:.4f}  "
          f"test_acc {more['test_accuracy']:.4f}"
          + (f"  eps {more['epsilon']:.3g}" if "epsilon" in more else ""))
    return more

  t_run = time.perf_counter()
  state, record = runs.run_steps(
      state, lambda s: round_step(s, clients), steps=config.rounds, ckpt=ckpt, log=log,
      checkpoint_every=config.checkpoint_every, on_log=on_log, progress=progress and primary,
      divergence=runs.Divergence(
          keys=("train_loss",),
          advice=f"lower --fed.local_lr (now {config.fed.local_lr:g}) or --fed.server_lr "
                 f"(now {config.fed.server_lr:g})"))

  evaluated = [r for r in log.records if "test_accuracy" in r]
  if primary:  # the final model, for whoever attacks or evaluates it later (flax msgpack)
    (workdir / "params.msgpack").write_bytes(flax.serialization.to_bytes(jax.device_get(state.params)))
  if primary and figures:
    plots.plot_curves({config.data.partition: ([r["round"] for r in evaluated],
                                               [r["test_accuracy"] for r in evaluated])},
                      str(workdir / "accuracy.png"),
                      title=f"{config.fed.algorithm} on {config.data.name}, {config.model.name}")
  if start >= config.rounds:
    say(f"nothing to do: {workdir} already holds {start} rounds (raise --rounds to continue)")
  else:
    say(f"done: {config.rounds} rounds in {time.perf_counter() - t_run:.1f}s this session; "
        f"test accuracy {evaluated[-1]['test_accuracy']:.4f}; outputs in {workdir}")
  return record


def main(argv: list[str] | None = None, *, config_cls: type = ExperimentConfig,
         run: Any = None) -> None:
  """The command line: config flags derived from `config_cls`, plus the run flags
  (`fljax.runs.add_flags`: --workdir, --overwrite, --progress, --distributed ...).

  `run(config, workdir, overwrite=, progress=)` defaults to `train_and_evaluate`; a layer
  above fljax passes its own (with a config class that extends `ExperimentConfig`).
  """
  config, ns = config_lib.parse(
      config_cls, argv, extra=lambda p: runs.add_flags(p, workdir="runs/fl", distributed=True),
      description="Federated training on offline datasets (FedAvg/FedSGD), resumable.")
  if ns.distributed:
    # CPU devices of several processes talk through gloo; accelerators ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(ns.coordinator, ns.num_processes, ns.process_id)
  with runs.cli_errors():
    (run or train_and_evaluate)(config, ns.workdir, overwrite=ns.overwrite, progress=ns.progress)


if __name__ == "__main__":
  main()
