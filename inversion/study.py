"""The comparative study: attacks x defenses x data skew, one grid, one report.

A study is a grid of cells. An *FL cell* is (partition, defense, seed): FedAvg trained
under the defense (`privacy.train`), recording test accuracy and epsilon per round. An
*attack cell* is (partition, defense, seed, attack, batch size, local steps, model state):
the honest-but-curious server's view of one upload (or, under secure aggregation, of the
round's aggregate) at the model state (`untrained`: the run's initial parameters, or
`trained`: its final ones), attacked on the same victims by every attack.

Cells are cached on disk by a hash of what determines their result (`cells/<kind>/<hash>/`),
so a rerun skips finished cells and a killed study resumes (an FL cell mid-training
resumes from its checkpoint). Attack cells whose shapes agree are attacked in one compiled
computation (`experiment.attack_batched` with one model per row): the victims of every
partition, defense and seed at once, their rows spread over the local devices; an FL cell
shards its clients over them. Several hosts (`Hosts`: independent processes sharing the
output folder) each take the cells whose hash falls to them; host 0 writes the report.
Programs that agree across cells compile once (JAX's persistent compilation cache in
`xla_cache/`; clients padded to a power of two so seeds and partitions share shapes).

The server's view of each defense (what the attack gets), next to what trains the model:

  none, pruning      the client's update as sent (pruned: its top 10% entries)
  DP-FedAvg          the clear update: central DP clips and noises at the server, after it
                     has seen the update (Geyer et al. 2017, McMahan et al. 2018)
  local DP-SGD       the update of one DP-SGD step on the batch: clip C, noise sigma C / B
                     (exact for B = 1; for B > 1 the update is clipped as a whole)
  forward noise,     the upload sqrt(abar) clip_C(u) + sqrt(1 - abar) C xi at the upload's z
  its DP hybrid      (the hybrid's central noise comes after the server has seen it)
  SecAgg (+ DDGauss) only the mean of the n = q C sampled clients' updates (with the
                     distributed discrete Gaussian each is clipped to C and the mean carries
                     the summed noise, modelled as sigma C / n):
                     with FedSGD, the gradient of the union of their batches

The report (`report.md` and the self-contained `report.html`) holds a summary table per
defense, accuracy per round, accuracy vs epsilon, attack PSNR vs epsilon, the frontier
(accuracy vs best attack PSNR) per partition, reconstruction grids on the same victims, and
every cell's config, versions, seed, device and wall time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import time
import traceback
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fljax import models
from fljax import train as fl_train
from inversion import adaptive, attacks, metrics
from inversion import experiment as ex
from inversion import observation as ob
from privacy import accounting
from privacy import federated as pfed
from privacy import forward_noise as fn
from privacy import train as ptrain

# ----------------------------------------------------------------------------- registries

PARTITIONS: dict[str, dict[str, Any]] = {
    "iid": dict(partition="iid"),
    "dirichlet0.5": dict(partition="dirichlet", alpha=0.5),
    "dirichlet0.1": dict(partition="dirichlet", alpha=0.1),
    "shards2": dict(partition="shards", shards_per_client=2),
}

# name -> (compare_attacks variant, paper)
ATTACKS: dict[str, tuple[str, str]] = {
    "dlg": ("dlg", "Zhu et al. 2019, Deep Leakage from Gradients"),
    "idlg": ("idlg", "Zhao et al. 2020, iDLG"),
    "ig": ("ig", "Geiping et al. 2020, Inverting Gradients"),
    "gifd": ("gifd", "Fang et al. 2023, GIFD (GAN prior, feature domain)"),
    "dps": ("dps[features=1]", "Chung et al. 2023 DPS as gradient inversion, with feature "
                               "matching (GI-DDPM style)"),
    "adaptive": ("dps[adaptive=true,denoise=rescale]", "diffusion-guided, noise-aware and "
                                                        "clip-aware (A1 of issue 8)"),
}

LOCAL_Z = 0.3  # forward noise's z per upload (empirically protective at issue 8's grid)


@dataclasses.dataclass(frozen=True)
class Defense:
  """A defense of the study: how FL trains under it, and what the server sees."""

  privacy: dict[str, Any]  # `privacy.train.PrivacyConfig` fields (target_epsilon resolved there)
  view: str  # clear | local_dp | forward | prune | aggregate
  paper: str
  dp: bool = True
  fed: tuple[tuple[str, Any], ...] = ()  # FedConfig overrides


DEFENSES: dict[str, Defense] = {
    "none": Defense(dict(mechanism="none"), "clear", "-", dp=False),
    "dp_fedavg_eps1": Defense(dict(mechanism="dp_fedavg", target_epsilon=1.0, clip_norm=0.5),
                              "clear", "McMahan et al. 2018 (DP-FedAvg), user level"),
    "dp_fedavg_eps4": Defense(dict(mechanism="dp_fedavg", target_epsilon=4.0, clip_norm=0.5),
                              "clear", "McMahan et al. 2018 (DP-FedAvg), user level"),
    "dp_fedavg_eps8": Defense(dict(mechanism="dp_fedavg", target_epsilon=8.0, clip_norm=0.5),
                              "clear", "McMahan et al. 2018 (DP-FedAvg), user level"),
    # record level: client sampling is not credited, so a fixed q C clients a round (not
    # Poisson over all C slots) is the same privacy at a tenth of the per-example work; the
    # exact Poisson DP-SGD step pads every batch to the client's size, so its cost grows as
    # N^2 / B: local batches of 32 (DP-SGD's usual larger batches) keep it near the others'
    "dpsgd": Defense(dict(mechanism="dpsgd", noise_multiplier=1.0, clip_norm=1.0), "local_dp",
                     "Abadi et al. 2016 (DP-SGD) in each client, record level",
                     fed=(("sampling", "fixed"), ("local_batch_size", 32))),
    "secagg": Defense(dict(mechanism="secagg", secagg_clip=10.0, secagg_neighbours=8),
                      "aggregate", "Bonawitz et al. 2017; Bell et al. 2020 (SecAgg+)", dp=False),
    "secagg_ddp": Defense(dict(mechanism="secagg", target_epsilon=8.0, clip_norm=0.5,
                               secagg_bits=20, secagg_neighbours=8), "aggregate",
                          "SecAgg+ with the distributed discrete Gaussian (Kairouz et al. "
                          "2021), epsilon 8 replace-one, participation visible"),
    "forward": Defense(dict(mechanism="forward_noise", noise_multiplier=LOCAL_Z, clip_norm=0.5),
                       "forward", "forward-diffusion noise on updates (issue 8), z = 0.3"),
    "hybrid": Defense(dict(mechanism="forward_noise", noise_multiplier=LOCAL_Z, clip_norm=0.5,
                           central_noise_multiplier="eps8"), "forward",
                      "forward noise z = 0.3 + central noise to epsilon 8 (replace-one, "
                      "participation visible)"),
    # the trusted server hides participation: a cap of 2 q C slots keeps the top-up total
    # z_T >= sqrt(slots) z_L affordable
    "topup": Defense(dict(mechanism="forward_noise", noise_multiplier=LOCAL_Z, clip_norm=0.5,
                          topup_noise_multiplier="eps8"), "forward",
                     "forward noise z = 0.3 topped up by the trusted server to a "
                     "participation-independent total (epsilon <= 8, add/remove, amplified)",
                     fed=(("poisson_cap", 20),)),
    "prune": Defense(dict(mechanism="prune", prune_fraction=0.9), "prune",
                     "Zhu et al. 2019 (gradient pruning)", dp=False),
}

MODEL_STATES = ("untrained", "trained")


def check_names(kind: str, names: Iterable[str], valid: Iterable[str]) -> list[str]:
  names, valid = list(names), list(valid)
  bad = [n for n in names if n not in valid]
  if bad:
    raise ValueError(f"unknown {kind} {', '.join(map(repr, bad))}; valid: {', '.join(valid)}")
  if not names:
    raise ValueError(f"the study needs at least one {kind}")
  return names


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True, kw_only=True)
class StudyConfig:
  """A study's grid and the size of each cell.

  Attributes:
    partitions, defenses, attacks: names from PARTITIONS, DEFENSES and ATTACKS.
    seeds: every FL cell runs once per seed; attack cells on `attack_seeds` of them.
    batch_sizes: B, the images behind each attacked upload.
    local_steps: local SGD steps behind it (1: a FedSGD gradient; s > 1: FedAvg, s full-batch
      steps).
    model_states: untrained (the run's initial model) and/or trained (its final model).
    dataset, image_size, channels: the data (32x32x1: the shipped priors' geometry).
    clients, q, rounds, model: the federated run (Poisson sampling of q C clients a round).
    victims: attacked uploads per attack cell.
    budget: double-backward evaluations per victim for every attack.
  """

  partitions: tuple[str, ...] = ("iid", "dirichlet0.5", "dirichlet0.1")
  defenses: tuple[str, ...] = tuple(DEFENSES)
  attacks: tuple[str, ...] = tuple(ATTACKS)
  seeds: tuple[int, ...] = (0, 1, 2)
  attack_seeds: tuple[int, ...] = (0,)
  batch_sizes: tuple[int, ...] = (1,)
  local_steps: tuple[int, ...] = (1,)
  model_states: tuple[str, ...] = ("untrained",)
  dataset: str = "mnist"
  image_size: int = 32
  channels: int = 1
  clients: int = 100
  q: float = 0.1
  rounds: int = 10
  model: str = "cnn"
  victims: int = 2
  budget: int = 30
  eval_every: int = 2

  def __post_init__(self):
    check_names("partition", self.partitions, PARTITIONS)
    check_names("defense", self.defenses, DEFENSES)
    check_names("attack", self.attacks, ATTACKS)
    check_names("model state", self.model_states, MODEL_STATES)
    if not self.seeds or not set(self.attack_seeds) <= set(self.seeds):
      raise ValueError(f"attack_seeds {list(self.attack_seeds)} must be among seeds {list(self.seeds)}")
    for name in ("clients", "rounds", "victims", "budget", "eval_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if min(self.batch_sizes) < 1 or min(self.local_steps) < 1:
      raise ValueError("batch sizes and local steps must be >= 1")
    if not 0 < self.q <= 1:
      raise ValueError(f"q must be in (0, 1], got {self.q}")

  def expected_clients(self) -> int:
    return max(1, round(self.q * self.clients))


# StudyConfig overrides of `scripts/study.py --full` and `--tiny`
PRESETS: dict[str, dict[str, Any]] = {
    "full": dict(seeds=(0, 1, 2, 3, 4), attack_seeds=(0, 1, 2), rounds=50, victims=8, budget=200,
                 batch_sizes=(1, 4, 16), local_steps=(1, 5), model_states=("untrained", "trained"),
                 eval_every=5),
    "tiny": dict(dataset="digits", partitions=("iid",), defenses=("none", "forward"),
                 attacks=("ig",), seeds=(0, 1), attack_seeds=(0, 1), clients=8, q=0.5, rounds=2,
                 model="mlp", victims=1, budget=4, eval_every=1),
}


def config_hash(cfg: dict[str, Any]) -> str:
  """The cache key of a cell: its config without the attack's display name (the variant
  says what runs)."""
  content = {k: v for k, v in cfg.items() if k != "attack"}
  return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- FL cells


@functools.lru_cache(maxsize=16)
def _central_z(rounds: int, q: float) -> float:
  """The hybrid's central z_C: sqrt(z_L^2 + z_C^2) meets epsilon 8 (model observer,
  replace-one, participation visible at rate q) over the rounds."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", fn.ScheduleWarning)
    z_star = float(fn.calibrate(fn.constant(1.0, rounds), 8.0, 1e-5, q=q).z[0])
  return math.sqrt(max(z_star ** 2 - LOCAL_Z ** 2, 1e-6))


