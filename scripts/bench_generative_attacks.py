"""Benchmark: the diffusion-guided attack (`dps`, feature-conditioned, the shipped MNIST
prior) on many victims and seeds in one compiled sampler vs one victim at a time.

Untrained DLG LeNet (uniform(-0.5, 0.5)), 32x32x3 MNIST victims, batch 1, iDLG labels, DDIM
(eta 1) with `--steps` guided steps. V victims x R seeds:
  (a) batched: all V x R runs in one jitted computation (vmap; lax.map over --group-run groups);
  (b) loop: one (victim, seed) run at a time, a Python loop over the jitted single run,
      timed on the first `--loop_runs` runs (throughput does not depend on which).
It prints runs per hour, the median PSNR of each victim's selected seed (lowest final
matching loss) and the evaluations one victim costs; `ratio=` on the RESULT line is the best
batched mode's throughput over the loop's.

  python scripts/bench_generative_attacks.py            # 16 victims x 4 seeds, 50 steps
  python scripts/bench_generative_attacks.py --quick    # 2 victims x 2 seeds, 4 steps
"""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import prior as prior_lib
from fljax import config as config_lib
from fljax import datasets, models
from fljax import federated as fed
from fljax.partitions import Batch
from inversion import metrics
from inversion import observation as ob
from inversion.attacks import COUNTERS, best, diffusion_guided as dg


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchConfig:
  """The benchmark's sizes (none: the full size, or the --quick one).

  Attributes:
    quick: 2 victims x 2 seeds, 4 steps (seconds) unless given.
    victims: V, MNIST test images attacked (none: 16, or 2).
    seeds: R, attack seeds per victim (none: 4, or 2).
    steps: guided DDIM steps (none: 50, or 4).
    group: runs vmapped per lax.map step.
    loop_runs: runs timed in the one-at-a-time loop (none: 8, or 2).
  """

  quick: bool = False
  victims: int | None = None
  seeds: int | None = None
  steps: int | None = None
  group: int = 8
  loop_runs: int | None = None

  def __post_init__(self):
    if any(v is not None and v < 1 for v in (self.victims, self.seeds, self.steps, self.group,
                                              self.loop_runs)):
      raise ValueError("--victims, --seeds, --steps, --group and --loop_runs must be >= 1")


def main(argv=None):
  args, _ = config_lib.parse(BenchConfig, argv, description=__doc__.split("\n")[0])
  v = args.victims or (2 if args.quick else 16)
  r = args.seeds or (2 if args.quick else 4)
  steps = args.steps or (4 if args.quick else 50)
  loop_runs = min(args.loop_runs or (2 if args.quick else 8), v * r)
  ds = datasets.load("mnist", image_size=32, channels=3, test_subset=max(v, 10))
  model = models.make("lenet", num_classes=10, input_shape=ds.image_shape, init="uniform")
  params = model.init(jax.random.key(0))
  threat = ob.ThreatModel(batch_size=1, input_shape=ds.image_shape, num_classes=10)
  client_update = jax.jit(fed.make_client_update(fed.make_loss_fn(model.apply),
                                                 fed.FedConfig(algorithm="fedsgd")))
  xs, ys = jnp.asarray(ds.x_test[:v, None]), jnp.asarray(ds.y_test[:v, None])
  updates = jax.vmap(lambda x, y: client_update(params, Batch(x=x, y=y, mask=jnp.ones(1)),
                                                jax.random.key(0))[0])(xs, ys)
  # Runs are victim-major: run i attacks victim i // r with seed key i.
  rows = jax.tree.map(lambda a: jnp.repeat(a, r, axis=0), updates)
  keys = jax.random.split(jax.random.key(1), v * r)
  attack = dg.make(model.apply, threat, prior_lib.load(), dg.DiffusionAttackConfig(num_steps=steps),
                   features_fn=model.features)

  def run(key, update):
    o = ob.Observation(update=update, params=params)
    state = attack.init(key, o)
    return jax.lax.scan(lambda s, _: attack.step(s, o), state, None, length=steps)[0]

  print(f"backend={jax.default_backend()} {v} victims x {r} seeds, {steps} DDIM steps, "
        f"LeNet 32x32x3, prior {prior_lib.MNIST_PRIOR.name}")
  print(f"{'mode':>6} {'seconds':>8} {'runs/hour':>10} {'median PSNR':>11}")
  rates, per_victim = {}, None
  for mode in ("vmap", "map", "loop"):
    if mode == "loop":
      single = jax.jit(run)
      one = lambda i: single(keys[i], jax.tree.map(lambda a: a[i], rows))  # noqa: E731
      jax.block_until_ready(one(0))  # compile
      t0 = time.perf_counter()
      for i in range(loop_runs):
        jax.block_until_ready(one(i))
      seconds, runs, psnr = time.perf_counter() - t0, loop_runs, float("nan")
    else:
      batched = jax.jit(fed.batch_over(run, "map", args.group) if mode == "map"
                        else fed.batch_over(run, "vmap"))
      jax.block_until_ready(batched(keys, rows))  # compile
      t0 = time.perf_counter()
      states = jax.block_until_ready(batched(keys, rows))
      seconds, runs = time.perf_counter() - t0, v * r
      stacked = jax.tree.map(lambda a: a.reshape((v, r) + a.shape[1:]), states)
      chosen = jax.vmap(best)(stacked, stacked.loss)
      psnr = float(np.median(np.asarray(metrics.psnr(chosen.x[:, 0], xs[:, 0]))))
      per_victim = np.asarray(stacked.counts).sum(axis=1).mean(axis=0)
    rates[mode] = runs * 3600 / seconds
    print(f"{mode:>6} {seconds:8.2f} {rates[mode]:10.0f} {psnr:11.1f}")
  print("per victim (all seeds): " + ", ".join(f"{n} {c:.0f}" for n, c in zip(COUNTERS, per_victim)))
  ratio = max(rates["vmap"], rates["map"]) / rates["loop"]
  print(f"RESULT bench_generative_attacks ratio={ratio:.2f} vmap_ratio={rates['vmap'] / rates['loop']:.2f} "
        f"map_ratio={rates['map'] / rates['loop']:.2f} victims={v} seeds={r} steps={steps} "
        f"backend={jax.default_backend()}")


if __name__ == "__main__":
  main()
