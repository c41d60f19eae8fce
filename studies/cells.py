"""A study's cells: their configs and hashes, the on-disk cache, FL cells and attack cells.

An *FL cell* is (partition, defense, seed): FedAvg trained under the defense
(`privacy.train`), recording test accuracy and epsilon per round. An *attack cell* is
(partition, defense, seed, attack, batch size, local steps, model state): the
honest-but-curious server's view of one upload (or, under secure aggregation, of the
round's aggregate) at the model state (`untrained`: the run's initial parameters, or
`trained`: its final ones), attacked on the same victims by every attack.

Each cell lives in `cells/<kind>/<hash>/`, the hash covering what determines its result.
Its outcome is `done.json` or `failed.json` (the reason and traceback), written
atomically: a done cell is not run again (unless a prior it sampled has been retrained
since: `priors_of`), a failed one is run again by the next study (`reopen`), its record
keeping the reasons of the earlier failures. A file that is not
valid JSON is named in a warning and its cell run again. Attack cells whose shapes agree
are attacked in one compiled computation (`attack_group`, one model per row).
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fljax import federated as fed
from fljax import models
from fljax import train as fl_train
from inversion import adaptive, attacks, cost, engine, held_out, metrics, specs
from inversion import observation as ob
from inversion.compare import parse_variant
from privacy import train as ptrain
from studies import grid

DONE, FAILED, RETRY = "done.json", "failed.json", "retry.json"


def config_hash(cfg: dict[str, Any]) -> str:
  """The cache key of a cell: its config without the attack's display name (the variant
  says what runs)."""
  content = {k: v for k, v in cfg.items() if k != "attack"}
  return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


def priors_of(cell: dict[str, Any]) -> dict[str, str]:
  """The generative priors an attack or baseline cell samples, folder -> digest of their
  weights and configs. A cell's hash names a prior, not its weights, so a done cell
  records these and a study runs it again once they changed (`read_cell`, `reopen`):
  retraining a shipped prior leaves no result of the old weights in the cache."""
  if cell.get("kind") not in ("attack", "baseline"):
    return {}
  if cell["kind"] == "baseline":
    if not cell["prior_steps"]:
      return {}
    return {**variant_priors(cell["variant"]), **_digests([_baseline_gan(cell)])}
  return variant_priors(cell["variant"])


def variant_priors(variant: str) -> dict[str, str]:
  """The generative prior an attack variant samples (`inversion.compare.parse_variant`'s
  syntax), folder -> digest of its weights and configs; {} for an attack without one."""
  from diffusion import prior as prior_lib
  name, overrides = parse_variant(variant)
  spec = specs.AttackSpec(name=name, **overrides)
  try:
    folder = specs.prior_folder(spec)
  except prior_lib.PriorError:  # a shipped prior not trained yet
    folder = prior_lib.SHIPPED[spec.prior]
  return _digests([folder] if folder is not None else [])


def _digests(folders: list[str | Path]) -> dict[str, str]:
  return {Path(f).name: _folder_digest(Path(f)) for f in folders}


def _baseline_gan(cell: dict[str, Any]) -> Path:
  """The GAN a baseline cell samples: the one trained on its dataset, else MNIST's."""
  from inversion import gan as gan_lib
  return gan_lib.SHIPPED.get(cell["data"]["name"], gan_lib.MNIST_GAN)


def _folder_digest(folder: Path) -> str:
  """sha256 (16 hex digits) of a prior folder's weights and configs (*.msgpack, *.json);
  "missing" when it has none (a prior not trained yet)."""
  files = sorted(f for f in folder.glob("*") if f.suffix in (".msgpack", ".json"))
  stats = [(str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files]
  return _digest_files(tuple(stats)) if files else "missing"


@functools.lru_cache(maxsize=None)
def _digest_files(files: tuple[tuple[str, int, int], ...]) -> str:
  digest = hashlib.sha256()
  for name, *_ in files:
    digest.update(Path(name).name.encode())
    digest.update(Path(name).read_bytes())
  return digest.hexdigest()[:16]


def environment() -> dict[str, Any]:
  """Library versions and the machine, recorded with every cell."""
  import flax
  import optax
  return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
          "numpy": np.__version__, "python": platform.python_version(),
          "backend": jax.default_backend(), "devices": jax.device_count(),
          "device_kind": jax.devices()[0].device_kind, "host": platform.node(),
          "processes": jax.process_count(), "cpus": os.cpu_count()}


# ----------------------------------------------------------------------------- the cache


