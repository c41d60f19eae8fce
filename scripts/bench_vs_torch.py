"""Benchmark: fljax's training steps against PyTorch, Opacus and torch.func on this machine.

The same steps on the same shapes (`fljax.peers`): DLG's LeNet on 32x32x3 at batch 64 and
the TF-Privacy MNIST CNN on 28x28x1 at batch 256; one SGD step each, non-private and
DP-SGD (clip each example to C = 1, Gaussian noise sigma = 1). fljax runs its jitted steps
(DP by vmap, its default, and by ghost norms); torch runs eagerly with its default threads.
Each framework runs in its own worker process (`fljax.timing.Worker`), so neither's
thread pool slows the other's calls. Every variant is timed in rounds, round robin (each
round: `repeats` calls of each, after a warm-up), and reports the median over all calls
with the spread of the round medians.

  pip install -e '.[peers]'          # torch==2.13.0 (CPU) and opacus==1.6.0
  python scripts/bench_vs_torch.py [--quick]

Ends with `RESULT bench_vs_torch dp_ratio=<Opacus ms / fljax DP ms, worst model>
plain_ratio=<torch ms / fljax ms, worst model> dp_ratio_vmap=<the same with vmap>
dp_ratio_1slice=... plain_ratio_1slice=...` (the last two unsliced). fljax's DP step is its
default, clipping 'auto', which takes ghost norms on both models, and slices 'auto', one
slice of the batch per CPU core.
"""

import dataclasses
import sys

from fljax import config as config_lib
from fljax import peers
from fljax.timing import Worker, classifier_workload, round_robin, serve


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchConfig:
  """The benchmark's sizes.

  Attributes:
    quick: batches of 16 and 32 instead of 64 and 256, 2 rounds of 3 (seconds).
    repeats: timed calls of each variant per round (none: 10, or 3 with --quick).
    rounds: rounds of the round robin (none: 3, or 2 with --quick).
    worker: internal: serve one framework's steps (torch or fljax) to the parent.
  """

  quick: bool = False
  repeats: int | None = None
  rounds: int | None = None
  worker: str = ""

  def __post_init__(self):
    for name in ("repeats", "rounds"):
      if getattr(self, name) is not None and getattr(self, name) < 1:
        raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
    if self.worker not in ("", "torch", "fljax"):
      raise ValueError(f"--worker must be torch or fljax, got {self.worker!r}")


def fljax_steps(name, shape, batch):
  """fljax's jitted plain and DP steps (vmap and ghost) on its twin of the batch, as its
  defaults slice the batch (one slice per CPU core), and the plain and ghost steps
  unsliced (the same steps before slicing was the default)."""
  import jax
  import optax

  from privacy import dpsgd
  _, params, loss_fn, data = classifier_workload(name, shape, batch)
  sgd, key = optax.sgd(0.1), jax.random.key(2)
  out = {}
  for variant, clipping, slices in (
      ("fljax", None, 0), ("fljax DP (vmap)", "vmap", 0), ("fljax DP (ghost)", "ghost", 0),
      ("fljax 1 slice", None, 1), ("fljax DP 1 slice", "ghost", 1)):
    cfg = dpsgd.DPSGDConfig(clip_norm=1.0, noise_multiplier=1.0, batch_size=batch,
                            sampling="fixed", clipping=clipping or "vmap", slices=slices)
    tx = dpsgd.dp_optimizer(cfg, sgd, key=jax.random.key(1)) if clipping else sgd
    step = jax.jit(dpsgd.make_batch_step(loss_fn, cfg, tx, private=bool(clipping)))
    out[variant] = lambda step=step, state=tx.init(params): jax.block_until_ready(
        step(params, state, data, key))
  return out


def main(argv=None):
  args, _ = config_lib.parse(BenchConfig, argv, description=__doc__.split("\n")[0])
  peers.require_or_exit()
  cases = [("lenet", (32, 32, 3), 16 if args.quick else 64),
           ("cnn", (28, 28, 1), 32 if args.quick else 256)]
  if args.worker:
    build = peers.steps if args.worker == "torch" else fljax_steps
    serve({f"{name} {k}": fn for name, shape, batch in cases
           for k, fn in build(name, shape, batch).items()})
    return
  repeats = args.repeats or (3 if args.quick else 10)
  rounds = args.rounds or (2 if args.quick else 3)
  command = [sys.executable, __file__] + (["--quick"] if args.quick else [])
  workers = [Worker(command + ["--worker", side]) for side in ("torch", "fljax")]
  print(f"{peers.versions()}; one process each; {rounds} rounds x {repeats} calls each")
  times = round_robin(workers, repeats, rounds)
  for worker in workers:
    worker.close()
  print(f"{'model':>6} {'batch':>5} {'variant':>18} {'ms':>9} {'round medians':>17}")
  ratios = {}
  for name, _, batch in cases:
    for k, (ms, lo, hi) in times.items():
      if k.startswith(name + " "):
        print(f"{name:>6} {batch:>5} {k[len(name) + 1:]:>18} {ms:9.2f} {lo:8.2f}-{hi:<8.2f}")
    ms = {k[len(name) + 1:]: v[0] for k, v in times.items() if k.startswith(name + " ")}
    for key, peer, ours in (("dp_ratio", "opacus", "fljax DP (ghost)"),
                            ("plain_ratio", "torch", "fljax"),
                            ("dp_ratio_vmap", "opacus", "fljax DP (vmap)"),
                            ("dp_ratio_1slice", "opacus", "fljax DP 1 slice"),
                            ("plain_ratio_1slice", "torch", "fljax 1 slice")):
      ratios.setdefault(key, []).append(ms[peer] / ms[ours])
  print("RESULT bench_vs_torch " + " ".join(f"{k}={min(v):.2f}" for k, v in ratios.items()))


if __name__ == "__main__":
  main()
