"""The entry points' command lines: every config flag has its own help, the small scripts'
flags and errors, plot_runs' curves, the .sh drivers' arguments (in-process where Python)."""

import argparse
import dataclasses
import json
import os
import re
import runpy
import subprocess
import typing
from pathlib import Path

import pytest

from fljax import config as config_lib

ROOT = Path(__file__).resolve().parents[1]


class _Parsed(BaseException):
  """Stops an entry point once it parses its command line."""


@pytest.fixture(scope="module")
def entry_configs():
  """{script: the config dataclass it parses} for every scripts/*.py using fljax.config."""
  found, current = {}, [None]

  def record(cls, argv=None, **kwargs):
    found[current[0]] = cls
    raise _Parsed

  def stop(self, args=None, namespace=None):
    raise _Parsed

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(config_lib, "parse", record)
    mp.setattr(argparse.ArgumentParser, "parse_known_args", stop)
    for path in sorted((ROOT / "scripts").glob("*.py")):
      current[0] = path.name
      try:
        runpy.run_path(str(path), run_name="__main__")
      except _Parsed:
        pass
  return found


def leaves(cls: type):
  """(dataclass, field name) of every flag `cls` derives."""
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    if dataclasses.is_dataclass(hints[f.name]):
      yield from leaves(hints[f.name])
    else:
      yield cls, f.name


def test_every_flag_has_its_own_help(entry_configs):
  names = {cls.__name__ for cls in entry_configs.values()}
  assert {"PrivateExperimentConfig", "CentralConfig", "InversionConfig", "TrainConfig",
          "GANTrainConfig", "BenchConfig", "EvalConfig", "PlotConfig"} <= names
  problems = []
  for script, config in entry_configs.items():
    for cls, name in leaves(config):
      text = config_lib.field_docs(cls).get(name, "")
      others = [f.name for f in dataclasses.fields(cls) if f.name != name]
      # Another field's entry ("other: ..." or "a, other: ...") glued onto this help.
      glued = [o for o in others
               if re.search(rf"(?:^|[.;)]\s+)(?:\w+,\s*)*{o}(?:,\s*\w+)*:", text)]
      if not text or glued:
        problems.append(f"{script}: {cls.__name__}.{name}: {text!r} {glued}")
  assert not problems, "\n".join(problems)


def test_privacy_help_lists_every_mechanism_and_places_each_text(capsys):
  from privacy import train
  with pytest.raises(SystemExit):
    train.main(["--help"])
  text = " ".join(capsys.readouterr().out.split())
  mechanism = text.split("--privacy.mechanism NAME")[-1].split(" --privacy.")[0]
  assert f"[{', '.join(train.MECHANISMS)}]" in mechanism and len(train.MECHANISMS) == 9
  stairs = text.split("--privacy.stairs INT")[-1].split(" --privacy.")[0]
  assert stairs.strip() == "forward_noise: staircase levels. (default: 4)"  # t_start's went here


def script_main(name: str):
  return runpy.run_path(str(ROOT / "scripts" / name))["main"]


def error_line(main, argv, capsys) -> str:
  """The one line a rejected command ends with: the parser's (exit status 2, on stderr) or
  the `SystemExit(message)` of the script (which Python prints, exit status 1)."""
  with pytest.raises(SystemExit) as e:
    main(argv)
  if isinstance(e.value.code, str):
    assert "\n" not in e.value.code
    return e.value.code
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.count("\n") == 1
  return err.strip()


def test_bench_quick_prints_one_result_line(capsys):
  script_main("bench_secagg.py")(["--quick"])
  assert capsys.readouterr().out.strip().splitlines()[-1].startswith("RESULT bench_secagg seconds=")


