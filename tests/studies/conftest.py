"""One tiny study (`scripts/study.py --tiny`), run once for every test of `studies`; tests
that change cells work on a copy of it (its done cells are reused, not rerun)."""

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from studies import grid, runner

ROOT = Path(__file__).resolve().parents[2]
TINY = grid.PRESETS["tiny"]


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
  """(config, workdir) of the finished tiny study: digits, iid, none and forward, seeds 0
  and 1, ig."""
  workdir = tmp_path_factory.mktemp("tiny_study")
  cfg = grid.make(grid.StudyConfig, TINY)
  runner.run(cfg, workdir, progress=False)
  return cfg, workdir


@pytest.fixture
def study_copy(tiny_study, tmp_path):
  """A copy of the tiny study's workdir, free to change."""
  cfg, workdir = tiny_study
  return cfg, Path(shutil.copytree(workdir, tmp_path / "study"))


def load_script(name: str):
  """scripts/<name>.py as a module, for in-process calls of its `main(argv)`."""
  spec = importlib.util.spec_from_file_location(f"scripts_{name}", ROOT / "scripts" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module