@functools.lru_cache(maxsize=16)
def _topup_z(rounds: int, q: float, clients: int, slots: int) -> float:
  """The top-up's total z_T: sqrt(slots) z_L (the least the server can top up to), or
  DP-FedAvg's noise for epsilon 8 (add/remove, Poisson q truncated to `slots`, PLD) when
  that floor does not reach epsilon 8."""
  fed_cfg = fl_train.fed.FedConfig(clients_per_round=q, sampling="poisson", poisson_cap=slots)
  run = lambda s: accounting.compose([(pfed.dp_fedavg_event(fed_cfg, clients, s)[0], rounds)])  # noqa: E731
  floor = math.sqrt(slots) * LOCAL_Z
  if accounting.epsilon(run(floor), 1e-5, neighbouring="add_remove") <= 8.0:
    return floor
  return accounting.calibrate(run, 8.0, 1e-5, accountant="pld", neighbouring="add_remove",
                              sigma_min=floor)


def fl_cell(cfg: StudyConfig, partition: str, defense: str, seed: int) -> dict[str, Any]:
  """The JSON config of an FL cell (what its hash covers)."""
  privacy = dict(DEFENSES[defense].privacy)
  if privacy.get("central_noise_multiplier") == "eps8":
    privacy["central_noise_multiplier"] = round(_central_z(cfg.rounds, cfg.q), 6)
  fed_overrides = dict(DEFENSES[defense].fed)
  if privacy.get("topup_noise_multiplier") == "eps8":
    privacy["topup_noise_multiplier"] = round(_topup_z(cfg.rounds, cfg.q, cfg.clients,
                                                       fed_overrides["poisson_cap"]), 6)
  return {"kind": "fl", "partition": partition, "defense": defense, "data": dict(
      name=cfg.dataset, image_size=cfg.image_size, channels=cfg.channels,
      num_clients=cfg.clients, pad_pow2=True, **PARTITIONS[partition]), "model": cfg.model,
      "fed": {"clients_per_round": cfg.q, "sampling": "poisson", **fed_overrides},
      "rounds": cfg.rounds,
      "seed": seed, "eval_every": cfg.eval_every, "privacy": privacy}