def _read_json(path: Path) -> dict[str, Any] | None:
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except (ValueError, OSError) as e:
    warnings.warn(f"{path} is unreadable ({type(e).__name__}: {e}); its cell runs again",
                  stacklevel=3)
    return None


def read_cell(folder: Path) -> dict[str, Any] | None:
  """The cell's outcome (done.json, else failed.json); None while it has none, or when it
  is done with priors whose weights have changed since (`priors_of`)."""
  done = _read_json(folder / DONE)
  if done is not None:
    return None if _stale(done) else done
  return _read_json(folder / FAILED)


def _stale(result: dict[str, Any]) -> bool:
  """Whether a done cell sampled other weights of its priors than the current ones (cells
  recorded before digests were kept have none and count as current)."""
  return "priors" in result and result["priors"] != priors_of(result["config"])


def is_done(folder: Path) -> bool:
  result = read_cell(folder)
  return result is not None and result["status"] == "done"


def reopen(folder: Path) -> None:
  """Marks a failed cell, or a done one whose priors were retrained since, as to be run
  again (its record becomes retry.json, with the reason), so that other hosts wait for
  its new outcome."""
  done = _read_json(folder / DONE)
  if done is not None and _stale(done):
    _write_json(folder / RETRY, {**done, "status": "failed", "reason": (
        f"ran with other weights of its priors (digests {done['priors']}; now "
        f"{priors_of(done['config'])})")})
    (folder / DONE).unlink()
  elif (folder / FAILED).exists() and done is None:
    (folder / FAILED).replace(folder / RETRY)


def write_cell(folder: Path, result: dict[str, Any]) -> None:
  """Writes done.json or failed.json (atomically; the other files removed). A cell that
  failed before keeps those reasons in `previous_failures`; a done one records the
  digests of the priors it sampled (`priors_of`)."""
  folder.mkdir(parents=True, exist_ok=True)
  old = _read_json(folder / RETRY) or _read_json(folder / FAILED)
  if old is not None:
    result = {**result, "previous_failures": old.get("previous_failures", []) + [old["reason"]]}
  if result["status"] == "done" and (priors := priors_of(result.get("config", {}))):
    result = {**result, "priors": priors}
  name = DONE if result["status"] == "done" else FAILED
  _write_json(folder / name, result)
  for other in {DONE, FAILED, RETRY} - {name}:
    (folder / other).unlink(missing_ok=True)


def _write_json(path: Path, content: dict[str, Any]) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(content, indent=1, default=float) + "\n")
  tmp.replace(path)


def failure(cell: dict[str, Any], e: BaseException, **extra: Any) -> dict[str, Any]:
  """The record of a cell that raised `e`."""
  return {"status": "failed", "config": cell, "reason": f"{type(e).__name__}: {e}",
          "traceback": traceback.format_exc(), **extra, "environment": environment()}


# ----------------------------------------------------------------------------- FL cells


def fl_cell(cfg: Any, partition: str, defense: str, seed: int) -> dict[str, Any]:
  """The JSON config of an FL cell (what its hash covers). `cfg` holds the run's `data`,
  `clients`, `q`, `rounds` (or `fl_rounds`, a `StudyConfig`'s rounds resolved per model),
  `model` and `eval_every` (a `StudyConfig` or the like)."""
  rounds = getattr(cfg, "fl_rounds", cfg.rounds)
  privacy = grid.privacy_fields(defense, rounds=rounds, q=cfg.q, clients=cfg.clients)
  return {"kind": "fl", "partition": partition, "defense": defense, "data": dict(
      name=cfg.data.name, image_size=cfg.data.image_size, channels=cfg.data.channels,
      num_clients=cfg.clients, pad_pow2=True, **grid.PARTITIONS[partition]),
      "model": cfg.model, **grid.init_field(cfg.model),
      "fed": grid.fed_fields(defense, q=cfg.q, clients=cfg.clients,
                             poisson_cap=getattr(cfg, "poisson_cap", 0)),
      "rounds": rounds, "seed": seed, "eval_every": cfg.eval_every, "privacy": privacy}


