"""The layout rules (issue 19): thin scripts, no import cycle, the study above the libraries."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("fljax", "privacy", "inversion", "diffusion")
PACKAGES = LIBRARIES + ("studies",)


def _module(path: Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
  """Each project module -> the project modules it imports (anywhere in its body)."""
  files = {_module(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
  graph = {}
  for name, path in files.items():
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        for alias in node.names:
          sub = f"{node.module}.{alias.name}"
          deps.add(sub if sub in files else node.module)
      elif isinstance(node, ast.Import):
        deps.update(alias.name for alias in node.names)
    graph[name] = {d for d in deps if d in files and d != name}
  return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in graph:
    if v not in index:
      visit(v)
  return found


def test_no_import_cycle_and_no_library_imports_the_studies():
  graph = _imports()
  assert _cycles(graph) == []
  upward = {m: sorted(d for d in deps if d.startswith("studies"))
            for m, deps in graph.items() if m.split(".")[0] in LIBRARIES}
  assert {m: d for m, d in upward.items() if d} == {}


def test_scripts_are_thin_and_the_attack_driver_is_split():
  long = {p.name: n for p in (ROOT / "scripts").glob("*.py")
          if (n := len(p.read_text().splitlines())) > 120}
  assert long == {}
  assert len((ROOT / "inversion" / "experiment.py").read_text().splitlines()) < 400


def test_libraries_never_change_jax_config_outside_an_entry_point():
  """`jax.config.update` only inside a `main()` (an entry point), never at import or in a
  library function."""
  offenders = []
  for pkg in PACKAGES:
    for path in (ROOT / pkg).rglob("*.py"):
      tree = ast.parse(path.read_text())
      allowed = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "main"
                 for n in ast.walk(f)}
      offenders += [f"{path.relative_to(ROOT)}:{n.lineno}" for n in ast.walk(tree)
                    if isinstance(n, ast.Attribute) and n.attr == "update"
                    and ast.unparse(n.value) == "jax.config" and id(n) not in allowed]
  assert offenders == []
