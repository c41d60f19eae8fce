"""Benchmark: the non-private step split into one independent slice of the batch per core
against the unsplit step on this CPU.

On a CPU, XLA runs each op of a small model on all cores and pays for the hand-offs; it
also runs independent ops concurrently. The split step computes the gradient of each of
`--slices` slices of the batch separately and sums them (`privacy.dpsgd.make_batch_step`
with `DPSGDConfig.slices`: the same gradient, summation order aside; the default, slices
0, is one per core). Each variant runs in its own worker process, round robin
(`fljax.timing.round_robin`), on DLG's LeNet (32x32x3, batch 64) and the MNIST CNN
(28x28x1, batch 256). `--flag` runs the split worker under
`XLA_FLAGS=--xla_cpu_multi_thread_eigen=false` (one thread an op), which an earlier note
thought the split needed; on jax 0.10.2 it changes nothing measurable.

  python scripts/bench_cpu_split.py [--quick] [--flag]

Ends with `RESULT bench_cpu_split speedup=<unsplit ms / split ms, worst model>`.
"""

import dataclasses
import os
import sys

from fljax import config as config_lib
from fljax.timing import Worker, classifier_workload, round_robin, serve

FLAG = "--xla_cpu_multi_thread_eigen=false"


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchConfig:
  """The benchmark's sizes.

  Attributes:
    quick: batches of 16 and 32, 2 rounds of 3 calls (seconds; too small to split).
    slices: slices of the batch (none: the number of cores).
    flag: run the split worker under XLA_FLAGS=--xla_cpu_multi_thread_eigen=false.
    worker: internal: serve one variant (ordinary or split) to the parent.
  """

  quick: bool = False
  slices: int | None = None
  flag: bool = False
  worker: str = ""

  def __post_init__(self):
    if self.slices is not None and self.slices < 1:
      raise ValueError(f"--slices must be >= 1, got {self.slices}")
    if self.worker not in ("", "ordinary", "split"):
      raise ValueError(f"--worker must be ordinary or split, got {self.worker!r}")


def main(argv=None):
  args, _ = config_lib.parse(BenchConfig, argv, description=__doc__.split("\n")[0])
  cases = [("lenet", (32, 32, 3), 16 if args.quick else 64),
           ("cnn", (28, 28, 1), 32 if args.quick else 256)]
  slices = args.slices or os.cpu_count() or 1
  if args.worker:
    import jax
    import optax

    from privacy import dpsgd
    fns = {}
    for name, shape, batch in cases:
      _, params, loss_fn, data = classifier_workload(name, shape, batch)
      cfg = dpsgd.DPSGDConfig(batch_size=batch, sampling="fixed",
                              slices=slices if args.worker == "split" else 1)
      step = jax.jit(dpsgd.make_batch_step(loss_fn, cfg, optax.sgd(0.1), private=False))
      state, key = optax.sgd(0.1).init(params), jax.random.key(2)
      fns[f"{name} {args.worker}"] = lambda step=step, p=params, s=state, d=data: (
          jax.block_until_ready(step(p, s, d, key)))
    serve(fns)
    return
  command = [sys.executable, __file__, "--slices", str(slices)]
  command += ["--quick"] if args.quick else []
  env = None
  if args.flag:
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + FLAG).strip())
  workers = [Worker(command + ["--worker", "ordinary"]),
             Worker(command + ["--worker", "split"], env=env)]
  times = round_robin(workers, 3 if args.quick else 10, 2 if args.quick else 3)
  for worker in workers:
    worker.close()
  print(f"{slices} slices{f', split worker under XLA_FLAGS={FLAG}' if args.flag else ''}; "
        f"ms per step, median (round medians)")
  speedups = []
  for name, _, batch in cases:
    (a, alo, ahi), (b, blo, bhi) = times[f"{name} ordinary"], times[f"{name} split"]
    speedups.append(a / b)
    print(f"{name:>6} batch {batch:>4}: ordinary {a:7.2f} ({alo:.2f}-{ahi:.2f})  split "
          f"{b:7.2f} ({blo:.2f}-{bhi:.2f})  speedup {a / b:.2f}")
  print(f"RESULT bench_cpu_split speedup={min(speedups):.2f}")


if __name__ == "__main__":
  main()