def midway_round(rounds: int) -> int:
  """The round after which an FL cell's `midway` model is taken: half its rounds."""
  return max(1, rounds // 2)


def fl_experiment(cell: dict[str, Any], devices: int = 1) -> ptrain.PrivateExperimentConfig:
  """The `privacy.train` run of an FL cell (which also keeps its `midway` model)."""
  return ptrain.PrivateExperimentConfig(
      snapshot_rounds=(midway_round(cell["rounds"]),),
      data=fl_train.DataConfig(**cell["data"]), model=fl_train.ModelConfig(
          name=cell["model"], init=cell.get("init", "default")),
      fed=fed.FedConfig(**cell["fed"]), rounds=cell["rounds"], seed=cell["seed"],
      eval_every=cell["eval_every"], checkpoint_every=cell["rounds"],
      devices=devices, privacy=ptrain.PrivacyConfig(**cell["privacy"]))


def run_fl_cell(cell: dict[str, Any], folder: Path) -> dict[str, Any]:
  """Trains (or resumes) one FL cell in `folder/run`; writes and returns its outcome (a
  failure is recorded with its reason, not raised)."""
  folder.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  try:
    config = fl_experiment(cell, devices=0 if jax.local_device_count() > 1 else 1)
    (folder / "run").mkdir(exist_ok=True)
    with open(folder / "run" / "train.log", "a") as log, contextlib.redirect_stdout(log):
      ptrain.train_and_evaluate(config, folder / "run", progress=False, figures=False)
    records = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    final = records[-1]
    if not np.isfinite(final.get("test_accuracy", np.nan)):
      raise FloatingPointError(f"test accuracy is {final.get('test_accuracy')}")
    declared = folder / "run" / "privacy.json"  # each epsilon's threat model, relation, event
    result = {"status": "done", "config": cell, "records": records, "final": final,
              "privacy": json.loads(declared.read_text()) if declared.exists() else None,
              "wall_seconds": time.perf_counter() - t0, "environment": environment()}
  except Exception as e:  # recorded with its reason; the study goes on
    result = failure(cell, e, wall_seconds=time.perf_counter() - t0)
  write_cell(folder, result)
  return result


# ----------------------------------------------------------------------------- attack cells


def _server_z(defense: grid.Defense, fl: dict[str, Any] | None) -> float | None:
  """The z of the least-noisy upload the server sees under forward noise: the registry's,
  or the FL cell's calibrated one (None while it has none)."""
  z = defense.privacy.get("noise_multiplier")
  if isinstance(z, (int, float)):
    return float(z)
  if fl is None or fl["status"] != "done" or not fl.get("privacy"):
    return None
  return float(min(fl["privacy"]["event_z"]))


def released_view(cfg: grid.StudyConfig, d: grid.Defense, upload: dict[str, Any],
                  fl: dict[str, Any] | None) -> dict[str, Any]:
  """What a model observer recovers from two consecutive global models: the round's mean
  update over its n = q C clients, each the client's `upload` (its server view), with
  DP-FedAvg's central noise sigma C / n (`fl`'s calibrated sigma; None while unknown).
  Secure aggregation's view already is this. The hybrid's central noise and the top-up's
  are left out: in the attacker's favour."""
  if upload["kind"] == "aggregate":
    return upload
  view: dict[str, Any] = {"kind": "aggregate", "clients": cfg.expected_clients()}
  if d.privacy.get("mechanism") == "dp_fedavg":
    sigma = None if fl is None or fl["status"] != "done" else fl["final"].get("noise_multiplier")
    view.update(clip_norm=d.privacy["clip_norm"], sigma=sigma)
  elif upload["kind"] != "clear":
    view["upload"] = upload
  return view


def attack_cell(cfg: grid.StudyConfig, partition: str, defense: str, seed: int, attack: str,
                batch: int, steps: int, state: str, fl_hash: str, fl: dict[str, Any] | None,
                budget: int, *, released: bool = False) -> dict[str, Any]:
  """The JSON config of an attack cell at `budget` double-backward evaluations per victim,
  given its FL cell's hash and outcome (None if not run); `released`: against the released
  model (`released_view`) instead of what the server sees. The hash covers what determines the result only (the view, the model, the
  victims, the attack), so cells that coincide (e.g. DP-FedAvg at every epsilon on the
  untrained model: the server sees the same clear update) run once."""
  d = grid.DEFENSES[defense]
  if d.view is None:
    raise ValueError(f"the server's view of defense {defense!r} is not modelled: no attack cell")
  privacy = d.privacy
  view: dict[str, Any] = {"kind": d.view}
  if d.view == "local_dp":
    view.update(clip_norm=privacy["clip_norm"], noise_multiplier=privacy["noise_multiplier"] / batch)
  elif d.view == "forward":
    view.update(clip_norm=privacy["clip_norm"], z=_server_z(d, fl))
  elif d.view == "prune":
    view.update(fraction=privacy["prune_fraction"])
  elif d.view == "aggregate":
    view.update(clients=cfg.expected_clients())
    if "target_epsilon" in privacy or "noise_multiplier" in privacy:
      sigma = None if fl is None or fl["status"] != "done" else fl["final"].get("noise_multiplier")
      view.update(clip_norm=privacy["clip_norm"], sigma=sigma)
  if released:
    view = released_view(cfg, d, view, fl)
  model = {"name": cfg.model, "state": state, "seed": seed,
           "fl": fl_hash if state != "untrained" else None, **grid.init_field(cfg.model)}
  if state == "midway":
    model["round"] = midway_round(getattr(cfg, "fl_rounds", cfg.rounds))
  variant = grid.variant(attack, cfg.data.name, cfg.model)  # with its tuned values
  if attack == "adaptive" and view["kind"] in ("clear", "aggregate"):
    # nothing to adapt to (clear), or no model of it (an aggregate of per-client clipped and
    # noised updates is not one clipped update): the dps attack itself, one shared cell
    variant = grid.variant("dps", cfg.data.name, cfg.model)
  return {"kind": "attack", "attack": attack, "variant": variant,
          "budget": budget, "view": view, "model": model,
          "data": {"name": cfg.data.name, "image_size": cfg.data.image_size,
                   "channels": cfg.data.channels, "num_clients": cfg.clients,
                   **grid.PARTITIONS[partition]},
          "partition_seed": seed, "batch": batch, "local_steps": steps,
          # an aggregate already holds n B images: one per cell keeps its cost near the others'
          "victims": 1 if view["kind"] == "aggregate" else cfg.victims if defense == "none"
                     else cfg.defense_victims,
          "local_lr": 0.1}


def check_budgets(cfg: grid.StudyConfig) -> None:
  """Raises a ValueError (one sentence) when an attack's smallest budget in the grid is
  below what it needs for one step: checked before any cell runs, by building each
  attack's plan at that budget (no computation)."""
  from fljax import datasets
  ds = datasets.load(cfg.data.name, image_size=cfg.data.image_size, channels=cfg.data.channels)
  model = grid.make_model(cfg.model, ds)
  for attack in cfg.attacks:
    budget = min(min(cfg.rungs(attack, d), default=math.inf) for d in cfg.defenses)
    if not math.isfinite(budget):
      continue
    name, overrides = parse_variant(grid.variant(attack, cfg.data.name, cfg.model))
    for b in sorted(set(cfg.batch_sizes) | set(cfg.defense_batch_sizes)):
      threat = ob.ThreatModel(batch_size=b, input_shape=ds.image_shape, num_classes=ds.num_classes)
      spec = specs.AttackSpec(name=name, budget=int(budget), retries=0, **overrides)
      try:
        specs.ATTACKS[name](model, threat, spec, specs.DefenseSpec(name="none"))
      except ValueError as e:
        raise ValueError(f"attack {attack} cannot run at the ladder's budget {budget} "
                         f"(B = {b}): {e}") from None


@functools.lru_cache(maxsize=4)  # a grid's cells are prepared partition by partition
def _clients(data_json: str, seed: int):
  """The FL run's own partition (its key), so that victims are clients of that run."""
  data = fl_train.DataConfig(**json.loads(data_json))
  k_partition = jax.random.split(jax.random.key(seed), 3)[0]
  ds, clients, _ = fl_train.load_clients(data, key=k_partition)
  return ds, clients


def load_partition(cell: dict[str, Any]):
  """The dataset and the FL run's clients of the cell's partition."""
  return _clients(json.dumps(cell["data"], sort_keys=True), cell["partition_seed"])


def _cell_key(cell: dict[str, Any]) -> jax.Array:
  """The key of the victims, their clients' (defense) noise and the attack's restarts. It
  depends on the data, partition seed, B and local steps only: every defense and attack of
  a grid point sees the same victims (and common random numbers)."""
  what = {k: cell[k] for k in ("data", "partition_seed", "batch", "local_steps")}
  return jax.random.fold_in(jax.random.key(cell["partition_seed"]), int(config_hash(what)[:7], 16))


def victim_batches(cell: dict[str, Any], count: int) -> tuple[np.ndarray, np.ndarray]:
  """`count` victims of B images each: images `[count, B, H, W, C]`, labels `[count, B]`.

  A victim is a client of the partition holding >= B examples (a prefix of one
  permutation, so victim 0 is the same client for every defense, an aggregate's first
  client too) whose B examples are replaced by held-out images of the same labels: images
  of the test split's evaluation part (`inversion.held_out.split_indices`: not the
  quarter the attacks are tuned on), which neither the FL run nor the shipped priors
  trained on (DESIGN.md: victims never come from a prior's training data). The client
  keeps its partition's label mix; every test image serves at most one victim of the
  cell."""
  ds, clients = load_partition(cell)
  b = cell["batch"]
  sizes = np.asarray(clients.mask.sum(axis=1))
  eligible = np.flatnonzero(sizes >= b)
  if len(eligible) < count:
    raise ValueError(f"only {len(eligible)} clients hold >= {b} examples; {count} are needed "
                     f"(lower the batch size or the victims)")
  pick = np.asarray(jax.random.permutation(jax.random.fold_in(_cell_key(cell), 1), eligible))[:count]
  y = np.asarray(clients.y)[pick, :b]
  pool = held_out.split_indices(len(ds.y_test), "evaluation")  # the tuning quarter never
  order = np.asarray(jax.random.permutation(jax.random.fold_in(_cell_key(cell), 3), pool))
  pools = {c: list(order[ds.y_test[order] == c]) for c in np.unique(y)}
  short = {int(c): int((y == c).sum()) - len(pools[c]) for c in pools if (y == c).sum() > len(pools[c])}
  if short:
    raise ValueError(f"the test split lacks held-out images of classes {short} (missing "
                     f"counts) for {count} victims of batch {b}: lower --victims or the batch size")
  index = np.asarray([[pools[c].pop(0) for c in row] for row in y])
  return ds.x_test[index], y


def _model(cell: dict[str, Any]) -> models.Model:
  ds, _ = load_partition(cell)
  return models.make(cell["model"]["name"], num_classes=ds.num_classes,
                     input_shape=ds.image_shape, init=cell["model"].get("init", "default"))


def _params(cell: dict[str, Any], cells_dir: Path) -> Any:
  """The model the server holds: the FL run's initial parameters (same key as
  `fljax.train`), its global model after the midway round, or its final one (the FL
  cell's params_round<r>.msgpack or params.msgpack)."""
  import flax.serialization
  init = _model(cell).init(jax.random.split(jax.random.key(cell["model"]["seed"]), 3)[1])
  state = cell["model"]["state"]
  if state == "untrained":
    return init
  run = cells_dir / "fl" / cell["model"]["fl"] / "run"
  path = run / ("params.msgpack" if state == "trained" else f"params_round{cell['model']['round']}.msgpack")
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing: the FL cell ran before its midway model was "
                            f"kept; delete {run.parent} and rerun the study to retrain it")
  return flax.serialization.from_bytes(init, path.read_bytes())