def test_small_scripts_answer_bad_flags_in_one_line(capsys):
  assert error_line(script_main("bench_fl_round.py"), ["--clients", "10,x"], capsys) == (
      "error: --clients: 'x' is not an int")
  assert error_line(script_main("bench_inversion.py"), ["--quik"], capsys) == (
      "error: unknown flag --quik; did you mean --quick?")
  assert error_line(script_main("bench_inversion.py"), ["--victims", "0"], capsys) == (
      "error: --victims must be >= 1, got 0")
  assert "--workdir" in error_line(script_main("eval_diffusion.py"), ["--grid"], capsys)
  assert error_line(script_main("eval_labels.py"), ["--sizes", "1,0"], capsys).startswith("error: ")


def fake_run(folder: Path, accuracies: list[float]) -> Path:
  """A run folder as scripts/train_fl.py writes it (iid partition)."""
  folder.mkdir(parents=True)
  (folder / "config.json").write_text(json.dumps({"data": {"partition": "iid", "alpha": 0.5}}))
  (folder / "metrics.jsonl").write_text("".join(
      json.dumps({"round": r + 1, "test_accuracy": a}) + "\n" for r, a in enumerate(accuracies)))
  return folder


def test_plot_runs_draws_one_labelled_curve_per_run(tmp_path, capsys):
  a = fake_run(tmp_path / "seed0" / "iid", [0.5, 0.7])
  b = fake_run(tmp_path / "seed1" / "iid", [0.4, 0.8, 0.9])
  figure = script_main("plot_runs.py")([str(a), str(b), "--workdir", str(tmp_path / "out")])
  ax = figure.axes[0]
  assert [t.get_text() for t in ax.get_legend().get_texts()] == [str(a), str(b)]
  assert [len(line.get_xdata()) for line in ax.get_lines()] == [2, 3]
  assert (tmp_path / "out" / "accuracy.png").is_file()
  missing = error_line(script_main("plot_runs.py"), [str(tmp_path / "nowhere")], capsys)
  assert "metrics.jsonl not found" in missing


STUB = """#!/usr/bin/env bash
echo "$PWD $*" >> "$STUB_LOG"
"""


def run_driver(name: str, *args: str, cwd: Path, stub: Path | None = None):
  env = {**os.environ}
  if stub is not None:
    env.update(PYTHON=str(stub), STUB_LOG=str(stub.with_suffix(".log")))
  return subprocess.run(["bash", str(ROOT / "scripts" / name), *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name", ["acceptance_generative.sh", "attack_vs_noise.sh"])
def test_shell_drivers_answer_help_and_bad_arguments(name, tmp_path):
  shown = run_driver(name, "--help", cwd=tmp_path)
  assert shown.returncode == 0 and "--workdir DIR" in shown.stdout
  for args in (["--workdir", "--help"], ["--workdir"], ["runs/x"]):
    refused = run_driver(name, *args, cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.startswith("error: ")
  assert not list(tmp_path.iterdir())  # nothing was taken as an output folder


def test_shell_drivers_run_from_any_folder(tmp_path):
  stub = tmp_path / "python"
  stub.write_text(STUB)
  stub.chmod(0o755)
  assert run_driver("attack_vs_noise.sh", "--workdir", "out", "--zs", "0,0.1", cwd=tmp_path,
                    stub=stub).returncode == 0
  calls = stub.with_suffix(".log").read_text().splitlines()
  assert len(calls) == 2
  for call, z in zip(calls, ("0", "0.1")):
    assert call.startswith(f"{ROOT} scripts/compare_attacks.py --workdir {tmp_path}/out/z{z} ")
    assert "--progress false" in call and f"--defense.noise_multiplier {z} " in call
  stub.with_suffix(".log").unlink()
  assert run_driver("acceptance_generative.sh", "--gifd", "false", cwd=tmp_path,
                    stub=stub).returncode == 0
  calls = stub.with_suffix(".log").read_text().splitlines()
  assert len(calls) == 10 and not any("gifd" in c for c in calls)
  assert all(f"--workdir {tmp_path}/runs/acceptance/" in c for c in calls)
