"""Scaling studies: attack quality vs batch size, local steps and SecAgg clients; throughput
vs clients and devices.

  python scripts/scaling.py --out runs/scaling            # all of it (CPU: ~15 min)
  python scripts/scaling.py --quick --out /tmp/scaling    # seconds (digits, tiny sizes)
  python scripts/scaling.py --parts throughput            # only the throughput figures

Attack quality (median PSNR, label accuracy, on the untrained CNN, embedded MNIST 32x32,
victims are clients of an iid partition; cells cached like the study's, so reruns resume):
  batch        B in 1..64 images behind one FedSGD gradient
  local_steps  s in 1..10 full-batch local SGD steps (FedAvg, B = 4) behind one delta
  secagg       n in 1..100 clients (B = 1 each) summed by secure aggregation: the server
               sees only the mean of their gradients
Throughput:
  clients      client updates per second of one jitted FedAvg round vs clients per round
  devices      client updates per second and victim attacks per hour vs local devices
               (forced CPU devices here: `--xla_force_host_platform_device_count`, one
               subprocess per count; on CPU they share the same cores)
Writes scaling.md, scaling.json and one PNG per study into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARTS = ("batch", "local_steps", "secagg", "clients", "devices")


def attack_sweep(args, axis: str, values: list[int]) -> list[dict]:
  """One attack cell per (value, attack), cached in --out/cells; all batched by shape."""
  from fljax import datasets
  from inversion import study as st
  clients = args.clients
  if axis == "batch":  # iid clients must hold the largest batch
    n_train = len(datasets.load(args.dataset, image_size=32, channels=1).y_train)
    clients = max(1, min(clients, n_train // max(values)))
  cfg = st.StudyConfig(dataset=args.dataset, partitions=("iid",), defenses=("none",),
                       attacks=tuple(args.attacks), seeds=(0,), clients=clients,
                       q=0.1, model=args.model, victims=args.victims, budget=args.budget)
  cells_dir = Path(args.out) / "cells"
  rows = []
  for value in values:
    for attack in args.attacks:
      b = value if axis == "batch" else 4 if axis == "local_steps" else 1
      steps = value if axis == "local_steps" else 1
      cell = st.attack_cell(cfg, "iid", "secagg" if axis == "secagg" else "none", 0, attack,
                            b, steps, "untrained", "-", None)
      if axis == "secagg":
        cell["view"]["clients"] = value
      h = st.config_hash(cell)
      result = st.read_cell(cells_dir / "attack" / h)
      if result is None:
        try:
          p = st.prepare(cell, h, cells_dir)
          result, matched = st.attack_group([p], mode=st.batching_mode())[0]
          st._write_attack(cells_dir, h, result, (p.x, matched))
        except Exception as e:  # recorded, the sweep goes on
          result = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
          st._write_attack(cells_dir, h, {**result, "config": cell}, None)
      rows.append({"axis": axis, "value": value, "attack": attack, "status": result["status"],
                   "psnr": result.get("median_psnr"), "label_accuracy":
                   result.get("mean_label_accuracy"), "seconds": result.get("wall_seconds"),
                   "reason": result.get("reason")})
      print(f"{axis}={value} {attack}: " + (f"{rows[-1]['psnr']:.2f} dB, labels "
            f"{rows[-1]['label_accuracy']:.2f}" if result["status"] == "done" else
            f"failed ({result['reason']})"), flush=True)
  return rows


def fl_throughput(clients: list[int], dataset: str, repeats: int, devices: int = 1) -> list[dict]:
  """Client updates per second of one jitted FedAvg round (every client participates)."""
  import jax
  import jax.numpy as jnp
  from fljax import datasets, models, partitions
  from fljax import federated as fed
  from fljax.timing import timed
  ds = datasets.load(dataset, image_size=32, channels=1)
  model = models.make("cnn", num_classes=ds.num_classes, input_shape=ds.image_shape)
  params = model.init(jax.random.key(0))
  mesh = fed.make_mesh(devices) if devices > 1 else None
  rows = []
  for c in clients:
    parts = partitions.iid(ds.y_train, c, key=jax.random.key(1))
    data = fed.replicate(jax.tree.map(jnp.asarray, partitions.make_clients(ds.x_train, ds.y_train, parts)), mesh)
    cfg = fed.FedConfig(clients_per_round=1.0)
    step = jax.jit(fed.make_round_step(fed.make_client_update(fed.make_loss_fn(model.apply), cfg),
                                       cfg, c, mesh=mesh))
    state = fed.replicate(fed.init_server_state(params, cfg, key=jax.random.key(2)), mesh)
    jax.block_until_ready(step(state, data))
    seconds = timed(lambda: jax.block_until_ready(step(state, data)), repeats)
    rows.append({"clients": c, "devices": devices, "updates_per_second": c / seconds})
  return rows


def attack_throughput(args, devices: int) -> dict:
  """Victim attacks per hour: `victims` x devices victims of one attack, rows spread over
  the devices (compile excluded: the second of two runs is timed)."""
  from inversion import study as st
  cfg = st.StudyConfig(dataset=args.dataset, partitions=("iid",), defenses=("none",),
                       attacks=("ig",), seeds=(0,), clients=args.clients, model=args.model,
                       victims=args.victims * devices, budget=args.budget)
  cell = st.attack_cell(cfg, "iid", "none", 0, "ig", 1, 1, "untrained", "-", None)
  p = st.prepare(cell, st.config_hash(cell), Path(args.out) / "cells")
  st.attack_group([p], mode=st.batching_mode())
  t0 = time.perf_counter()
  st.attack_group([p], mode=st.batching_mode())
  return {"devices": devices, "victims": cfg.victims,
          "victim_attacks_per_hour": cfg.victims * 3600 / (time.perf_counter() - t0)}


def device_worker(args) -> None:
  import jax
  d = jax.local_device_count()
  fl = fl_throughput([args.device_clients], args.dataset, args.repeats, devices=d)[0]
  print("WORKER " + json.dumps({**fl, **attack_throughput(args, d)}), flush=True)


def device_sweep(args) -> list[dict]:
  rows = []
  for d in args.devices:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={d}",
           "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "")}
    argv = [sys.executable, __file__, "--worker", "--out", args.out, "--dataset", args.dataset,
            "--model", args.model, "--victims", str(args.victims), "--budget", str(args.budget),
            "--clients", str(args.clients), "--device_clients", str(args.device_clients),
            "--repeats", str(args.repeats)]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=3600)
    line = [x for x in out.stdout.splitlines() if x.startswith("WORKER ")]
    if out.returncode or not line:
      rows.append({"devices": d, "failed": (out.stderr.strip().splitlines() or ["?"])[-1]})
    else:
      rows.append(json.loads(line[0][7:]))
    print(f"devices={d}: {rows[-1]}", flush=True)
  return rows


def plots(out: Path, data: dict) -> list[str]:
  from fljax.plots import _pyplot
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


def table(out: Path, data: dict, figs: list[str], env: dict) -> str:
  lines = ["# Scaling studies", "", f"Machine: {env}", ""]
  for axis in ("batch", "local_steps", "secagg"):
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


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default="runs/scaling")
  p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
  p.add_argument("--quick", action="store_true", help="digits, tiny sizes: a smoke test")
  p.add_argument("--attacks", nargs="+", default=["ig", "dps"])
  p.add_argument("--dataset", default="mnist")
  p.add_argument("--model", default="cnn")
  p.add_argument("--clients", type=int, default=100, help="the partition's clients")
  p.add_argument("--victims", type=int, default=1)
  p.add_argument("--budget", type=int, default=30)
  p.add_argument("--batch", nargs="+", type=int, default=[1, 4, 16, 64])
  p.add_argument("--local_steps", nargs="+", type=int, default=[1, 2, 5, 10])
  p.add_argument("--secagg", nargs="+", type=int, default=[1, 10, 100])
  p.add_argument("--fl_clients", nargs="+", type=int, default=[10, 100, 1000])
  p.add_argument("--devices", nargs="+", type=int, default=[1, 2, 4, 8])
  p.add_argument("--device_clients", type=int, default=64)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.quick:
    args.dataset, args.model, args.clients, args.victims, args.budget = "digits", "mlp", 16, 1, 3
    args.attacks, args.batch, args.local_steps, args.secagg = ["ig"], [1, 2], [1, 2], [1, 2]
    args.fl_clients, args.devices, args.device_clients, args.repeats = [4, 8], [1, 2], 8, 1
  if args.worker:
    return device_worker(args)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  data: dict = {"attack": []}
  if (out / "scaling.json").exists():  # parts not run this time keep their earlier results
    data = json.loads((out / "scaling.json").read_text())
    data.pop("environment", None)
    data["attack"] = [r for r in data.get("attack", []) if r["axis"] not in args.parts]
  for axis in ("batch", "local_steps", "secagg"):
    if axis in args.parts:
      data["attack"] += attack_sweep(args, axis, getattr(args, axis))
  if "clients" in args.parts:
    data["clients"] = fl_throughput(args.fl_clients, args.dataset, args.repeats)
    print(f"clients: {data['clients']}", flush=True)
  if "devices" in args.parts:
    data["devices"] = device_sweep(args)
  import jax
  from inversion import study as st
  env = st.environment() | {"jax_devices_here": jax.device_count()}
  (out / "scaling.json").write_text(json.dumps({**data, "environment": env}, indent=1) + "\n")
  figs = plots(out, data)
  print(table(out, data, figs, env))
  done = [r for r in data["attack"] if r["status"] == "done"]
  head = {}
  if done:
    head["psnr_b1"] = max((r["psnr"] for r in done if r["axis"] == "batch" and r["value"] == min(args.batch)), default=float("nan"))
  if data.get("devices"):
    ok = [r for r in data["devices"] if "updates_per_second" in r]
    if len(ok) >= 2:
      head["device_speedup"] = ok[-1]["updates_per_second"] / ok[0]["updates_per_second"]
  print("RESULT scaling " + " ".join(f"{k}={v:.3g}" for k, v in head.items()))


if __name__ == "__main__":
  main()