def _threat(cell: dict[str, Any], batch: int, observes: str) -> ob.ThreatModel:
  ds, _ = load_partition(cell)
  s = cell["local_steps"]
  return ob.ThreatModel(algorithm="fedsgd" if s == 1 else "fedavg", batch_size=batch,
                        input_shape=ds.image_shape, num_classes=ds.num_classes,
                        local_epochs=s, local_batch_size=cell["batch"],
                        local_lr=cell["local_lr"], observes=observes,
                        defense="none" if cell["view"]["kind"] == "clear" else cell["view"]["kind"])


def defense_spec(view: dict[str, Any]) -> specs.DefenseSpec:
  """The inversion-side defense of one client's upload under `view`."""
  kind = view["kind"]
  if kind == "local_dp":
    return specs.DefenseSpec(name="local_dp", clip_norm=view["clip_norm"],
                             noise_multiplier=view["noise_multiplier"])
  if kind == "forward":
    return specs.DefenseSpec(name="forward_noise", clip_norm=view["clip_norm"],
                             noise_multiplier=view["z"], rescale=False)
  if kind == "prune":
    return specs.DefenseSpec(name="prune", fraction=view["fraction"])
  if kind == "aggregate" and "upload" in view:  # each client's upload, defended, then the mean
    return defense_spec(view["upload"])
  if kind == "aggregate" and view.get("sigma") is not None:
    # each of the n clients clips and adds its share: the mean carries sigma C / n (the
    # distributed discrete Gaussian's shares are sized for n_min <= n survivors, so the real
    # mean carries at least this much noise, discrete and rounded: the attacker's model is
    # the continuous Gaussian of the accounted std, in its favour)
    return specs.DefenseSpec(name="local_dp", clip_norm=view["clip_norm"],
                             noise_multiplier=view["sigma"] / math.sqrt(view["clients"]))
  return specs.DefenseSpec(name="none")


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
  spec: specs.AttackSpec
  defense: specs.DefenseSpec


