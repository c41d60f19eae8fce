"""Benchmark: the CNN's 2x2 stride-1 max-pool as four shifted slices (`models.max_pool_2x2`,
the default) against flax's `nn.max_pool` (XLA's reduce-window, whose gradient is a
select-and-scatter), the same function, on the same inputs in this process:
  - the training step: one jitted gradient of the mean loss of a batch (256; --quick 32);
  - the attack step: one jitted DLG evaluation at B = 1, the matching loss's value and its
    gradient with respect to the dummy image (a double backward).
The headline `step_speedup=` is nn.max_pool's time over the slices' for the training step
(> 1: the slices are faster); `attack_speedup=` the same for the attack step.

  python scripts/bench_max_pool.py
  python scripts/bench_max_pool.py --quick
"""

import dataclasses

import jax
import jax.numpy as jnp

from fljax import config as config_lib
from fljax import federated as fed
from fljax import models
from fljax.partitions import Batch
from fljax.timing import timed


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchConfig:
  """The benchmark's sizes.

  Attributes:
    quick: a batch of 32 instead of 256, 5 repetitions (seconds).
    repeats: timed repetitions of each step (none: 20, or 5 with --quick).
  """

  quick: bool = False
  repeats: int | None = None

  def __post_init__(self):
    if self.repeats is not None and self.repeats < 1:
      raise ValueError(f"--repeats must be >= 1, got {self.repeats}")


def steps(pool: str, batch: int):
  """The jitted training step and DLG evaluation of the CNN with `pool`, and their inputs."""
  model = models.CNN(num_classes=10, pool=pool)
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.uniform(keys[0], (batch, 28, 28, 1))
  y = jax.random.randint(keys[1], (batch,), 0, 10)
  params = model.init(keys[2], x[:1])
  loss_fn = fed.make_loss_fn(model.apply)
  data = Batch(x=x, y=y, mask=jnp.ones((batch,)))
  grad = jax.jit(lambda p: jax.grad(lambda q: loss_fn(q, data, None)[0])(p))
  one = Batch(x=x[:1], y=y[:1], mask=jnp.ones((1,)))
  target = jax.grad(lambda q: loss_fn(q, one, None)[0])(params)

  def matching(dummy):
    trial = jax.grad(lambda q: loss_fn(q, Batch(x=dummy, y=y[:1], mask=one.mask), None)[0])(params)
    return sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(trial), jax.tree.leaves(target)))

  attack = jax.jit(jax.value_and_grad(matching))
  return (lambda: jax.block_until_ready(grad(params)),
          lambda: jax.block_until_ready(attack(0.5 * jnp.ones_like(x[:1]))))


def main(argv=None):
  args, _ = config_lib.parse(BenchConfig, argv, description=__doc__.split("\n")[0])
  repeats = args.repeats or (5 if args.quick else 20)
  batch = 32 if args.quick else 256
  print(f"backend={jax.default_backend()} devices={jax.device_count()} batch={batch}")
  times = {}
  for _ in range(2):  # round robin: each variant timed twice, the faster median kept
    for pool in ("flax", "slices"):
      train, attack = steps(pool, batch)
      t = (timed(train, repeats), timed(attack, repeats))
      times[pool] = tuple(min(a, b) for a, b in zip(times.get(pool, t), t))
  print(f"{'pool':>7} {'train step ms':>14} {'DLG evaluation ms':>18}")
  for pool, (t_train, t_attack) in times.items():
    print(f"{pool:>7} {1e3 * t_train:14.2f} {1e3 * t_attack:18.3f}")
  print(f"RESULT bench_max_pool step_speedup={times['flax'][0] / times['slices'][0]:.2f} "
        f"attack_speedup={times['flax'][1] / times['slices'][1]:.2f}")


if __name__ == "__main__":
  main()
