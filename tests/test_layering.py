"""The package's layers, read from its imports: lower layers never import higher ones; no
module imports itself through others (no cycles).

Every ``import`` of every module of ``overinterp_jax/`` and ``benchmarks/`` counts, at
module level or inside a function. An import names the module it loads: ``from
overinterp_jax.data import loader`` depends on ``data/loader.py``, ``from overinterp_jax
import data`` or ``from overinterp_jax.data import Dataset`` on ``data/__init__.py`` (the
package's face, which imports its own modules). A benchmark script imports its
neighbours by their bare names (it puts ``benchmarks/`` on ``sys.path``).

``LAYERS`` is the order, bottom first; docs/architecture.md ("Layers") shows the same
table. A module may import modules of its own layer or of lower ones. A new module
belongs to a layer before this test passes.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TOPS = ("overinterp_jax", "benchmarks")

# (layer, its files and folders (a folder: every module under it)), bottom first.
LAYERS = (
    ("core", ("overinterp_jax/__init__.py", "overinterp_jax/precision.py",
              "overinterp_jax/memory.py", "overinterp_jax/sharding.py",
              "overinterp_jax/progress.py", "overinterp_jax/compile_cache.py",
              "overinterp_jax/config_schema.py", "overinterp_jax/cpu_budget.py")),
    ("store", ("overinterp_jax/store/",)),
    ("config_reads", ("overinterp_jax/config_reads.py",)),
    ("selection", ("overinterp_jax/selection/",)),
    ("sis", ("overinterp_jax/sis/",)),
    ("models", ("overinterp_jax/models/",)),
    ("data", ("overinterp_jax/data/",)),
    ("train", ("overinterp_jax/train.py",)),
    ("pipeline", ("overinterp_jax/pipeline/",)),
    ("apps", ("overinterp_jax/main.py", "overinterp_jax/config_checks.py",
              "overinterp_jax/export_pretrained.py", "overinterp_jax/collect.py")),
    ("benchmarks", ("benchmarks/",)),
)


def module_files(root: pathlib.Path, tops=TOPS) -> dict[str, str]:
  """``{dotted module name: path relative to root}`` of every ``.py`` under ``tops``; a
  package's ``__init__.py`` is named as the package."""
  out = {}
  for top in tops:
    for path in sorted((root / top).rglob("*.py")):
      parts = list(path.relative_to(root).with_suffix("").parts)
      if parts[-1] == "__init__":
        parts.pop()
      out[".".join(parts)] = path.relative_to(root).as_posix()
  return out


def _resolve(name: str, importer: str, modules) -> str | None:
  """The module of ``modules`` that importing ``name`` from ``importer`` loads, if any:
  the longest known prefix of ``name``. In a folder of scripts (no ``__init__.py``, as
  ``benchmarks/``) a bare name is first a neighbour's."""
  top = importer.split(".")[0]
  if top not in modules and f"{top}.{name.split('.')[0]}" in modules:
    name = f"{top}.{name}"
  parts = name.split(".")
  for i in range(len(parts), 0, -1):
    if ".".join(parts[:i]) in modules:
      return ".".join(parts[:i])
  return None


def _imported(node: ast.AST, importer: str, is_package: bool, modules) -> list[str]:
  """The modules of ``modules`` that one import statement loads."""
  if isinstance(node, ast.Import):
    return [m for a in node.names if (m := _resolve(a.name, importer, modules))]
  base = node.module or ""
  if node.level:  # relative: from the importer's package, up level - 1
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    package = package[:len(package) - node.level + 1]
    base = ".".join(package + ([base] if base else []))
  out = []
  for alias in node.names:
    full = f"{base}.{alias.name}"
    m = full if full in modules else _resolve(base, importer, modules)  # module or name
    if m:
      out.append(m)
  return out


def import_graph(root: pathlib.Path, tops=TOPS) -> dict[str, set[str]]:
  """``{module path: paths of the modules it imports}`` (relative to ``root``), every
  import statement of the module counted, its own module left out."""
  modules = module_files(root, tops)
  graph = {}
  for name, path in modules.items():
    tree = ast.parse((root / path).read_text(), filename=path)
    is_package = path.endswith("__init__.py")
    deps = {modules[m] for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for m in _imported(node, name, is_package, modules)}
    graph[path] = deps - {path}
  return graph