def fl_experiment(cell: dict[str, Any], devices: int = 1) -> ptrain.PrivateExperimentConfig:
  return ptrain.PrivateExperimentConfig(
      data=fl_train.DataConfig(**cell["data"]), model=fl_train.ModelConfig(name=cell["model"]),
      fed=fl_train.fed.FedConfig(**cell["fed"]), rounds=cell["rounds"], seed=cell["seed"],
      eval_every=cell["eval_every"], checkpoint_every=cell["rounds"],
      devices=devices, privacy=ptrain.PrivacyConfig(**cell["privacy"]))


def environment() -> dict[str, Any]:
  import flax
  import optax
  return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
          "numpy": np.__version__, "python": platform.python_version(),
          "backend": jax.default_backend(), "devices": jax.device_count(),
          "device_kind": jax.devices()[0].device_kind, "host": platform.node(),
          "processes": jax.process_count(), "cpus": os.cpu_count()}


def run_fl_cell(cell: dict[str, Any], folder: Path, *, progress: bool = False) -> dict[str, Any]:
  """Trains (or resumes) one FL cell; writes done.json (or failed.json with the reason)."""
  folder.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  try:
    config = fl_experiment(cell, devices=0 if jax.local_device_count() > 1 else 1)
    (folder / "run").mkdir(exist_ok=True)
    with open(folder / "run" / "train.log", "a") as log, contextlib.redirect_stdout(log):
      ptrain.train_and_evaluate(config, folder / "run", progress=progress, figures=False)
    records = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    final = records[-1]
    if not np.isfinite(final.get("test_accuracy", np.nan)):
      raise FloatingPointError(f"test accuracy is {final.get('test_accuracy')}")
    declared = folder / "run" / "privacy.json"  # each epsilon's threat model, relation, event
    result = {"status": "done", "config": cell, "records": records, "final": final,
              "privacy": json.loads(declared.read_text()) if declared.exists() else None,
              "wall_seconds": time.perf_counter() - t0, "environment": environment()}
  except (Exception, SystemExit) as e:  # recorded with its reason; the study goes on
    result = {"status": "failed", "config": cell, "reason": f"{type(e).__name__}: {e}",
              "traceback": traceback.format_exc(), "wall_seconds": time.perf_counter() - t0,
              "environment": environment()}
  (folder / ("done.json" if result["status"] == "done" else "failed.json")).write_text(
      json.dumps(result, indent=1, default=float) + "\n")
  return result