def prepare(cell: dict[str, Any], h: str, cells_dir: Path) -> Prepared:
  """What the server sees in this cell, V times (one upload, or one round's aggregate)."""
  view = cell["view"]
  upload = view.get("upload", view)
  if (view["kind"] == "aggregate" and "clip_norm" in view and view["sigma"] is None
      or upload["kind"] == "forward" and upload["z"] is None):
    raise ValueError("the defense's calibrated noise is unknown: its FL cell failed")
  model = _model(cell)
  params = _params(cell, cells_dir)
  v, b = cell["victims"], cell["batch"]
  d = defense_spec(view)
  key = _cell_key(cell)
  name, overrides = parse_variant(cell["variant"])
  spec = specs.AttackSpec(name=name, budget=cell["budget"], retries=0, **overrides)
  if view["kind"] == "aggregate":
    n = view["clients"]
    x, y = victim_batches(cell, v * n)
    client_threat = _threat(cell, b, "client")
    one = engine.observe_all(model, params, x, y, client_threat, specs.DEFENSES[d.name](d), key=key)
    update = jax.tree.map(lambda a: a.reshape((v, n) + a.shape[1:]).mean(axis=1), one.update)
    x = x.reshape((v, n * b) + x.shape[2:])
    y = y.reshape(v, n * b)
    threat = _threat(cell, n * b, "aggregate")
    obs = ob.Observation(update=update, params=params, labels=None)
  else:
    x, y = victim_batches(cell, v)
    threat = _threat(cell, b, "client")
    obs = engine.observe_all(model, params, x, y, threat, specs.DEFENSES[d.name](d), key=key)
    steps = adaptive.parse(spec.denoise)
    if steps:
      update, _ = adaptive.process(jax.tree.map(lambda a: a[None], obs.update), steps,
                                   specs.declared_noise(d), batch_size=b)
      obs = ob.Observation(update=update, params=params, labels=obs.labels)
  bad = [i for i in range(v) if not all(bool(jnp.isfinite(a[i]).all())
                                        for a in jax.tree.leaves(obs.update))]
  if bad:
    raise FloatingPointError(f"the observed updates of victims {bad} are not finite")
  return Prepared(cell, h, params, obs, np.asarray(x), np.asarray(y), threat, spec, d)