def layer_of(path: str, layers=LAYERS) -> int | None:
  """Index in ``layers`` of the entry that names ``path``: the file itself, else the
  longest folder holding it; None when none does."""
  best, best_len = None, -1
  for i, (_, entries) in enumerate(layers):
    for entry in entries:
      hit = path == entry or (entry.endswith("/") and path.startswith(entry))
      if hit and len(entry) > best_len:
        best, best_len = i, len(entry)
  return best


def upward_imports(graph, layers=LAYERS) -> list[str]:
  """``"a (layer) -> b (layer)"`` for every import of a module from a higher layer."""
  out = []
  for a, deps in sorted(graph.items()):
    for b in sorted(deps):
      la, lb = layer_of(a, layers), layer_of(b, layers)
      if la is not None and lb is not None and lb > la:
        out.append(f"{a} ({layers[la][0]}) -> {b} ({layers[lb][0]})")
  return out


def cycles(graph) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan), sorted."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
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
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return sorted(out)


@pytest.fixture(scope="module")
def graph():
  return import_graph(REPO)


def test_every_module_has_a_layer(graph):
  missing = [p for p in graph if layer_of(p) is None]
  assert not missing, f"Modules in no layer of LAYERS: {missing}"


def test_no_layer_imports_a_higher_one(graph):
  assert not upward_imports(graph), "\n".join(["Imports of a higher layer:"]
                                                + upward_imports(graph))


def test_no_import_cycles(graph):
  assert not cycles(graph), f"Modules that import each other: {cycles(graph)}"


def test_the_store_imports_only_core_modules(graph):
  """The I/O layer is the foundation: only core modules below it (``sharding``)."""
  core = {p for p in graph if layer_of(p) == 0}
  assert {d for p, deps in graph.items() if p.startswith("overinterp_jax/store/")
          for d in deps if not d.startswith("overinterp_jax/store/")} <= core


def test_the_report_and_the_controls_import_no_stage_module(graph):
  """Stages share services through the context (``ctx.sis_sample``) and draw their own
  figures (``registry.Stage``): the report imports no stage's module, the controls (and
  their gradient check) no other stage's."""
  from overinterp_jax.pipeline import registry
  stages = {f"{registry.get(name).run.__module__.replace('.', '/')}.py"
            for name in registry.names()}
  assert "overinterp_jax/pipeline/sis_stage.py" in stages
  for path in ("overinterp_jax/pipeline/report.py", "overinterp_jax/pipeline/controls.py",
               "overinterp_jax/pipeline/gradient_check.py",
               "overinterp_jax/pipeline/retrain_stage.py"):  # masks: ctx.pixel_subsets()
    assert not graph[path] & stages, (path, sorted(graph[path] & stages))


def _write(root: pathlib.Path, files: dict[str, str]) -> None:
  for rel, text in files.items():
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(text)


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path):
  """A toy package: a function-level upward import, a cycle through a package's face and
  a relative import, and a benchmark importing a neighbour by its bare name."""
  _write(tmp_path, {
      "pkg/__init__.py": "",
      "pkg/low.py": "def f():\n  from pkg import high\n",
      "pkg/high.py": "import pkg.low\n",
      "pkg/sub/__init__.py": "from pkg.sub.a import A\n",
      "pkg/sub/a.py": "from . import b\nA = 1\n",
      "pkg/sub/b.py": "from pkg.sub import A\n",
      "bench/x.py": "import y\nimport os\n",
      "bench/y.py": "from pkg import low\n",
  })
  layers = (("low", ("pkg/__init__.py", "pkg/low.py", "pkg/sub/")), ("high", ("pkg/high.py",)),
            ("bench", ("bench/",)))
  g = import_graph(tmp_path, ("pkg", "bench"))
  assert g["bench/x.py"] == {"bench/y.py"}
  assert upward_imports(g, layers) == ["pkg/low.py (low) -> pkg/high.py (high)"]
  assert cycles(g) == [["pkg/high.py", "pkg/low.py"],
                       ["pkg/sub/__init__.py", "pkg/sub/a.py", "pkg/sub/b.py"]]
  assert layer_of("pkg/other.py", layers) is None
