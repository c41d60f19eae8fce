"""Equal-effort tuning of the attacks' hyperparameters by stratified random search (Latin
hypercube sampling, McKay et al. 1979; random search as in Bergstra and Bengio, JMLR 2012),
on victims held out from the evaluation (DESIGN.md, "What makes a number count": equal
tuning).

Every attack gets the same protocol: `trials` candidate settings of its key hyperparameters
(`SPACES`), trial 0 its current default and trials 1.. random draws, each scored by the
median PSNR of its reconstructions of the same `victims` at the same budget of
double-backward evaluations. The victims are images of the test split's tuning quarter
(`inversion.held_out.split_indices(n, "tuning")`), never one the study evaluates on; the
model is the FL run's untrained initialisation, the observation one FedSGD update with no
defense (the study's untrained cells). The trial with the highest median wins (ties: the
earlier trial, so the default stays unless beaten). The draws are stratified: each
hyperparameter's range (on its log scale for `LogUniform`) is cut into `trials - 1` equal
strata and every stratum is drawn once, in an order shuffled per hyperparameter, so that 7
draws cover a range of 16 octaves end to end (plain random draws left dps's zeta below 250
of 0.5..32768 with this seed, and the LeNet's guidance works from about 2,000).

  cfg = config.build(TuningConfig, TINY)
  result = run(cfg, "runs/tuning")             # tuning.json, tuning.md, trials/*.json
  tuned_overrides("mnist", "cnn", "dps")       # {'scale': ..., 'features': ...} or {}

Each finished trial is cached in `workdir/trials/` under a hash of what determines it, so
a killed run resumes; `run(..., write_defaults=True)` records the chosen values in
`studies/tuned.json` ("<dataset>/<model>" -> attack -> AttackSpec field -> value), which
the study merges into its attack variants.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
import traceback
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fljax import config as config_lib
from fljax import datasets, models
from fljax import federated as fed
from inversion import attacks, engine, held_out, metrics, specs, stats
from inversion import observation as ob
from inversion.attacks import dlg
from inversion.compare import parse_variant
from studies import cells, grid


# the tuned values live with the study's registries, which read them (`grid.variant`)
TUNED, tuned_overrides, with_overrides = grid.TUNED, grid.tuned_overrides, grid.with_overrides
COUNTER = dict(zip(attacks.COUNTERS, range(len(attacks.COUNTERS))))

# ----------------------------------------------------------------------------- search spaces


@dataclasses.dataclass(frozen=True)
class LogUniform:
  """A positive value drawn log-uniformly from [low, high]."""

  low: float
  high: float

  def at(self, u: float) -> float:
    """The value at quantile u in [0, 1)."""
    return _round(math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low))))


@dataclasses.dataclass(frozen=True)
class Uniform:
  """A value drawn uniformly from [low, high]."""

  low: float
  high: float

  def at(self, u: float) -> float:
    """The value at quantile u in [0, 1)."""
    return _round(self.low + u * (self.high - self.low))


@dataclasses.dataclass(frozen=True)
class Choice:
  """One of `values`, each equally likely."""

  values: tuple[Any, ...]

  def at(self, u: float) -> Any:
    """The value at quantile u in [0, 1)."""
    return self.values[min(int(u * len(self.values)), len(self.values) - 1)]


def _round(value: float) -> float:
  """3 significant digits: readable tables, values that survive a variant string."""
  return float(f"{value:.3g}")


_DLG_SPACE = {"optimizer": Choice(dlg.OPTIMIZERS), "lr": LogUniform(1e-3, 1.0)}

# attack -> AttackSpec field -> its range (the keys are exactly AttackSpec's field names)
SPACES: dict[str, dict[str, LogUniform | Uniform | Choice]] = {
    "dlg": _DLG_SPACE,
    "idlg": _DLG_SPACE,
    "ig": {"tv": LogUniform(1e-6, 1.0), "lr": LogUniform(1e-3, 1.0)},
    # feature_share: the feature stages' share of the steps, i.e. the stage lengths
    "gifd": {"lr": LogUniform(1e-3, 1.0), "tv": LogUniform(1e-6, 1e-1),
             "feature_share": Uniform(0.1, 0.9)},
    # the guidance scales reach past where the attacks diverge on the untrained models:
    # the LeNet's zeta acts from about 2,000 and its gamma from about 1e6 (docs/tuning.md)
    "dps": {"scale": LogUniform(0.5, 32768.0), "features": Uniform(0.0, 1.0)},
    "ggdm": {"scale": LogUniform(10.0, 1e8)},  # scale is ggdm's gamma
}

# the study's attack variant of each tuned attack (`studies.grid.ATTACKS`, else its name)
VARIANTS: dict[str, str] = {name: grid.ATTACKS[name][0] if name in grid.ATTACKS else name
                            for name in SPACES}


def variant(attack: str, dataset: str) -> str:
  """The variant a trial of `attack` runs on `dataset`: its study variant (`VARIANTS`) with
  the generative prior trained on that dataset when one ships (`grid.prior_overrides`), as
  the study runs it; on MNIST (the default priors) exactly `VARIANTS[attack]`."""
  own = grid.prior_overrides(attack, dataset)
  return grid.with_overrides(VARIANTS[attack], own) if own else VARIANTS[attack]


def defaults(attack: str) -> dict[str, Any]:
  """The attack's current values of its tuned hyperparameters (None: the attack's own
  default, resolved by its plan builder), with its study variant's overrides."""
  name, overrides = parse_variant(VARIANTS[attack])
  spec = specs.AttackSpec(name=name, **overrides)
  return {k: getattr(spec, k) for k in SPACES[attack]}


