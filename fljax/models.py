"""Flax classifiers used across the study, exposed as a pure `apply(params, x)`.

- `lenet`: the LeNet of Deep Leakage from Gradients (Zhu et al., NeurIPS 2019): three 5x5
  convolutions with 12 channels, strides 2/2/1, 'same' padding, sigmoid activations, one
  dense layer; any input size. The DLG code draws every weight and bias from
  uniform(-0.5, 0.5): `init="uniform"`.
- `mlp`: fully connected ReLU network.
- `cnn`: the small CNN of the TF-Privacy / Opacus DP-SGD MNIST examples: conv 16 8x8
  stride 2 (padding 3), maxpool 2 stride 1, conv 32 4x4 stride 2, maxpool 2 stride 1,
  dense 32, dense classes, tanh activations.
- `resnet`: a small pre-activation-free ResNet (He et al. 2016) with GroupNorm instead of
  BatchNorm, so that per-example gradients and federated averaging are well defined.

Every model also exposes its penultimate features (`Model.features`), the input of its
output layer. No BatchNorm anywhere: per-example gradients (DP-SGD) and gradient inversion need a model
whose output for one example does not depend on the others in its batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Params = Any  # a pytree of arrays
ApplyFn = Callable[[Params, jax.Array], jax.Array]

def _uniform(low: float, high: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, low, high)
  return init


def _initializers(name: str):
  if name == "default":
    return nn.initializers.lecun_normal(), nn.initializers.zeros
  if name == "uniform":
    return _uniform(-0.5, 0.5), _uniform(-0.5, 0.5)
  raise ValueError(f"unknown init {name!r}; choose 'default' or 'uniform'")


class LeNet(nn.Module):
  """DLG's LeNet: conv(12, 5x5, s2) -> conv(12, 5x5, s2) -> conv(12, 5x5, s1) -> dense."""

  num_classes: int
  init_scheme: str = "default"
  channels: int = 12

  @nn.compact
  def __call__(self, x, features: bool = False):
    k_init, b_init = _initializers(self.init_scheme)
    for stride in (2, 2, 1):
      x = nn.Conv(self.channels, (5, 5), strides=stride, padding=2, kernel_init=k_init,
                  bias_init=b_init)(x)
      x = nn.sigmoid(x)
    x = x.reshape(x.shape[0], -1)
    if features:
      return x
    return nn.Dense(self.num_classes, kernel_init=k_init, bias_init=b_init)(x)


class MLP(nn.Module):
  """Flatten -> (dense -> relu) x len(hidden) -> dense."""

  num_classes: int
  hidden: Sequence[int] = (200, 200)
  init_scheme: str = "default"

  @nn.compact
  def __call__(self, x, features: bool = False):
    k_init, b_init = _initializers(self.init_scheme)
    x = x.reshape(x.shape[0], -1)
    for width in self.hidden:
      x = nn.relu(nn.Dense(width, kernel_init=k_init, bias_init=b_init)(x))
    if features:
      return x
    return nn.Dense(self.num_classes, kernel_init=k_init, bias_init=b_init)(x)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """`nn.max_pool(x, (2, 2), strides=(1, 1))` (VALID) as the maximum of four shifted slices.

  The same function; its gradient is elementwise instead of XLA:CPU's select-and-scatter,
  which took more than half of the CNN's training step: a batch-256 gradient of the CNN
  measured 74 ms with `nn.max_pool` and 41 ms with this on 2 CPU cores (issue 21's profile).
  Where a window's maximum is tied, the gradient is shared between the tied inputs
  (select-and-scatter gives it all to the first); both are subgradients.
  """
  return jnp.maximum(jnp.maximum(x[:, :-1, :-1], x[:, 1:, :-1]),
                     jnp.maximum(x[:, :-1, 1:], x[:, 1:, 1:]))


