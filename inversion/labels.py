"""Label inference from a shared gradient: iDLG (Zhao et al. 2020) for one example.

For softmax cross-entropy, the gradient of one example's loss with respect to the last
layer's bias is p - onehot(y): its only negative entry is the true class. With respect to
the kernel it is h (p - onehot(y))^T, so when the features h are non-negative (ReLU,
sigmoid) the true class is the only column with a negative sum. `idlg` reads the bias
gradient when there is one and the kernel's column sums otherwise.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def last_layer(grads: Any, num_classes: int) -> tuple[jax.Array, jax.Array | None]:
  """The (kernel [F, K], bias [K] or None) gradient of the classifier's output layer.

  It is the one dense layer whose kernel maps to `num_classes` outputs; a model with
  several such layers is ambiguous and raises a ValueError.
  """
  found = []

  def visit(node):
    if isinstance(node, dict):
      kernel = node.get("kernel")
      if kernel is not None and getattr(kernel, "ndim", 0) == 2 and kernel.shape[-1] == num_classes:
        bias = node.get("bias")
        found.append((kernel, bias if bias is not None and bias.shape == (num_classes,) else None))
      for value in node.values():
        visit(value)

  visit(grads)
  if len(found) != 1:
    raise ValueError(f"expected one dense output layer with {num_classes} outputs in the "
                     f"gradient, found {len(found)}")
  return found[0]


def idlg(grads: Any, num_classes: int) -> jax.Array:
  """The label of the single example behind `grads` (a FedSGD gradient of batch 1)."""
  kernel, bias = last_layer(grads, num_classes)
  if bias is not None:
    return jnp.argmin(bias)
  return jnp.argmin(kernel.sum(axis=0))
