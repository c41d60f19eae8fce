"""The README's commands and the docs' code run as written; every relative link resolves;
every documented command line of a script uses flags that script has, and parses."""

import io
import os
import re
import runpy
import shlex
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from fljax import config as config_lib

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)|<img [^>]*src=\"([^\"]+)\"")
COMMAND = re.compile(r"\b(?:python3?|bash) scripts/(\w+\.(?:py|sh))\b([^\n]*)")
# A value to fill in (`runs/<name>`, `[--flag ...]`, `none|gaussian`, `...`, `--lr LR`).
PLACEHOLDER = re.compile(r"[<>\[\]|]|\.\.\.|(?:^|\s)[A-Z][A-Z_:]*(?=\s|$)")


def run_example(page: str, marker: str) -> dict:
  """Executes the ```python block of docs/`page` that contains `marker`; returns its names."""
  path = ROOT / "docs" / page
  blocks = re.findall(r"```python\n(.*?)```", path.read_text(), re.S)
  code = next(b for b in blocks if marker in b)
  namespace = {}
  exec(compile(code, str(path), "exec"), namespace)  # noqa: S102
  return namespace


def test_readme_opens_with_the_two_commands():
  block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
  assert len(block) == 2
  assert block[0].endswith("python scripts/study.py")
  assert block[1].endswith("python -m pytest -q")
  ci = (ROOT / ".ci" / "run").read_text()
  assert "python -m pytest -q" in ci and "pip install -q -e '.[test]'" in ci


def test_readme_is_at_most_300_lines():
  assert len(README.splitlines()) <= 300


def test_relative_links_point_to_files():
  broken = []
  for page in PAGES:
    for match in LINK.finditer(page.read_text()):
      target = (match.group(1) or match.group(2)).split("#")[0]
      if not target or re.match(r"[a-z]+:", target):
        continue  # an anchor on the same page, or an absolute URL
      if not (page.parent / target).exists():
        broken.append(f"{page.relative_to(ROOT)} -> {target}")
  assert not broken


@pytest.mark.slow  # an FL round of the docs' CNN on MNIST (about 20 s)
def test_federated_example_runs():
  namespace = run_example("data_and_fl.md", "make_round_step")
  metrics = namespace["metrics"]
  assert int(namespace["state"].round) == 1 and float(metrics["clients"]) == 10


@pytest.mark.slow  # PLD calibration and a DP-SGD step of the docs' example (about 35 s)
def test_privacy_example_runs():
  namespace = run_example("privacy.md", "dpsgd.calibrate")
  assert 1.9 < namespace["epsilon"] <= 2.0
  assert float(namespace["metrics"]["loss"]) > 0


def test_inversion_example_runs():
  namespace = run_example("inversion.md", "dlg.make")
  assert namespace["psnr"] > 30
  assert namespace["label"] == int(namespace["ds"].y_test[0])


def test_baselines_example_runs():
  namespace = run_example("inversion.md", "baselines.evaluate")
  assert namespace["blank"].n == 16 and namespace["blank"].defined
  assert namespace["diff"].estimate > 0  # the nearest training digit beats the mean digit


def documented_commands() -> list[tuple[str, str, str]]:
  """(page, script, arguments) of every `scripts/X.py` or `.sh` command line in the README
  and docs/*.md: code blocks line by line (continuations joined, comments dropped), and
  inline code spans (which may wrap over lines)."""
  found = []
  for page in PAGES:
    text = page.read_text()
    blocks = re.findall(r"```(\w*)\n(.*?)```", text, re.S)
    lines = [line.split(" #")[0] for lang, code in blocks if lang != "python"
             for line in code.replace("\\\n", " ").splitlines()]
    spans = re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    for line in lines + [" ".join(span.split()) for span in spans]:
      for match in COMMAND.finditer(line):
        args = re.split(r" && | ; ", match.group(2))[0].strip()
        found.append((str(page.relative_to(ROOT)), match.group(1), args))
  return found


COMMANDS = documented_commands()


class _Parsed(Exception):
  """Stops an entry point once it has parsed its command line."""


