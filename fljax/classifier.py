"""Centralised (non-federated) training of a classifier, and the reference classifier that
feature-space metrics use (the distance between reconstructions and the truth, or between
generated samples and the test set, in its penultimate layer).

No Inception weights can be downloaded here, so image quality is judged in the feature
space of a classifier trained on the same dataset by `reference_classifier`; its numbers
are comparable across runs of this project, not with published Inception-based figures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from fljax import federated as fed
from fljax import models
from fljax.datasets import Dataset
from fljax.partitions import Batch

Params = Any


def train(model: models.Model, params: Params, x: np.ndarray, y: np.ndarray, *, steps: int,
          optimizer: optax.GradientTransformation, batch_size: int = 64,
          key: jax.Array) -> Params:
  """`steps` minibatch steps of `optimizer` on (x, y), in one jitted scan.

  Each step draws `batch_size` examples uniformly without replacement with
  `fold_in(key, step)`.
  """
  if steps <= 0:
    return params
  loss_fn = fed.make_loss_fn(model.apply)
  x, y = jnp.asarray(x), jnp.asarray(y)
  b = min(batch_size, len(y))

  def step(carry, t):
    p, opt_state = carry
    idx = jax.random.choice(jax.random.fold_in(key, t), len(y), (b,), replace=False)
    grads, _ = jax.grad(loss_fn, has_aux=True)(p, Batch(x=x[idx], y=y[idx], mask=jnp.ones(b)),
                                               None)
    updates, opt_state = optimizer.update(grads, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state), None

  run = jax.jit(lambda p: jax.lax.scan(step, (p, optimizer.init(p)), jnp.arange(steps))[0][0])
  return run(params)


def accuracy(model: models.Model, params: Params, x: np.ndarray, y: np.ndarray) -> float:
  metrics = jax.jit(fed.make_evaluate(model.apply))(params, jnp.asarray(x), jnp.asarray(y))
  return float(metrics["accuracy"])


def reference_classifier(ds: Dataset, cache_dir: str | Path | None = None, *, steps: int = 400,
                         seed: int = 0) -> tuple[models.Model, Params, float]:
  """A classifier trained on `ds`'s training split, for feature-space metrics.

  The 'cnn' (the 'mlp' for images under 14x14), Adam 1e-3, `steps` batches of 64, seeded;
  returns the model, its parameters and its test accuracy. With `cache_dir` the weights
  are kept in `cache_dir/classifier_<name>_<HxWxC>_<steps>_<seed>.msgpack` (and a .json of
  its accuracy) and loaded from there on later calls.
  """
  h, w, c = ds.image_shape
  name = "cnn" if min(h, w) >= 14 else "mlp"
  model = models.make(name, num_classes=ds.num_classes, input_shape=ds.image_shape)
  k_init, k_train = jax.random.split(jax.random.key(seed))
  params = model.init(k_init)
  path = None
  if cache_dir is not None:
    path = Path(cache_dir) / f"classifier_{ds.name.replace(':', '_')}_{h}x{w}x{c}_{steps}_{seed}"
    if path.with_suffix(".msgpack").exists() and path.with_suffix(".json").exists():
      params = serialization.from_bytes(params, path.with_suffix(".msgpack").read_bytes())
      return model, params, json.loads(path.with_suffix(".json").read_text())["test_accuracy"]
  params = train(model, params, ds.x_train, ds.y_train, steps=steps,
                 optimizer=optax.adam(1e-3), key=k_train)
  acc = accuracy(model, params, ds.x_test, ds.y_test)
  if path is not None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".msgpack").write_bytes(serialization.to_bytes(params))
    path.with_suffix(".json").write_text(json.dumps({"model": name, "test_accuracy": acc}) + "\n")
  return model, params, acc
