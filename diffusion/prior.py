"""A trained diffusion prior: the UNet's config and weights, its noise schedule and
parameterisation, and its denoiser with classifier-free guidance (Ho & Salimans 2022).

On disk a prior is a folder: `unet.json` (a diffusers-style `UNet2DModel` config),
`params.msgpack` (flax serialisation of the weights), `schedule.json` ({name,
num_train_steps, prediction, num_classes}) and, for priors trained here, `config.json`
(the training run's config). `load(path)` reads it; `diffusion.hub.load_diffusers` reads
a diffusers checkpoint folder into the same `Prior`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import serialization

from diffusion import schedules, unet
from fljax import runs

Params = Any

#: The MNIST prior that ships with fljax (see docs/diffusion.md: how it was trained, its quality).
MNIST_PRIOR = Path(__file__).parent / "priors" / "mnist32"
#: The shipped priors by the dataset they model (what `--attack.prior NAME` and a study on
#: that dataset sample); a name whose folder is absent is not trained yet.
SHIPPED: dict[str, Path] = {
    "mnist": MNIST_PRIOR,
    "fashion_mnist": Path(__file__).parent / "priors" / "fashion_mnist32",
}
#: The training steps of each shipped prior (README's table of shipped weights).
SHIPPED_STEPS: dict[str, int] = {"mnist": 5000, "fashion_mnist": 4000}
TRAIN_COMMAND = ("python scripts/train_diffusion.py --workdir runs/ddpm_{name} --data.name {name} "
                 "--steps {steps}, then copy runs/ddpm_{name}/prior to {folder}")


def shipped(name: str) -> Path:
  """The folder of the shipped prior for dataset `name` (`SHIPPED`).

  Raises:
    PriorError: no prior is registered for `name`, or it is not trained yet (the message
      gives the command that trains it).
  """
  if name not in SHIPPED:
    raise PriorError(f"no shipped diffusion prior for {name!r} (shipped: {', '.join(SHIPPED)}); "
                     f"pass a prior folder instead")
  folder = SHIPPED[name]
  if not (folder / "params.msgpack").is_file():
    raise PriorError(f"the {name} diffusion prior is not trained yet: "
                     + TRAIN_COMMAND.format(name=name, folder=folder, steps=SHIPPED_STEPS[name]))
  return folder


class PriorError(ValueError):
  """A prior folder that cannot be loaded (the message names the file and what to do)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Prior:
  """A denoiser with everything needed to sample from it.

  Attributes:
    unet_config: the UNet's configuration.
    params: its weights.
    schedule: the training noise schedule.
    prediction: what the UNet predicts ('epsilon', 'x0', 'v').
    num_classes: classes of a class-conditional prior (its null label is `num_classes`),
      0 for an unconditional one.
    schedule_config: how to rebuild `schedule` ({'name', 'num_train_steps'} or a diffusers
      scheduler config under 'diffusers').
  """

  unet_config: unet.UNetConfig
  params: Params
  schedule: schedules.Schedule
  prediction: str = "epsilon"
  num_classes: int = 0
  schedule_config: dict = dataclasses.field(default_factory=dict)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of the images it makes."""
    return self.unet_config.input_shape

  def apply(self, params: Params, x: jax.Array, t: jax.Array, labels: jax.Array | None = None) -> jax.Array:
    """The UNet's raw output at `x [B, H, W, C]` (model range [-1, 1]) and timesteps `t`."""
    if self.unet_config.num_class_embeds and labels is None:
      labels = jnp.full((x.shape[0],), unet.null_label(self.unet_config))
    return unet.UNet(self.unet_config).apply({"params": params}, x, t, labels)

  def denoiser(self, labels: jax.Array | None = None, *, guidance_weight: float = 0.0,
               params: Params | None = None):
    """`denoiser(x_t, t) -> prediction` for the samplers.

    `labels [B]` condition a class-conditional prior (None: unconditional, the null
    label). `guidance_weight` w > 0 uses classifier-free guidance:
    (1 + w) f(x, t, y) - w f(x, t, null).
    """
    params = self.params if params is None else params
    if labels is not None and not self.num_classes:
      raise PriorError("this prior is unconditional; sample without labels")
    if guidance_weight and labels is None:
      raise PriorError("classifier-free guidance needs labels")

    def denoiser(x, t):
      out = self.apply(params, x, t, labels)
      if guidance_weight:
        out = (1 + guidance_weight) * out - guidance_weight * self.apply(params, x, t, None)
      return out

    return denoiser


def save(prior: Prior, path: str | Path, *, run_config: dict | None = None) -> None:
  """Writes `prior` to the folder `path` (see the module docstring)."""
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  (path / "unet.json").write_text(json.dumps(unet.config_to_dict(prior.unet_config), indent=2) + "\n")
  (path / "schedule.json").write_text(json.dumps(
      {**prior.schedule_config, "prediction": prior.prediction, "num_classes": prior.num_classes},
      indent=2) + "\n")
  tmp = path / "params.msgpack.tmp"
  tmp.write_bytes(serialization.to_bytes(jax.device_get(prior.params)))
  tmp.replace(path / "params.msgpack")
  if run_config is not None:
    (path / "config.json").write_text(json.dumps(run_config, indent=2) + "\n")


def _schedule(config: dict[str, Any]) -> schedules.Schedule:
  if "diffusers" in config:
    return schedules.from_diffusers_config(config["diffusers"])[0]
  name = config.get("name", "linear")
  if name not in schedules.SCHEDULES:
    raise PriorError(f"unknown schedule {name!r}; choose one of {sorted(schedules.SCHEDULES)}")
  return schedules.SCHEDULES[name](int(config.get("num_train_steps", 1000)))


def load(path: str | Path = MNIST_PRIOR) -> Prior:
  """Reads a prior folder written by `save` (the shipped MNIST prior by default)."""
  path = Path(path)
  for name in _FILES:
    if not (path / name).is_file():
      raise PriorError(f"{path / name} is missing; a prior folder holds unet.json, schedule.json "
                       "and params.msgpack (train one with scripts/train_diffusion.py)")
  return _load(path, runs.stamp(path, _FILES))


_FILES = ("unet.json", "schedule.json", "params.msgpack")


@functools.lru_cache(maxsize=4)  # a study loads the same prior for every cell
def _load(path: Path, stamp: tuple) -> Prior:
  del stamp  # the cache key: a rewritten file is read again
  config = unet.config_from_dict(json.loads((path / "unet.json").read_text()))
  sched = json.loads((path / "schedule.json").read_text())
  template = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                          jax.eval_shape(lambda: unet.init(config, key=jax.random.key(0))))
  problem = None
  try:
    params = serialization.from_bytes(template, (path / "params.msgpack").read_bytes())
    for (where, want), got in zip(jax.tree_util.tree_flatten_with_path(template)[0], jax.tree.leaves(params)):
      if want.shape != got.shape:
        problem = f"{jax.tree_util.keystr(where)} has shape {got.shape}, the config needs {want.shape}"
        break
  except Exception as e:  # msgpack / structure mismatch
    problem = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
  if problem:
    raise PriorError(f"{path / 'params.msgpack'} does not hold weights for the UNet of "
                     f"{path / 'unet.json'} ({problem})")
  return Prior(unet_config=config, params=params, schedule=_schedule(sched),
               prediction=sched.get("prediction", "epsilon"),
               num_classes=int(sched.get("num_classes", 0)),
               schedule_config={k: v for k, v in sched.items() if k not in ("prediction", "num_classes")})