def parse_only(script: str, argv: list[str]) -> tuple[int | str | None, str, str]:
  """Runs scripts/`script` in this process until fljax.config has parsed `argv` (no work is
  done); returns (exit code: 0 once parsed, stdout, stderr)."""
  real = config_lib.parse

  def parse(*args, **kwargs):
    real(*args, **kwargs)
    raise _Parsed

  out, err = io.StringIO(), io.StringIO()
  with pytest.MonkeyPatch.context() as mp, redirect_stdout(out), redirect_stderr(err):
    mp.setattr(config_lib, "parse", parse)
    mp.setattr(sys, "argv", [f"scripts/{script}", *argv])
    mp.setattr(sys, "path", list(sys.path))
    try:
      runpy.run_path(str(ROOT / "scripts" / script), run_name="__main__")
      code = f"scripts/{script} ran without parsing its flags through fljax.config"
    except _Parsed:
      code = 0
    except SystemExit as e:
      code = e.code
  return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def flags_of():
  """script -> the flags its --help lists (a Python script's in-process, a .sh script's run)."""
  cache = {}

  def flags(script: str) -> set[str]:
    if script not in cache:
      if script.endswith(".sh"):
        text = subprocess.run(["bash", str(ROOT / "scripts" / script), "--help"],
                              capture_output=True, text=True, check=True).stdout
      else:
        code, text, err = parse_only(script, ["--help"])
        assert code == 0, f"scripts/{script} --help: {err}"
      cache[script] = set(re.findall(r"^\s+(?:-\w, )?(--[\w.]+)", text, re.M))
    return cache[script]

  return flags


def test_docs_show_the_scripts_commands():
  scripts = {script for _, script, _ in COMMANDS}
  assert len(COMMANDS) > 40
  assert {"study.py", "train_fl.py", "invert.py", "defense_tradeoff.py", "scaling.py",
          "eval_diffusion.py", "attack_vs_noise.sh", "acceptance_generative.sh"} <= scripts


def test_documented_flags_exist(flags_of):
  unknown = []
  for page, script, args in COMMANDS:
    for token in args.split():
      flag = token.strip("\"'[(").split("=")[0]
      if re.fullmatch(r"--\w[\w.]*", flag) and flag not in flags_of(script):
        unknown.append(f"{page}: scripts/{script} {flag}")
  assert not unknown, "\n".join(unknown)


def test_documented_commands_parse():
  """Commands without placeholders parse as written (a .sh driver takes only flags, each
  with at most one value)."""
  bad = []
  for page, script, args in COMMANDS:
    if PLACEHOLDER.search(re.sub(r"\"[^\"]*\"|'[^']*'", "", args)):
      continue
    argv = shlex.split(args)
    if script.endswith(".sh"):
      loose = [a for i, a in enumerate(argv)
               if not a.startswith("--") and (i == 0 or not argv[i - 1].startswith("--"))]
      code, err = (2, f"arguments that are no flag's value: {loose}") if loose else (0, "")
    else:
      code, _, err = parse_only(script, argv)
    if code != 0:
      bad.append(f"{page}: scripts/{script} {args}: {err.strip() or code}")
  assert not bad, "\n".join(bad)


@pytest.mark.slow  # three subprocesses, about 3 minutes
def test_quick_start_runs_as_written_and_writes_the_files_it_lists(tmp_path):
  section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
  commands = re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip().splitlines()
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # as a user's
  for line in commands:
    argv = shlex.split(line.split("#")[0])
    argv = [str(tmp_path / a) if a.startswith("runs/") else a for a in argv]
    done = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0, f"{line}\n{done.stderr[-2000:]}"
  # every file the section lists under "What appears" exists
  for folder, listing in re.findall(r"- `runs/(\w+)/`: (.*?)(?=\n- `runs/|\n\n)", section, re.S):
    for name in re.findall(r"`([\w.]+/?)`", listing):
      assert (tmp_path / "runs" / folder / name.rstrip("/")).exists(), f"runs/{folder}/{name}"