def read_cell(folder: Path) -> dict[str, Any] | None:
  for name in ("done.json", "failed.json"):
    if (folder / name).exists():
      return json.loads((folder / name).read_text())
  return None


# ----------------------------------------------------------------------------- attack cells


def attack_cell(cfg: StudyConfig, partition: str, defense: str, seed: int, attack: str,
                batch: int, steps: int, state: str, fl_hash: str, fl: dict[str, Any] | None
                ) -> dict[str, Any]:
  """The JSON config of an attack cell. Its hash covers what determines the result only
  (the view, the model, the victims, the attack), so cells that coincide (e.g. DP-FedAvg
  at every epsilon on the untrained model: the server sees the same clear update) run once."""
  d = DEFENSES[defense]
  privacy = d.privacy
  view: dict[str, Any] = {"kind": d.view}
  if d.view == "local_dp":
    view.update(clip_norm=privacy["clip_norm"], noise_multiplier=privacy["noise_multiplier"] / batch)
  elif d.view == "forward":
    view.update(clip_norm=privacy["clip_norm"], z=privacy["noise_multiplier"])
  elif d.view == "prune":
    view.update(fraction=privacy["prune_fraction"])
  elif d.view == "aggregate":
    view.update(clients=cfg.expected_clients())
    if "target_epsilon" in privacy or "noise_multiplier" in privacy:
      sigma = None if fl is None or fl["status"] != "done" else fl["final"].get("noise_multiplier")
      view.update(clip_norm=privacy["clip_norm"], sigma=sigma)
  model = {"name": cfg.model, "state": state, "seed": seed,
           "fl": fl_hash if state == "trained" else None}
  variant = ATTACKS[attack][0]
  if attack == "adaptive" and d.view in ("clear", "aggregate"):
    # nothing to adapt to (clear), or no model of it (an aggregate of per-client clipped and
    # noised updates is not one clipped update): the dps attack itself, one shared cell
    variant = ATTACKS["dps"][0]
  return {"kind": "attack", "attack": attack, "variant": variant,
          "budget": cfg.budget, "view": view, "model": model,
          "data": {"name": cfg.dataset, "image_size": cfg.image_size, "channels": cfg.channels,
                   "num_clients": cfg.clients, **PARTITIONS[partition]},
          "partition_seed": seed, "batch": batch, "local_steps": steps,
          # an aggregate already holds n B images: one per cell keeps its cost near the others'
          "victims": 1 if d.view == "aggregate" else cfg.victims,
          "local_lr": 0.1}


@functools.lru_cache(maxsize=8)
def _clients(data_json: str, seed: int):
  """The FL run's own partition (its key), so that victims are clients of that run."""
  data = fl_train.DataConfig(**json.loads(data_json))
  k_partition = jax.random.split(jax.random.key(seed), 3)[0]
  ds, clients, _ = fl_train.load_clients(data, key=k_partition)
  return ds, clients


def _cell_key(cell: dict[str, Any]) -> jax.Array:
  """The key of the victims, their clients' (defense) noise and the attack's restarts. It
  depends on the data, partition seed, B and local steps only: every defense and attack of
  a grid point sees the same victims (and common random numbers)."""
  what = {k: cell[k] for k in ("data", "partition_seed", "batch", "local_steps")}
  return jax.random.fold_in(jax.random.key(cell["partition_seed"]), int(config_hash(what)[:7], 16))


