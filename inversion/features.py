"""The last layer's input features, read analytically from its weight and bias gradients
(Geiping et al. 2020, Proposition on biased fully connected layers; FGLA, Xue et al. 2023).

For logits z = W^T h + b (Flax kernel W `[F, K]`) and one example, dL/dW = h (dL/dz)^T and
dL/db = dL/dz, so dW db = h ||db||^2 and h = dW db / ||db||^2 exactly (`last_layer_features`
with B = 1): the least-squares fit of the rank-one dW, robust to noise on either factor.

For a batch of B with labels y (the mean loss), column c of dW is (1/B) sum_i h_i
(p_ic - [y_i = c]) and db_c = (1/B) sum_i (p_ic - [y_i = c]): their ratio is a weighted
mean of the h_i in which the examples labelled c carry the large negative weights p - 1
and the others the small weights p_ic. `batch_features` returns h_k ~ dW[:, y_k] / db[y_k]
for each example, exact when only example k has a non-negligible weight in its column
(an untrained model over many classes) and the mean feature of a class when the batch
repeats it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from inversion.labels import last_layer


def _kernel_and_bias(grads: Any, num_classes: int) -> tuple[jax.Array, jax.Array]:
  kernel, bias = last_layer(grads, num_classes)
  if bias is None:
    raise ValueError("feature recovery needs the output layer's bias gradient; this model's "
                     "output layer has no bias")
  return kernel, bias


def last_layer_features(grads: Any, num_classes: int) -> jax.Array:
  """h `[F]` of the single example behind a gradient: dW db / ||db||^2."""
  kernel, bias = _kernel_and_bias(grads, num_classes)
  return kernel @ bias / jnp.sum(bias ** 2)


def batch_features(grads: Any, num_classes: int, labels: jax.Array) -> jax.Array:
  """Per-example features `[B, F]` of a batch with (inferred) `labels [B]`:
  dW[:, y_k] / db[y_k], the batch approximation of the module docstring."""
  kernel, bias = _kernel_and_bias(grads, num_classes)
  return (kernel[:, labels] / bias[labels]).T
