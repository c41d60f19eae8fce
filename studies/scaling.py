"""Scaling studies: attack quality vs batch size, local steps and SecAgg clients; throughput
vs clients and devices.

Attack quality (median PSNR, label accuracy, on the untrained model; victims are clients
of an iid partition; attack cells cached in `cells/` like the study's, so reruns resume):
  batch        B in 1..64 images behind one FedSGD gradient
  local_steps  s in 1..10 full-batch local SGD steps (FedAvg, B = 4) behind one delta
  secagg       n in 1..100 clients (B = 1 each) summed by secure aggregation: the server
               sees only the mean of their gradients
Throughput:
  clients      client updates per second of one jitted FedAvg round vs clients per round
  devices      client updates per second and victim attacks per hour vs local devices
               (forced CPU devices: `--xla_force_host_platform_device_count`, one
               subprocess per count; on CPU they share the same cores)
`run` writes scaling.md, scaling.json and one PNG per study into the workdir.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from fljax import config as config_lib
from fljax import datasets, partitions
from fljax import federated as fed
from fljax.plots import _pyplot
from fljax.timing import timed
from studies import cells, grid, runner

PARTS = ("batch", "local_steps", "secagg", "clients", "devices")
ATTACK_PARTS = ("batch", "local_steps", "secagg")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScalingConfig:
  """The scaling studies and their sizes.

  Attributes:
    parts: the studies to run (the others keep their earlier results in the workdir).
    attacks: attacks of the attack-quality studies.
    data: the data.
    model: the model (fljax.models).
    clients: clients of the iid partition the victims come from.
    victims: attacked uploads per attack cell.
    budget: double-backward evaluations per victim.
    batch: B values of the batch study.
    local_steps: local steps of the local_steps study (B = 4).
    secagg: clients summed by secure aggregation (B = 1 each).
    fl_clients: clients per round of the clients study.
    devices: local device counts of the devices study.
    device_clients: clients per round in the devices study.
    repeats: timed repeats of each throughput measurement.
  """

  parts: tuple[str, ...] = dataclasses.field(default=PARTS, metadata={"choices": PARTS})
  attacks: tuple[str, ...] = dataclasses.field(default=("ig", "dps"),
                                               metadata={"choices": tuple(grid.ATTACKS)})
  data: grid.DataSpec = grid.DataSpec()
  model: str = "cnn"
  clients: int = 100
  victims: int = 1
  budget: int = 30
  batch: tuple[int, ...] = (1, 4, 16, 64)
  local_steps: tuple[int, ...] = (1, 2, 5, 10)
  secagg: tuple[int, ...] = (1, 10, 100)
  fl_clients: tuple[int, ...] = (10, 100, 1000)
  devices: tuple[int, ...] = (1, 2, 4, 8)
  device_clients: int = 64
  repeats: int = 3

  def __post_init__(self):
    grid.check_names("part", self.parts, PARTS)
    grid.check_names("attack", self.attacks, grid.ATTACKS)
    for name in ("batch", "local_steps", "secagg", "fl_clients", "devices"):
      if not getattr(self, name) or min(getattr(self, name)) < 1:
        raise ValueError(f"{name} needs values >= 1, got {list(getattr(self, name))}")


# `scripts/scaling.py --quick`: digits, tiny sizes, seconds
QUICK = {"data.name": "digits", "model": "mlp", "clients": 16, "victims": 1, "budget": 3,
         "attacks": ("ig",), "batch": (1, 2), "local_steps": (1, 2), "secagg": (1, 2),
         "fl_clients": (4, 8), "devices": (1, 2), "device_clients": 8, "repeats": 1}


def _study(cfg: ScalingConfig, clients: int, victims: int, attacks: tuple[str, ...]
           ) -> grid.StudyConfig:
  return grid.StudyConfig(data=cfg.data, partitions=("iid",), defenses=("none",),
                          attacks=attacks, seeds=(0,), clients=clients, q=0.1, model=cfg.model,
                          victims=victims, budgets=(cfg.budget,),
                          generative_budget=cfg.budget, defense_budget=cfg.budget)


def attack_sweep(cfg: ScalingConfig, axis: str, cells_dir: Path, *,
                 say: Callable[[str], Any] = print) -> list[dict[str, Any]]:
  """One attack cell per (value, attack) of `axis`, those not done attacked (batched by
  shape); one row per cell."""
  values = getattr(cfg, axis)
  clients = cfg.clients
  if axis == "batch":  # iid clients must hold the largest batch
    n_train = len(datasets.load(cfg.data.name, image_size=cfg.data.image_size,
                                channels=cfg.data.channels).y_train)
    clients = max(1, min(clients, n_train // max(values)))
  study = _study(cfg, clients, cfg.victims, cfg.attacks)
  planned = []
  for value in values:
    for attack in cfg.attacks:
      b = value if axis == "batch" else 4 if axis == "local_steps" else 1
      steps = value if axis == "local_steps" else 1
      cell = cells.attack_cell(study, "iid", "secagg" if axis == "secagg" else "none", 0, attack,
                               b, steps, "untrained", "-", None, cfg.budget)
      if axis == "secagg":
        cell["view"]["clients"] = value
      planned.append((value, attack, cells.config_hash(cell), cell))
  todo = {h: cell for _, _, h, cell in planned if not cells.is_done(cells_dir / "attack" / h)}
  for h in todo:
    cells.reopen(cells_dir / "attack" / h)
  for group in cells.prepare_groups(todo, cells_dir).values():
    cells.attack_and_write(group, cells_dir, mode=cells.batching_mode())
  rows = []
  for value, attack, h, _ in planned:
    r = cells.read_cell(cells_dir / "attack" / h)
    rows.append({"axis": axis, "value": value, "attack": attack, "status": r["status"],
                 "psnr": r.get("median_psnr"), "label_accuracy": r.get("mean_label_accuracy"),
                 "seconds": r.get("wall_seconds"), "reason": r.get("reason")})
    say(f"{axis}={value} {attack}: " + (f"{r['median_psnr']:.2f} dB, labels "
        f"{r['mean_label_accuracy']:.2f}" if r["status"] == "done" else f"failed ({r['reason']})"))
  return rows


def fl_throughput(cfg: ScalingConfig, clients: tuple[int, ...], devices: int = 1
                  ) -> list[dict[str, Any]]:
  """Client updates per second of one jitted FedAvg round (every client participates)."""
  ds = datasets.load(cfg.data.name, image_size=cfg.data.image_size, channels=cfg.data.channels)
  model = grid.make_model(cfg.model, ds)
  params = model.init(jax.random.key(0))
  mesh = fed.make_mesh(devices) if devices > 1 else None
  rows = []
  for c in clients:
    parts = partitions.iid(ds.y_train, c, key=jax.random.key(1))
    data = fed.replicate(jax.tree.map(jnp.asarray, partitions.make_clients(ds.x_train, ds.y_train, parts)), mesh)
    fed_cfg = fed.FedConfig(clients_per_round=1.0)
    step = jax.jit(fed.make_round_step(fed.make_client_update(fed.make_loss_fn(model.apply), fed_cfg),
                                       fed_cfg, c, mesh=mesh))
    state = fed.replicate(fed.init_server_state(params, fed_cfg, key=jax.random.key(2)), mesh)
    jax.block_until_ready(step(state, data))
    seconds = timed(lambda: jax.block_until_ready(step(state, data)), cfg.repeats)
    rows.append({"clients": c, "devices": devices, "updates_per_second": c / seconds})
  return rows


def attack_throughput(cfg: ScalingConfig, devices: int, cells_dir: Path) -> dict[str, Any]:
  """Victim attacks per hour: `victims` x devices victims of one attack, rows spread over
  the devices (compile excluded: the second of two runs is timed)."""
  study = _study(cfg, cfg.clients, cfg.victims * devices, ("ig",))
  cell = cells.attack_cell(study, "iid", "none", 0, "ig", 1, 1, "untrained", "-", None,
                           cfg.budget)
  p = cells.prepare(cell, cells.config_hash(cell), cells_dir)
  cells.attack_group([p], mode=cells.batching_mode())
  t0 = time.perf_counter()
  cells.attack_group([p], mode=cells.batching_mode())
  return {"devices": devices, "victims": study.victims,
          "victim_attacks_per_hour": study.victims * 3600 / (time.perf_counter() - t0)}


def device_worker(config_json: str, workdir: str) -> None:
  """The devices study on this process's devices: prints `WORKER <json row>`."""
  cfg = config_lib.from_dict(ScalingConfig, json.loads(config_json))
  d = jax.local_device_count()
  row = fl_throughput(cfg, (cfg.device_clients,), devices=d)[0]
  print("WORKER " + json.dumps({**row, **attack_throughput(cfg, d, Path(workdir) / "cells")}),
        flush=True)


