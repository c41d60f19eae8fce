"""Running a study: plan its cells, run those not done, write the report.

The FL cells run one after the other (each shards its clients over the local devices);
the attack cells are grouped by shape and each group is attacked in one compiled
computation, its rows (the victims of every partition, defense and seed at once) spread
over the local devices. A rerun skips the done cells and runs again the failed ones; a
killed study resumes (an FL cell mid-training from its checkpoint). Several hosts
(`Hosts`: independent processes sharing the workdir, started together) each take the
cells whose hash falls to them and wait for the others'; host 0 writes the report.

`run` leaves `jax.config` alone: an entry point that wants JAX's persistent compilation
cache (programs that agree across cells then compile once) sets it, as
`scripts/study.py` does in the workdir's `xla_cache/`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from fljax import runs
from studies import cells, grid, report

_ATTACK_SHARE = 0.6  # attacks' time relative to the FL cells' in the default grid (measured)

FlPlan = dict[tuple[str, str, int], tuple[str, dict]]  # (partition, defense, seed) -> (hash, cell)
AttackPlan = dict[tuple, tuple[str, dict]]  # (partition, defense, seed, attack, B, s, state, budget) -> ...


class BudgetError(RuntimeError):
  """The study would take longer than its budget (finished cells are kept)."""


@dataclasses.dataclass(frozen=True)
class Hosts:
  """This host's share of the cells: several hosts (each an independent JAX process on its
  own devices, sharing the workdir) split the cells by hash; host 0 writes the report."""

  index: int = 0
  count: int = 1

  def __post_init__(self):
    if not 0 <= self.index < self.count:
      raise ValueError(f"host index {self.index} must be in [0, {self.count})")

  def mine(self, h: str) -> bool:
    return int(h, 16) % self.count == self.index

  @classmethod
  def from_env(cls, index: int | None = None, count: int | None = None) -> Hosts:
    """`index` and `count` where given, else from SLURM (SLURM_PROCID / SLURM_NTASKS) or
    FLJAX_HOST / FLJAX_HOSTS; else one host."""
    env = os.environ
    index = int(env.get("FLJAX_HOST", env.get("SLURM_PROCID", "0"))) if index is None else index
    count = int(env.get("FLJAX_HOSTS", env.get("SLURM_NTASKS", "1"))) if count is None else count
    return cls(index, count)


def plan_fl(cfg: grid.StudyConfig) -> FlPlan:
  out = {}
  for p in cfg.partitions:
    for d in cfg.defenses:
      for s in cfg.seeds:
        cell = cells.fl_cell(cfg, p, d, s)
        out[(p, d, s)] = (cells.config_hash(cell), cell)
  return out


def plan_attacks(cfg: grid.StudyConfig, fl: FlPlan, cells_dir: Path) -> AttackPlan:
  """The attack cells of the grid, given the FL cells' outcomes so far (defenses whose
  view is not modelled have none)."""
  out = {}
  for (p, d, s), (h, _) in fl.items():
    if s not in cfg.attack_seeds or grid.DEFENSES[d].view is None:
      continue
    result = cells.read_cell(cells_dir / "fl" / h)
    for b in cfg.batches(d):
      for a in cfg.attacks_under(d, b):
        for steps in cfg.local_steps:
          for state in cfg.states(d):
            for budget in cfg.rungs(a, d, b):
              cell = cells.attack_cell(cfg, p, d, s, a, b, steps, state, h, result, budget)
              out[(p, d, s, a, b, steps, state, budget)] = (cells.config_hash(cell), cell)
    for a in cfg.released_attacks:  # what a model observer recovers (grid.RELEASED)
      for b in cfg.defense_batch_sizes:
        for steps in cfg.local_steps:
          for state in cfg.defense_model_states:
            for budget in cfg.rungs(a, grid.RELEASED):  # one rung, as under any defense
              cell = cells.attack_cell(cfg, p, d, s, a, b, steps, state, h, result, budget,
                                       released=True)
              out[(p, d, s, a + grid.RELEASED, b, steps, state, budget)] = (
                  cells.config_hash(cell), cell)
  return out


def open_workdir(workdir: Path) -> Path:
  """`workdir/cells`, created; `runs.WorkdirError` if the workdir is a file or unwritable."""
  if workdir.exists() and not workdir.is_dir():
    raise runs.WorkdirError(f"{workdir} is a file: pass a folder as the workdir")
  try:
    (workdir / "cells").mkdir(parents=True, exist_ok=True)
    probe = workdir / ".write_test"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise runs.WorkdirError(f"cannot write in {workdir} ({e.strerror or e}): pass a writable "
                            f"folder as the workdir") from None
  return workdir / "cells"


def _pending(folder: Path, hashes: list[str], hosts: Hosts) -> list[str]:
  """This host's cells that are not done, the failed ones reopened for a new try."""
  todo = [h for h in hashes if hosts.mine(h) and not cells.is_done(folder / h)]
  for h in todo:
    cells.reopen(folder / h)
  return todo