def _victim_batches(cell: dict[str, Any], count: int) -> tuple[np.ndarray, np.ndarray]:
  """`count` clients of the partition holding >= B examples, the first B of each: images
  `[count, B, H, W, C]`, labels `[count, B]`. The clients are a prefix of one permutation,
  so victim 0 is the same client for every defense (an aggregate's first client too)."""
  ds, clients = _clients(json.dumps(cell["data"], sort_keys=True), cell["partition_seed"])
  b = cell["batch"]
  sizes = np.asarray(clients.mask.sum(axis=1))
  eligible = np.flatnonzero(sizes >= b)
  if len(eligible) < count:
    raise ValueError(f"only {len(eligible)} clients hold >= {b} examples; {count} are needed "
                     f"(lower the batch size or the victims)")
  pick = np.asarray(jax.random.permutation(jax.random.fold_in(_cell_key(cell), 1), eligible))[:count]
  x = np.asarray(clients.x)[pick, :b]
  y = np.asarray(clients.y)[pick, :b]
  return x, y


def _model(cell: dict[str, Any]) -> models.Model:
  ds, _ = _clients(json.dumps(cell["data"], sort_keys=True), cell["partition_seed"])
  return models.make(cell["model"]["name"], num_classes=ds.num_classes, input_shape=ds.image_shape)


def _params(cell: dict[str, Any], cells_dir: Path) -> Any:
  """The model the server holds: the FL run's initial parameters (same key as
  `fljax.train`) or its final ones (params.msgpack of the FL cell)."""
  import flax.serialization
  model = _model(cell)
  init = model.init(jax.random.split(jax.random.key(cell["model"]["seed"]), 3)[1])
  if cell["model"]["state"] == "untrained":
    return init
  path = cells_dir / "fl" / cell["model"]["fl"] / "run" / "params.msgpack"
  return flax.serialization.from_bytes(init, path.read_bytes())


def _threat(cell: dict[str, Any], batch: int, observes: str) -> ob.ThreatModel:
  ds, _ = _clients(json.dumps(cell["data"], sort_keys=True), cell["partition_seed"])
  s = cell["local_steps"]
  return ob.ThreatModel(algorithm="fedsgd" if s == 1 else "fedavg", batch_size=batch,
                        input_shape=ds.image_shape, num_classes=ds.num_classes,
                        local_epochs=s, local_batch_size=cell["batch"],
                        local_lr=cell["local_lr"], observes=observes,
                        defense="none" if cell["view"]["kind"] == "clear" else cell["view"]["kind"])


def defense_spec(view: dict[str, Any]) -> ex.DefenseSpec:
  """The inversion-side defense of one client's upload under `view`."""
  kind = view["kind"]
  if kind == "local_dp":
    return ex.DefenseSpec(name="local_dp", clip_norm=view["clip_norm"],
                          noise_multiplier=view["noise_multiplier"])
  if kind == "forward":
    return ex.DefenseSpec(name="forward_noise", clip_norm=view["clip_norm"],
                          noise_multiplier=view["z"], rescale=False)
  if kind == "prune":
    return ex.DefenseSpec(name="prune", fraction=view["fraction"])
  if kind == "aggregate" and view.get("sigma") is not None:
    # each of the n clients clips and adds its share: the mean carries sigma C / n (the
    # distributed discrete Gaussian's shares are sized for n_min <= n survivors, so the real
    # mean carries at least this much noise, discrete and rounded: the attacker's model is
    # the continuous Gaussian of the accounted std, in its favour)
    return ex.DefenseSpec(name="local_dp", clip_norm=view["clip_norm"],
                          noise_multiplier=view["sigma"] / math.sqrt(view["clients"]))
  return ex.DefenseSpec(name="none")


@dataclasses.dataclass
class Prepared:
  """An attack cell's observations, ready to be stacked with others."""

  cell: dict[str, Any]
  hash: str
  params: Any
  obs: ob.Observation  # updates [V, ...], labels
  x: np.ndarray  # truth [V, B', H, W, C] (B' = n B under aggregation)
  y: np.ndarray
  threat: ob.ThreatModel
  spec: ex.AttackSpec
  defense: ex.DefenseSpec


def prepare(cell: dict[str, Any], h: str, cells_dir: Path) -> Prepared:
  """What the server sees in this cell, V times (one upload, or one round's aggregate)."""
  if cell["view"]["kind"] == "aggregate" and "clip_norm" in cell["view"] and cell["view"]["sigma"] is None:
    raise ValueError("the distributed-DP noise is unknown: its FL cell failed")
  model = _model(cell)
  params = _params(cell, cells_dir)
  v, b = cell["victims"], cell["batch"]
  d = defense_spec(cell["view"])
  key = _cell_key(cell)
  name, overrides = _variant(cell["variant"])
  spec = ex.AttackSpec(name=name, budget=cell["budget"], retries=0, **overrides)
  if cell["view"]["kind"] == "aggregate":
    n = cell["view"]["clients"]
    x, y = _victim_batches(cell, v * n)
    client_threat = _threat(cell, b, "client")
    one = ex.observe_all(model, params, x, y, client_threat, ex.DEFENSES[d.name](d), key=key)
    update = jax.tree.map(lambda a: a.reshape((v, n) + a.shape[1:]).mean(axis=1), one.update)
    x = x.reshape((v, n * b) + x.shape[2:])
    y = y.reshape(v, n * b)
    threat = _threat(cell, n * b, "aggregate")
    obs = ob.Observation(update=update, params=params, labels=None)
  else:
    x, y = _victim_batches(cell, v)
    threat = _threat(cell, b, "client")
    obs = ex.observe_all(model, params, x, y, threat, ex.DEFENSES[d.name](d), key=key)
    steps = adaptive.parse(spec.denoise)
    if steps:
      update, _ = adaptive.process(jax.tree.map(lambda a: a[None], obs.update), steps,
                                   ex.declared_noise(d), batch_size=b)
      obs = ob.Observation(update=update, params=params, labels=obs.labels)
  bad = [i for i in range(v) if not all(bool(jnp.isfinite(a[i]).all())
                                        for a in jax.tree.leaves(obs.update))]
  if bad:
    raise FloatingPointError(f"the observed updates of victims {bad} are not finite")
  return Prepared(cell, h, params, obs, np.asarray(x), np.asarray(y), threat, spec, d)