def device_sweep(cfg: ScalingConfig, workdir: Path, *, say: Callable[[str], Any] = print
                 ) -> list[dict[str, Any]]:
  """`device_worker` in one subprocess per device count (forced host devices)."""
  root = str(Path(__file__).resolve().parents[1])
  code = "import sys; from studies import scaling; scaling.device_worker(sys.argv[1], sys.argv[2])"
  rows = []
  for d in cfg.devices:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={d}",
           "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", ""),
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    argv = [sys.executable, "-c", code, json.dumps(config_lib.to_dict(cfg)), str(workdir)]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=3600)
    line = [x for x in out.stdout.splitlines() if x.startswith("WORKER ")]
    if out.returncode or not line:
      rows.append({"devices": d, "failed": (out.stderr.strip().splitlines() or ["?"])[-1]})
    else:
      rows.append(json.loads(line[0][len("WORKER "):]))
    say(f"devices={d}: {rows[-1]}")
  return rows


def plots(out: Path, data: dict[str, Any]) -> list[str]:
  plt = _pyplot()
  made = []
  for axis, xlabel in (("batch", "batch size B"), ("local_steps", "local steps (B = 4)"),
                       ("secagg", "clients summed by secure aggregation (B = 1 each)")):
    rows = [r for r in data.get("attack", []) if r["axis"] == axis and r["status"] == "done"]
    if not rows:
      continue
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for a in dict.fromkeys(r["attack"] for r in rows):
      rs = [r for r in rows if r["attack"] == a]
      ax.plot([r["value"] for r in rs], [r["psnr"] for r in rs], "o-", label=a)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("median PSNR, dB")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"attack_vs_{axis}.png", dpi=100)
    plt.close(fig)
    made.append(f"attack_vs_{axis}.png")
  for key, x, y, xlabel, ylabel in (
      ("clients", "clients", "updates_per_second", "clients per round", "client updates / s"),
      ("devices", "devices", "updates_per_second", "local devices", "client updates / s")):
    rows = [r for r in data.get(key, []) if y in r]
    if not rows:
      continue
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot([r[x] for r in rows], [r[y] for r in rows], "o-", label="FedAvg round")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if key == "devices":
      ax2 = ax.twinx()
      ax2.plot([r[x] for r in rows], [r["victim_attacks_per_hour"] for r in rows], "s--",
               color="C1", label="victim attacks / hour (ig)")
      ax2.set_ylabel("victim attacks / hour")
      ax2.legend(fontsize=7, loc="lower right")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out / f"throughput_vs_{key}.png", dpi=100)
    plt.close(fig)
    made.append(f"throughput_vs_{key}.png")
  return made


