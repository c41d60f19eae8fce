"""A gradient-inversion experiment: victims -> observed updates -> attack -> scores, grid.

`run(config, workdir)` takes V victims (each a batch of B images from a dataset's test
split, or from a folder of image files), lets each one's client compute the update that
fljax's own `client_update` sends (FedSGD gradient or FedAvg delta) under the configured
defense, and attacks all V observations, with R restarts each, in one compiled
computation (`inversion.engine.attack_batched`: vmap, or lax.map with a batch size;
'auto' picks lax.map on CPU, where vmapped second-order convolution gradients are slow,
and vmap on accelerators). The specs and registries live in `inversion.specs`, the
scoring and pictures in `inversion.report`.

Divergence: a restart whose loss or iterate became non-finite or exploded
(`inversion.attacks.healthy`) is never scored. Each victim keeps its restart with the
lowest final matching loss among the healthy ones (the ground truth is never looked at);
a victim with no healthy restart is attacked again with fresh keys, up to
`attack.retries` times, and is then reported as failed (and left out of the medians).

Outputs in `workdir`: `config.json`, `metrics.json` (a summary and per-victim scores),
`grid.png` (ground truth above each reconstruction, PSNR under it). The attack state is
saved every `chunk` steps (`attack_state.npz`), so a killed run resumes where it was.
The summary times each phase (`model_training_seconds`, `classifier_seconds` for the
feature metric's reference classifier, trained before the attack; `attack_seconds`;
`wall_seconds` for the whole run), and its `victim_attacks_per_hour` counts only the
attack steps run in this process (none when a resumed run found the attack finished).
Progress on stderr counts each attempt's attack steps up to 100 %: a bar on a terminal,
else a plain line every 30 s (`fljax.runs.Progress`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fljax import classifier, datasets, models
from fljax import config as config_lib
from fljax import federated as fed
from fljax import runs
from inversion import adaptive, attacks, engine, held_out, report
from inversion import observation as ob
from inversion.specs import (ATTACKS, DEFENSES, AttackPlan, InversionConfig, declared_noise,
                             prior_folder)
from privacy import forward_noise as fn


def _remove_attack_files(workdir: Path) -> None:
  """Drops an attack's resume files (after its report is written, or on --overwrite)."""
  for name in ("attack_state.npz", "attack_results.npz"):
    (workdir / name).unlink(missing_ok=True)