def run(cfg: grid.StudyConfig, workdir: str | os.PathLike, *, progress: bool = True,
        budget_minutes: float | None = None, chunk: int = 25, hosts: Hosts = Hosts(),
        say: Callable[[str], Any] = print, report_only: bool = False) -> dict[str, Any]:
  """Runs (or resumes) the study in `workdir` and writes the report (host 0); with
  `report_only`, writes the report of the cells finished so far and runs none (the others
  are listed as not run: a look at a study that is still running, or one stopped part way).

  Returns the report's data (`studies.report.gather`): its `failed` entry lists the cells
  that failed (their reasons are also in the report); {} on hosts other than 0.
  Raises `runs.WorkdirError` for a workdir that is a file or unwritable, ValueError when
  an attack's smallest budget cannot buy it one step (before anything runs), `BudgetError`
  when the first cell's time says the study would exceed `budget_minutes`.
  """
  if jax.process_count() > 1:
    raise ValueError("study cells run in independent processes: share them between hosts "
                     "with --hosts / --host (or SLURM), not jax.distributed")
  workdir = Path(workdir)
  cells.check_budgets(cfg)
  cells_dir = open_workdir(workdir)
  (workdir / "study.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")
  t_start = time.perf_counter()
  fl = plan_fl(cfg)
  if report_only:
    data = report.write(cfg, workdir, fl, plan_attacks(cfg, fl, cells_dir), wall_seconds=0.0)
    missing = sum(f["reason"] == "not run" for f in data["failed"])
    say(f"report of the finished cells: {workdir / 'report.md'} ({missing} cell(s) not run "
        f"yet)")
    return data
  unique_fl = {h: c for h, c in fl.values()}
  pending = _pending(cells_dir / "fl", list(unique_fl), hosts)
  say(f"study: {len(cfg.partitions)} partitions x {len(cfg.defenses)} defenses x "
      f"{len(cfg.seeds)} seeds = {len(unique_fl)} FL cells ({len(pending)} to run); attacks "
      f"{', '.join(cfg.attacks)} on {cfg.victims} victims x batch {list(cfg.batch_sizes)} x "
      f"local steps {list(cfg.local_steps)} x {list(cfg.model_states)} models; {workdir}")
  bar = runs.Progress(len(pending), unit="FL cells", enabled=progress)
  for i, h in enumerate(pending):
    cell = unique_fl[h]
    result = cells.run_fl_cell(cell, cells_dir / "fl" / h)
    if result["status"] == "failed":
      say(f"FL cell {h} ({cell['partition']}, {cell['defense']}, seed {cell['seed']}) failed: "
          f"{result['reason']}")
    bar.update(1)
    if i == 0 and budget_minutes:
      estimate = result["wall_seconds"] * len(pending) * (1 + _ATTACK_SHARE) / 60
      if estimate > budget_minutes:
        bar.close()
        raise BudgetError(
            f"this grid would take about {estimate:.0f} minutes here (first FL cell "
            f"{result['wall_seconds']:.0f} s x {len(pending)} FL cells, plus attacks), over "
            f"the budget of {budget_minutes:g} minutes: shrink it (fewer --seeds, --rounds, "
            f"--defenses or --partitions) or raise --budget_minutes (0: no limit)")
  bar.close()
  _wait_for(cells_dir / "fl", list(unique_fl), hosts, say)

  attack_plan = plan_attacks(cfg, fl, cells_dir)
  unique = {h: c for h, c in attack_plan.values()}
  todo = _pending(cells_dir / "attack", list(unique), hosts)
  groups = cells.prepare_groups({h: unique[h] for h in todo}, cells_dir)
  say(f"attacks: {len(unique)} distinct attack cells ({len(todo)} to run) in {len(groups)} "
      f"batched computations")
  mode = cells.batching_mode()
  cbar = runs.Progress(len(todo), unit="attack cells", enabled=progress)
  t_attacks, done_rows = time.perf_counter(), 0
  total_rows = sum(len(g) for g in groups.values())
  for k, group in enumerate(sorted(groups.values(), key=lambda g: g[0].cell["variant"])):
    steps_bar = runs.Progress(group[0].cell["budget"], unit="evaluations", enabled=progress)
    cells.attack_and_write(group, cells_dir, mode=mode, chunk=chunk, progress=steps_bar.update)
    steps_bar.close()
    cbar.update(len(group))
    done_rows += len(group)
    if k == 0 and budget_minutes and done_rows < total_rows:
      spent = (time.perf_counter() - t_start) / 60
      estimate = spent + (time.perf_counter() - t_attacks) / 60 * (total_rows - done_rows) / done_rows
      if estimate > budget_minutes:
        cbar.close()
        raise BudgetError(f"the attacks would take the study to about {estimate:.0f} minutes, "
                          f"over the budget of {budget_minutes:g}: lower --victims, --budget, "
                          f"--attacks or raise --budget_minutes (finished cells are kept)")
  cbar.close()
  _wait_for(cells_dir / "attack", list(unique), hosts, say)
  base = cells.plan_baselines(attack_plan, cfg.prior_only_steps)
  todo = _pending(cells_dir / "baseline", list(base), hosts)
  say(f"baselines: {len(base)} victim sets on the clear update ({len(todo)} to score)")
  for h in todo:
    outcome = cells.run_baseline_cell(base[h][1], h, cells_dir)
    if outcome["status"] == "failed":
      say(f"baseline cell {h} failed: {outcome['reason']}")
  _wait_for(cells_dir / "baseline", list(base), hosts, say)
  if hosts.index != 0:
    return {}
  data = report.write(cfg, workdir, fl, attack_plan, wall_seconds=time.perf_counter() - t_start)
  say(f"report: {workdir / 'report.md'} and {workdir / 'report.html'} "
      f"({time.perf_counter() - t_start:.0f} s this session)")
  return data


def _wait_for(folder: Path, hashes: list[str], hosts: Hosts, say: Callable[[str], Any],
              timeout: float = 24 * 3600) -> None:
  """With several hosts, waits until every cell (theirs too) has an outcome."""
  if hosts.count == 1:
    return
  t0 = time.perf_counter()
  while any(cells.read_cell(folder / h) is None for h in hashes):
    if time.perf_counter() - t0 > timeout:
      raise TimeoutError(f"cells in {folder} still have no result after {timeout:.0f} s")
    time.sleep(5)
  say(f"all cells in {folder} are done")
