"""The README's commands and the docs' code run as written; every relative link resolves."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)|<img [^>]*src=\"([^\"]+)\"")


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


def test_federated_example_runs():
  namespace = run_example("data_and_fl.md", "make_round_step")
  metrics = namespace["metrics"]
  assert int(namespace["state"].round) == 1 and float(metrics["clients"]) == 10


def test_privacy_example_runs():
  namespace = run_example("privacy.md", "dpsgd.calibrate")
  assert 1.9 < namespace["epsilon"] <= 2.0
  assert float(namespace["metrics"]["loss"]) > 0


def test_inversion_example_runs():
  namespace = run_example("inversion.md", "dlg.make")
  assert namespace["psnr"] > 30
  assert namespace["label"] == int(namespace["ds"].y_test[0])