def run(config: InversionConfig, workdir: str | os.PathLike, *, overwrite: bool = False,
        progress: bool = True) -> dict[str, Any]:
  """Runs (or resumes, or reports) the experiment; returns the summary in metrics.json."""
  workdir = Path(workdir)
  runs.check_workdir(workdir, config, overwrite, setup_files=("classifier",))
  if (workdir / "metrics.json").exists() and not overwrite:
    summary = json.loads((workdir / "metrics.json").read_text())["summary"]
    print(f"nothing to do: {workdir} already holds this experiment's results "
          f"(median PSNR {summary['median_psnr']:.2f} dB); pass --overwrite to run it again")
    return summary
  if overwrite:
    _remove_attack_files(workdir)
  t_start = time.perf_counter()
  k_victims, k_model, k_train, k_clients, k_attack = jax.random.split(
      jax.random.key(config.seed), 5)
  spec = config.attack
  victims = engine.load_victims(config.data, config.victims.num, config.threat.batch_size,
                                key=k_victims)
  ds, x, y = victims.dataset, victims.x, victims.y
  for name, why in victims.skipped:
    print(f"warning: skipped {Path(config.data.images) / name}: {why}", file=sys.stderr)
  if victims.unused:
    print(f"warning: {victims.unused} readable images of {config.data.images} are not "
          f"attacked ({len(y)} victims x batch {config.threat.batch_size} use "
          f"{y.size}); raise --victims.num or change --threat.batch_size to use them",
          file=sys.stderr)
  model = models.make(config.model.name, num_classes=ds.num_classes,
                      input_shape=ds.image_shape, init=config.model.init)
  threat = engine.threat_model(config.threat, ds, config.defense.name)
  plan = ATTACKS[spec.name](model, threat, spec, config.defense)  # a bad budget fails here
  if prior_folder(spec) is not None and config.data.images is None:  # victims: the test split
    held_out.check(held_out.training_data(prior_folder(spec)), dataset=config.data.name,
                   split="test")
  seconds, t0 = {}, time.perf_counter()
  if config.model.train_steps:
    print(f"training the attacked {config.model.name} for {config.model.train_steps} steps",
          flush=True)
  params = classifier.train(model, model.init(k_model), ds.x_train, ds.y_train,
                            steps=config.model.train_steps,
                            optimizer=optax.sgd(config.model.train_lr), key=k_train)
  if config.model.train_steps:
    seconds["model_training"] = time.perf_counter() - t0
  model_accuracy = classifier.accuracy(model, params, ds.x_test, ds.y_test)
  reference = None
  if config.feature_metric:
    folder = config.classifier_dir or workdir / "classifier"
    print(f"reference classifier for the feature metric: loading it from {folder}, or "
          f"training it there", flush=True)
    t0 = time.perf_counter()
    ref_model, ref_params, ref_accuracy = classifier.reference_classifier(ds, folder)
    reference = report.Reference(model=ref_model, params=ref_params, test_accuracy=ref_accuracy)
    seconds["classifier"] = time.perf_counter() - t0
    print(f"reference classifier ready in {seconds['classifier']:.1f} s, test accuracy "
          f"{reference.test_accuracy:.3f}", flush=True)
  defense = DEFENSES[config.defense.name](config.defense)
  obs = engine.observe_all(model, params, x, y, threat, defense, key=k_clients)
  obs, extra = adaptive_processing(config, model, params, ds, x, y, threat, defense, obs,
                                   key=k_clients)
  for i in range(len(y)):  # what the server received must be attackable
    row = jax.tree.map(lambda a: a[i], ob.Observation(update=obs.update, params=None,
                                                      labels=obs.labels))
    ob.check(ob.Observation(update=row.update, params=params, labels=row.labels), threat)
  if spec.control == "random_observation":
    obs = engine.random_observation(obs, key=jax.random.fold_in(k_clients, 1 << 20))
  mode = fed.resolve_batching(config.batching)
  print(f"{ds.describe()}; {len(y)} victims x batch {threat.batch_size} "
        f"({'images from ' + config.data.images if config.data.images else 'test split'}); "
        f"{config.model.name} ({config.model.init} init, {config.model.train_steps} training "
        f"steps, test accuracy {model_accuracy:.3f}); {threat.algorithm}, defense "
        f"{config.defense.name}; attack {spec.name}, {plan.steps} steps x {spec.restarts} "
        f"restarts, batched by {mode} on {jax.default_backend()}", flush=True)
  result = _attack(config, plan, obs, x, y, victims.names, workdir, mode=mode,
                   progress=progress, key=k_attack)
  seconds = {**seconds, **result.seconds, "wall": time.perf_counter() - t_start}
  result = dataclasses.replace(result, seconds=seconds)
  summary = report.write(config, workdir, result, reference=reference,
                         extra={"model_test_accuracy": model_accuracy, "batching": mode, **extra})
  rate = summary["victim_attacks_per_hour"]
  print(f"median PSNR {summary['median_psnr']:.2f} dB, mean SSIM {summary['mean_ssim']:.3f}, "
        f"label accuracy {summary['label_accuracy']:.3f}, {summary['failed']} failed, "
        f"{result.diverged_restarts} diverged restarts; attack {seconds['attack']:.1f} s ("
        + (f"{rate:.0f} victim-attacks/hour" if rate else "resumed: nothing left to attack")
        + f"), wall {seconds['wall']:.1f} s; outputs in {workdir}")
  _remove_attack_files(workdir)
  return summary


