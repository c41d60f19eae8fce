"""Sample quality without Inception weights: a classifier trained here on the same data.

- class accuracy: the fraction of label-conditioned samples that the reference classifier
  (`fljax.classifier.reference_classifier`) assigns to the label they were drawn for;
- Frechet distance in that classifier's penultimate feature space (Heusel et al. 2017's
  formula ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) on its features, not on
  Inception's): between samples and the test set. It is comparable only between models
  scored with the same classifier and sample count, never with published Inception FIDs.
  The distance between the training and test sets (`reference_fd`) is the floor a
  perfect model would reach with the same counts.
- memorisation: the PSNR of each sample to its nearest training image; a prior that
  copies its training set scores far above held-out test images, whose nearest-training
  PSNR is printed beside it. (It matters here: the inversion attacks use this prior on
  test images, and a copied training image would be a prior, not a reconstruction.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import prior as prior_lib
from diffusion import samplers
from diffusion.training import to_image_range
from fljax import classifier, datasets


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
  """The Frechet distance between Gaussians fitted to feature sets `a [N, D]`, `b [M, D]`."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  mu_a, mu_b = a.mean(0), b.mean(0)
  cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  # Tr (S_a S_b)^(1/2) = Tr (S_a^(1/2) S_b S_a^(1/2))^(1/2), symmetric and PSD, so eigh is
  # stable even when the covariances are singular (saturated features).
  w, v = np.linalg.eigh(cov_a)
  half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  trace_root = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(half @ cov_b @ half), 0, None)))
  return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)


def nearest_psnr(x: np.ndarray, reference: np.ndarray, *, chunk: int = 256) -> np.ndarray:
  """For each image of `x [N, ...]` in [0, 1], the PSNR to its nearest image in `reference`."""
  ref = jnp.asarray(reference.reshape(len(reference), -1))
  ref_sq = jnp.sum(ref ** 2, 1)

  @jax.jit
  def best(q):
    d = jnp.sum(q ** 2, 1)[:, None] - 2 * q @ ref.T + ref_sq[None]
    return jnp.maximum(jnp.min(d, 1), 0.0) / q.shape[1]

  flat = x.reshape(len(x), -1)
  mse = np.concatenate([np.asarray(best(jnp.asarray(flat[i:i + chunk]))) for i in range(0, len(x), chunk)])
  return 10 * np.log10(1.0 / np.maximum(mse, 1e-10))


def generate(prior: prior_lib.Prior, labels: np.ndarray | None, *, key: jax.Array, num: int,
             sampler: str = "ddim", num_steps: int = 50, guidance_weight: float = 0.0,
             batch_size: int = 250) -> np.ndarray:
  """`num` samples in [0, 1] (label-conditioned when `labels [num]` is given), in batches."""
  out = []
  sample_fn = samplers.SAMPLERS[sampler](prior.schedule, num_steps=num_steps, prediction=prior.prediction)

  @jax.jit
  def run(x_T, key, y):
    return to_image_range(samplers.run(sample_fn, prior.denoiser(y, guidance_weight=guidance_weight),
                                       x_T, key=key))

  for i, start in enumerate(range(0, num, batch_size)):
    n = min(batch_size, num - start)
    k_noise, k_run = jax.random.split(jax.random.fold_in(key, i))
    x_T = jax.random.normal(k_noise, (n, *prior.unet_config.input_shape))
    y = None if labels is None else jnp.asarray(labels[start:start + n])
    out.append(np.asarray(run(x_T, k_run, y)))
  return np.concatenate(out)


def evaluate(prior: prior_lib.Prior, ds: datasets.Dataset, *, key: jax.Array, num: int = 1000,
             num_steps: int = 50, guidance_weight: float = 0.0, cache_dir: str | None = None,
             classifier_steps: int = 400) -> dict[str, float]:
  """Class accuracy of conditional samples, and Frechet distances in the reference
  classifier's feature space (samples vs test set, and the train-vs-test floor)."""
  if ds.image_shape != prior.unet_config.input_shape:
    raise ValueError(f"the prior makes {prior.unet_config.input_shape} images, the dataset holds "
                     f"{ds.image_shape}; load it with the prior's image_size and channels")
  k_labels, k_gen, k_test, k_train = jax.random.split(key, 4)
  labels = None
  if prior.num_classes:
    labels = np.asarray(jax.random.randint(k_labels, (num,), 0, prior.num_classes))
  x = generate(prior, labels, key=k_gen, num=num, num_steps=num_steps, guidance_weight=guidance_weight)
  return {**score(x, ds, test_key=k_test, train_key=k_train, labels=labels, cache_dir=cache_dir,
                  classifier_steps=classifier_steps),
          "ddim_steps": num_steps, "guidance_weight": guidance_weight}


def score(x: np.ndarray, ds: datasets.Dataset, *, test_key: jax.Array, train_key: jax.Array,
          labels: np.ndarray | None = None, cache_dir: str | None = None,
          classifier_steps: int = 400) -> dict[str, float]:
  """The scores of samples `x [num, H, W, C]` in [0, 1] from any generative prior (a GAN's
  too): the Frechet distance to as many test images and its train-vs-test floor, the class
  accuracy when `labels` (what each sample was drawn for) are given, the total variation
  between the classes the reference classifier assigns to the samples and to the test
  images (0: every class as often as in the data; mode collapse raises it), and the
  memorisation check. The keys draw the random test and training subsets."""
  if x.shape[1:] != ds.image_shape:
    raise ValueError(f"the samples are {x.shape[1:]} images, the dataset holds {ds.image_shape}; "
                     f"load it with the prior's image_size and channels")
  num = len(x)
  model, params, acc = classifier.reference_classifier(ds, cache_dir, steps=classifier_steps)
  # Random subsets: the datasets may be stored sorted by class.
  test = ds.x_test[np.asarray(jax.random.permutation(test_key, len(ds.x_test)))[:num]]
  train = ds.x_train[np.asarray(jax.random.permutation(train_key, len(ds.x_train)))[:num]]
  features = jax.jit(lambda x: model.features(params, x))
  predicted = jax.jit(lambda x: jnp.argmax(model.apply(params, x), -1))
  share = lambda c: np.bincount(np.asarray(c), minlength=ds.num_classes) / num  # noqa: E731
  result = {"classifier_test_accuracy": acc, "num_samples": num,
            "frechet_distance": frechet_distance(features(x), features(test)),
            "reference_fd_train_vs_test": frechet_distance(features(train), features(test)),
            "class_share_tv": float(0.5 * np.abs(share(predicted(x)) - share(predicted(test))).sum())}
  if labels is not None:
    result["class_accuracy"] = float(np.mean(np.asarray(predicted(x)) == labels))
  result["median_nearest_train_psnr"] = float(np.median(nearest_psnr(x, ds.x_train)))
  result["median_nearest_train_psnr_of_test_images"] = float(np.median(nearest_psnr(test, ds.x_train)))
  return result