def group_key(p: Prepared) -> str:
  """Cells attacked in one computation share the attack, its plan and the shapes."""
  adaptive_plan = p.spec.adaptive or p.spec.denoise != "none"
  return config_hash({"variant": p.cell["variant"], "budget": p.cell["budget"],
                      "threat": dataclasses.asdict(p.threat) | {"defense": None},
                      "defense": dataclasses.asdict(p.defense) if adaptive_plan else None,
                      "model": p.cell["model"]["name"], "victims": p.cell["victims"]})


def prepare_groups(cells: dict[str, dict[str, Any]], cells_dir: Path
                   ) -> dict[str, list[Prepared]]:
  """The cells (hash -> config) prepared and grouped by `group_key`; a cell that cannot be
  prepared is recorded as failed."""
  groups: dict[str, list[Prepared]] = {}
  for h, cell in cells.items():
    try:
      p = prepare(cell, h, cells_dir)
    except Exception as e:  # recorded with its reason; the study goes on
      write_cell(cells_dir / "attack" / h, failure(cell, e))
      continue
    groups.setdefault(group_key(p), []).append(p)
  return groups


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
  return "vmap" if jax.local_device_count() > 1 else fed.resolve_batching("auto")


def attack_group(group: list[Prepared], *, mode: str, progress: Callable[[int], Any] = lambda n: None,
                 chunk: int = 25) -> list[tuple[dict[str, Any], np.ndarray]]:
  """Attacks every cell of the group in one compiled computation (rows = cells x victims,
  each row with its cell's model); returns each cell's outcome and matched reconstructions."""
  first = group[0]
  plan = specs.ATTACKS[first.spec.name](_model(first.cell), first.threat, first.spec, first.defense)
  v = first.cell["victims"]
  updates = jax.tree.map(lambda *a: jnp.concatenate(a), *[p.obs.update for p in group])
  params = jax.tree.map(lambda *a: jnp.stack([x for x in a for _ in range(v)]),
                        *[p.params for p in group])
  labels = None if first.obs.labels is None else jnp.concatenate([p.obs.labels for p in group])
  keys = jnp.stack([jax.random.fold_in(_cell_key(p.cell), 2 + i) for p in group for i in range(v)])
  updates, params, labels, keys = shard_rows((updates, params, labels, keys), len(group) * v)
  timings: dict[str, float] = {}
  states = engine.attack_batched(plan, ob.Observation(update=updates, params=params, labels=labels),
                                 keys, mode=mode, chunk=chunk, progress=progress, row_params=True,
                                 timings=timings)
  xs = np.clip(np.asarray(states.x), 0.0, 1.0)
  ys = np.asarray(plan.labels(states))
  ok = ~np.asarray(states.diverged) & np.isfinite(np.asarray(states.loss))
  counts = np.asarray(states.counts)
  rows = [slice(j * v, (j + 1) * v) for j in range(len(group))]
  cost_ = {"seconds_per_victim": timings["run_seconds"] / (len(group) * v),
           "compile_seconds": timings["compile_seconds"], "flops_per": unit_flops(first)}
  return [score_cell(p, xs[r], ys[r], ok[r], counts[r], timings["run_seconds"] / len(group),
                     plan.steps, cost_) for p, r in zip(group, rows)]


