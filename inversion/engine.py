"""The attack engine of a gradient-inversion experiment: victims, observations, batched attacks.

`load_victims` draws the victims (a dataset's test split or a folder of images),
`observe_all` computes what each victim's client sends (fljax's `client_update` under the
defense), `random_observation` is the control observation, and `attack_batched` runs an
`AttackPlan` on many observations (victims x restarts) in one compiled computation per
chunk of steps, with `save_state`/`load_state` to resume an interrupted attack.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fljax import datasets, models
from fljax import federated as fed
from fljax.partitions import Batch
from inversion import attacks
from inversion import observation as ob
from inversion.specs import AttackPlan, DataSpec, ThreatSpec


class Victims(NamedTuple):
  """The attacked data (`load_victims`).

  Attributes:
    dataset: the dataset (its training split trains the model and the reference
      classifier; it sets the classes and input shape).
    x: the victims' images `[V, B, H, W, C]`.
    y: their labels `[V, B]`.
    names: where each victim's images came from `[V]`.
    skipped: `(file, why)` of every file of the image folder that was not read.
    unused: readable images of the folder left out (beyond V x B).
  """

  dataset: datasets.Dataset
  x: np.ndarray
  y: np.ndarray
  names: list[str]
  skipped: list[tuple[str, str]]
  unused: int


def load_victims(data: DataSpec, num: int, batch_size: int, *, key: jax.Array) -> Victims:
  """`num` victims of `batch_size` images each, from `data`.

  From the dataset, V = num victims of distinct test images in a random order drawn with
  `key`. From a folder (`data.images`, `fljax.datasets.load_image_folder`), its images in
  sorted order, V = min(num, N // B).

  Raises:
    fljax.datasets.DatasetError: the dataset or the folder cannot be read.
    ValueError: too few images, or more class folders than the dataset has classes.
  """
  ds = datasets.load(data.name, image_size=data.image_size, channels=data.channels,
                     data_dir=data.data_dir)
  skipped = []
  if data.images is not None:
    folder = datasets.load_image_folder(data.images, ds.image_shape)
    x, y, names, skipped = folder.images, folder.labels, folder.names, folder.skipped
    if len(folder.classes) > ds.num_classes:
      raise ValueError(f"{data.images} has {len(folder.classes)} class folders, but "
                       f"{data.name}'s model has {ds.num_classes} classes")
    v = min(num, len(y) // batch_size)
    if v == 0:
      raise ValueError(f"{data.images} holds {len(y)} readable images, fewer than one batch "
                       f"of {batch_size}; lower --threat.batch_size")
    names = [",".join(names[i * batch_size:(i + 1) * batch_size]) for i in range(v)]
  else:
    need = num * batch_size
    if need > len(ds.y_test):
      raise ValueError(f"{num} victims x batch {batch_size} need {need} test images; "
                       f"{data.name} has {len(ds.y_test)}")
    order = np.asarray(jax.random.permutation(key, len(ds.y_test)))[:need]
    x, y, v = ds.x_test[order], ds.y_test[order], num
    names = [f"test[{','.join(map(str, order[i * batch_size:(i + 1) * batch_size]))}]"
             for i in range(v)]
  n = v * batch_size
  return Victims(ds, x[:n].reshape((v, batch_size) + x.shape[1:]),
                 y[:n].reshape(v, batch_size), names, skipped, len(y) - n)


def threat_model(spec: ThreatSpec, ds: datasets.Dataset, defense: str) -> ob.ThreatModel:
  return ob.ThreatModel(algorithm=spec.algorithm, batch_size=spec.batch_size,
                        input_shape=ds.image_shape, num_classes=ds.num_classes,
                        local_epochs=spec.local_epochs, local_batch_size=spec.local_batch_size,
                        local_lr=spec.local_lr, labels_known=spec.labels_known, defense=defense)


def observe_all(model: models.Model, params: Any, x: np.ndarray, y: np.ndarray,
                threat: ob.ThreatModel, defense: fed.DefenseFn, *, key: jax.Array,
                round_: int = 0) -> ob.Observation:
  """The V victims' observations: updates (and known labels) stacked `[V, ...]`, params
  shared. Victim i's client runs fljax's client update with `fold_in(key, i)` and the
  defense with its own fold of that key (`observation.observe`), folded again with the
  round for rounds > 0 (the same update, fresh defense noise)."""
  batch = Batch(x=jnp.asarray(x), y=jnp.asarray(y), mask=jnp.ones(y.shape, jnp.float32))
  ob.check_batch(batch.mask, threat)
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(len(y)))
  updates, labels = _observer(model, threat, defense)(params, batch, keys, round_)
  return ob.Observation(update=updates, params=params, labels=labels)


@functools.lru_cache(maxsize=32)
def _observer(model: models.Model, threat: ob.ThreatModel, defense: fed.DefenseFn):
  """The compiled `(params, batch, keys, round) -> (updates, labels)` of `observe_all`,
  one per (model, threat, defense), so that k rounds or many surrogate batches compile once."""
  fed_cfg = fed.FedConfig(algorithm=threat.algorithm, local_epochs=threat.local_epochs,
                          local_batch_size=threat.local_batch_size, local_lr=threat.local_lr)
  client_update = fed.make_client_update(fed.make_loss_fn(model.apply), fed_cfg)

  def one(params, data, k, round_):
    dkey = jax.random.fold_in(k, 1)
    dkey = jnp.where(round_ == 0, jax.random.key_data(dkey),
                     jax.random.key_data(jax.random.fold_in(dkey, round_)))
    o = ob.observe(client_update, params, data, k, threat, defense=defense,
                   defense_key=jax.random.wrap_key_data(dkey), round_=round_)
    return o.update, o.labels

  return jax.jit(jax.vmap(one, in_axes=(None, 0, 0, None)))


def random_observation(obs: ob.Observation, *, key: jax.Array) -> ob.Observation:
  """The control observation: each leaf of each update replaced by Gaussian noise with
  that leaf's own standard deviation (what an attack recovers from it comes from its
  prior and its label guess, not from the client's data)."""
  leaves, treedef = jax.tree.flatten(obs.update)
  noisy = [jax.vmap(lambda a, k: jnp.std(a) * jax.random.normal(k, a.shape, a.dtype))(
      leaf, jax.random.split(jax.random.fold_in(key, i), leaf.shape[0]))
      for i, leaf in enumerate(leaves)]
  return ob.Observation(update=jax.tree.unflatten(treedef, noisy), params=obs.params,
                        labels=obs.labels)


def save_state(path: Path, state: Any, done: int, attempt: int) -> None:
  """Saves the attack states after `done` steps of retry `attempt`, atomically.

  Only the arrays are written; typed PRNG keys (the diffusion attacks' sampler keys) are
  written as their key data and wrapped again by `load_state`.
  """
  leaves = [jax.random.key_data(a) if _is_key(a) else a for a in jax.tree.leaves(state)]
  tmp = path.with_name(path.stem + ".tmp.npz")
  np.savez(tmp, *[np.asarray(a) for a in leaves], done=done, attempt=attempt)
  os.replace(tmp, path)


def load_state(path: Path, like: Any, attempt: int) -> tuple[Any, int] | None:
  """The states that `save_state` saved for this `attempt`, shaped like `like`, and the
  steps done; None when there are none, or they are another attempt's or shape's."""
  if not path.exists():
    return None
  data = np.load(path)
  if int(data["attempt"]) != attempt:
    return None
  leaves, treedef = jax.tree.flatten(like)
  restored = []
  for i, leaf in enumerate(leaves):
    saved = data[f"arr_{i}"]
    if _is_key(leaf):
      if saved.shape != jax.random.key_data(leaf).shape:
        return None
      restored.append(jax.random.wrap_key_data(jnp.asarray(saved),
                                               impl=jax.random.key_impl(leaf)))
    elif saved.shape != leaf.shape:
      return None
    else:
      restored.append(jnp.asarray(saved, leaf.dtype))
  return jax.tree.unflatten(treedef, restored), int(data["done"])


def _is_key(a: Any) -> bool:
  return hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jax.dtypes.prng_key)