def table(out: Path, data: dict[str, Any], figs: list[str], env: dict[str, Any]) -> str:
  """scaling.md: one table per study; returns its text."""
  lines = ["# Scaling studies", "", f"Machine: {env}", ""]
  for axis in ATTACK_PARTS:
    rows = [r for r in data.get("attack", []) if r["axis"] == axis]
    if rows:
      lines += [f"## attack quality vs {axis}", "", "| value | attack | median PSNR dB | label acc "
                "| wall s | status |", "|---|---|---|---|---|---|"]
      lines += [f"| {r['value']} | {r['attack']} | " + (
          f"{r['psnr']:.2f} | {r['label_accuracy']:.2f} | {r['seconds']:.1f} | done |"
          if r["status"] == "done" else f"- | - | - | failed: {r['reason']} |") for r in rows]
      lines.append("")
  for key in ("clients", "devices"):
    rows = data.get(key, [])
    if rows:
      cols = list(dict.fromkeys(k for r in rows for k in r))
      lines += [f"## throughput vs {key}", "", "| " + " | ".join(cols) + " |",
                "|" + "---|" * len(cols)]
      lines += ["| " + " | ".join(f"{r.get(c):.4g}" if isinstance(r.get(c), float) else
                                  str(r.get(c, "-")) for c in cols) + " |" for r in rows]
      lines.append("")
  lines += [f"![{f}]({f})" for f in figs]
  text = "\n".join(lines) + "\n"
  (out / "scaling.md").write_text(text)
  return text


def run(cfg: ScalingConfig, workdir: str | os.PathLike, *, say: Callable[[str], Any] = print
        ) -> dict[str, Any]:
  """Runs `cfg.parts` (the other parts keep their results from scaling.json) and writes
  scaling.json, scaling.md and the figures; returns the data with its `headline`: the
  best PSNR at the smallest B, and the speedup of the most devices over the fewest."""
  out = Path(workdir)
  cells_dir = runner.open_workdir(out)
  data: dict[str, Any] = {"attack": []}
  if (out / "scaling.json").exists():
    data = json.loads((out / "scaling.json").read_text())
    data.pop("environment", None)
    data.pop("headline", None)
    data["attack"] = [r for r in data.get("attack", []) if r["axis"] not in cfg.parts]
  for axis in ATTACK_PARTS:
    if axis in cfg.parts:
      data["attack"] += attack_sweep(cfg, axis, cells_dir, say=say)
  if "clients" in cfg.parts:
    data["clients"] = fl_throughput(cfg, cfg.fl_clients)
    say(f"clients: {data['clients']}")
  if "devices" in cfg.parts:
    data["devices"] = device_sweep(cfg, out, say=say)
  env = cells.environment() | {"jax_devices_here": jax.device_count()}
  (out / "scaling.json").write_text(json.dumps({**data, "environment": env}, indent=1) + "\n")
  say(table(out, data, plots(out, data), env))
  done = [r for r in data["attack"] if r["status"] == "done" and r["axis"] == "batch"
          and r["value"] == min(cfg.batch)]
  headline = {"psnr_b1": max(r["psnr"] for r in done)} if done else {}
  ok = [r for r in data.get("devices", []) if "updates_per_second" in r]
  if len(ok) >= 2:
    headline["device_speedup"] = ok[-1]["updates_per_second"] / ok[0]["updates_per_second"]
  return {**data, "headline": headline}
