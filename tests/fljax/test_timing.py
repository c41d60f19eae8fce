"""The benchmarks' timing workers: one process per framework, answering over pipes."""

import sys

import pytest

from fljax import timing

SERVE = "from fljax.timing import serve; print('noise'); serve({'m a': lambda: print('x'), 'm b': lambda: None})"


def test_a_worker_serves_its_variants_and_round_robin_times_each():
  worker = timing.Worker([sys.executable, "-c", SERVE])
  try:
    assert worker.variants == ["m a", "m b"]  # stray prints are passed to stderr
    assert len(worker.run("m b", 3)) == 3
    times = timing.round_robin([worker], repeats=2, rounds=2, settle=0.0)
  finally:
    worker.close()
  assert set(times) == {"m a", "m b"}
  for median, lo, hi in times.values():
    assert 0.0 <= lo <= hi and median >= 0.0


def test_a_worker_that_dies_before_it_is_ready_says_so():
  with pytest.raises(RuntimeError, match="exited with code 3 before it answered"):
    timing.Worker([sys.executable, "-c", "import sys; sys.exit(3)"])
