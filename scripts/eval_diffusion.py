"""Sample quality of a diffusion or GAN prior, scored by a classifier trained here (no Inception).

  python scripts/eval_diffusion.py                       # the shipped MNIST prior
  python scripts/eval_diffusion.py --prior runs/ddpm_mnist/prior --num 1000 --steps 50 \
      --workdir runs/eval_ddpm_mnist --grid
  python scripts/eval_diffusion.py --gan inversion/priors/fashion_mnist_dcgan \
      --data.name fashion_mnist --num 500            # a GAN prior (unconditional)

Prints one JSON line: the class accuracy of label-conditioned samples and the Frechet
distance in the reference classifier's feature space (samples vs test set), with the
train-vs-test distance as the floor; see diffusion.evaluation. With --workdir the line is
also written to <workdir>/eval.json, and --grid draws <workdir>/samples.png.
"""

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np

from diffusion import evaluation, training
from diffusion import prior as prior_lib
from fljax import config as config_lib
from fljax import datasets


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
  """One evaluation of a prior.

  Attributes:
    prior: a prior folder (default: the shipped MNIST prior).
    data: the dataset the prior was trained on.
    num: samples (and test images) to compare.
    steps: DDIM steps.
    guidance_weight: classifier-free guidance weight (0: plain conditional sampling).
    seed: sampling seed.
    cache_dir: where the reference classifier is cached (none: not cached).
    workdir: output folder for eval.json and samples.png (none: print only).
    grid: also draw samples.png in --workdir, one row per class.
    gan: score this GAN prior folder instead of --prior (unconditional samples: no class
      accuracy; the class shares' total variation shows mode collapse).
  """

  prior: str = str(prior_lib.MNIST_PRIOR)
  data: datasets.Source = datasets.Source()
  num: int = 1000
  steps: int = 50
  guidance_weight: float = 0.0
  seed: int = 0
  cache_dir: str | None = "runs/cache"
  workdir: str | None = None
  grid: bool = False
  gan: str | None = None

  def __post_init__(self):
    if self.num < 1 or self.steps < 1:
      raise ValueError(f"--num and --steps must be >= 1, got {self.num} and {self.steps}")
    if self.grid and self.workdir is None:
      raise ValueError("--grid draws samples.png into --workdir: pass --workdir too")
    if self.gan and self.grid:
      raise ValueError("--grid draws a diffusion prior's class rows; a GAN's training run "
                       "already wrote its samples.png")


def main(argv=None):
  config, _ = config_lib.parse(EvalConfig, argv, description=__doc__.splitlines()[0])
  workdir = Path(config.workdir) if config.workdir else None
  try:
    if workdir is not None:
      workdir.mkdir(parents=True, exist_ok=True)
    if config.gan:
      result = _score_gan(config)
    else:
      prior = prior_lib.load(config.prior)
      h, w, c = prior.unet_config.input_shape
      ds = config.data.load(image_size=h, channels=c)
      result = evaluation.evaluate(prior, ds, key=jax.random.key(config.seed), num=config.num,
                                   num_steps=config.steps,
                                   guidance_weight=config.guidance_weight,
                                   cache_dir=config.cache_dir)
  except (prior_lib.PriorError, datasets.DatasetError, ValueError, OSError) as e:
    raise SystemExit(f"error: {e}") from None
  line = json.dumps({"prior": config.gan or config.prior, **result})
  if workdir is not None:
    (workdir / "eval.json").write_text(line + "\n")
  if config.grid:
    from fljax.plots import save_image_grid
    save_image_grid(workdir / "samples.png",
                    training.sample_grid(prior, key=jax.random.key(config.seed + 1),
                                         num_steps=config.steps,
                                         guidance_weight=config.guidance_weight))
  print(line)


def _score_gan(config: EvalConfig) -> dict:
  from inversion import gan as gan_lib
  g = gan_lib.load(config.gan)
  h, _, c = g.image_shape
  ds = config.data.load(image_size=h, channels=c)
  k_latent, k_test, k_train = jax.random.split(jax.random.key(config.seed), 3)
  z = jax.random.normal(k_latent, (config.num, g.config.latent_dim))
  x = jax.jit(lambda z: gan_lib.to_unit(gan_lib.generate(g, g.variables, z)))(z)
  return evaluation.score(np.clip(np.asarray(x), 0.0, 1.0), ds, test_key=k_test,
                          train_key=k_train, cache_dir=config.cache_dir)


if __name__ == "__main__":
  main()