_UNIT_FLOPS: dict[str, dict[str, float]] = {}


def unit_flops(p: Prepared) -> dict[str, float]:
  """The unit costs (`inversion.cost`) of the cell's evaluations, per victim (one estimate
  per model, threat and prior)."""
  key = config_hash({"model": p.cell["model"]["name"], "data": p.cell["data"],
                     "threat": dataclasses.asdict(p.threat), "attack": p.spec.name,
                     "prior": str(specs.prior_folder(p.spec))})
  if key not in _UNIT_FLOPS:
    unit = cost.victim_flops(_model(p.cell), p.threat, p.params)
    unit["prior"] = cost.prior_flops(p.spec.name, specs.prior_folder(p.spec), p.threat.batch_size)
    _UNIT_FLOPS[key] = unit
  return _UNIT_FLOPS[key]


# a victim whose attack diverged (every restart) is scored as this grey image, in the study
# as in tuning: leaving it out would raise the median of an attack that fails on the hard
# victims, scoring it at 0 dB would let one divergence decide a comparison
FAILED_IMAGE = 0.5


def scored_image(rec: np.ndarray, ok: bool, truth: np.ndarray) -> tuple[np.ndarray, bool]:
  """What a victim's reconstruction is scored as, and whether its attack failed: the grey
  `FAILED_IMAGE` in place of a diverged or non-finite reconstruction."""
  if ok and np.isfinite(rec).all():
    return rec, False
  return np.full_like(truth, FAILED_IMAGE, dtype=np.float32), True


def score_cell(p: Prepared, rec: np.ndarray, rec_y: np.ndarray, ok: np.ndarray,
               counts: np.ndarray, seconds: float, steps: int, cost_: dict[str, Any]
               ) -> tuple[dict[str, Any], np.ndarray]:
  """The cell's scores (after Hungarian matching) and its matched reconstructions, with
  its compute: evaluations, seconds (compilation apart) and estimated FLOPs per victim."""
  matched = np.zeros_like(p.x, dtype=np.float32)
  psnr, ssim, label_acc, failed = [], [], [], []
  for i in range(len(p.y)):
    label_acc.append(metrics.label_accuracy(rec_y[i], p.y[i]))
    image, diverged = scored_image(rec[i], ok[i], p.x[i])
    if diverged:
      failed.append(i)
    s = metrics.score(image, p.x[i])
    matched[i] = image[s["order"]]
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
      "wall_seconds": seconds, "seconds_per_victim": cost_["seconds_per_victim"],
      "compile_seconds": cost_["compile_seconds"], "unit_flops": cost_["flops_per"],
      "environment": environment()}
  result["flops_per_victim"] = cost.total(result, cost_["flops_per"])
  if result["status"] == "failed":
    result["reason"] = "every victim's attack diverged (non-finite loss or iterate)"
  return result, matched


def attack_and_write(group: list[Prepared], cells_dir: Path, *, mode: str, chunk: int = 25,
                     progress: Callable[[int], Any] = lambda n: None) -> list[dict[str, Any]]:
  """`attack_group`, each cell's outcome written to its folder (with the truth and the
  matched reconstructions in reconstructions.npz); if the computation fails, every cell
  of the group is recorded as failed with the reason. Returns the outcomes."""
  try:
    scored = attack_group(group, mode=mode, chunk=chunk, progress=progress)
  except Exception as e:  # the whole computation failed: every cell in it, with the reason
    scored = [(failure(p.cell, e), None) for p in group]
  for p, (result, matched) in zip(group, scored):
    folder = cells_dir / "attack" / p.hash
    if matched is not None:
      folder.mkdir(parents=True, exist_ok=True)
      np.savez_compressed(folder / "reconstructions.npz", truth=p.x, reconstruction=matched)
    write_cell(folder, result)
  return [result for result, _ in scored]


