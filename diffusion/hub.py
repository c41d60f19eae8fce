"""diffusers checkpoints as priors: a `UNet2DModel` folder (`config.json` +
`diffusion_pytorch_model.safetensors`) read with safetensors' NumPy API into the Flax UNet,
and its scheduler config into our schedules. No torch, no diffusers code.

    prior = hub.load_diffusers("path/to/ddpm-cifar10-32")   # downloaded by the user

A pipeline folder (`unet/` and `scheduler/` subfolders, as `DDPMPipeline.save_pretrained`
writes) and a bare model folder (`config.json` and the weights, `scheduler_config.json`
beside them, as google/ddpm-cifar10-32 is laid out) are both accepted.

Tensor names map one to one: diffusers' `down_blocks.0.resnets.1.conv1.weight` is
`params['down_blocks_0']['resnets_1']['conv1']['kernel']`, transposed from OIHW to HWIO
(dense layers: [out, in] -> [in, out]; GroupNorm's weight is Flax's scale). The attention
names of checkpoints saved before diffusers 0.14 (`query`, `key`, `value`, `proj_attn`)
are renamed to the current ones (`to_q`, `to_k`, `to_v`, `to_out.0`) as diffusers does.
`save_diffusers` writes the reverse, so priors trained here load in diffusers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np

from diffusion import prior as prior_lib
from diffusion import schedules, unet

WEIGHTS = "diffusion_pytorch_model.safetensors"
_LISTS = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers", "to_out")
_DEPRECATED = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


class CheckpointFormatError(ValueError):
  """A diffusers folder this port cannot read (the message names the file or tensor)."""


def _diffusers_name(path: tuple[str, ...]) -> str:
  """('down_blocks_0', 'resnets_1', 'conv1', 'kernel') -> 'down_blocks.0.resnets.1.conv1.weight'."""
  parts = []
  for p in path[:-1]:
    m = re.fullmatch(rf"({'|'.join(_LISTS)})_(\d+)", p)
    parts.append(f"{m.group(1)}.{m.group(2)}" if m else p)
  leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}[path[-1]]
  return ".".join(parts + [leaf])


def _renamed(name: str) -> str:
  """A pre-0.14 attention tensor name in today's naming."""
  m = re.fullmatch(r"(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)", name)
  return f"{m.group(1)}.{_DEPRECATED[m.group(2)]}.{m.group(3)}" if m else name


def _to_flax(array: np.ndarray, leaf: str, ndim: int) -> np.ndarray:
  if leaf == "kernel" and ndim == 4:
    return array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  if leaf == "kernel" and ndim == 2:
    if array.ndim == 4:  # a 1x1 convolution used as a dense layer in old attention blocks
      array = array[:, :, 0, 0]
    return array.T
  return array


