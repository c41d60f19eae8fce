"""Federated training runs: `train_and_evaluate(config, workdir)` and its command line.

A run loads a dataset, partitions it over clients, trains a model with FedAvg/FedSGD,
evaluates on the test split and writes to `workdir`:

  config.json          the resolved config (a rerun with another config is refused)
  metrics.jsonl        one JSON record per round (train loss, test accuracy, wall time)
  accuracy.png         test accuracy per round
  label_histogram.txt  labels per client (and .png)
  checkpoints/         orbax checkpoints of the server state every `checkpoint_every` rounds

Rerunning the same command resumes from the newest checkpoint; the resumed run ends with
parameters bit-identical to an uninterrupted one. Ctrl-C saves a checkpoint first.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from fljax import config as config_lib
from fljax import datasets, models, partitions, plots
from fljax import federated as fed
from fljax.checkpoint import Checkpointer


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
    partition: iid, dirichlet, shards or quantity_skew.
    alpha: Dirichlet label-skew concentration (partition=dirichlet).
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
  """

  data: DataConfig = DataConfig()
  model: ModelConfig = ModelConfig()
  fed: fed.FedConfig = fed.FedConfig()
  rounds: int = 50
  seed: int = 0
  eval_every: int = 1
  checkpoint_every: int = 10
  devices: int = 1

  def __post_init__(self):
    for name in ("rounds", "eval_every", "checkpoint_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
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


_CLIENTS: dict[tuple, Any] = {}  # the last few partitions built in this process


def load_clients(cfg: DataConfig, *, key: jax.Array
                 ) -> tuple[datasets.Dataset, partitions.Batch, np.ndarray]:
  """The dataset, its clients as a padded `Batch [C, N_max, ...]`, and their label histogram.

  Cached per (config, key) in the process (a study builds each partition once per seed
  for many runs); the arrays are shared, never modified."""
  cache_key = (cfg, np.asarray(jax.random.key_data(key)).tobytes())
  if cache_key not in _CLIENTS:
    if len(_CLIENTS) >= 4:
      _CLIENTS.pop(next(iter(_CLIENTS)))
    _CLIENTS[cache_key] = _load_clients(cfg, key)
  return _CLIENTS[cache_key]


def _load_clients(cfg: DataConfig, key: jax.Array
                  ) -> tuple[datasets.Dataset, partitions.Batch, np.ndarray]:
  ds = datasets.load(cfg.name, image_size=cfg.image_size, channels=cfg.channels,
                     train_subset=cfg.train_subset, test_subset=cfg.test_subset,
                     data_dir=cfg.data_dir)
  parts = partitions.partition(cfg.partition, ds.y_train, cfg.num_clients, key=key,
                               **cfg.partition_kwargs())
  n_max = max(len(p) for p in parts)
  clients = partitions.make_clients(ds.x_train, ds.y_train, parts,
                                    n_max=1 << (n_max - 1).bit_length() if cfg.pad_pow2 else None)
  return ds, clients, partitions.label_histogram(ds.y_train, parts, ds.num_classes)


class MetricsLog:
  """metrics.jsonl, truncated to the resumed round so that no round appears twice."""

  def __init__(self, path: Path, resume_round: int, *, write: bool = True, key: str = "round"):
    self.path, self.write = path, write
    records = []
    if path.exists() and resume_round > 0:
      records = [r for r in map(json.loads, path.read_text().splitlines())
                 if r[key] <= resume_round]
    if write:
      path.write_text("".join(json.dumps(r) + "\n" for r in records))
    self.records = records

  def append(self, record: dict[str, Any]) -> None:
    self.records.append(record)
    if not self.write:
      return
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")


class _StopRequests:
  """Turns Ctrl-C and SIGTERM into a request that the loop honours between rounds.

  The first signal lets the current round finish, then the run checkpoints and exits
  with status 130; a second one interrupts at once (losing only the rounds since the
  last checkpoint). Handlers are installed only in the main thread.
  """

  requested = False

  def _handle(self, signum, frame):
    if self.requested:
      raise KeyboardInterrupt
    self.requested = True

  def __enter__(self):
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False


def resume_steps(workdir: Path, state: Any, *, steps: int, say: Callable[[str], Any]
                 ) -> tuple[Any, int, MetricsLog, Any, dict[str, Any] | None]:
  """The prior trainers' resume: restores the newest readable checkpoint of `state` (a
  dataclass with a `step`) in `workdir/checkpoints` and truncates `metrics.jsonl` to it.
  Returns (state, start step, log, checkpointer, record): `record` is the last logged
  one when the run has already reached `steps` (the checkpointer is then closed)."""
  from fljax import checkpoint
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", step_field="step")
  restored = ckpt.restore_newest_valid(state, warn=say)
  if restored is not None:
    state = restored
  start = int(state.step)
  log = MetricsLog(workdir / "metrics.jsonl", start, key="step")
  if start >= steps:
    say(f"{workdir} already finished {start} steps; pass a larger --steps to train on")
    ckpt.close()
    return state, start, log, ckpt, (log.records[-1] if log.records else {"step": start})
  if start:
    say(f"resuming {workdir} at step {start}")
  return state, start, log, ckpt, None


def run_steps(state: Any, step_fn: Callable[[Any], tuple[Any, dict[str, Any]]], *, steps: int,
              start: int, log: MetricsLog, ckpt: Any, export: Callable[[Any], None],
              log_every: int, checkpoint_every: int, sample_every: int,
              nonfinite: Callable[[dict[str, float], int], str],
              postfix: Callable[[dict[str, float]], dict[str, str]], say: Callable[[str], Any],
              progress: bool = True) -> dict[str, Any]:
  """The step loop of the prior trainers (diffusion, GAN): runs `step_fn` until `state.step`
  reaches `steps`, logging window means every `log_every` steps (a non-finite mean stops
  the run with `nonfinite(means, step)` as the message), checkpointing every
  `checkpoint_every` and calling `export(state)` every `sample_every` steps and at the end.
  Ctrl-C / SIGTERM finish the step, checkpoint and exit with status 130. Returns the last
  logged record."""
  from tqdm import tqdm
  bar = tqdm(total=steps, initial=start, desc="steps", disable=None if progress else True)
  window, t0, record = [], time.perf_counter(), {}
  with _StopRequests() as stop:
    while int(state.step) < steps and not stop.requested:
      state, metrics = step_fn(state)
      window.append(metrics)
      step = int(state.step)
      bar.update(1)
      if step % log_every == 0 or step == steps:
        means = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
        if not all(np.isfinite(v) for v in means.values()):
          raise FloatingPointError(nonfinite(means, step))
        record = {"step": step, **means, "seconds_per_step": (time.perf_counter() - t0) / len(window)}
        log.append(record)
        bar.set_postfix(**postfix(means))
        window, t0 = [], time.perf_counter()
      if step % checkpoint_every == 0 or step == steps:
        ckpt.save(state)
      if (sample_every and step % sample_every == 0) or step == steps:
        export(state)
    ckpt.save(state)
  bar.close()
  ckpt.close()
  if stop.requested:
    say(f"stopped at step {int(state.step)}; rerun the same command to resume")
    raise SystemExit(130)
  return record


def check_workdir(workdir: Path, config: Any, overwrite: bool,
                  extendable: tuple[str, ...] = ("rounds", "epochs")) -> None:
  """Writes config.json; refuses a workdir that holds a run with a different config.

  Only the `extendable` fields (the run length) may differ, to extend a run on resume.
  """
  path = workdir / "config.json"
  current = config_lib.to_dict(config)
  if path.exists() and not overwrite:
    saved = json.loads(path.read_text())
    differ = {k for k in set(saved) | set(current)
              if k not in extendable and saved.get(k) != current.get(k)}
    if differ:
      raise SystemExit(f"error: {workdir} holds a run with a different config ({', '.join(sorted(differ))} "
                       f"differ); choose a new --workdir, or pass --overwrite to start afresh")
  if overwrite and jax.process_index() == 0 and (workdir / "checkpoints").exists():
    import shutil
    shutil.rmtree(workdir / "checkpoints")
  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    path.write_text(json.dumps(current, indent=2) + "\n")


def train_and_evaluate(config: ExperimentConfig, workdir: str | os.PathLike, *,
                       overwrite: bool = False, progress: bool = True,
                       plugins: Any = None, figures: bool = True) -> dict[str, Any]:
  """Runs (or resumes) a federated training run; returns the last metrics record.

  `plugins`, if given, is `plugins(RunContext) -> Plugins`: how a privacy layer swaps in
  its client update, defense, aggregation and per-round metrics. `figures=False` skips the
  label-histogram and accuracy PNGs (a study's many short runs).
  """
  from tqdm import tqdm

  workdir = Path(workdir)
  check_workdir(workdir, config, overwrite)
  k_partition, k_init, k_run = jax.random.split(jax.random.key(config.seed), 3)

  # With several processes (jax.distributed) all compute, the first one writes files.
  primary = jax.process_index() == 0
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
  ckpt = Checkpointer(workdir / "checkpoints")
  start = ckpt.latest_round() or 0
  if start:
    state = ckpt.restore(state)
  log = MetricsLog(workdir / "metrics.jsonl", start, write=primary)
  clients = fed.replicate(jax.tree.map(jnp.asarray, clients), mesh)
  state = fed.replicate(state, mesh)
  x_test, y_test = fed.replicate((jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)), mesh)

  say = (tqdm.write if progress else print) if primary else (lambda *_: None)
  say(f"{ds.describe()}; {config.data.partition} over {config.data.num_clients} clients; "
      f"{config.model.name} with {models.num_params(state.params):,} parameters; "
      f"{config.fed.algorithm}, {fed.num_sampled(config.fed, clients.num_clients)} client slots/round"
      + (f"; {extra.description}" if extra.description else "")
      + (f"; resuming at round {start}" if start else ""))
  # disable=None: the bar shows on a terminal and stays out of redirected output.
  bar = tqdm(total=config.rounds, initial=start, desc="rounds", disable=None if progress else True,
             dynamic_ncols=True, leave=False)
  t_run = time.perf_counter()
  record: dict[str, Any] = {}
  try:
    with _StopRequests() as stop:
      while int(state.round) < config.rounds:
        if stop.requested:
          ckpt.save(state)
          print(f"\ninterrupted: checkpoint saved at round {int(state.round)} in {ckpt.directory}; "
                f"rerun the same command to resume", file=sys.stderr)
          raise SystemExit(130)
        t0 = time.perf_counter()
        state, metrics = round_step(state, clients)
        metrics = jax.device_get(metrics)
        r = int(state.round)
        record = {"round": r, **{k: float(v) for k, v in metrics.items()}}
        if not np.isfinite(record["train_loss"]):
          raise FloatingPointError(
              f"training diverged at round {r} (train loss {record['train_loss']}); the last "
              f"checkpoint is kept: lower --fed.local_lr or --fed.server_lr and rerun with a new --workdir")
        if extra.round_metrics is not None:
          record.update(extra.round_metrics(r))
        if r % config.eval_every == 0 or r == config.rounds:
          ev = jax.device_get(evaluate(state.params, x_test, y_test))
          record.update(test_accuracy=float(ev["accuracy"]), test_loss=float(ev["loss"]))
        record["round_seconds"] = time.perf_counter() - t0
        log.append(record)
        if "test_accuracy" in record:
          say(f"round {r:4d}/{config.rounds}  train_loss {record['train_loss']:.4f}  "
              f"test_acc {record['test_accuracy']:.4f}"
              + (f"  eps {record['epsilon']:.3g}" if "epsilon" in record else "")
              + f"  {record['round_seconds']:.2f}s")
        if r % config.checkpoint_every == 0 or r == config.rounds:
          ckpt.save(state)
        bar.update(1)
  finally:
    # Every exit (done, interrupted, diverged, an error) closes the bar and the checkpointer.
    bar.close()
    ckpt.close()

  evaluated = [r for r in log.records if "test_accuracy" in r]
  if primary:  # the final model, for whoever attacks or evaluates it later (flax msgpack)
    (workdir / "params.msgpack").write_bytes(flax.serialization.to_bytes(jax.device_get(state.params)))
  if primary and figures:
    plots.plot_curves({config.data.partition: ([r["round"] for r in evaluated],
                                               [r["test_accuracy"] for r in evaluated])},
                      str(workdir / "accuracy.png"),
                      title=f"{config.fed.algorithm} on {config.data.name}, {config.model.name}")
  if not record:
    say(f"nothing to do: {workdir} already holds {start} rounds (raise --rounds to continue)")
  else:
    say(f"done: {config.rounds} rounds in {time.perf_counter() - t_run:.1f}s this session; "
        f"test accuracy {evaluated[-1]['test_accuracy']:.4f}; outputs in {workdir}")
  return log.records[-1] if log.records else {}


