"""Test set-up, before any jax import.

- 8 fake CPU devices for the sharding tests, and XLA's backend optimisation off (the
  suite's time is mostly compilation);
- JAX's persistent compilation cache in one folder for the whole session (shared by the
  xdist workers, which `-n auto` in pyproject.toml starts), inherited by the
  subprocess tests through the environment, so that a function compiled by one test (or one
  script launch) is loaded, not recompiled, by the next.
"""

import os
import tempfile

os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8"
    # The tests' functions are tiny and compiled once: LLVM's optimisation costs more than it
    # saves (measured on tests/fljax/test_federated.py, cold cache: 114 s -> 77 s).
    " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "fljax-test-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_xdist_auto_num_workers(config):
  """`-n auto` (pyproject's addopts): one worker per core, at most 4 (each holds a JAX
  runtime with 8 fake devices; more workers mostly add compilation memory)."""
  del config
  return max(1, min(os.cpu_count() or 1, 4))