def _attack(config: InversionConfig, plan: AttackPlan, obs: ob.Observation,
            x: np.ndarray, y: np.ndarray, names: list[str], workdir: Path, *, mode: str,
            progress: bool, key: jax.Array) -> report.AttackResult:
  """Attacks every pending victim (all at first, or those an interrupted run left), keeps
  each one's best healthy restart, and attacks again with fresh keys the victims none of
  whose restarts stayed healthy. Resumable from the files it keeps in `workdir`."""
  spec = config.attack
  v, r = len(y), spec.restarts
  results_path, state_path = workdir / "attack_results.npz", workdir / "attack_state.npz"
  best_x = np.zeros(x.shape, np.float32)
  best_y = np.zeros(y.shape, np.int32)
  best_loss = np.full(v, np.inf)
  pending = np.ones(v, bool)
  attempts = np.zeros(v, np.int32)
  diverged_restarts = 0
  first_attempt = 0
  spent = np.zeros((v, len(attacks.COUNTERS)), np.int64)  # evaluations per victim, all restarts
  if results_path.exists():
    saved = np.load(results_path)
    best_x, best_y, best_loss = saved["x"], saved["y"], saved["loss"]
    pending, attempts, spent = saved["pending"], saved["attempts"], saved["spent"]
    diverged_restarts, first_attempt = int(saved["diverged"]), int(saved["next_attempt"])
    if not pending.any() or first_attempt > spec.retries:
      print("resumed: the attack had finished; scoring its saved results", flush=True)
  attack_seconds, victim_attacks = 0.0, 0.0
  for attempt in range(first_attempt, spec.retries + 1):
    ids = np.flatnonzero(pending)
    if len(ids) == 0:
      break
    if attempt > 0:
      print(f"retry {attempt}: {len(ids)} victims none of whose restarts stayed healthy, "
            f"attacked again with fresh keys", flush=True)
    rows = jax.tree.map(lambda a: jnp.repeat(a[ids], r, axis=0), obs.update)
    labels = None if obs.labels is None else jnp.repeat(obs.labels[ids], r, axis=0)
    batch_obs = ob.Observation(update=rows, params=obs.params, labels=labels)
    k_try = jax.random.fold_in(key, attempt)
    keys = jax.vmap(lambda i: jax.random.fold_in(k_try, i))(
        jnp.asarray((ids[:, None] * r + np.arange(r)).ravel()))
    steps = _Steps(plan.steps, unit="attack steps" if attempt == 0 else f"retry {attempt} steps",
                   enabled=progress)
    t0 = time.perf_counter()
    try:
      states = engine.attack_batched(
          plan, batch_obs, keys, mode=mode, map_batch_size=config.map_batch_size,
          chunk=config.chunk, progress=steps,
          restore=lambda like, a=attempt: engine.load_state(state_path, like, a),
          checkpoint=lambda s, done, a=attempt: engine.save_state(state_path, s, done, a))
    finally:
      steps.close()
    attack_seconds += time.perf_counter() - t0
    victim_attacks += len(ids) * (plan.steps - steps.restored) / plan.steps
    states = jax.tree.map(lambda a: a.reshape((len(ids), r) + a.shape[1:]), states)
    healthy = ~np.asarray(states.diverged) & np.isfinite(np.asarray(states.loss))
    spent[ids] += np.asarray(states.counts).sum(axis=1)
    diverged_restarts += int((~healthy).sum())
    chosen = jax.vmap(attacks.best)(states, jnp.where(healthy, states.loss, jnp.inf))
    ok = healthy.any(axis=1)
    best_x[ids[ok]] = np.asarray(chosen.x)[ok]
    best_y[ids[ok]] = np.asarray(plan.labels(chosen))[ok]
    best_loss[ids[ok]] = np.asarray(chosen.loss)[ok]
    attempts[ids] += 1
    pending[ids[ok]] = False
    np.savez(results_path, x=best_x, y=best_y, loss=best_loss, pending=pending,
             attempts=attempts, spent=spent, diverged=diverged_restarts,
             next_attempt=attempt + 1)
    state_path.unlink(missing_ok=True)
  return report.AttackResult(
      truth=x, labels=y, names=names, reconstruction=best_x, inferred_labels=best_y,
      loss=best_loss, failed=pending, attempts=attempts, diverged_restarts=diverged_restarts,
      spent=spent, steps=plan.steps, seconds={"attack": attack_seconds},
      victim_attacks=victim_attacks)