def draws(attack: str, trials: int, seed: int,
          start: dict[str, Any] | None = None) -> list[dict[str, Any]]:
  """The attack's `trials` distinct candidates: its defaults (with `start`'s values, e.g.
  those tuned on another dataset, over them), then `trials - 1` stratified
  draws from its space (a Latin hypercube: per hyperparameter, stratum s of `trials - 1`
  equal quantile ranges goes to the trial at its place in a shuffled order, and the value
  is drawn uniformly within it). Every key derives from the seed folded with the attack's
  name; a draw that repeats an earlier candidate (two strata of a choice can give the
  same value) is drawn again from the whole space.

  Raises:
    ValueError: the space holds fewer than `trials` distinct settings.
  """
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 7),
                           zlib.crc32(attack.encode()) & 0x7FFFFFFF)
  space = SPACES[attack]
  n = trials - 1
  k_order, k_within = jax.random.split(key)
  order = {name: np.asarray(jax.random.permutation(k, n)) if n else np.zeros(0, int)
           for name, k in zip(space, jax.random.split(k_order, len(space)))}
  out = [{**defaults(attack), **{k: v for k, v in (start or {}).items() if k in space}}]
  for t in range(1, trials):
    for attempt in range(100):  # a draw equal to an earlier candidate is drawn again
      keys = jax.random.split(jax.random.fold_in(jax.random.fold_in(k_within, t), attempt),
                              len(space))
      values = {}
      for (name, dim), k in zip(space.items(), keys):
        u = float(jax.random.uniform(k))
        # the first attempt within the trial's stratum, a repeat anywhere in the range
        values[name] = dim.at(int(order[name][t - 1]) / n + (1.0 / n) * u if attempt == 0 else u)
      if values.get("optimizer") == "lbfgs_zoom":
        values["lr"] = None  # its line search sets the step
      if values not in out:
        break
    else:
      raise ValueError(f"the search space of {attack} holds fewer than {trials} distinct "
                       f"settings; lower --trials")
    out.append(values)
  return out


# ----------------------------------------------------------------------------- the config


