"""Label inference from a shared gradient: iDLG (Zhao et al. 2020) for one example, and
for batches Geng et al. 2021's bias-corrected counts and Yin et al. 2021's distinct labels.

For softmax cross-entropy, the gradient of one example's loss with respect to the last
layer's bias is p - onehot(y): its only negative entry is the true class. With respect to
the kernel it is h (p - onehot(y))^T, so when the features h are non-negative (ReLU,
sigmoid) the true class is the only column with a negative sum. `idlg` reads the bias
gradient when there is one and the kernel's column sums otherwise.

For a batch of B the bias gradient is the mean of p_i - onehot(y_i): `bias_corrected`
reads per-class counts from it (repeats included) once the unobserved mean prediction is
estimated on dummy inputs; `yin` assumes B distinct labels. `infer` dispatches by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from inversion.observation import Observation, ThreatModel, gradient_signal


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


# ----------------------------------------------------------------------------- batches


def count_round(estimate: jax.Array, total: int) -> jax.Array:
  """Non-negative integer counts summing to `total`, closest to a real `estimate` [K]:
  floors of the clipped estimate, then the largest remainders get one more each."""
  est = jnp.maximum(estimate, 0.0)
  est = est * total / jnp.maximum(est.sum(), 1e-12)
  base = jnp.floor(est)
  short = total - base.sum()
  order = jnp.argsort(-(est - base))
  extra = jnp.zeros_like(base).at[order].set(
      (jnp.arange(est.shape[0]) < short).astype(base.dtype))
  return (base + extra).astype(jnp.int32)


def expand_counts(counts: jax.Array, total: int) -> jax.Array:
  """Labels `[total]`, sorted, from per-class counts `[K]` summing to `total`."""
  return jnp.repeat(jnp.arange(counts.shape[0]), counts, total_repeat_length=total)


def mean_probs(apply_fn: Callable[[Any, jax.Array], jax.Array], params: Any,
               input_shape: tuple[int, ...], *, key: jax.Array, n: int = 64) -> jax.Array:
  """The model's mean softmax over `n` uniform(0, 1) dummy inputs `[K]` (Geng et al. 2021):
  the attacker's estimate of the batch's mean prediction, which it cannot observe."""
  x = jax.random.uniform(key, (n,) + tuple(input_shape))
  return jax.nn.softmax(apply_fn(params, x)).mean(0)


def bias_corrected(grads: Any, num_classes: int, batch_size: int, probs: jax.Array) -> jax.Array:
  """Labels of a batch of B from the gradient of the mean loss (Geng et al. 2021, breaching's
  "bias-corrected" estimator), repeats included.

  The last bias's gradient is g = mean_i (p_i - onehot(y_i)), so the count of class k is
  n_k = B (pbar_k - g_k); pbar (the batch's mean softmax) is not observed and is replaced
  by `probs` (`mean_probs` on dummy inputs). The estimate is rounded to B non-negative
  counts (`count_round`). The output layer needs a bias.

  Returns:
    `[B]` labels, sorted (the batch order is not observable).
  """
  _, bias = last_layer(grads, num_classes)
  if bias is None:
    raise ValueError("bias_corrected label inference reads the output layer's bias gradient; "
                     "this model has none: use 'yin'")
  counts = count_round(batch_size * (probs - bias), batch_size)
  return expand_counts(counts, batch_size)


def yin(grads: Any, num_classes: int, batch_size: int) -> jax.Array:
  """Labels of a batch of B distinct classes (Yin et al., CVPR 2021, GradInversion): the B
  classes whose kernel-gradient column has the most negative entry. Repeated labels in
  the batch are not recovered (use `bias_corrected`)."""
  if batch_size > num_classes:
    raise ValueError(f"yin label inference assumes distinct labels: batch {batch_size} > "
                     f"{num_classes} classes; use 'bias_corrected'")
  kernel, _ = last_layer(grads, num_classes)
  return jnp.sort(jnp.argsort(kernel.min(axis=0))[:batch_size])


def check(method: str, batch_size: int) -> None:
  """Raises a clear ValueError when `method` cannot infer the labels of a batch of B."""
  if method == "idlg" and batch_size != 1:
    raise ValueError("iDLG reads the label of a single example: for B > 1 pass labels='known' "
                     "(if the attacker knows them), 'bias_corrected' or 'yin' (or, for DLG, "
                     "'optimise')")


def infer(method: str, grads: Any, *, num_classes: int, batch_size: int,
          probs: jax.Array | None = None) -> jax.Array:
  """`[B]` labels by `method` in `METHODS` ('idlg' needs B = 1; 'bias_corrected' needs
  `probs`). `grads` is a FedSGD gradient; for a FedAvg delta pass its negative."""
  check(method, batch_size)
  if method == "idlg":
    return jnp.reshape(idlg(grads, num_classes), (1,))
  if method == "yin":
    return yin(grads, num_classes, batch_size)
  if method == "bias_corrected":
    if probs is None:
      raise ValueError("bias_corrected label inference needs the mean probabilities `probs`")
    return bias_corrected(grads, num_classes, batch_size, probs)
  raise ValueError(f"unknown label inference {method!r}; choose one of {METHODS}")


METHODS = ("idlg", "yin", "bias_corrected")


def from_observation(method: str, apply_fn: Callable[[Any, jax.Array], jax.Array],
                     obs: Observation, threat: ThreatModel, *, key: jax.Array) -> jax.Array:
  """`[B]` labels an attacker infers from an `Observation` under its `ThreatModel`.

  'known' takes them from the observation; the other `METHODS` read the observed update
  as a mean gradient (`observation.gradient_signal`: a FedAvg delta is divided by
  -lr x local steps), and 'bias_corrected' estimates the mean prediction with `key`.
  """
  if method == "known":
    return obs.labels
  probs = None
  if method == "bias_corrected":
    probs = mean_probs(apply_fn, obs.params, threat.input_shape, key=key)
  return infer(method, gradient_signal(obs.update, threat), num_classes=threat.num_classes,
               batch_size=threat.batch_size, probs=probs)
