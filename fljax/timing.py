"""Wall-clock timing for the benchmark scripts (never for assertions in tests)."""

import statistics
import time
from collections.abc import Callable


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
