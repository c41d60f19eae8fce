"""Benchmark: fljax's training steps against PyTorch, Opacus and torch.func on this machine.

The same steps on the same shapes (`fljax.peers`): DLG's LeNet on 32x32x3 at batch 64 and
the TF-Privacy MNIST CNN on 28x28x1 at batch 256; one SGD step each, non-private and
DP-SGD (clip each example to C = 1, Gaussian noise sigma = 1). fljax runs its jitted steps
(DP by vmap, its default, and by ghost norms); torch runs eagerly with its default threads.
Every variant is timed in rounds, round robin (each round: `repeats` calls of each, after a
warm-up), and reports the median over all calls with the spread of the round medians.

  pip install -e '.[peers]'          # torch==2.13.0 (CPU) and opacus==1.6.0
  python scripts/bench_vs_torch.py [--quick]

Ends with `RESULT bench_vs_torch dp_ratio=<Opacus ms / fljax DP ms, worst model>
plain_ratio=<torch ms / fljax ms, worst model> dp_ratio_ghost=<the same with ghost>`.
"""

import dataclasses
import statistics
import sys
import time

import jax
import optax

from fljax import config as config_lib
from fljax import peers
from fljax.timing import classifier_workload
from privacy import dpsgd


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchConfig:
  """The benchmark's sizes.

  Attributes:
    quick: batches of 16 and 32 instead of 64 and 256, 2 rounds of 3 (seconds).
    repeats: timed calls of each variant per round (none: 10, or 3 with --quick).
    rounds: rounds of the round robin (none: 3, or 2 with --quick).
  """

  quick: bool = False
  repeats: int | None = None
  rounds: int | None = None

  def __post_init__(self):
    for name in ("repeats", "rounds"):
      if getattr(self, name) is not None and getattr(self, name) < 1:
        raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")


def fljax_steps(name, shape, batch):
  """fljax's jitted plain and DP steps (vmap and ghost) on its twin of the batch."""
  _, params, loss_fn, data = classifier_workload(name, shape, batch)
  sgd = optax.sgd(0.1)
  plain = jax.jit(lambda p, s: (lambda g: optax.apply_updates(p, sgd.update(g, s, p)[0]))(
      jax.grad(lambda q: loss_fn(q, data, None)[0])(p)))
  out = {"fljax": lambda: jax.block_until_ready(plain(params, sgd.init(params)))}
  for clipping in ("vmap", "ghost"):
    cfg = dpsgd.DPSGDConfig(clip_norm=1.0, noise_multiplier=1.0, batch_size=batch,
                            sampling="fixed", clipping=clipping)
    tx = dpsgd.dp_optimizer(cfg, sgd, key=jax.random.key(1))
    clip = dpsgd.CLIPPING[clipping]
    step = jax.jit(lambda p, s, clip=clip, tx=tx: optax.apply_updates(p, tx.update(
        clip(loss_fn, p, data, jax.random.key(2), clip_norm=1.0)[0], s, p)[0]))
    state = tx.init(params)
    out[f"fljax DP ({clipping})"] = lambda step=step, state=state: jax.block_until_ready(
        step(params, state))
  return out


def round_robin(fns, repeats, rounds):
  """{name: (median ms over all calls, min and max of the round medians)}."""
  for fn in fns.values():
    fn()  # compile / warm up
  calls = {k: [] for k in fns}
  medians = {k: [] for k in fns}
  for _ in range(rounds):
    for k, fn in fns.items():
      ts = []
      for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(1e3 * (time.perf_counter() - t0))
      calls[k] += ts
      medians[k].append(statistics.median(ts))
  return {k: (statistics.median(calls[k]), min(medians[k]), max(medians[k])) for k in fns}


def main(argv=None):
  args, _ = config_lib.parse(BenchConfig, argv, description=__doc__.split("\n")[0])
  try:
    peers.require()
  except peers.PeersMissing as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  import torch
  repeats = args.repeats or (3 if args.quick else 10)
  rounds = args.rounds or (2 if args.quick else 3)
  cases = [("lenet", (32, 32, 3), 16 if args.quick else 64),
           ("cnn", (28, 28, 1), 32 if args.quick else 256)]
  print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); {rounds} rounds x {repeats} calls each")
  print(f"{'model':>6} {'batch':>5} {'variant':>18} {'ms':>9} {'round medians':>17}")
  ratios = {"dp": [], "plain": [], "dp_ghost": []}
  for name, shape, batch in cases:
    times = round_robin({**peers.steps(name, shape, batch), **fljax_steps(name, shape, batch)},
                        repeats, rounds)
    for k, (ms, lo, hi) in times.items():
      print(f"{name:>6} {batch:>5} {k:>18} {ms:9.2f} {lo:8.2f}-{hi:<8.2f}")
    ratios["dp"].append(times["opacus"][0] / times["fljax DP (vmap)"][0])
    ratios["dp_ghost"].append(times["opacus"][0] / times["fljax DP (ghost)"][0])
    ratios["plain"].append(times["torch"][0] / times["fljax"][0])
  print(f"RESULT bench_vs_torch dp_ratio={min(ratios['dp']):.2f} "
        f"plain_ratio={min(ratios['plain']):.2f} dp_ratio_ghost={min(ratios['dp_ghost']):.2f}")


if __name__ == "__main__":
  main()