def _variant(text: str) -> tuple[str, dict[str, Any]]:
  from inversion.compare import parse_variant
  return parse_variant(text)


def group_key(p: Prepared) -> str:
  """Cells attacked in one computation share the attack, its plan and the shapes."""
  adaptive_plan = p.spec.adaptive or p.spec.denoise != "none"
  return config_hash({"variant": p.cell["variant"], "budget": p.cell["budget"],
                      "threat": dataclasses.asdict(p.threat) | {"defense": None},
                      "defense": dataclasses.asdict(p.defense) if adaptive_plan else None,
                      "model": p.cell["model"]["name"], "victims": p.cell["victims"]})


def shard_rows(tree: Any, rows: int) -> Any:
  """Rows (stacked cells x victims) split over every local device when they divide evenly;
  the compiled attack then runs each device's rows there (GSPMD)."""
  n = jax.local_device_count()
  if n == 1 or rows % n:
    return tree
  mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), ("rows",))
  return jax.device_put(tree, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("rows")))


def batching_mode() -> str:
  """vmap when rows are spread over several devices (lax.map would serialise them),
  else fljax's default for the backend (lax.map on CPU, vmap on accelerators)."""
  return "vmap" if jax.local_device_count() > 1 else ex.fed.resolve_batching("auto")


def attack_group(group: list[Prepared], *, mode: str, progress: Callable[[int], Any] = lambda n: None,
                 chunk: int = 25) -> list[dict[str, Any]]:
  """Attacks every cell of the group in one compiled computation (rows = cells x victims,
  each row with its cell's model) and scores each cell."""
  first = group[0]
  model = _model(first.cell)
  plan = ex.ATTACKS[first.spec.name](model, first.threat, first.spec, first.defense)
  v = first.cell["victims"]
  stack = lambda *a: jnp.concatenate(a)  # noqa: E731
  updates = jax.tree.map(stack, *[p.obs.update for p in group])
  params = jax.tree.map(lambda *a: jnp.stack([x for x in a for _ in range(v)]),
                        *[p.params for p in group])
  labels = None if first.obs.labels is None else jnp.concatenate([p.obs.labels for p in group])
  keys = jnp.stack([jax.random.fold_in(_cell_key(p.cell), 2 + i) for p in group for i in range(v)])
  updates, params, labels, keys = shard_rows((updates, params, labels, keys), len(group) * v)
  t0 = time.perf_counter()
  states = ex.attack_batched(plan, ob.Observation(update=updates, params=params, labels=labels),
                             keys, mode=mode, chunk=chunk, progress=progress, row_params=True)
  jax.block_until_ready(states)
  seconds = time.perf_counter() - t0
  xs = np.clip(np.asarray(states.x), 0.0, 1.0)
  ys = np.asarray(plan.labels(states))
  ok = ~np.asarray(states.diverged) & np.isfinite(np.asarray(states.loss))
  counts = np.asarray(states.counts)
  out = []
  for j, p in enumerate(group):
    rows = slice(j * v, (j + 1) * v)
    out.append(score_cell(p, xs[rows], ys[rows], ok[rows], counts[rows], seconds / len(group),
                          plan.steps))
  return out


def score_cell(p: Prepared, rec: np.ndarray, rec_y: np.ndarray, ok: np.ndarray,
               counts: np.ndarray, seconds: float, steps: int
               ) -> tuple[dict[str, Any], np.ndarray]:
  """The cell's scores (after Hungarian matching) and its matched reconstructions."""
  matched = np.zeros_like(p.x, dtype=np.float32)
  psnr, ssim, label_acc, failed = [], [], [], []
  for i in range(len(p.y)):
    label_acc.append(metrics.label_accuracy(rec_y[i], p.y[i]))
    if not ok[i] or not np.isfinite(rec[i]).all():
      failed.append(i)
      continue
    s = metrics.score(rec[i], p.x[i])
    matched[i] = rec[i][s["order"]]
    psnr += [float(v) for v in s["psnr"]]
    ssim += [float(v) for v in s["ssim"]]
  result = {
      "status": "failed" if len(failed) == len(p.y) else "done", "config": p.cell,
      "psnr": psnr, "ssim": ssim, "label_accuracy": label_acc, "failed_victims": failed,
      "median_psnr": float(np.median(psnr)) if psnr else float("nan"),
      "mean_ssim": float(np.mean(ssim)) if ssim else float("nan"),
      "mean_label_accuracy": float(np.mean(label_acc)),
      "steps": steps, **{f"{c}_per_victim": float(counts[:, i].mean())
                         for i, c in enumerate(attacks.COUNTERS)},
      "wall_seconds": seconds, "environment": environment()}
  if result["status"] == "failed":
    result["reason"] = "every victim's attack diverged (non-finite loss or iterate)"
  return result, matched