def attack_batched(plan: AttackPlan, obs: ob.Observation, keys: jax.Array, *, mode: str,
                   map_batch_size: int = 0, chunk: int = 100,
                   progress: Callable[[int], Any] = lambda n: None,
                   checkpoint: Callable[[Any, int], None] | None = None,
                   restore: Callable[[Any], tuple[Any, int] | None] | None = None,
                   row_params: bool = False, timings: dict[str, float] | None = None) -> Any:
  """Runs `plan` on N observations stacked on their leading axis (keys `[N]`), all in one
  compiled computation per `chunk` steps; returns the final states stacked `[N, ...]`.

  The model parameters are shared by every observation (`obs.params` unbatched), or, with
  `row_params`, stacked `[N, ...]` like the updates (observations of different models,
  e.g. a study's cells, attacked in one computation).
  `checkpoint(states, steps_done)` is called between chunks; `restore(initial_states)`
  may return `(states, steps_done)` saved by an earlier, interrupted call. With a
  `plan.budget`, a restart's steps are skipped once it has spent that many double-backward
  evaluations, except those of the phases marked `always` (scoring, stage transitions).
  `timings`, when given, receives `compile_seconds` (tracing and XLA compilation of every
  program, ahead of time) and `run_seconds` (running them), added to what it holds.
  """
  clock = {} if timings is None else timings
  for k in ("compile_seconds", "run_seconds"):
    clock.setdefault(k, 0.0)
  params = None if row_params else obs.params
  rows = ob.Observation(update=obs.update, params=obs.params if row_params else None,
                        labels=obs.labels)

  def with_params(o, params):
    return ob.Observation(update=o.update, params=o.params if row_params else params,
                          labels=o.labels)

  @jax.jit
  def init(keys, rows, params):
    one = lambda k, o: plan.attack.init(k, with_params(o, params))
    return fed.batch_over(one, mode, map_batch_size)(keys, rows)

  phases = plan.attack.phases or (attacks.Phase(plan.attack.step, plan.steps),)
  ends = np.cumsum([p.steps for p in phases])
  if ends[-1] != plan.steps:
    raise ValueError(f"the attack's phases take {ends[-1]} steps, its plan {plan.steps}")
  # The cap is an argument, not a constant: runs that differ only in budget compile alike.
  cap = None if plan.budget is None else np.int32(plan.budget)

  def capped(phase, cap):
    if cap is None or phase.always:
      return phase.step
    def run(s, o):  # a restart that has spent its double-backward budget stops where it is
      spent = s.counts[attacks.COUNTERS.index("double_backward_evals")] >= cap
      # lax.cond skips the step under lax.map (one restart at a time); vmap evaluates both.
      return jax.lax.cond(spent, lambda s: s, lambda s: phase.step(s, o)[0], s), {}
    return run

  @functools.partial(jax.jit, static_argnums=(4, 5))
  def advance(states, rows, params, cap, n, phase):
    step = capped(phases[phase], cap)

    def one(s, o):
      o = with_params(o, params)
      return jax.lax.scan(lambda s, _: (step(s, o)[0], None), s, None, length=n)[0]
    return fed.batch_over(one, mode, map_batch_size)(states, rows)

  programs: dict[tuple[int, int], Any] = {}

  def program(states, n, phase):  # compiled ahead of time, so that compiling is timed apart
    if (n, phase) not in programs:
      t0 = time.perf_counter()
      programs[(n, phase)] = advance.lower(states, rows, params, cap, n, phase).compile()
      clock["compile_seconds"] += time.perf_counter() - t0
    return programs[(n, phase)]

  t0 = time.perf_counter()
  start = init.lower(keys, rows, params).compile()
  clock["compile_seconds"] += time.perf_counter() - t0
  t0 = time.perf_counter()
  states, done = jax.block_until_ready(start(keys, rows, params)), 0
  clock["run_seconds"] += time.perf_counter() - t0
  restored = None if restore is None else restore(states)
  if restored is not None:
    states, done = restored
  progress(done)
  while done < plan.steps:
    phase = int(np.searchsorted(ends, done, side="right"))
    n = min(chunk, plan.steps - done, int(ends[phase]) - done)
    run = program(states, n, phase)
    t0 = time.perf_counter()
    states = jax.block_until_ready(run(states, rows, params, cap))
    clock["run_seconds"] += time.perf_counter() - t0
    done += n
    progress(n)
    if checkpoint is not None and done < plan.steps:
      checkpoint(states, done)
  return states