@dataclasses.dataclass(frozen=True, kw_only=True)
class TuningConfig:
  """The tuning protocol: the same for every attack.

  Attributes:
    data: the dataset whose test split's tuning quarter gives the victims.
    model: the attacked model (untrained: the FL run's initialisation at `seed`).
    attacks: the attacks tuned (study names; `SPACES` lists each one's hyperparameters).
    batch_size: B, images behind each observed FedSGD update.
    victims: victims V (from the tuning split only), the same for every trial.
    trials: settings tried per attack (trial 0: the default), the same for every attack.
    budget: double-backward evaluations per victim, the same for every attack and trial.
    seed: seed of the victims, the model, the draws and the attacks' initialisations.
    victim_indices: test-split indices of the V x B victim images (none: drawn from the
      tuning split); they must not be evaluation images.
    chunk: attack steps per compiled call.
    start_from: a dataset whose values tuned for this model (in the defaults file) are each
      attack's trial 0 instead of its own default: a warm start where a dataset has run on
      another's tuning (`grid.TUNING_FALLBACK`), so that what it ran is a candidate too.
  """

  data: grid.DataSpec = grid.DataSpec()
  model: str = dataclasses.field(default="cnn", metadata={"choices": tuple(models.MODELS)})
  attacks: tuple[str, ...] = dataclasses.field(default=tuple(SPACES),
                                               metadata={"choices": tuple(SPACES)})
  batch_size: int = 1
  victims: int = 8
  trials: int = 8
  budget: int = 100
  seed: int = 0
  victim_indices: tuple[int, ...] | None = None
  chunk: int = 25
  start_from: str | None = None

  def __post_init__(self):
    grid.check_names("attack", self.attacks, SPACES)
    for name in ("batch_size", "victims", "trials", "budget", "chunk"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    n = self.victims * self.batch_size
    if self.victim_indices is not None and len(self.victim_indices) != n:
      raise ValueError(f"victim_indices needs victims x batch_size = {n} test-split indices, "
                       f"got {len(self.victim_indices)}")


# `TuningConfig` overrides of `scripts/tune_attacks.py --tiny`, as flags name them: seconds
TINY: dict[str, Any] = {"data.name": "digits", "data.image_size": None, "data.channels": None,
                        "model": "mlp", "attacks": ("ig", "idlg"), "victims": 2, "trials": 2,
                        "budget": 4}


# ----------------------------------------------------------------------------- one trial


@dataclasses.dataclass
class Setup:
  """What every trial shares: the model, the victims and what the server observed."""

  dataset: str  # whose generative priors the attacks sample (`variant`)
  model: models.Model
  threat: ob.ThreatModel
  obs: ob.Observation  # updates [V, ...], params shared
  x: np.ndarray  # truth [V, B, H, W, C]
  y: np.ndarray  # [V, B]
  indices: np.ndarray  # test-split indices [V, B]
  keys: jax.Array  # the attacks' initialisation keys [V] (the same for every trial)


def victim_indices(cfg: TuningConfig, n_test: int) -> np.ndarray:
  """The victims' test-split indices `[V, B]`: `cfg.victim_indices`, or drawn without
  replacement from the tuning split.

  Raises:
    held_out.HeldOutError: some are evaluation images.
    ValueError: an index outside the test split, or a tuning split too small.
  """
  n = cfg.victims * cfg.batch_size
  if cfg.victim_indices is not None:
    index = np.asarray(cfg.victim_indices, dtype=np.int64)
    if index.min() < 0 or index.max() >= n_test:
      raise ValueError(f"victim_indices must lie in [0, {n_test}) (the test split of "
                       f"{cfg.data.name}), got {index.min()}..{index.max()}")
  else:
    pool = held_out.split_indices(n_test, "tuning")
    if len(pool) < n:
      raise ValueError(f"the tuning split of {cfg.data.name} holds {len(pool)} images, "
                       f"{n} are needed; lower --victims or --batch_size")
    key = jax.random.fold_in(jax.random.key(cfg.seed), 1)
    index = np.asarray(jax.random.permutation(key, pool))[:n]
  held_out.check_disjoint(index, held_out.split_indices(n_test, "evaluation"))
  return index.reshape(cfg.victims, cfg.batch_size)


def prepare(cfg: TuningConfig) -> Setup:
  """Loads the data, checks the victims are held out, checks every attack's plan (its
  budget), then observes the victims' updates."""
  ds = datasets.load(cfg.data.name, image_size=cfg.data.image_size, channels=cfg.data.channels)
  index = victim_indices(cfg, len(ds.y_test))
  model = grid.make_model(cfg.model, ds)
  threat = ob.ThreatModel(batch_size=cfg.batch_size, input_shape=ds.image_shape,
                          num_classes=ds.num_classes)
  for attack in cfg.attacks:  # every attack checked before any runs
    _plan(model, threat, variant(attack, cfg.data.name), defaults(attack), cfg.budget)
  key = jax.random.key(cfg.seed)
  params = model.init(jax.random.split(key, 3)[1])  # the FL run's initialisation (fljax.train)
  x, y = ds.x_test[index], ds.y_test[index]
  obs = engine.observe_all(model, params, x, y, threat, fed.identity_defense,
                           key=jax.random.fold_in(key, 2))
  keys = jax.random.split(jax.random.fold_in(key, 3), cfg.victims)
  return Setup(cfg.data.name, model, threat, obs, np.asarray(x), np.asarray(y), index, keys)


def _plan(model: models.Model, threat: ob.ThreatModel, variant_: str, values: dict[str, Any],
          budget: int) -> specs.AttackPlan:
  name, overrides = parse_variant(variant_)
  spec = specs.AttackSpec(name=name, budget=budget, retries=0, **{**overrides, **values})
  return specs.ATTACKS[name](model, threat, spec, specs.DefenseSpec(name="none"))


def run_trial(setup: Setup, attack: str, values: dict[str, Any], budget: int, *,
              chunk: int = 25) -> dict[str, Any]:
  """Attacks every victim with `values`; returns the scores (Hungarian-matched, a diverged
  victim scored as the blank image) and what was spent."""
  plan = _plan(setup.model, setup.threat, variant(attack, setup.dataset), values, budget)
  t0 = time.perf_counter()
  states = engine.attack_batched(plan, setup.obs, setup.keys, mode=cells.batching_mode(),
                                 chunk=chunk)
  jax.block_until_ready(states)
  seconds = time.perf_counter() - t0
  xs = np.clip(np.asarray(states.x), 0.0, 1.0)
  ys = np.asarray(plan.labels(states))
  ok = ~np.asarray(states.diverged) & np.isfinite(np.asarray(states.loss))
  psnr, ssim, labels, failed = [], [], [], []
  for i in range(len(setup.y)):
    rec, diverged = cells.scored_image(xs[i], ok[i], setup.x[i])
    if diverged:
      failed.append(i)
    s = metrics.score(rec, setup.x[i])
    psnr += [float(v) for v in s["psnr"]]
    ssim += [float(v) for v in s["ssim"]]
    labels.append(metrics.label_accuracy(ys[i], setup.y[i]))
  counts = np.asarray(states.counts)
  group = len(psnr) // max(len(setup.y), 1)  # B images per victim, resampled together
  return {"status": "done", "median_psnr": stats.bootstrap_median(psnr, group=group).to_dict(),
          "psnr": psnr, "mean_ssim": float(np.mean(ssim)), "label_accuracy": float(np.mean(labels)),
          "failed_victims": failed, "steps": plan.steps,
          **{f"{c}_per_victim": float(counts[:, i].mean()) for c, i in COUNTER.items()},
          "seconds": seconds}


# ----------------------------------------------------------------------------- the protocol


def trial_hash(cfg: TuningConfig, index: np.ndarray, attack: str, values: dict[str, Any]) -> str:
  """The cache key of a trial: everything that determines its result."""
  content = {"data": dataclasses.asdict(cfg.data), "model": cfg.model,
             **grid.init_field(cfg.model), "seed": cfg.seed,
             "victims": index.tolist(), "budget": cfg.budget, "attack": attack,
             "variant": variant(attack, cfg.data.name), "values": values}
  return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def _read(path: Path) -> dict[str, Any] | None:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None  # not finished (or a torn write): the trial runs again


def chosen(trials: list[dict[str, Any]]) -> int | None:
  """The trial with the highest median PSNR (ties: the earliest); None if none finished."""
  scores = [t["median_psnr"]["estimate"] if t["status"] == "done" else -math.inf for t in trials]
  scores = [-math.inf if math.isnan(s) else s for s in scores]
  best = max(range(len(trials)), key=lambda i: (scores[i], -i))
  return best if scores[best] > -math.inf else None


def run(cfg: TuningConfig, workdir: str | Path, *, write_defaults: bool = False,
        defaults_file: str | Path = TUNED, log: Callable[[str], Any] = print) -> dict[str, Any]:
  """Tunes every attack of `cfg` (finished trials in `workdir/trials/` are reused); writes
  tuning.json and tuning.md into `workdir`, and with `write_defaults` the chosen values
  into `defaults_file`. Returns what tuning.json holds."""
  workdir = Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(f"--workdir {workdir} is a file, not a folder; pass a folder path")
  start = starting_values(cfg, defaults_file)
  setup = prepare(cfg)
  (workdir / "trials").mkdir(parents=True, exist_ok=True)
  out: dict[str, Any] = {}
  for attack in cfg.attacks:
    trials = []
    candidates = draws(attack, cfg.trials, cfg.seed, start.get(attack))
    # the hash names a prior, not its weights: a trial of other weights runs again (a trial
    # recorded without them counts as current, as the study's cells do: `cells.read_cell`)
    priors = cells.variant_priors(variant(attack, cfg.data.name))
    for t, values in enumerate(candidates):
      path = workdir / "trials" / f"{attack}-{trial_hash(cfg, setup.indices, attack, values)}.json"
      result = _read(path)
      if result is not None and result.get("priors", priors) != priors:
        result = None
      if result is None:
        try:
          result = run_trial(setup, attack, values, cfg.budget, chunk=cfg.chunk)
        except Exception as e:  # recorded with its reason (not cached: a rerun retries it)
          result = {"status": "failed", "reason": f"{type(e).__name__}: {e}",
                    "traceback": traceback.format_exc()}
        else:
          result["priors"] = priors
          tmp = path.with_suffix(".tmp")
          tmp.write_text(json.dumps({**result, "values": values}, indent=1) + "\n")
          tmp.replace(path)
      trials.append({**result, "trial": t, "values": values})
      score = (f"{result['median_psnr']['estimate']:.2f} dB" if result["status"] == "done"
               else result["reason"])
      log(f"{attack} trial {t}: {_show(values)}: {score}")
    out[attack] = {"variant": variant(attack, cfg.data.name), "chosen": chosen(trials),
                   "trials": trials,
                   "space": {k: {"kind": type(d).__name__, **dataclasses.asdict(d)}
                             for k, d in SPACES[attack].items()}}
  text = json.dumps({"config": config_lib.to_dict(cfg), "victims": setup.indices.tolist(),
                     "backend": jax.default_backend(), "attacks": out}, indent=1)
  (workdir / "tuning.json").write_text(text + "\n")
  result = json.loads(text)  # what the file holds (tuples as lists)
  (workdir / "tuning.md").write_text(tables(result))
  if write_defaults:
    write_tuned(result, defaults_file)
  return result


def starting_values(cfg: TuningConfig, path: str | Path = TUNED) -> dict[str, dict[str, Any]]:
  """attack -> the values tuned on `cfg.start_from` for `cfg.model` in `path` ({} without
  --start_from).

  Raises:
    ValueError: `path` holds no values tuned on that dataset and model.
  """
  if cfg.start_from is None:
    return {}
  key = f"{cfg.start_from}/{cfg.model}"
  if key not in grid.read_tuned(Path(path)):
    raise ValueError(f"--start_from {cfg.start_from}: {path} holds no values tuned on {key}; "
                     f"tune there first (--data.name {cfg.start_from}) or leave --start_from "
                     f"out")
  return {attack: tuned_overrides(cfg.start_from, cfg.model, attack, path=path)
          for attack in cfg.attacks}


# ----------------------------------------------------------------------------- tables


def _show(values: dict[str, Any]) -> str:
  return ", ".join(f"{k}={'default' if v is None else v}" for k, v in values.items())


def _interval(m: dict[str, Any]) -> str:
  if not m["defined"]:
    return f"{m['estimate']:.2f}"
  return f"{m['estimate']:.2f} [{m['low']:.2f}, {m['high']:.2f}]"


def tables(result: dict[str, Any]) -> str:
  """tuning.md: one table per attack (the chosen trial in bold), then the chosen values."""
  cfg = result["config"]
  data = cfg["data"]
  trial0 = ("the default" if cfg.get("start_from") is None
            else f"the values tuned on {cfg['start_from']}")
  lines = [f"# Attack tuning: {data['name']} / {cfg['model']}", "",
           f"{cfg['victims']} victims of B = {cfg['batch_size']} from the test split's tuning "
           f"quarter (indices {result['victims']}), untrained model (seed {cfg['seed']}), "
           f"FedSGD, no defense; {cfg['trials']} trials per attack (trial 0: {trial0}), "
           f"{cfg['budget']} double-backward evaluations per victim; median PSNR over the "
           f"victims' images with its bootstrap 95 % interval (`studies.tuning`).", ""]
  best = ["## Chosen values", "", "| attack | variant | values | median PSNR [95 % CI] | trial |",
          "|---|---|---|---|---|"]
  for attack, a in result["attacks"].items():
    names = list(a["space"])
    lines += [f"## {attack} (`{a['variant']}`)", "",
              "| trial | " + " | ".join(names) + " | median PSNR [95 % CI] | mean SSIM | labels "
              "| evaluations / victim | seconds |", "|---" * (len(names) + 6) + "|"]
    for t in a["trials"]:
      values = ["default" if t["values"][k] is None else str(t["values"][k]) for k in names]
      if t["status"] == "done":
        cells_ = [str(t["trial"]), *values, _interval(t["median_psnr"]), f"{t['mean_ssim']:.3f}",
                  f"{t['label_accuracy']:.2f}", f"{t['double_backward_evals_per_victim']:.0f}",
                  f"{t['seconds']:.0f}"]
      else:
        cells_ = [str(t["trial"]), *values, f"failed: {t['reason']}", "-", "-", "-", "-"]
      if t["trial"] == a["chosen"]:
        cells_ = [f"**{c}**" for c in cells_]
      lines.append("| " + " | ".join(cells_).replace("\n", " ") + " |")
    lines.append("")
    if a["chosen"] is None:
      best.append(f"| {attack} | `{a['variant']}` | no trial finished | - | - |")
    else:
      t = a["trials"][a["chosen"]]
      best.append(f"| {attack} | `{a['variant']}` | {_show(t['values'])} | "
                  f"{_interval(t['median_psnr'])} | {t['trial']} |")
  return "\n".join(lines + best) + "\n"


# ----------------------------------------------------------------------------- defaults


def chosen_overrides(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
  """attack -> the chosen trial's values, None (the attack's own default) left out."""
  return {attack: {k: v for k, v in a["trials"][a["chosen"]]["values"].items() if v is not None}
          for attack, a in result["attacks"].items() if a["chosen"] is not None}


def write_tuned(result: dict[str, Any], path: str | Path = TUNED) -> None:
  """Records the chosen values of `result` (a `run`'s) under "<dataset>/<model>" in `path`."""
  path = Path(path)
  tuned = json.loads(path.read_text()) if path.exists() else {}
  key = f"{result['config']['data']['name']}/{result['config']['model']}"
  tuned[key] = {**tuned.get(key, {}), **chosen_overrides(result)}
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(tuned, indent=1, sort_keys=True) + "\n")
  tmp.replace(path)
