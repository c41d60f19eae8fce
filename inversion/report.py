"""The scores and pictures of a gradient-inversion experiment: metrics.json, grid.png.

`write(config, workdir, result)` scores every victim of an `AttackResult` after
Hungarian matching (`inversion.metrics`), optionally in the feature space of a reference
classifier, and writes `metrics.json` (a summary and per-victim scores),
`reconstructions.npz` and `grid.png` (ground truth above each reconstruction).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fljax import config as config_lib
from fljax import models
from inversion import attacks, metrics
from inversion.specs import InversionConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttackResult:
  """What an attack on V victims of batch B produced.

  Attributes:
    truth: the victims' images `[V, B, H, W, C]` in [0, 1].
    labels: their labels `[V, B]`.
    names: where each victim's images came from `[V]`.
    reconstruction: each victim's best healthy restart `[V, B, H, W, C]` (zeros if failed).
    inferred_labels: the labels the attack used or found `[V, B]`.
    loss: the final matching loss of that restart `[V]`.
    failed: victims without a healthy restart after every retry `[V]`.
    attempts: the attempts each victim took `[V]`.
    diverged_restarts: restarts never scored because they diverged.
    spent: evaluations per victim over all its restarts `[V, len(attacks.COUNTERS)]`.
    steps: attack steps per restart.
    seconds: named timings (e.g. attack, classifier, wall).
    victim_attacks: victim attacks done in this process (a resumed attempt counts the
      fraction of its steps run here): the numerator of the throughput.
  """

  truth: np.ndarray
  labels: np.ndarray
  names: list[str]
  reconstruction: np.ndarray
  inferred_labels: np.ndarray
  loss: np.ndarray
  failed: np.ndarray
  attempts: np.ndarray
  diverged_restarts: int
  spent: np.ndarray
  steps: int
  seconds: dict[str, float]
  victim_attacks: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class Reference:
  """The classifier whose features and predictions score reconstructions."""

  model: models.Model
  params: Any
  test_accuracy: float


def write(config: InversionConfig, workdir: Path, result: AttackResult, *,
          reference: Reference | None = None, extra: dict[str, Any] | None = None
          ) -> dict[str, Any]:
  """Scores every victim (after Hungarian matching), writes metrics.json,
  reconstructions.npz and grid.png; returns the summary (with `extra` merged in)."""
  r = result
  features = predict = None
  if reference is not None:
    features = jax.jit(functools.partial(reference.model.features, reference.params))
    predict = jax.jit(functools.partial(reference.model.apply, reference.params))
  rec = np.clip(r.reconstruction, 0.0, 1.0)  # the valid image range (DLG is unconstrained)
  x, y = r.truth, r.labels
  victims, matched = [], np.zeros_like(rec)
  psnr = np.full(y.shape, np.nan)
  for i in range(len(y)):
    scores = metrics.score(rec[i], x[i], features=features)
    matched[i] = rec[i][scores["order"]]
    psnr[i] = scores["psnr"]
    entry = {"victim": i, "source": r.names[i], "labels": y[i].tolist(),
             "inferred_labels": r.inferred_labels[i].tolist(),
             "label_accuracy": metrics.label_accuracy(r.inferred_labels[i], y[i]),
             "failed": bool(r.failed[i]), "attempts": int(r.attempts[i]),
             "matching_loss": float(r.loss[i]),
             **{k: scores[k].tolist() for k in ("psnr", "ssim", "mse", "feature_distance")
                if k in scores}}
    if predict is not None:
      entry["recognised"] = (np.asarray(predict(jnp.asarray(matched[i]))).argmax(-1)
                             == y[i]).tolist()
    victims.append(entry)
  ok = [e for e in victims if not e["failed"]]
  flat = lambda key: [value for e in ok for value in e.get(key, [])]  # noqa: E731
  nan = float("nan")
  finite_psnr = _finite(flat("psnr"))
  seconds = {f"{name}_seconds": value for name, value in r.seconds.items()}
  summary = {
      "victims": len(y), "batch_size": int(y.shape[1]), "failed": int(r.failed.sum()),
      "diverged_restarts": r.diverged_restarts, "retried_victims": int((r.attempts > 1).sum()),
      "median_psnr": float(np.median(flat("psnr"))) if ok else nan,
      "mean_psnr": float(np.mean(finite_psnr)) if finite_psnr else nan,
      "median_ssim": float(np.median(flat("ssim"))) if ok else nan,
      "mean_ssim": float(np.mean(flat("ssim"))) if ok else nan,
      "label_accuracy": float(np.mean([e["label_accuracy"] for e in victims])),
      "images_above_30db": int(np.sum(np.asarray(flat("psnr")) >= 30)),
      # reconstruction success (for the ReRo ceiling): an image at >= 20 dB, failures count
      "success_rate_20db": float(np.sum(np.asarray(flat("psnr")) >= 20) / y.size),
      **({"mean_feature_distance": float(np.mean(flat("feature_distance"))) if ok else nan,
          "recognised": float(np.mean(flat("recognised"))) if ok else nan,
          "reference_classifier": reference.model.module.__class__.__name__.lower(),
          "reference_test_accuracy": reference.test_accuracy} if reference else {}),
      "attack": config.attack.name, "steps": r.steps, "restarts": config.attack.restarts,
      "gradient_steps_per_victim": r.steps * config.attack.restarts * int(r.attempts.max()),
      **{f"{name}_per_victim": float(r.spent[:, i].mean())
         for i, name in enumerate(attacks.COUNTERS)},
      "budget": config.attack.budget, "control": config.attack.control,
      **seconds,
      # this process's attacks over this process's attack time (none when resumed finished)
      "victim_attacks_per_hour": (r.victim_attacks * 3600.0 / r.seconds["attack"]
                                  if r.victim_attacks and r.seconds["attack"] > 0 else None),
      "backend": jax.default_backend(), "devices": jax.device_count(), "jax": jax.__version__,
      **(extra or {}),
  }
  np.savez_compressed(workdir / "reconstructions.npz", truth=x, reconstruction=matched,
                      psnr=psnr, failed=r.failed)
  (workdir / "metrics.json").write_text(json.dumps(
      {"summary": summary, "config": config_lib.to_dict(config), "victims": victims},
      indent=2) + "\n")
  save_grid(workdir / "grid.png", x, matched, psnr, r.failed,
            title=f"{config.attack.name} on {config.model.name}, {config.threat.algorithm} "
                  f"B={y.shape[1]}, defense {config.defense.name}: median PSNR "
                  f"{summary['median_psnr']:.1f} dB")
  return summary


def save_grid(path: Path, truth: np.ndarray, reconstruction: np.ndarray, psnr: np.ndarray,
              failed: np.ndarray, *, title: str = "") -> None:
  """Pairs of rows: ground truth above its (matched) reconstruction, PSNR under each.

  `truth`, `reconstruction` `[V, B, H, W, C]` in [0, 1]; `psnr` `[V, B]`; `failed` `[V]`.
  """
  from fljax.plots import _pyplot
  plt = _pyplot()
  v, b = truth.shape[:2]
  per_row = b * max(1, 16 // b) if b <= 16 else b
  cols = min(v * b, per_row)
  rows = -(-v * b // cols)
  fig, axes = plt.subplots(2 * rows, cols, figsize=(max(1.1 * cols, 4.5), 2.8 * rows + 0.4),
                           squeeze=False)
  for ax in axes.ravel():
    ax.axis("off")
  for i in range(v * b):
    j, k = divmod(i, b)
    r, c = divmod(i, cols)
    for ax, img in ((axes[2 * r, c], truth[j, k]), (axes[2 * r + 1, c], reconstruction[j, k])):
      ax.imshow(np.clip(img.squeeze(-1) if img.shape[-1] == 1 else img, 0, 1),
                cmap="gray" if img.shape[-1] == 1 else None, vmin=0, vmax=1)
    caption = "failed" if failed[j] else f"{psnr[j, k]:.1f} dB"
    axes[2 * r + 1, c].text(0.5, -0.06, caption, fontsize=7, ha="center", va="top",
                            transform=axes[2 * r + 1, c].transAxes)
    if k == 0:
      axes[2 * r, c].set_title(f"victim {j}", fontsize=7)
  if title:
    import textwrap
    fig.suptitle("\n".join(textwrap.wrap(title, 60)), fontsize=8)
  fig.tight_layout(h_pad=1.5)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _finite(values: list[float]) -> list[float]:
  return [float(v) for v in values if np.isfinite(v)]