# ----------------------------------------------------------------------------- the study


@dataclasses.dataclass
class Plan:
  """Every cell of the study: the FL cells, and each grid point's attack cell (by hash)."""

  fl: dict[tuple[str, str, int], tuple[str, dict]]  # (partition, defense, seed) -> (hash, cell)
  attacks: dict[tuple, tuple[str, dict]]  # (partition, defense, seed, attack, B, s, state) -> ...


def plan_fl(cfg: StudyConfig) -> dict[tuple[str, str, int], tuple[str, dict]]:
  out = {}
  for p in cfg.partitions:
    for d in cfg.defenses:
      for s in cfg.seeds:
        cell = fl_cell(cfg, p, d, s)
        out[(p, d, s)] = (config_hash(cell), cell)
  return out


def plan_attacks(cfg: StudyConfig, fl: dict, cells_dir: Path) -> dict[tuple, tuple[str, dict]]:
  out = {}
  for (p, d, s), (h, _) in fl.items():
    if s not in cfg.attack_seeds:
      continue
    result = read_cell(cells_dir / "fl" / h)
    for a in cfg.attacks:
      for b in cfg.batch_sizes:
        for steps in cfg.local_steps:
          for state in cfg.model_states:
            cell = attack_cell(cfg, p, d, s, a, b, steps, state, h, result)
            out[(p, d, s, a, b, steps, state)] = (config_hash(cell), cell)
  return out


@dataclasses.dataclass(frozen=True)
class Hosts:
  """This host's share of the cells: several hosts (each an independent JAX process on its
  own devices, sharing the output folder) split the cells by hash; host 0 writes the report."""

  index: int = 0
  count: int = 1

  def __post_init__(self):
    if not 0 <= self.index < self.count:
      raise ValueError(f"host index {self.index} must be in [0, {self.count})")

  def mine(self, h: str) -> bool:
    return int(h, 16) % self.count == self.index

  @classmethod
  def from_env(cls) -> Hosts:
    """From SLURM (SLURM_PROCID / SLURM_NTASKS) or FLJAX_HOST / FLJAX_HOSTS; else one host."""
    env = os.environ
    index = env.get("FLJAX_HOST", env.get("SLURM_PROCID", "0"))
    count = env.get("FLJAX_HOSTS", env.get("SLURM_NTASKS", "1"))
    return cls(int(index), int(count))


def compilation_cache(folder: Path) -> None:
  """JAX's persistent compilation cache in `folder`: cells whose programs agree (the same
  defense and shapes over seeds and partitions, a resumed study) compile once."""
  jax.config.update("jax_compilation_cache_dir", str(folder))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class BudgetError(RuntimeError):
  pass


