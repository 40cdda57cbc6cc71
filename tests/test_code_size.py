"""Small modules and short functions in ``overinterp_jax/`` (issue 29): read with ``ast``,
nothing is imported.

A module has at most ``MAX_MODULE_LINES`` lines. A function has at most
``MAX_FUNCTION_LINES`` lines of its own: from its first decorator (or ``def``) to its last
line, docstring, comments and blank lines included, less the lines of the functions and
classes defined inside it, which are counted apart as functions of their own. A method is a
function. Data tables are exempt by name in ``EXEMPT``; ``TEMPORARY`` lists functions
being split now, and an entry leaves it when its split lands.
"""
from __future__ import annotations

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "overinterp_jax"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80

# Data tables, not logic: "<path relative to the repository>::<qualified name>".
EXEMPT = {
    "overinterp_jax/config_schema.py::base_config",  # the schema: every key and its default
}

# Functions being split; empty since train.fit and coarse_to_fine_backselect were split.
TEMPORARY: set[str] = set()

_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _span(node: ast.AST) -> int:
  """Lines from a definition's first decorator (or its ``def``/``class``) to its end."""
  first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
  return node.end_lineno - first + 1


def _inner_defs(node: ast.AST):
  """The functions and classes defined directly inside ``node`` (at any depth of its
  statements, not inside another definition)."""
  for child in ast.iter_child_nodes(node):
    if isinstance(child, _DEFS):
      yield child
    else:
      yield from _inner_defs(child)


def function_lengths(source: str) -> dict[str, int]:
  """``{qualified name: own lines}`` of every function of a module's ``source``."""
  out = {}

  def visit(node, prefix):
    for d in _inner_defs(node):
      name = prefix + d.name
      if not isinstance(d, ast.ClassDef):
        out[name] = _span(d) - sum(_span(inner) for inner in _inner_defs(d))
      visit(d, name + ".")

  visit(ast.parse(source), "")
  return out


def _modules():
  for path in sorted((REPO / PACKAGE).rglob("*.py")):
    yield path.relative_to(REPO).as_posix(), path.read_text(encoding="utf-8")


def test_function_lengths_count_nested_functions_apart():
  source = ("@decorator\n"
            "def outer():\n"
            "  '''doc'''\n"
            "  x = 1\n"
            "  if x:\n"
            "    def inner():\n"
            "      return 2\n"
            "  class Local:\n"
            "    def method(self):\n"
            "      pass\n"
            "  return x\n")
  assert function_lengths(source) == {"outer": 6, "outer.inner": 2,
                                      "outer.Local.method": 2}


def test_modules_are_small():
  long = [f"{path}: {text.count(chr(10))} lines" for path, text in _modules()
          if text.count("\n") > MAX_MODULE_LINES]
  assert not long, f"modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(long)


def test_functions_are_short():
  allowed = EXEMPT | TEMPORARY
  long, seen = [], set()
  for path, text in _modules():
    for name, lines in function_lengths(text).items():
      key = f"{path}::{name}"
      seen.add(key)
      if lines > MAX_FUNCTION_LINES and key not in allowed:
        long.append(f"{key}: {lines} lines")
  assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)
  assert allowed <= seen, f"allowed functions that no longer exist: {sorted(allowed - seen)}"

