"""The layout's rules, measured on the package's source (function-level imports included): no
import cycles, no function over 80 lines, no file over 600, the package root holds entry points
and the shared config/cli modules only, model code imports nothing above it, and objectives are
asked, not compared by name, outside data/objectives/."""

import ast
import os
import re

from tests.conftest import REPO

PACKAGE = os.path.join(REPO, "transformer_jax")
OBJECTIVE_NAMES = {"clm", "mlm", "span", "denoise", "ul2", "seq2seq", "prefix_lm"}


def _modules() -> dict:
  """{dotted module name: (path, ast)} for every module of the package."""
  out = {}
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        dotted = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
        dotted = dotted[:-len(".__init__")] if dotted.endswith(".__init__") else dotted
        with open(path, encoding="utf-8") as f:
          out[dotted] = (path, ast.parse(f.read()))
  return out


def _imports(name: str, path: str, tree, modules) -> set:
  """The package modules `name` imports (`from pkg import sub` counts as importing pkg.sub)."""
  deps = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      deps.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = name.split(".")[:len(name.split(".")) - node.level + path.endswith("__init__.py")]
        base = ".".join(parts + ([node.module] if node.module else []))
      subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules}
      deps.update(subs if len(subs) == len(node.names) else subs | {base})
  return {d for d in deps if d in modules and d != name}


def test_no_import_cycles():
  modules = _modules()
  graph = {n: _imports(n, p, t, modules) for n, (p, t) in modules.items()}
  done, path, cycles = set(), [], []

  def visit(n):
    if n in path:
      cycles.append(path[path.index(n):] + [n])
      return
    if n in done:
      return
    path.append(n)
    for d in sorted(graph[n]):
      visit(d)
    path.pop()
    done.add(n)
  for n in sorted(graph):
    visit(n)
  assert not cycles, cycles[:3]


def test_model_code_imports_nothing_above_it():
  modules = _modules()
  above = re.compile(r"transformer_jax\.(data|training|parallel|inference|perf|sweep|convert)")
  bad = {n: sorted(d for d in _imports(n, p, t, modules) if above.match(d))
         for n, (p, t) in modules.items() if n.startswith("transformer_jax.models")}
  assert not {n: d for n, d in bad.items() if d}


def test_functions_and_files_are_short():
  long_functions, long_files = [], []
  for name, (path, tree) in _modules().items():
    with open(path, encoding="utf-8") as f:
      if sum(1 for _ in f) > 600:
        long_files.append(name)
    long_functions += [f"{name}.{node.name}: {node.end_lineno - node.lineno + 1}"
                       for node in ast.walk(tree)
                       if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                       and node.end_lineno - node.lineno + 1 > 80]
  assert not long_functions and not long_files, (long_functions, long_files)


def test_the_package_root_holds_entry_points_and_the_shared_modules_only():
  shared = {"__init__.py", "cli.py"}
  for name in os.listdir(PACKAGE):
    path = os.path.join(PACKAGE, name)
    if name.endswith(".py") and name not in shared:
      with open(path, encoding="utf-8") as f:
        assert 'if __name__ == "__main__":' in f.read(), name


def test_objectives_are_asked_not_compared_by_name():
  """At most a few comparisons with an objective's name outside data/objectives/ (the issue's
  bound; today one, and it is the tokenizer's `--special=ul2` group, not the objective)."""
  found = []
  for name, (_, tree) in _modules().items():
    if name.startswith("transformer_jax.data.objectives"):
      continue
    for node in ast.walk(tree):
      if isinstance(node, ast.Compare):
        for side in [node.left] + node.comparators:
          values = ([side] if isinstance(side, ast.Constant) else
                    getattr(side, "elts", []) if isinstance(side, (ast.Tuple, ast.List, ast.Set))
                    else [])
          if any(isinstance(v, ast.Constant) and v.value in OBJECTIVE_NAMES for v in values):
            found.append(f"{name}:{node.lineno}")
  assert len(found) <= 4, found