# ----------------------------------------------------------------------------- baseline cells

def baseline_cell(attack: dict[str, Any], prior_steps: int) -> dict[str, Any]:
  """The baselines of the victims an attack cell sees (on the clear update): what an
  attacker gets without the gradient. Their hash covers the victims and the model (the
  prior-only sample's labels are inferred from the update; `prior_steps` 0: no prior
  baselines)."""
  return {**{k: attack[k] for k in ("view", "model", "data", "partition_seed", "batch",
                                    "local_steps", "victims", "local_lr")},
          "kind": "baseline", "budget": max(prior_steps, 1),
          "variant": grid.with_overrides(grid.ATTACKS["dps"][0],
                                         grid.prior_overrides("dps", attack["data"]["name"])),
          "prior_steps": prior_steps, "scores": "per image"}


def plan_baselines(attack_plan: dict[tuple, tuple[str, dict[str, Any]]], prior_steps: int
                   ) -> dict[str, tuple[str, dict[str, Any]]]:
  """hash -> (partition, config) of the baseline cells: one per victim set and model of the
  ladder (the attack cells on the clear update, defense `none`, not those on the released
  model; keys as `studies.runner.plan_attacks`, whose first is the partition)."""
  out = {}
  for key, (_, cell) in attack_plan.items():
    if key[1] == "none" and not key[3].endswith(grid.RELEASED):
      b = baseline_cell(cell, prior_steps)
      out[config_hash(b)] = (key[0], b)
  return out


def run_baseline_cell(cell: dict[str, Any], h: str, cells_dir: Path) -> dict[str, Any]:
  """Scores the baselines (`inversion.baselines.evaluate`: blank image, the training
  split's mean image, the victim's nearest training image, the diffusion prior's sample
  at the labels inferred from the update, a GAN sample) on the cell's victims; writes and
  returns its outcome (a failure is recorded, not raised)."""
  from diffusion import prior as prior_lib
  from inversion import baselines, gan as gan_lib
  from inversion.attacks import diffusion_guided
  folder = cells_dir / "baseline" / h
  t0 = time.perf_counter()
  try:
    p = prepare(cell, h, cells_dir)
    ds, _ = load_partition(cell)
    key = jax.random.fold_in(_cell_key(cell), 5)
    samples, skipped, nfe = {}, {}, None
    # A prior that is not trained yet fails the cell (a rerun retries it once it is); a
    # prior that cannot serve these victims (the shipped priors make 32x32 images) skips
    # its baseline, with the reason.
    if not cell["prior_steps"]:
      skipped["prior_only"] = skipped["gan_sample"] = "not asked for (prior_only_steps 0)"
    else:
      try:
        cfg = diffusion_guided.DiffusionAttackConfig(
            num_steps=cell["prior_steps"], labels=specs.label_method(p.spec, p.threat))
        sample = baselines.prior_only(_model(cell).apply, p.threat, prior_lib.load(
            specs.prior_folder(p.spec)), p.obs, key=key, cfg=cfg)
        samples["prior_only"] = np.clip(sample.x, 0.0, 1.0)
        nfe = float(sample.counts[:, 2].mean())
      except (prior_lib.PriorError, gan_lib.GANError):
        raise
      except ValueError as e:
        skipped["prior_only"] = str(e)
      try:
        samples["gan_sample"] = baselines.gan_sample(gan_lib.load(_baseline_gan(cell)), p.threat,
                                                     len(p.x), key=jax.random.fold_in(key, 1))
      except gan_lib.GANError:
        raise
      except ValueError as e:
        skipped["gan_sample"] = str(e)
    scores = baselines.evaluate(p.x, ds.x_train, samples=samples)
    result = {"status": "done", "config": cell, "baselines": scores, "skipped": skipped,
              "prior_only_nfe_per_victim": nfe,
              "wall_seconds": time.perf_counter() - t0, "environment": environment()}
  except Exception as e:  # recorded with its reason; the study goes on
    result = failure(cell, e, wall_seconds=time.perf_counter() - t0)
  write_cell(folder, result)
  return result
