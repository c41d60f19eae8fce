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


ANSWER = "@timing "


def serve(variants: dict[str, Callable[[], object]]) -> None:
  """A timing worker's loop (`Worker` runs one per framework, in its own process).

  Warms every variant up (compiles), writes their names as one JSON line, then answers
  each stdin line `<name> <n>` with one JSON line: the `n` calls' milliseconds. Its
  answers start with `ANSWER`; whatever else the process prints goes to stderr.
  """
  import json
  import os
  import sys
  out = os.fdopen(os.dup(1), "w")  # answers go to the real stdout,
  os.dup2(2, 1)  # and anything else printed goes to stderr
  for fn in variants.values():
    fn()
  print(ANSWER + json.dumps(list(variants)), file=out, flush=True)
  for line in sys.stdin:
    name, n = line.rsplit(" ", 1)
    times = []
    for _ in range(int(n)):
      t0 = time.perf_counter()
      variants[name]()
      times.append(1e3 * (time.perf_counter() - t0))
    print(ANSWER + json.dumps(times), file=out, flush=True)


class Worker:
  """A child process that runs `serve` (its command line is `argv`): one framework's
  steps timed apart from the others', so that no framework's thread pool, still spinning
  after its last call, slows another's next one. `env`: the child's environment (none:
  this process's), e.g. XLA flags that only one variant should run under."""

  def __init__(self, argv: list[str], env: dict[str, str] | None = None):
    import subprocess
    self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True, env=env)
    self.argv = argv
    self.variants = self._answer()

  def _answer(self):
    import json
    import sys
    for line in self.proc.stdout:
      if line.startswith(ANSWER):
        return json.loads(line[len(ANSWER):])
      print(line, end="", file=sys.stderr)  # printed before serve() took over stdout
    raise RuntimeError(f"timing worker {' '.join(self.argv)} exited with code "
                       f"{self.proc.wait()} before it answered (see its output above)")

  def run(self, name: str, n: int) -> list[float]:
    """Milliseconds of `n` calls of variant `name`."""
    self.proc.stdin.write(f"{name} {n}\n")
    self.proc.stdin.flush()
    return self._answer()

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait()


def round_robin(workers: list[Worker], repeats: int, rounds: int, settle: float = 0.5
                ) -> dict[str, tuple[float, float, float]]:
  """`{variant: (median ms over all calls, min and max of the round medians)}`.

  Each round runs `repeats` calls of every variant of every worker in turn, pausing
  `settle` seconds whenever it switches worker (idle thread pools stop spinning).
  """
  calls, medians = {}, {}
  for _ in range(rounds):
    for worker in workers:
      time.sleep(settle)
      for name in worker.variants:
        ts = worker.run(name, repeats)
        calls.setdefault(name, []).extend(ts)
        medians.setdefault(name, []).append(statistics.median(ts))
  return {k: (statistics.median(calls[k]), min(medians[k]), max(medians[k])) for k in calls}