class _Steps:
  """One attempt's progress callback for `engine.attack_batched`, shown by
  `fljax.runs.Progress` (a bar on a terminal, else a line every 30 s and at 100 %). The
  first call reports the steps restored from a checkpoint (`restored`: not done here)."""

  def __init__(self, total: int, *, unit: str, enabled: bool):
    self.total, self.unit, self.enabled = total, unit, enabled
    self.bar, self.restored = None, 0

  def __call__(self, n: int) -> None:
    if self.bar is None:
      self.restored = n
      self.bar = runs.Progress(self.total, initial=n, unit=self.unit, enabled=self.enabled)
    else:
      self.bar.update(n)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def adaptive_processing(config: InversionConfig, model: models.Model, params: Any,
                        ds: datasets.Dataset, x: np.ndarray, y: np.ndarray,
                        threat: ob.ThreatModel, defense: fed.DefenseFn, obs: ob.Observation,
                        *, key: jax.Array) -> tuple[ob.Observation, dict[str, Any]]:
  """The attacker's denoising pipeline (`attack.denoise`) on the observations, and what to
  report about it: the cosine between the processed and the clean update, and the
  reconstruction-robustness ceiling (Kaissis et al. 2023) at the attacker's mu."""
  spec, d = config.attack, config.defense
  steps = adaptive.parse(spec.denoise)
  extra: dict[str, Any] = {"denoise": spec.denoise, "observed_rounds": spec.rounds}
  if steps:
    rounds = spec.rounds if "average" in steps else 1
    ys = [obs.update] + [engine.observe_all(model, params, x, y, threat, defense, key=key,
                                            round_=i).update for i in range(1, rounds)]
    surrogates = None
    if "wiener" in steps or "pca" in steps:
      surrogates = _surrogate_updates(model, params, ds, threat, spec.surrogates,
                                      key=jax.random.fold_in(key, 1 << 21))
    update, _ = adaptive.process(jax.tree.map(lambda *a: jnp.stack(a), *ys), steps,
                                 declared_noise(d), batch_size=threat.batch_size,
                                 surrogates=surrogates, pca_rank=spec.pca_rank)
    obs = ob.Observation(update=update, params=obs.params, labels=obs.labels)
  if d.name != "none":
    clean = engine.observe_all(model, params, x, y, threat, fed.identity_defense,
                               key=key).update
    cosine = adaptive.update_cosine(obs.update, clean)
    extra["update_cosine"] = float(np.median(np.asarray(cosine)))
  z = {"forward_noise": d.noise_multiplier, "local_dp": d.noise_multiplier}.get(d.name, 0.0)
  if z > 0:  # per upload, replace-one: mu = 2 sqrt(k) / z over the k uploads the attack used
    k = spec.rounds if "average" in steps else 1
    extra["mu_per_upload"] = 2.0 * k ** 0.5 / z
    extra["rero_bound_kappa_1e-3"] = fn.rero_bound(extra["mu_per_upload"], 1e-3)
  return obs, extra


def _surrogate_updates(model: models.Model, params: Any, ds: datasets.Dataset,
                       threat: ob.ThreatModel, num: int, *, key: jax.Array) -> Any:
  """`num` clean updates `[K, ...]` of batches drawn from the training split (the
  attacker's public data, disjoint from the test-split victims) at the same model."""
  b = threat.batch_size
  if num * b > len(ds.y_train):
    raise ValueError(f"attack.surrogates={num} batches of {b} exceed the {len(ds.y_train)} "
                     f"training images")
  order = np.asarray(jax.random.permutation(jax.random.fold_in(key, 0), len(ds.y_train)))
  idx = order[:num * b]
  xs = ds.x_train[idx].reshape((num, b) + ds.x_train.shape[1:])
  ys = ds.y_train[idx].reshape(num, b)
  return engine.observe_all(model, params, xs, ys, threat, fed.identity_defense,
                            key=jax.random.fold_in(key, 1)).update


def main(argv: list[str] | None = None) -> None:
  """The command line: one flag per config field, plus --workdir, --overwrite, --progress."""
  config, ns = config_lib.parse(
      InversionConfig, argv, extra=lambda parser: runs.add_flags(parser, workdir="runs/invert"),
      description="Gradient inversion (DLG, iDLG, Inverting Gradients, diffusion and GAN "
                  "priors) on what fljax's clients send; resumable.")
  try:
    run(config, ns.workdir, overwrite=ns.overwrite, progress=ns.progress)
  except (datasets.DatasetError, ValueError) as e:  # runs.WorkdirError among them
    raise SystemExit(f"error: {e}") from None
  except KeyboardInterrupt:
    print(f"\ninterrupted: the attack state is saved every --chunk steps in {ns.workdir}; "
          f"rerun the same command to resume", file=sys.stderr)
    raise SystemExit(130) from None