def run(cfg: StudyConfig, out: str | os.PathLike, *, progress: bool = True,
        budget_minutes: float | None = None, chunk: int = 25, hosts: Hosts = Hosts(),
        say: Callable[[str], Any] = print) -> dict[str, Any]:
  """Runs (or resumes) the study and writes the report; returns the report's data."""
  from tqdm import tqdm
  if jax.process_count() > 1:
    raise ValueError("study cells run in independent processes: share them between hosts "
                     "with --hosts / --host (or SLURM), not jax.distributed")
  out = Path(out)
  cells_dir = out / "cells"
  compilation_cache(out / "xla_cache")
  cells_dir.mkdir(parents=True, exist_ok=True)
  (out / "study.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")
  t_start = time.perf_counter()
  fl = plan_fl(cfg)
  unique_fl = {h: c for h, c in fl.values()}
  pending = [h for h in unique_fl if read_cell(cells_dir / "fl" / h) is None and hosts.mine(h)]
  say(f"study: {len(cfg.partitions)} partitions x {len(cfg.defenses)} defenses x "
      f"{len(cfg.seeds)} seeds = {len(unique_fl)} FL cells ({len(pending)} to run); attacks "
      f"{', '.join(cfg.attacks)} on {cfg.victims} victims x batch {list(cfg.batch_sizes)} x "
      f"local steps {list(cfg.local_steps)} x {list(cfg.model_states)} models; {out}")
  bar = tqdm(total=len(pending), desc="FL cells", disable=None if progress else True,
             dynamic_ncols=True)
  for i, h in enumerate(pending):
    cell = unique_fl[h]
    bar.set_postfix_str(f"{cell['partition']} {cell['defense']} seed {cell['seed']}")
    result = run_fl_cell(cell, cells_dir / "fl" / h, progress=False)
    if result["status"] == "failed":
      say(f"FL cell {h} ({cell['partition']}, {cell['defense']}, seed {cell['seed']}) failed: "
          f"{result['reason']}")
    bar.update(1)
    if i == 0 and budget_minutes:
      estimate = result["wall_seconds"] * len(pending) * (1 + _ATTACK_SHARE) / 60
      if estimate > budget_minutes:
        bar.close()
        raise BudgetError(
            f"this grid would take about {estimate:.0f} minutes here (first FL cell "
            f"{result['wall_seconds']:.0f} s x {len(pending)} FL cells, plus attacks), over "
            f"the budget of {budget_minutes:g} minutes: shrink it (fewer --seeds, --rounds, "
            f"--defenses or --partitions) or raise --budget_minutes (0: no limit)")
  bar.close()
  _wait_for(cells_dir / "fl", list(unique_fl), hosts, say)

  attack_plan = plan_attacks(cfg, fl, cells_dir)
  unique = {h: c for h, c in attack_plan.values()}
  todo = [h for h in unique if read_cell(cells_dir / "attack" / h) is None and hosts.mine(h)]
  groups: dict[str, list[Prepared]] = {}
  for h in todo:
    try:
      p = prepare(unique[h], h, cells_dir)
      groups.setdefault(group_key(p), []).append(p)
    except Exception as e:
      _write_attack(cells_dir, h, {"status": "failed", "config": unique[h],
                                   "reason": f"{type(e).__name__}: {e}",
                                   "environment": environment()}, None)
  say(f"attacks: {len(unique)} distinct attack cells ({len(todo)} to run) in {len(groups)} "
      f"batched computations")
  mode = batching_mode()
  cbar = tqdm(total=len(todo), desc="attack cells", disable=None if progress else True,
              dynamic_ncols=True)
  t_attacks, done_rows = time.perf_counter(), 0
  total_rows = sum(len(g) for g in groups.values())
  for k, (key, group) in enumerate(sorted(groups.items(), key=lambda kv: kv[1][0].cell["variant"])):
    steps_bar = tqdm(total=group[0].cell["budget"], desc=f"{group[0].cell['attack']} x "
                     f"{len(group)} cells", disable=None if progress else True, leave=False,
                     dynamic_ncols=True)
    try:
      results = attack_group(group, mode=mode, chunk=chunk, progress=steps_bar.update)
      for p, (result, matched) in zip(group, results):
        _write_attack(cells_dir, p.hash, result, (p.x, matched))
    except Exception as e:  # the whole computation failed: every cell in it, with the reason
      for p in group:
        _write_attack(cells_dir, p.hash, {"status": "failed", "config": p.cell,
                                          "reason": f"{type(e).__name__}: {e}",
                                          "traceback": traceback.format_exc(),
                                          "environment": environment()}, None)
    steps_bar.close()
    cbar.update(len(group))
    done_rows += len(group)
    if k == 0 and budget_minutes and done_rows < total_rows:
      spent = (time.perf_counter() - t_start) / 60
      estimate = spent + (time.perf_counter() - t_attacks) / 60 * (total_rows - done_rows) / done_rows
      if estimate > budget_minutes:
        cbar.close()
        raise BudgetError(f"the attacks would take the study to about {estimate:.0f} minutes, "
                          f"over the budget of {budget_minutes:g}: lower --victims, --budget, "
                          f"--attacks or raise --budget_minutes (finished cells are kept)")
  cbar.close()
  _wait_for(cells_dir / "attack", list(unique), hosts, say)
  if hosts.index != 0:
    return {}
  from inversion import study_report
  data = study_report.write(cfg, out, fl, attack_plan, wall_seconds=time.perf_counter() - t_start)
  say(f"report: {out / 'report.md'} and {out / 'report.html'} "
      f"({time.perf_counter() - t_start:.0f} s this session)")
  return data


_ATTACK_SHARE = 0.6  # attacks' time relative to the FL cells' in the default grid (measured)


def _write_attack(cells_dir: Path, h: str, result: dict[str, Any],
                  images: tuple[np.ndarray, np.ndarray] | None) -> None:
  folder = cells_dir / "attack" / h
  folder.mkdir(parents=True, exist_ok=True)
  if images is not None:
    np.savez_compressed(folder / "reconstructions.npz", truth=images[0], reconstruction=images[1])
  (folder / ("done.json" if result["status"] == "done" else "failed.json")).write_text(
      json.dumps(result, indent=1, default=float) + "\n")


def _wait_for(folder: Path, hashes: list[str], hosts: Hosts, say: Callable[[str], Any],
              timeout: float = 24 * 3600) -> None:
  """With several hosts, waits until every cell (theirs too) has a result."""
  if hosts.count == 1:
    return
  t0 = time.perf_counter()
  while any(read_cell(folder / h) is None for h in hashes):
    if time.perf_counter() - t0 > timeout:
      raise TimeoutError(f"cells in {folder} still have no result after {timeout:.0f} s")
    time.sleep(5)
  say(f"all cells in {folder} are done")


