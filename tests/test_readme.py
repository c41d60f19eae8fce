"""The README's commands and code run as written."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_opens_with_the_two_commands():
  block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
  assert len(block) == 2
  assert block[0].endswith("python scripts/study.py")
  assert block[1].endswith("python -m pytest -q")
  ci = (ROOT / ".ci" / "run").read_text()
  assert "python -m pytest -q" in ci and "pip install -q -e '.[test]'" in ci


def test_readme_python_example_runs():
  code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
  namespace = {}
  exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
  metrics = namespace["metrics"]
  assert int(namespace["state"].round) == 1 and float(metrics["clients"]) == 10


def test_readme_privacy_example_runs():
  blocks = re.findall(r"```python\n(.*?)```", README, re.S)
  code = next(b for b in blocks if "dpsgd.calibrate" in b)
  namespace = {}
  exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
  assert 1.9 < namespace["epsilon"] <= 2.0
  assert float(namespace["metrics"]["loss"]) > 0


def test_readme_inversion_example_runs():
  blocks = re.findall(r"```python\n(.*?)```", README, re.S)
  code = next(b for b in blocks if "dlg.make" in b)
  namespace = {}
  exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
  assert namespace["psnr"] > 30
  assert namespace["label"] == int(namespace["ds"].y_test[0])
