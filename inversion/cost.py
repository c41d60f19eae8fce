"""What an attack's evaluations cost in floating-point operations, estimated from XLA's
cost analysis of one compiled evaluation on this backend.

An attack's compute is its counted evaluations (`inversion.attacks.COUNTERS`) times their
unit costs:

    flops = double_backward_evals x F_db + grad_evals x F_grad + prior_nfe x F_prior

  F_db     one double-backward evaluation: the gradient, with respect to the trial
           images, of the L2 distance between their update and the observed one (the
           matching loss's own arithmetic is negligible beside the model's);
  F_grad   one matching-loss value (the trial update, without differentiating it again);
  F_prior  one pass of the prior network forward and backward (a diffusion UNet call, or
           the GAN generator), since the guided attacks differentiate through it.

The figures are XLA's operation counts (a multiply-add is 2), for the shapes of one
victim; they say how the attacks compare in arithmetic, not in seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from fljax import models
from inversion import observation as ob


def flops(fn: Callable[..., Any], *args: Any) -> float:
  """XLA's floating-point operation count of `fn(*args)`, compiled for this backend."""
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):  # one entry per program in older jax
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", float("nan")))


def victim_flops(model: models.Model, threat: ob.ThreatModel, params: Any) -> dict[str, float]:
  """`{'grad': F_grad, 'double_backward': F_db}` of the victim model for one victim."""
  x = jnp.zeros((threat.batch_size,) + tuple(threat.input_shape), jnp.float32)
  y = jax.nn.one_hot(jnp.zeros(threat.batch_size, jnp.int32), threat.num_classes)
  update_of = ob.forward(model.apply, threat)
  target = update_of(params, x, y)

  def distance(x):
    trial = update_of(params, x, y)
    return sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(trial), jax.tree.leaves(target)))

  return {"grad": flops(distance, x), "double_backward": flops(jax.grad(distance), x)}


def prior_flops(attack: str, folder: str | Path | None, batch: int) -> float:
  """F_prior of the attack's prior for `batch` images: 0 without one (dlg, idlg, ig)."""
  if folder is None:
    return 0.0
  if attack == "gifd":
    from inversion import gan as gan_lib
    g = gan_lib.load(folder)
    z = jnp.zeros((batch, g.config.latent_dim), jnp.float32)
    images = lambda z: jnp.sum(gan_lib.generate(g, g.variables, z))  # noqa: E731
    return flops(jax.grad(images), z)
  from diffusion import prior as prior_lib
  p = prior_lib.load(folder)
  x = jnp.zeros((batch,) + p.image_shape, jnp.float32)
  t = jnp.zeros((batch,), jnp.int32)
  labels = jnp.zeros((batch,), jnp.int32) if p.num_classes else None
  out = lambda x: jnp.sum(p.apply(p.params, x, t, labels))  # noqa: E731
  return flops(jax.grad(out), x)


def total(counts: dict[str, float], unit: dict[str, float]) -> float:
  """An attack's FLOPs from its evaluations per victim (`<counter>_per_victim`) and the unit
  costs (`victim_flops` plus `prior`)."""
  return (counts.get("double_backward_evals_per_victim", 0.0) * unit["double_backward"]
          + counts.get("grad_evals_per_victim", 0.0) * unit["grad"]
          + counts.get("prior_nfe_per_victim", 0.0) * unit.get("prior", 0.0))
