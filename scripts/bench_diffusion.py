"""Benchmark: diffusion training step time, and sampling throughput batched vs one image
at a time, for the shipped prior's UNet (MNIST 32x32x1, class-conditional).

  (a) training: seconds per Adam step at batch --batch_size (loss, grads, EMA);
  (b) sampling, DDIM 50 steps and DDPM 1000 steps: --images images in one jitted
      lax.scan over a batch, vs the same jitted sampler called on one image at a time
      (--single images, extrapolated per image).
`ratio=` on the RESULT line is batched over one-at-a-time DDIM throughput (images/s).

  python scripts/bench_diffusion.py            # the shipped config
  python scripts/bench_diffusion.py --quick    # a tiny UNet, 8x8, seconds
"""

import dataclasses
import time

import jax
import jax.numpy as jnp

from diffusion import samplers, schedules, training, unet
from diffusion import prior as prior_lib
from fljax import config as config_lib


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchConfig:
  """The benchmark's sizes.

  Attributes:
    quick: a tiny UNet at 8x8 and 8 images (seconds) instead of the shipped 32x32 one.
    images: images per batched sampling run (none: 32, or 8 with --quick).
    single: images sampled one at a time.
    batch_size: training batch size.
  """

  quick: bool = False
  images: int | None = None
  single: int = 2
  batch_size: int = 64

  def __post_init__(self):
    if min(self.images or 1, self.single, self.batch_size) < 1:
      raise ValueError("--images, --single and --batch_size must be >= 1")


def _time(fn, *args, repeats=1):
  jax.block_until_ready(fn(*args))  # compile
  t0 = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / repeats


def main(argv=None):
  args, _ = config_lib.parse(BenchConfig, argv, description=__doc__.split("\n")[0])
  if args.quick:
    config = training.TrainConfig(block_out_channels=(16,), down_block_types=("AttnDownBlock2D",),
                                  up_block_types=("AttnUpBlock2D",), norm_num_groups=4, attention_head_dim=8)
    shape, ddpm_steps = (8, 8, 1), 100
  else:
    config, shape, ddpm_steps = training.TrainConfig(), (32, 32, 1), 1000
  images = args.images or (8 if args.quick else 32)
  ucfg = config.unet_config(shape, 10)
  params = unet.init(ucfg, key=jax.random.key(0))
  schedule = schedules.linear(1000)
  prior = prior_lib.Prior(unet_config=ucfg, params=params, schedule=schedule, num_classes=10)
  print(f"backend={jax.default_backend()} UNet {unet.count_params(params):,} parameters, {shape}")

  loss_fn = training.make_loss_fn(unet.UNet(ucfg), schedule, label_dropout=0.1)
  optimizer = training.make_optimizer(config)
  data = jnp.zeros((256, *shape)), jnp.zeros((256,), jnp.int32)
  state = training.TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                              opt_state=optimizer.init(params), key=jax.random.key(1))
  step = jax.jit(training.make_train_step(loss_fn, optimizer, *data, batch_size=args.batch_size,
                                          ema_decay=0.999))
  train_s = _time(lambda s: step(s)[1]["loss"], state, repeats=3)
  print(f"training: {train_s:.3f} s/step at batch {args.batch_size}")

  rates = {}
  for name, sampler in (("ddim50", samplers.ddim(schedule, num_steps=50)),
                        (f"ddpm{ddpm_steps}", samplers.ddpm(schedule, num_steps=ddpm_steps))):
    run = jax.jit(lambda x, y, k: samplers.run(sampler, prior.denoiser(y), x, key=k))
    x = jax.random.normal(jax.random.key(2), (images, *shape))
    y = jnp.arange(images) % 10
    batched = _time(run, x, y, jax.random.key(3))
    single = _time(lambda: [run(x[i:i + 1], y[i:i + 1], jax.random.key(i)) for i in range(args.single)])
    per_batched, per_single = batched / images, single / args.single
    rates[name] = per_single / per_batched
    print(f"{name}: batched {per_batched:.3f} s/image ({images} images), one at a time "
          f"{per_single:.3f} s/image, ratio {rates[name]:.1f}")
  print(f"RESULT bench_diffusion ratio={rates['ddim50']:.2f} ddpm_ratio={rates[f'ddpm{ddpm_steps}']:.2f} "
        f"train_step_s={train_s:.3f} images={images} backend={jax.default_backend()}")


if __name__ == "__main__":
  main()
