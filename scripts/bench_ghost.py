"""Benchmark: the DP-SGD step with ghost-norm clipping against the vmap path.

The same DP-SGD step (clip each example's gradient to C = 1, sum, add noise, SGD) on the
same batch, its clipped sum computed two ways: per-example gradients by vmap
(`privacy.clipping`), and ghost norms from each layer's input and output gradient
(`privacy.ghost`; the same sum, tests/privacy/test_ghost.py). Workloads: the DLG LeNet on
32x32x3 at batch 64 and the MNIST CNN (TF-Privacy's) on 28x28x1 at batch 256, flat and
per-layer clipping. The variants run round robin, each timed twice, the faster median
kept. The headline `speedup=` is the smallest vmap-over-ghost ratio of the flat steps.

  python scripts/bench_ghost.py
  python scripts/bench_ghost.py --quick
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax

from fljax import config as config_lib
from fljax.timing import classifier_workload, timed
from privacy import dpsgd


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchConfig:
  """The benchmark's sizes.

  Attributes:
    quick: batches of 16 and 32 instead of 64 and 256 (seconds).
    repeats: timed repetitions of each step (none: 10, or 3 with --quick).
  """

  quick: bool = False
  repeats: int | None = None

  def __post_init__(self):
    if self.repeats is not None and self.repeats < 1:
      raise ValueError(f"--repeats must be >= 1, got {self.repeats}")


def dp_step(name, shape, batch, clipping, per_layer):
  """A jitted DP-SGD step and its first run's parameters (for the equality check)."""
  _, params, loss_fn, data = classifier_workload(name, shape, batch)
  cfg = dpsgd.DPSGDConfig(clip_norm=1.0, noise_multiplier=1.0, batch_size=batch,
                          per_layer=per_layer, clipping=clipping, sampling="fixed")
  tx = dpsgd.dp_optimizer(cfg, optax.sgd(0.1), key=jax.random.key(1))
  step = jax.jit(dpsgd.make_batch_step(loss_fn, cfg, tx))
  state, key = tx.init(params), jax.random.key(2)
  return (lambda: jax.block_until_ready(step(params, state, data, key))), step(
      params, state, data, key)[0]


def main(argv=None):
  args, _ = config_lib.parse(BenchConfig, argv, description=__doc__.split("\n")[0])
  repeats = args.repeats or (3 if args.quick else 10)
  cases = [("lenet", (32, 32, 3), 16 if args.quick else 64),
           ("cnn", (28, 28, 1), 32 if args.quick else 256)]
  print(f"backend={jax.default_backend()} devices={jax.device_count()} repeats={repeats}")
  print(f"{'model':>6} {'batch':>5} {'clip':>9} {'vmap ms':>9} {'ghost ms':>9} {'speedup':>8} "
        f"{'max |diff|':>10}")
  flat = []
  for name, shape, batch in cases:
    for per_layer in (False, True):
      fns, outs = {}, {}
      for clipping in ("vmap", "ghost"):
        fns[clipping], outs[clipping] = dp_step(name, shape, batch, clipping, per_layer)
      best = {c: float("inf") for c in fns}
      for _ in range(2):
        for c, fn in fns.items():
          best[c] = min(best[c], timed(fn, repeats))
      diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                 zip(jax.tree.leaves(outs["vmap"]), jax.tree.leaves(outs["ghost"])))
      ratio = best["vmap"] / best["ghost"]
      flat += [ratio] if not per_layer else []
      print(f"{name:>6} {batch:>5} {'per-layer' if per_layer else 'flat':>9} "
            f"{1e3 * best['vmap']:9.2f} {1e3 * best['ghost']:9.2f} {ratio:8.2f} {diff:10.1e}")
  print(f"RESULT bench_ghost speedup={min(flat):.2f} lenet_speedup={flat[0]:.2f} "
        f"cnn_speedup={flat[1]:.2f}")


if __name__ == "__main__":
  main()
