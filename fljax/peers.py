"""The benchmark's peers: the same models and steps in PyTorch, Opacus and torch.func, for
`scripts/bench_vs_torch.py`. Needs the optional extra `peers` (torch and opacus, pinned);
nothing else in fljax imports torch.

The models mirror `fljax.models` layer by layer (same shapes, strides, padding,
activations and parameter counts; channels first): DLG's LeNet (three 5x5 convs of 12
channels, strides 2, 2, 1, sigmoid, one dense layer) and the TF-Privacy MNIST CNN (8x8/2
and 4x4/2 convs with tanh and 2x2 stride-1 max-pools, dense 32, dense 10). Each step is
one SGD step (lr 0.1) on a fixed random batch: non-private, DP-SGD with Opacus's hooks
(`GradSampleModule` + `DPOptimizer`: per-sample gradients, clip to C = 1, noise sigma = 1),
and DP-SGD with `torch.func` (`vmap(grad)` of a functional call, then the same clip and
noise).
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable

INSTALL = "pip install -e '.[peers]'   (torch==2.13.0, a CPU build, and opacus==1.6.0)"


class PeersMissing(ImportError):
  """torch or opacus is not installed (the message says how to install them)."""


def require() -> None:
  """Raises `PeersMissing` with the install command when torch or opacus is missing."""
  for name in ("torch", "opacus"):
    try:
      importlib.import_module(name)
    except ImportError:
      raise PeersMissing(f"the peer benchmark needs torch and opacus ({name} is missing): "
                         f"{INSTALL}") from None


def require_or_exit() -> None:
  """`require`, for a script: on a missing peer, prints the install line to stderr and
  exits with status 2."""
  import sys
  try:
    require()
  except PeersMissing as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def versions() -> str:
  """One line: the frameworks' versions, backend and torch's thread count."""
  import jax
  import opacus
  import torch
  return (f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), opacus {opacus.__version__}")


def model(name: str, shape: tuple[int, int, int], num_classes: int = 10):
  """The torch twin of `fljax.models.make(name, ...)` for `shape = (H, W, C)`."""
  from torch import nn
  h, w, c = shape
  if name == "lenet":
    layers, size = [], (h, w)
    for i, stride in enumerate((2, 2, 1)):
      layers += [nn.Conv2d(c if i == 0 else 12, 12, 5, stride=stride, padding=2), nn.Sigmoid()]
      size = tuple((s + 4 - 5) // stride + 1 for s in size)
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(12 * size[0] * size[1], num_classes))
  if name == "cnn":
    size = ((h + 6 - 8) // 2 + 1) - 1
    size = ((size - 4) // 2 + 1) - 1
    return nn.Sequential(
        nn.Conv2d(c, 16, 8, stride=2, padding=3), nn.Tanh(), nn.MaxPool2d(2, 1),
        nn.Conv2d(16, 32, 4, stride=2), nn.Tanh(), nn.MaxPool2d(2, 1), nn.Flatten(),
        nn.Linear(32 * size * size, 32), nn.Tanh(), nn.Linear(32, num_classes))
  raise ValueError(f"no torch twin of model {name!r}; choose lenet or cnn")


def steps(name: str, shape: tuple[int, int, int], batch: int, num_classes: int = 10
          ) -> dict[str, Callable[[], None]]:
  """`{'torch': plain step, 'opacus': DP step with hooks, 'torch.func': DP step with
  vmap}`, each a no-argument callable that runs one step to completion."""
  import numpy as np
  import torch
  from opacus import GradSampleModule
  from opacus.optimizers import DPOptimizer
  from torch.func import functional_call, grad, vmap

  rng = np.random.default_rng(0)
  h, w, c = shape
  x = torch.from_numpy(rng.random((batch, c, h, w), dtype=np.float32))
  y = torch.from_numpy(rng.integers(0, num_classes, batch).astype(np.int64))
  loss_fn = torch.nn.CrossEntropyLoss()
  torch.manual_seed(0)

  plain = model(name, shape, num_classes)
  sgd = torch.optim.SGD(plain.parameters(), lr=0.1)

  def plain_step():
    sgd.zero_grad()
    loss_fn(plain(x), y).backward()
    sgd.step()

  # Opacus's hooks warn that the input needs no gradient (true, and harmless here)
  warnings.filterwarnings("ignore", message="Full backward hook is firing")
  hooked = GradSampleModule(model(name, shape, num_classes))
  dp = DPOptimizer(torch.optim.SGD(hooked.parameters(), lr=0.1), noise_multiplier=1.0,
                   max_grad_norm=1.0, expected_batch_size=batch)

  def opacus_step():
    dp.zero_grad()
    loss_fn(hooked(x), y).backward()
    dp.step()

  func = model(name, shape, num_classes)
  params = {k: v.detach() for k, v in func.named_parameters()}

  def row_loss(p, xi, yi):
    return loss_fn(functional_call(func, p, (xi[None],)), yi[None])

  per_row = vmap(grad(row_loss), in_dims=(None, 0, 0))

  def func_step():
    g = per_row(params, x, y)
    norms = torch.sqrt(sum(v.reshape(batch, -1).pow(2).sum(1) for v in g.values()))
    scale = (1.0 / norms.clamp(min=1e-12)).clamp(max=1.0)
    for k, v in g.items():
      total = torch.einsum("b,b...->...", scale, v) + torch.randn_like(params[k])
      params[k] = params[k] - 0.1 * total / batch

  return {"torch": plain_step, "opacus": opacus_step, "torch.func": func_step}


def load_flax_lenet(net, params) -> None:
  """Copies the flax LeNet's `params` (`fljax.models`, NHWC) into its torch twin `net`
  (NCHW): conv kernels HWIO -> OIHW, and the dense kernel's rows from (H, W, C) order to
  torch's flattening order (C, H, W)."""
  import numpy as np
  import torch
  convs = [m for m in net if isinstance(m, torch.nn.Conv2d)]
  dense = [m for m in net if isinstance(m, torch.nn.Linear)][-1]
  with torch.no_grad():
    for i, conv in enumerate(convs):
      p = params[f"Conv_{i}"]
      conv.weight.copy_(torch.from_numpy(np.array(p["kernel"]).transpose(3, 2, 0, 1).copy()))
      conv.bias.copy_(torch.from_numpy(np.array(p["bias"])))
    kernel = np.asarray(params["Dense_0"]["kernel"])  # [H * W * C, classes]
    c = convs[-1].out_channels
    hw = int(round((kernel.shape[0] // c) ** 0.5))
    kernel = kernel.reshape(hw, hw, c, -1).transpose(2, 0, 1, 3).reshape(kernel.shape[0], -1)
    dense.weight.copy_(torch.from_numpy(kernel.T.copy()))
    dense.bias.copy_(torch.from_numpy(np.array(params["Dense_0"]["bias"])))


def original_dlg(net, image, label: int, *, steps: int = 300, threshold: float = 30.0,
                 seed: int = 0) -> dict[str, float]:
  """The original DLG attack (Zhu et al. 2019, the authors' torch code, mit-han-lab/dlg):
  random image and label logits, `torch.optim.LBFGS` (lr 1, its defaults) on the summed
  squared gradient difference of soft-label cross-entropy, `steps` optimiser steps. It
  stops early when the reconstruction (clipped to [0, 1]) reaches `threshold` dB PSNR,
  checked after every step, as `studies.convergence` does for fljax's attacks.

  `image`: [H, W, C] in [0, 1] (numpy); `net`: a torch twin (`model`) with its weights
  set. Returns evaluations (closure calls) and seconds until it converged or ended, the
  best PSNR, and whether it converged.
  """
  import math
  import time

  import numpy as np
  import torch
  import torch.nn.functional as F

  def soft_ce(pred, target):
    return torch.mean(torch.sum(-target * F.log_softmax(pred, dim=-1), 1))

  classes = net[-1].out_features
  x = torch.from_numpy(np.ascontiguousarray(np.transpose(image, (2, 0, 1))[None]))
  onehot = F.one_hot(torch.tensor([label]), classes).float()
  params = list(net.parameters())
  true = [g.detach() for g in torch.autograd.grad(soft_ce(net(x), onehot), params)]
  gen = torch.Generator().manual_seed(seed)
  dummy = torch.randn(x.shape, generator=gen).requires_grad_(True)
  logits = torch.randn(onehot.shape, generator=gen).requires_grad_(True)
  opt = torch.optim.LBFGS([dummy, logits])
  evals, best, t0 = 0, -math.inf, time.perf_counter()

  def closure():
    nonlocal evals
    evals += 1
    opt.zero_grad()
    loss = soft_ce(net(dummy), F.softmax(logits, dim=-1))
    grads = torch.autograd.grad(loss, params, create_graph=True)
    diff = sum(((g - t) ** 2).sum() for g, t in zip(grads, true))
    diff.backward()
    return diff

  for _ in range(steps):
    opt.step(closure)
    with torch.no_grad():
      mse = float(torch.mean((dummy.clamp(0, 1) - x) ** 2))
    best = max(best, 10 * math.log10(1 / max(mse, 1e-12)))
    if best >= threshold:
      break
  return {"evaluations": evals, "seconds": time.perf_counter() - t0, "best_psnr": best,
          "converged": best >= threshold}
