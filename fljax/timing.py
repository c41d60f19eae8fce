"""Wall-clock timing for the benchmark scripts (never for assertions in tests)."""

import statistics
import time
from collections.abc import Callable
from typing import Any


def timed(fn: Callable[[], object], repeats: int) -> float:
  """Median seconds of `repeats` calls of `fn`, after one call to compile and warm up.

  `fn` must block until its work is done (e.g. end in `jax.block_until_ready`).
  """
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def classifier_workload(name: str, shape: tuple[int, int, int], batch: int,
                        num_classes: int = 10) -> tuple[Any, Any, Any, Any]:
  """A registered model at its seed-0 initialisation, its masked cross-entropy and a
  random batch `[batch, *shape]` of seed 0: `(model, params, loss_fn, batch)`, the same
  in every benchmark that times a step on it."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from fljax import federated as fed
  from fljax import models
  from fljax.partitions import Batch
  model = models.make(name, num_classes=num_classes, input_shape=shape)
  rng = np.random.default_rng(0)
  data = Batch(x=jnp.asarray(rng.random((batch,) + tuple(shape), dtype=np.float32)),
               y=jnp.asarray(rng.integers(0, num_classes, batch), jnp.int32),
               mask=jnp.ones((batch,)))
  return model, model.init(jax.random.key(0)), fed.make_loss_fn(model.apply), data