def _to_torch(array: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel" and array.ndim == 4:
    return array.transpose(3, 2, 0, 1)
  if leaf == "kernel" and array.ndim == 2:
    return array.T
  return array


def _paths(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
  return [(tuple(k.key for k in path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def params_from_state_dict(config: unet.UNetConfig, state: dict[str, np.ndarray], *,
                           source: str = "the checkpoint") -> Any:
  """The Flax parameters of `UNet(config)` from a diffusers state dict (NumPy arrays).

  Raises:
    CheckpointFormatError: a tensor the UNet needs is missing, has the wrong shape, or the
      checkpoint holds tensors the UNet has no place for (each named).
  """
  state = {_renamed(k): np.asarray(v) for k, v in state.items()}
  template = jax.eval_shape(lambda: unet.init(config, key=jax.random.key(0)))
  flat, used = {}, set()
  for path, spec in _paths(template):
    name = _diffusers_name(path)
    if name not in state:
      raise CheckpointFormatError(f"{source} has no tensor {name!r}, which the UNet of its "
                                  f"config needs (Flax parameter {'/'.join(path)})")
    value = _to_flax(state[name], path[-1], len(spec.shape))
    if value.shape != spec.shape:
      raise CheckpointFormatError(f"tensor {name!r} in {source} has shape {state[name].shape}; "
                                  f"the UNet of its config needs {tuple(_to_torch(np.zeros(spec.shape), path[-1]).shape)}")
    flat[path] = value.astype(np.float32)
    used.add(name)
  extra = sorted(set(state) - used)
  if extra:
    raise CheckpointFormatError(f"{source} holds {len(extra)} tensor(s) the UNet of its config "
                                f"has no place for, e.g. {extra[0]!r}; is config.json the one "
                                "saved with these weights?")
  params: dict[str, Any] = {}
  for path, value in flat.items():
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  return params


def state_dict_from_params(params: Any) -> dict[str, np.ndarray]:
  """The diffusers state dict (NumPy, torch layouts) of Flax UNet parameters."""
  return {_diffusers_name(path): np.ascontiguousarray(_to_torch(np.asarray(leaf), path[-1]))
          for path, leaf in _paths(params)}


def _read_json(path: Path) -> dict[str, Any]:
  try:
    return json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointFormatError(f"cannot read {path}: {e}") from e


def load_unet(folder: str | Path) -> tuple[unet.UNetConfig, Any]:
  """The config and Flax parameters of a diffusers `UNet2DModel` folder."""
  folder = Path(folder)
  config_path, weights = folder / "config.json", folder / WEIGHTS
  if not config_path.is_file():
    raise CheckpointFormatError(f"{config_path} is missing; a diffusers UNet folder holds "
                                f"config.json and {WEIGHTS}")
  raw = _read_json(config_path)
  if raw.get("_class_name", "UNet2DModel") != "UNet2DModel":
    raise CheckpointFormatError(f"{config_path} describes a {raw['_class_name']}; this port "
                                "reads UNet2DModel checkpoints")
  try:
    config = unet.config_from_dict(raw)
  except unet.ConfigError as e:
    raise CheckpointFormatError(f"{config_path}: {e}") from e
  if not weights.is_file():
    hint = (" (it holds the PyTorch pickle diffusion_pytorch_model.bin: convert it once with "
            "diffusers' `UNet2DModel.from_pretrained(folder).save_pretrained(folder, "
            "safe_serialization=True)`)") if (folder / "diffusion_pytorch_model.bin").is_file() else ""
    raise CheckpointFormatError(f"{weights} is missing{hint}")
  from safetensors.numpy import load_file
  try:
    state = load_file(str(weights))
  except Exception as e:  # safetensors raises its own error types
    raise CheckpointFormatError(f"cannot read {weights}: {e}") from e
  return config, params_from_state_dict(config, state, source=str(weights))


def load_diffusers(folder: str | Path, *, scheduler_config: dict[str, Any] | None = None) -> prior_lib.Prior:
  """A `Prior` from a diffusers pipeline or UNet folder (see the module docstring).

  The scheduler config is read from `scheduler/scheduler_config.json` or
  `scheduler_config.json`, unless `scheduler_config` is given. A class-conditional
  checkpoint is taken to reserve its last class embedding as the null label, as priors
  trained here do.
  """
  folder = Path(folder)
  unet_folder = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
  config, params = load_unet(unet_folder)
  if scheduler_config is None:
    candidates = [folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json"]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
      raise CheckpointFormatError(f"no scheduler config in {folder} (looked for "
                                  f"{', '.join(str(p) for p in candidates)}); pass scheduler_config=")
    scheduler_config = _read_json(found)
  try:
    schedule, prediction = schedules.from_diffusers_config(scheduler_config)
  except ValueError as e:
    raise CheckpointFormatError(str(e)) from e
  return prior_lib.Prior(unet_config=config, params=params, schedule=schedule, prediction=prediction,
                         num_classes=(config.num_class_embeds or 1) - 1,
                         schedule_config={"diffusers": scheduler_config})


def save_diffusers(prior: prior_lib.Prior, folder: str | Path) -> None:
  """Writes `prior` as a diffusers pipeline folder: `unet/config.json`,
  `unet/diffusion_pytorch_model.safetensors` and `scheduler/scheduler_config.json`
  (a DDPMScheduler config; priors with a schedule given by name only)."""
  from safetensors.numpy import save_file
  folder = Path(folder)
  (folder / "unet").mkdir(parents=True, exist_ok=True)
  (folder / "scheduler").mkdir(parents=True, exist_ok=True)
  (folder / "unet" / "config.json").write_text(json.dumps(unet.config_to_dict(prior.unet_config), indent=2) + "\n")
  save_file(state_dict_from_params(prior.params), str(folder / "unet" / WEIGHTS))
  sc = prior.schedule_config
  if "diffusers" in sc:
    scheduler = sc["diffusers"]
  else:
    names = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
    if sc.get("name") not in names:
      raise CheckpointFormatError(f"cannot express schedule {sc} as a diffusers scheduler config")
    scheduler = {"_class_name": "DDPMScheduler", "num_train_timesteps": sc.get("num_train_steps", 1000),
                 "beta_schedule": names[sc["name"]], "beta_start": 1e-4, "beta_end": 0.02,
                 "prediction_type": {"epsilon": "epsilon", "x0": "sample", "v": "v_prediction"}[prior.prediction],
                 "clip_sample": True, "variance_type": "fixed_small"}
  (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
