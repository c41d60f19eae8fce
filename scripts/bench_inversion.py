"""Benchmark: DLG on many victims in one compiled computation vs a loop over victims.

DLG (Adam and L-BFGS) on the untrained DLG LeNet (uniform(-0.5, 0.5) weights), 32x32x3
inputs, batch 1 (iDLG labels), V victims from the embedded MNIST, `--steps` iterations:
  (a) batched: all victims' attacks in one jitted computation (jax.vmap; lax.map one
      victim at a time; lax.map over groups of 8 vmapped victims);
  (b) loop: one victim at a time, a Python loop calling the jitted single-victim attack.
It prints victim-attacks per hour and the median PSNR; `ratio=` on the RESULT line is
the best batched mode over the loop, for Adam.

  python scripts/bench_inversion.py            # 32 victims, 300 steps
  python scripts/bench_inversion.py --quick    # 4 victims, 20 steps
"""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from fljax import config as config_lib
from fljax import datasets, models
from fljax import federated as fed
from fljax.partitions import Batch
from inversion import metrics
from inversion import observation as ob
from inversion.attacks import dlg


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchConfig:
  """The benchmark's sizes.

  Attributes:
    quick: 4 victims and 20 steps (a few seconds) unless given.
    victims: V, MNIST test images attacked (none: 32, or 4 with --quick).
    steps: attack iterations (none: 300, or 20 with --quick).
  """

  quick: bool = False
  victims: int | None = None
  steps: int | None = None

  def __post_init__(self):
    for name in ("victims", "steps"):
      if getattr(self, name) is not None and getattr(self, name) < 1:
        raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")


def main(argv=None):
  args, _ = config_lib.parse(BenchConfig, argv, description=__doc__.split("\n")[0])
  victims = args.victims or (4 if args.quick else 32)
  steps = args.steps or (20 if args.quick else 300)
  ds = datasets.load("mnist", image_size=32, channels=3, test_subset=max(victims, 10))
  model = models.make("lenet", num_classes=10, input_shape=ds.image_shape, init="uniform")
  params = model.init(jax.random.key(0))
  threat = ob.ThreatModel(batch_size=1, input_shape=ds.image_shape, num_classes=10)
  client_update = jax.jit(fed.make_client_update(fed.make_loss_fn(model.apply),
                                                 fed.FedConfig(algorithm="fedsgd")))
  xs = jnp.asarray(ds.x_test[:victims, None])
  ys = jnp.asarray(ds.y_test[:victims, None])
  obs = jax.vmap(lambda x, y: ob.Observation(
      update=client_update(params, Batch(x=x, y=y, mask=jnp.ones(1)), jax.random.key(0))[0],
      params=params))(xs, ys)
  keys = jax.random.split(jax.random.key(1), victims)
  print(f"backend={jax.default_backend()} {victims} victims, {steps} steps, LeNet 32x32x3")
  print(f"{'optimizer':>9} {'mode':>6} {'seconds':>8} {'attacks/hour':>12} {'median PSNR':>11}")
  ratios = {}
  for optimizer in ("adam", "lbfgs"):
    attack = dlg.make(model.apply, threat, dlg.DLGConfig(optimizer=optimizer))

    def run(key, o):
      state = attack.init(key, o)
      state, _ = jax.lax.scan(lambda s, _: attack.step(s, o), state, None, length=steps)
      return state.x

    rates = {}
    for mode in ("vmap", "map", "map8", "loop"):
      if mode == "loop":
        single = jax.jit(run)
        one = lambda i: single(keys[i], jax.tree.map(lambda a: a[i], obs))  # noqa: E731
        jax.block_until_ready(one(0))  # compile
        t0 = time.perf_counter()
        out = jnp.stack([jax.block_until_ready(one(i)) for i in range(victims)])
      else:
        batched = jax.jit(fed.batch_over(run, "map", 8) if mode == "map8" else
                          fed.batch_over(run, mode))
        jax.block_until_ready(batched(keys, obs))  # compile
        t0 = time.perf_counter()
        out = jax.block_until_ready(batched(keys, obs))
      seconds = time.perf_counter() - t0
      rates[mode] = victims * 3600 / seconds
      psnr = np.median(np.asarray(metrics.psnr(jnp.clip(out[:, 0], 0, 1), xs[:, 0])))
      print(f"{optimizer:>9} {mode:>6} {seconds:8.2f} {rates[mode]:12.0f} {psnr:11.1f}")
    ratios[optimizer] = max(rates["vmap"], rates["map"], rates["map8"]) / rates["loop"]
  print(f"RESULT bench_inversion ratio={ratios['adam']:.2f} lbfgs_ratio={ratios['lbfgs']:.2f} "
        f"victims={victims} steps={steps} backend={jax.default_backend()}")


if __name__ == "__main__":
  main()
