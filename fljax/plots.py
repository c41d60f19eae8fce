"""PNG plots of runs and partitions (matplotlib, headless Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_label_histogram(hist: np.ndarray, path: str, *, max_clients: int = 100,
                         title: str = "") -> None:
  """Stacked bars: the label counts of each client (first `max_clients` clients)."""
  plt = _pyplot()
  hist = np.asarray(hist)[:max_clients]
  c, k = hist.shape
  fig, ax = plt.subplots(figsize=(max(6, 0.12 * c + 2), 3.5))
  bottom = np.zeros(c)
  cmap = plt.get_cmap("tab10" if k <= 10 else "tab20")
  for j in range(k):
    ax.bar(np.arange(c), hist[:, j], bottom=bottom, width=0.9, color=cmap(j % cmap.N),
           label=str(j))
    bottom = bottom + hist[:, j]  # a new array: matplotlib may keep a reference to the old one
  ax.set_xlabel("client")
  ax.set_ylabel("examples")
  ax.set_title(title or "labels per client")
  ax.legend(title="label", fontsize=6, ncol=2, bbox_to_anchor=(1.01, 1), loc="upper left")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str, *,
                xlabel: str = "round", ylabel: str = "test accuracy", title: str = ""):
  """One line per named `(x, y)` curve, written to `path`; returns the (closed) matplotlib
  figure, whose legend names the curves when there are several."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, (x, y) in curves.items():
    ax.plot(x, y, marker="." if len(x) < 60 else None, label=name)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  if title:
    ax.set_title(title)
  if len(curves) > 1:
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return fig


def save_image_grid(path: str | Path, images: np.ndarray, *, scale: int = 2, pad: int = 2) -> None:
  """Writes images in [0, 1] `[rows, cols, H, W, C]` (C = 1 or 3) as one PNG, each image
  upscaled `scale` times (nearest) and separated by `pad` white pixels."""
  from PIL import Image

  images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
  rows, cols, h, w, c = images.shape
  images = images.repeat(scale, 2).repeat(scale, 3)
  h, w = h * scale, w * scale
  canvas = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.float32)
  for r in range(rows):
    for k in range(cols):
      canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = images[r, k]
  pixels = (canvas * 255 + 0.5).astype(np.uint8)
  Image.fromarray(pixels[..., 0] if c == 1 else pixels).save(path)


def panels(plt, names, draw, path, *, xlabel: str, ylabel: str, title: str = "{}",
           legend: str = "best", xlog: bool = False, dpi: int = 110) -> None:
  """One panel per name (e.g. per partition); `draw(ax, name)` plots into each; one legend
  entry per label, whichever panel drew it (`legend`: a matplotlib location or 'outside')."""
  fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
  for ax, name in zip(axes[0], names):
    draw(ax, name)
    if xlog:
      ax.set_xscale("log")
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title.format(name))
  handles = {}
  for ax in axes[0]:
    for h, label in zip(*ax.get_legend_handles_labels()):
      handles.setdefault(label, h)
  if handles and legend == "outside":  # right of the last panel, clear of every point
    axes[0][-1].legend(handles.values(), handles.keys(), fontsize=6, loc="upper left",
                       bbox_to_anchor=(1.02, 1.0))
  elif handles:
    axes[0][-1].legend(handles.values(), handles.keys(), fontsize=6, loc=legend)
  fig.tight_layout()
  fig.savefig(path, dpi=dpi, bbox_inches="tight")
  plt.close(fig)
