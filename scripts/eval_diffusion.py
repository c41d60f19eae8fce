"""Sample quality of a diffusion prior, scored by a classifier trained here (no Inception).

  python scripts/eval_diffusion.py                       # the shipped MNIST prior
  python scripts/eval_diffusion.py --prior runs/ddpm_mnist/prior --num 1000 --steps 50

Prints one JSON line: the class accuracy of label-conditioned samples and the Frechet
distance in the reference classifier's feature space (samples vs test set), with the
train-vs-test distance as the floor; see diffusion.evaluation. --grid writes a sample grid.
"""

import dataclasses
import json
from pathlib import Path

import jax

from diffusion import evaluation, training
from diffusion import prior as prior_lib
from fljax import config as config_lib
from fljax import datasets


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
  """Attributes:
    prior: a prior folder (default: the shipped MNIST prior).
    dataset: the fljax dataset the prior was trained on.
    data_dir: its folder or TFDS data_dir, where it needs one.
    num: samples (and test images) to compare.
    steps: DDIM steps.
    guidance_weight: classifier-free guidance weight (0: plain conditional sampling).
    seed: sampling seed.
    cache_dir: where the reference classifier is cached.
    grid: write a sample grid (one row per class) to this PNG.
    out: also write the JSON to this file.
  """

  prior: str = str(prior_lib.MNIST_PRIOR)
  dataset: str = "mnist"
  data_dir: str | None = None
  num: int = 1000
  steps: int = 50
  guidance_weight: float = 0.0
  seed: int = 0
  cache_dir: str | None = "runs/cache"
  grid: str | None = None
  out: str | None = None


def main(argv=None):
  config, _ = config_lib.parse(EvalConfig, argv, description=__doc__.splitlines()[0])
  try:
    prior = prior_lib.load(config.prior)
    h, w, c = prior.unet_config.input_shape
    ds = datasets.load(config.dataset, image_size=h, channels=c, data_dir=config.data_dir)
    result = evaluation.evaluate(prior, ds, key=jax.random.key(config.seed), num=config.num,
                                 num_steps=config.steps, guidance_weight=config.guidance_weight,
                                 cache_dir=config.cache_dir)
  except (prior_lib.PriorError, datasets.DatasetError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None
  if config.grid:
    from fljax.plots import save_image_grid
    save_image_grid(config.grid, training.sample_grid(prior, key=jax.random.key(config.seed + 1),
                                                      num_steps=config.steps,
                                                      guidance_weight=config.guidance_weight))
  line = json.dumps({"prior": config.prior, **result})
  if config.out:
    Path(config.out).write_text(line + "\n")
  print(line)


if __name__ == "__main__":
  main()