def main(argv: list[str] | None = None, *, config_cls: type = ExperimentConfig,
         run: Any = None) -> None:
  """The command line: config flags derived from `config_cls`, plus --workdir.

  `run(config, workdir, overwrite=, progress=)` defaults to `train_and_evaluate`; a layer
  above fljax passes its own (with a config class that extends `ExperimentConfig`).
  """
  def extra(parser):
    parser.add_argument("--workdir", default="runs/fl", help="output folder (default: runs/fl)")
    parser.add_argument("--overwrite", action="store_true",
                        help="discard checkpoints in --workdir and start afresh")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() first: one process per host, all "
                             "running the same command; with --devices 0 the client axis spans "
                             "every process's devices and the first process writes the files")
    parser.add_argument("--coordinator", default=None,
                        help="with --distributed: host:port of process 0 (default: from the "
                             "cluster environment, e.g. SLURM)")
    parser.add_argument("--num-processes", type=int, default=None,
                        help="with --distributed: number of processes")
    parser.add_argument("--process-id", type=int, default=None,
                        help="with --distributed: this process's rank")
  config, ns = config_lib.parse(config_cls, argv, extra=extra,
                                description="Federated training on offline datasets "
                                            "(FedAvg/FedSGD), resumable.")
  if ns.distributed:
    # CPU devices of several processes talk through gloo; accelerators ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(ns.coordinator, ns.num_processes, ns.process_id)
  try:
    (run or train_and_evaluate)(config, ns.workdir, overwrite=ns.overwrite,
                                progress=not ns.no_progress)
  except (datasets.DatasetError, ValueError, FloatingPointError) as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  main()
