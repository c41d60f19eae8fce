"""Benchmark: one DP-SGD step against the non-private step and a per-example Python loop.

Two workloads: (a) the DLG LeNet on 32x32x3 inputs at batch 64, (b) the MNIST CNN on
28x28x1 at batch 256. For each, on the same batch in this process:
  - non-private: the jitted SGD step on the mean gradient;
  - DP (vmap): the jitted DP-SGD step (vmap per-example grads, clip, sum, noise, SGD);
  - DP (micro-batched): the same with per-example grads 16 at a time (bounded memory);
  - loop: a Python loop of jitted single-example gradient + clip (the Opacus-without-
    vectorisation / naive JAX baseline), then noise and SGD.
The headline `ratio=` is the larger DP-over-non-private overhead of the two workloads
(goal: <= 2 on CPU); `speedup=` is the smaller loop-over-DP speedup.

  python scripts/bench_dpsgd.py
  python scripts/bench_dpsgd.py --quick
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax

from fljax import config as config_lib
from fljax.timing import classifier_workload, timed
from privacy import clipping, dpsgd


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchConfig:
  """The benchmark's sizes.

  Attributes:
    quick: batches of 16 and 32 instead of 64 and 256 (a few seconds).
    repeats: timed repetitions of each step (none: 10, or 3 with --quick).
  """

  quick: bool = False
  repeats: int | None = None

  def __post_init__(self):
    if self.repeats is not None and self.repeats < 1:
      raise ValueError(f"--repeats must be >= 1, got {self.repeats}")


def workload(name, shape, batch, repeats, loop_rows):
  _, params, loss_fn, data = classifier_workload(name, shape, batch)
  cfg = dpsgd.DPSGDConfig(clip_norm=1.0, noise_multiplier=1.0, batch_size=batch)
  sgd = optax.sgd(0.1)
  private = dpsgd.dp_optimizer(cfg, sgd, key=jax.random.key(1))
  key = jax.random.key(2)
  plain_step = jax.jit(dpsgd.make_batch_step(loss_fn, cfg, sgd, private=False))

  def dp_step_fn(micro):
    return jax.jit(dpsgd.make_batch_step(
        loss_fn, dataclasses.replace(cfg, microbatch_size=micro), private))

  one_grad = jax.jit(lambda p, b: clipping.clip_rows(
      jax.tree.map(lambda g: g[None], jax.grad(lambda q: loss_fn(q, b, None)[0])(p)), 1.0)[0])
  add = jax.jit(lambda a, g: jax.tree.map(lambda x, y: x + y[0], a, g))
  finish = jax.jit(lambda p, s, total: (lambda us: (optax.apply_updates(p, us[0]), us[1]))(
      private.update(total, s, p)))
  rows = [jax.tree.map(lambda a: a[i:i + 1], data) for i in range(loop_rows)]

  def loop_step(p, s):
    total = jax.tree.map(jnp.zeros_like, p)
    for b in rows:
      total = add(total, one_grad(p, b))
    return finish(p, s, total)

  t_plain = timed(lambda: jax.block_until_ready(plain_step(params, sgd.init(params), data, key)),
                  repeats)
  t_dp, t_micro = (timed(lambda f=dp_step_fn(m): jax.block_until_ready(
      f(params, private.init(params), data, key)), repeats) for m in (0, 16))
  # The loop's cost is linear in rows: time loop_rows of them and scale to the batch.
  t_loop = timed(lambda: jax.block_until_ready(loop_step(params, private.init(params))),
                 max(1, repeats // 2)) * batch / loop_rows
  return t_plain, t_dp, t_micro, t_loop


def main(argv=None):
  args, _ = config_lib.parse(BenchConfig, argv, description=__doc__.split("\n")[0])
  repeats = args.repeats or (3 if args.quick else 10)
  cases = [("lenet", (32, 32, 3), 16 if args.quick else 64),
           ("cnn", (28, 28, 1), 32 if args.quick else 256)]
  print(f"backend={jax.default_backend()} devices={jax.device_count()}")
  print(f"{'model':>6} {'batch':>5} {'plain ms':>9} {'DP ms':>8} {'DP mb16 ms':>10} "
        f"{'loop ms':>9} {'DP/plain':>8} {'loop/DP':>8}")
  overheads, speedups = [], []
  for name, shape, batch in cases:
    t_plain, t_dp, t_micro, t_loop = workload(name, shape, batch, repeats,
                                              loop_rows=min(batch, 16 if args.quick else 64))
    overheads.append(t_dp / t_plain)
    speedups.append(t_loop / t_dp)
    print(f"{name:>6} {batch:>5} {1e3 * t_plain:9.2f} {1e3 * t_dp:8.2f} {1e3 * t_micro:10.2f} "
          f"{1e3 * t_loop:9.1f} {overheads[-1]:8.2f} {speedups[-1]:8.1f}")
  print(f"RESULT bench_dpsgd ratio={max(overheads):.2f} speedup={min(speedups):.1f} "
        f"lenet_overhead={overheads[0]:.2f} cnn_overhead={overheads[1]:.2f}")


if __name__ == "__main__":
  main()