class CNN(nn.Module):
  """The TF-Privacy / Opacus MNIST CNN (tanh): 26,010 parameters on 28x28x1 inputs."""

  num_classes: int
  init_scheme: str = "default"
  pool: str = "slices"  # or "flax": nn.max_pool, the same function (scripts/bench_max_pool.py)

  @nn.compact
  def __call__(self, x, features: bool = False):
    k_init, b_init = _initializers(self.init_scheme)
    pool = {"slices": max_pool_2x2,
            "flax": lambda x: nn.max_pool(x, (2, 2), strides=(1, 1))}[self.pool]
    x = nn.tanh(nn.Conv(16, (8, 8), strides=2, padding=3, kernel_init=k_init,
                        bias_init=b_init)(x))
    x = pool(x)
    x = nn.tanh(nn.Conv(32, (4, 4), strides=2, padding="VALID", kernel_init=k_init,
                        bias_init=b_init)(x))
    x = pool(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.tanh(nn.Dense(32, kernel_init=k_init, bias_init=b_init)(x))
    if features:
      return x
    return nn.Dense(self.num_classes, kernel_init=k_init, bias_init=b_init)(x)


class ResBlock(nn.Module):
  """Two 3x3 convolutions with GroupNorm and a projection shortcut when the shape changes."""

  features: int
  strides: int
  groups: int
  k_init: Callable
  b_init: Callable

  @nn.compact
  def __call__(self, x):
    conv = lambda f, k, s: nn.Conv(f, (k, k), strides=s, padding="SAME", use_bias=False,
                                   kernel_init=self.k_init)
    norm = lambda: nn.GroupNorm(num_groups=min(self.groups, self.features))
    y = nn.relu(norm()(conv(self.features, 3, self.strides)(x)))
    y = norm()(conv(self.features, 3, 1)(y))
    if x.shape[-1] != self.features or self.strides != 1:
      x = norm()(conv(self.features, 1, self.strides)(x))
    return nn.relu(x + y)


class ResNet(nn.Module):
  """A small ResNet with GroupNorm: stem conv, `stages` of `blocks` blocks, pool, dense."""

  num_classes: int
  widths: Sequence[int] = (16, 32, 64)
  blocks: int = 1
  groups: int = 8
  init_scheme: str = "default"

  @nn.compact
  def __call__(self, x, features: bool = False):
    k_init, b_init = _initializers(self.init_scheme)
    x = nn.Conv(self.widths[0], (3, 3), padding="SAME", use_bias=False, kernel_init=k_init)(x)
    x = nn.relu(nn.GroupNorm(num_groups=min(self.groups, self.widths[0]))(x))
    for i, width in enumerate(self.widths):
      for j in range(self.blocks):
        x = ResBlock(width, 2 if (i > 0 and j == 0) else 1, self.groups, k_init, b_init)(x)
    x = x.mean(axis=(1, 2))
    if features:
      return x
    return nn.Dense(self.num_classes, kernel_init=k_init, bias_init=b_init)(x)


@dataclasses.dataclass(frozen=True)
class Model:
  """A Flax module seen through pure functions.

  Attributes:
    module: the Flax module (hashable, so `Model` can be a static jit argument).
    input_shape: `(H, W, C)` of one example.
  """

  module: nn.Module
  input_shape: tuple[int, int, int]

  def init(self, key: jax.Array) -> Params:
    """Initial parameters (the 'params' collection) from a key."""
    return self.module.init(key, jnp.zeros((1,) + tuple(self.input_shape)))["params"]

  def apply(self, params: Params, x: jax.Array) -> jax.Array:
    """Logits `[B, num_classes]` for images `[B, H, W, C]`."""
    return self.module.apply({"params": params}, x)

  def features(self, params: Params, x: jax.Array) -> jax.Array:
    """The penultimate features `[B, F]`: the input of the output layer (what `apply`
    maps to logits with one dense layer), for feature-space metrics and feature matching."""
    return self.module.apply({"params": params}, x, features=True)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet": LeNet,
    "mlp": MLP,
    "cnn": CNN,
    "resnet": ResNet,
}


def make(name: str, *, num_classes: int, input_shape: Sequence[int], init: str = "default",
         **kwargs) -> Model:
  """Builds a registered model for `input_shape = (H, W, C)`."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
  _initializers(init)  # validates the name with a clear error
  shape = tuple(int(s) for s in input_shape)
  if len(shape) != 3:
    raise ValueError(f"input_shape must be (H, W, C), got {shape}")
  if name == "cnn" and min(shape[:2]) < 14:  # smaller leaves no feature for the dense layers
    raise ValueError(f"the 'cnn' model needs images of at least 14x14, got {shape[:2]}; "
                     f"use 'lenet', 'mlp' or 'resnet', or pad with image_size")
  return Model(MODELS[name](num_classes=num_classes, init_scheme=init, **kwargs), shape)


def num_params(params: Params) -> int:
  return sum(int(p.size) for p in jax.tree.leaves(params))
