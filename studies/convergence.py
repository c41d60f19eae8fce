"""Do the classical attacks converge as in their papers? iDLG (Zhao et al. 2020) on the
LeNet of Deep Leakage from Gradients (Zhu et al., NeurIPS 2019), on real photos.

The DLG setting: the LeNet with every weight drawn from uniform(-0.5, 0.5), untrained;
one FedSGD gradient of one 32x32x3 image (B = 1), here the test crops of the `photos`
dataset (`fljax.datasets`); iDLG (the label read from the gradient, the input optimised
alone, L2 gradient matching) with each optimiser of `inversion.attacks.dlg`, at most
`budget` double-backward evaluations per victim (each charged once). A victim converges
when the PSNR of its reconstruction (clipped to [0, 1]) reaches `threshold` (30 dB); the
PSNR is scored after every step, and a victim stops at the evaluation count where it
first converges (or where its budget ends, or its optimiser stops: torch's convergence
tests, divergence). Seed s draws the model's weights, the victims (V distinct test crops)
and the attack's initialisations, so V x seeds victims per optimiser. The original torch
DLG code converges on about 88 % of such victims, in about 2,700 evaluations.

`run` writes convergence.json (every victim's evaluations to converge and best PSNR) and
convergence.md (the table) into the workdir.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fljax import config as config_lib
from fljax import datasets, models
from fljax import federated as fed
from inversion import engine, metrics
from inversion import observation as ob
from inversion.attacks import COUNTERS, dlg
from inversion.specs import DataSpec

DOUBLE_BACKWARD = COUNTERS.index("double_backward_evals")
LADDER = (100, 300, 1000, 3000, 10000)  # budgets at which the converged fraction is read


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConvergenceConfig:
  """The convergence measurement.

  Attributes:
    optimizers: the DLG optimisers compared (`inversion.attacks.dlg`).
    victims: victims per seed (test crops; B = 1 each).
    seeds: seeds (each: model weights, victims, attack initialisations).
    budget: double-backward evaluations per victim.
    threshold: PSNR in dB at which a victim counts as converged.
    data: the dataset whose test split gives the victims (32x32 RGB; photos by default).
    batching: victims batched by map (one at a time; auto on CPU) or vmap.
    chunk: attack steps per compiled call (progress granularity).
    restart: lbfgs: start again from a fresh random image when a run ends with budget
      left (`inversion.attacks.dlg`, restart); the other optimisers never end early.
    restart_after: with restart, also start again once a start has spent this many
      evaluations (none: only when it ends).
  """

  optimizers: tuple[str, ...] = dataclasses.field(default=dlg.OPTIMIZERS,
                                                  metadata={"choices": dlg.OPTIMIZERS})
  victims: int = 16
  seeds: tuple[int, ...] = (0, 1, 2)
  budget: int = 3000
  threshold: float = 30.0
  data: str = "photos"
  batching: str = dataclasses.field(default="auto", metadata={"choices": ("auto", "map", "vmap")})
  chunk: int = 250
  restart: bool = False
  restart_after: int | None = None

  def __post_init__(self):
    if not self.optimizers or any(o not in dlg.OPTIMIZERS for o in self.optimizers):
      raise ValueError(f"optimizers must be some of {dlg.OPTIMIZERS}, got {self.optimizers}")
    if self.victims < 1 or not self.seeds or len(set(self.seeds)) != len(self.seeds):
      raise ValueError("give victims >= 1 and distinct seeds")
    if self.budget < 2:
      raise ValueError(f"budget {self.budget} leaves no step after the first evaluation; "
                       f"give budget >= 2")
    if self.threshold <= 0 or self.chunk < 1:
      raise ValueError("threshold must be > 0 and chunk >= 1")


QUICK = {"victims": 2, "seeds": (0,), "budget": 40, "chunk": 20}


def _tracked(attack):
  """`init(key, obs, truth, limits)` and `advance(carry, obs, truth, limits, n)` over one
  victim's carry (state, evaluations at the first pass or -1, best PSNR so far), with
  `limits` = (budget, threshold) (arguments, so that one compilation serves them all):
  each step is skipped once the victim has converged or spent the budget."""
  def score(state, truth, threshold, first, best):
    psnr = jnp.min(metrics.psnr(jnp.clip(state.x, 0.0, 1.0), truth))
    first = jnp.where((first < 0) & (psnr >= threshold), state.counts[DOUBLE_BACKWARD], first)
    return first, jnp.maximum(best, psnr)

  def init(key, obs, truth, limits):
    state = attack.init(key, obs)
    return (state, *score(state, truth, limits[1], jnp.int32(-1), jnp.float32(-jnp.inf)))

  def advance(carry, obs, truth, limits, n):
    budget, threshold = limits
    def one(carry, _):
      state, first, best = carry
      stop = (first >= 0) | (state.counts[DOUBLE_BACKWARD] >= budget)
      state = jax.lax.cond(stop, lambda s: s, lambda s: attack.step(s, obs)[0], state)
      return (state, *score(state, truth, threshold, first, best)), None
    return jax.lax.scan(one, carry, None, length=n)[0]

  return init, advance


def dlg_model(cfg: ConvergenceConfig) -> models.Model:
  """DLG's LeNet (uniform init) for `cfg.data`'s RGB images."""
  ds = datasets.load(cfg.data)
  if ds.image_shape[-1] != 3:
    raise ValueError(f"{cfg.data} has {ds.image_shape[-1]}-channel images; the DLG setting "
                     f"attacks RGB images (use photos)")
  return models.make("lenet", num_classes=ds.num_classes, input_shape=ds.image_shape,
                     init="uniform")


def seed_setting(cfg: ConvergenceConfig, model: models.Model, seed: int) -> tuple[Any, Any]:
  """Seed `seed`'s model weights and its `cfg.victims` victims (B = 1), `(params,
  victims)`: what `run_optimizer` attacks, for peers that attack the same."""
  key = jax.random.key(seed)
  data = DataSpec(name=cfg.data, image_size=None, channels=None)
  victims = engine.load_victims(data, cfg.victims, 1, key=jax.random.fold_in(key, 0))
  return model.init(jax.random.fold_in(key, 1)), victims


def run_optimizer(optimizer: str, cfg: ConvergenceConfig, *,
                  log: Callable[[str], Any] = print) -> dict[str, Any]:
  """Every seed's victims attacked with `optimizer`: their evaluations to converge (-1:
  not within the budget), best PSNR, evaluations spent, inferred labels' correctness."""
  model = dlg_model(cfg)
  shape, classes = model.input_shape, model.module.num_classes
  threat = ob.ThreatModel(batch_size=1, input_shape=shape, num_classes=classes)
  attack = dlg.make(model.apply, threat, dlg.DLGConfig(
      optimizer=optimizer, labels="idlg", restart=cfg.restart and optimizer == "lbfgs",
      restart_after=cfg.restart_after if cfg.restart and optimizer == "lbfgs" else None))
  init, advance = _tracked(attack)
  batched = lambda f: fed.batch_over(f, fed.resolve_batching(cfg.batching))  # noqa: E731
  limits = (jnp.int32(cfg.budget), jnp.float32(cfg.threshold))

  @jax.jit
  def start(keys, updates, truths, params, limits):
    one = lambda k, u, t: init(k, ob.Observation(update=u, params=params), t, limits)  # noqa: E731
    return batched(one)(keys, updates, truths)

  @functools.partial(jax.jit, static_argnums=5)
  def steps(carry, updates, truths, params, limits, n):
    def one(c, u, t):
      return advance(c, ob.Observation(update=u, params=params), t, limits, n)
    return batched(one)(carry, updates, truths)

  first, best, spent, labels_ok, clock = [], [], [], [], time.perf_counter()
  for seed in cfg.seeds:
    key = jax.random.key(seed)
    params, victims = seed_setting(cfg, model, seed)
    obs = engine.observe_all(model, params, victims.x, victims.y, threat,
                             fed.identity_defense, key=jax.random.fold_in(key, 2))
    truths = jnp.asarray(victims.x)
    keys = jax.random.split(jax.random.fold_in(key, 3), cfg.victims)
    carry, done = start(keys, obs.update, truths, params, limits), 0
    while done < cfg.budget - 1:  # every step that runs spends at least one evaluation
      before = np.asarray(carry[0].counts[:, DOUBLE_BACKWARD])
      n = min(cfg.chunk, cfg.budget - 1 - done)
      carry = steps(carry, obs.update, truths, params, limits, n)
      done += n
      after, passed = np.asarray(carry[0].counts[:, DOUBLE_BACKWARD]), np.asarray(carry[1]) >= 0
      finished = passed | (after >= cfg.budget) | (after == before)  # (stopped: no evaluation)
      log(f"{optimizer} seed {seed}: {done} steps, {int(passed.sum())}/{cfg.victims} "
          f"converged, {int(finished.sum())} finished")
      if finished.all():
        break
    state, f, b = jax.device_get(carry)
    first += f.tolist()
    best += b.tolist()
    spent += state.counts[:, DOUBLE_BACKWARD].tolist()
    labels_ok += (np.asarray(dlg.labels(state))[:, 0] == victims.y[:, 0]).tolist()
  name = optimizer
  if cfg.restart and optimizer == "lbfgs":
    name += " + restart" + (f" every {cfg.restart_after}" if cfg.restart_after else "")
  return {"optimizer": name, "first": first, "best_psnr": best, "spent": spent,
          "labels_correct": labels_ok, "seconds": time.perf_counter() - clock}


def summarise(result: dict[str, Any], budget: int) -> dict[str, Any]:
  """The converged fraction (at `budget` and at each ladder budget below it), the median
  evaluations to converge (converged victims) and the median best PSNR."""
  first = np.asarray(result["first"])
  converged = (first >= 0) & (first <= budget)
  return {
      "optimizer": result["optimizer"], "victims": len(first),
      "converged_fraction": float(converged.mean()),
      "median_evals": float(np.median(first[converged])) if converged.any() else float("nan"),
      "fraction_at": {b: float(((first >= 0) & (first <= b)).mean()) for b in LADDER if b < budget},
      "median_best_psnr": float(np.median(result["best_psnr"])),
      "label_accuracy": float(np.mean(result["labels_correct"])),
      "seconds": result["seconds"]}


def table(rows: list[dict[str, Any]], cfg: ConvergenceConfig) -> str:
  """The markdown table of `summarise` rows."""
  ladder = [b for b in LADDER if b < cfg.budget]
  head = (["optimizer", "victims", f"converged ({cfg.budget})"]
          + [f"converged ({b})" for b in ladder]
          + ["median evals to converge", "median best PSNR", "labels", "seconds"])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = ([r["optimizer"], str(r["victims"]), f"{100 * r['converged_fraction']:.0f} %"]
             + [f"{100 * r['fraction_at'][b]:.0f} %" for b in ladder]
             + [f"{r['median_evals']:.0f}", f"{r['median_best_psnr']:.1f}",
                f"{100 * r['label_accuracy']:.0f} %", f"{r['seconds']:.0f}"])
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def run(cfg: ConvergenceConfig, workdir: str | Path, *,
        log: Callable[[str], Any] = print) -> list[dict[str, Any]]:
  """Measures every optimiser of `cfg`; writes convergence.json and convergence.md into
  `workdir` and returns the `summarise` rows."""
  workdir = Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(f"--workdir {workdir} is a file, not a folder; pass a folder path")
  workdir.mkdir(parents=True, exist_ok=True)
  results = [run_optimizer(o, cfg, log=log) for o in cfg.optimizers]
  rows = [summarise(r, cfg.budget) for r in results]
  (workdir / "convergence.json").write_text(json.dumps(
      {"config": config_lib.to_dict(cfg), "backend": jax.default_backend(),
       "summary": rows, "victims": results}, indent=1))
  (workdir / "convergence.md").write_text(table(rows, cfg) + "\n")
  return rows
