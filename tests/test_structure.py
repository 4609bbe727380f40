"""The shape of the packages: no module over 400 lines, no function with more than 8 parameters.

A module that grows past a few hundred lines is collecting its neighbours' work, and a function
of 9+ parameters wants an options object (see STYLE.md). ``self`` and ``cls`` are not counted;
``*args`` and ``**kwargs`` are, one each.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("partition", "pipeline")
MAX_LINES = 400
MAX_PARAMETERS = 8


def _modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def parameter_count(node: ast.FunctionDef | ast.AsyncFunctionDef, method: bool) -> int:
    """Parameters of ``node``: positional-only, positional, keyword-only, ``*args``, ``**kwargs``;
    a method's first parameter (``self`` or ``cls``) is not counted."""
    a = node.args
    positional = [*a.posonlyargs, *a.args]
    if method and positional and positional[0].arg in ("self", "cls"):
        positional = positional[1:]
    return len(positional) + len(a.kwonlyargs) + (a.vararg is not None) + (a.kwarg is not None)


def long_signatures(tree: ast.Module) -> list[tuple[str, int, int]]:
    """``(qualified name, line, parameters)`` of every function over `MAX_PARAMETERS`."""
    found: list[tuple[str, int, int]] = []

    def visit(node: ast.AST, prefix: str, in_class: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                count = parameter_count(child, method=in_class)
                if count > MAX_PARAMETERS:
                    found.append((prefix + child.name, child.lineno, count))
                visit(child, f"{prefix}{child.name}.", in_class=False)
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.", in_class=True)
            else:
                visit(child, prefix, in_class)

    visit(tree, "", in_class=False)
    return found


def test_the_walk_sees_both_packages() -> None:
    names = {_name(p) for p in _modules()}
    assert {"partition/solve.py", "partition/__init__.py", "pipeline/__init__.py"} <= names
    assert any(n.startswith("partition/algorithms/") for n in names)  # sub-packages too


@pytest.mark.parametrize("path", _modules(), ids=_name)
def test_no_module_is_over_400_lines(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, (
        f"{_name(path)} has {lines} lines, over {MAX_LINES}: split it along a seam, one concept "
        "per module, named by it"
    )


@pytest.mark.parametrize("path", _modules(), ids=_name)
def test_no_function_has_more_than_8_parameters(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = long_signatures(tree)
    assert not found, (
        f"{_name(path)}: "
        + "; ".join(f"{name} (line {line}) takes {count} parameters" for name, line, count in found)
        + f", over {MAX_PARAMETERS}: group what travels together in a frozen dataclass"
    )


def test_the_count_skips_self_and_cls_and_counts_star_args() -> None:
    source = """
def f(a, b, /, c, *args, d, e=1, **kw): pass
class C:
    def m(self, a, b, c, d, e, f, g, h): pass
    @classmethod
    def k(cls, a, b, c, d, e, f, g, h, i): pass
    @staticmethod
    def s(self, a, b, c, d, e, f, g, h): pass
    def outer(self):
        def inner(self, a, b, c, d, e, f, g, h): pass
async def g(a, b, c, d, e, f, g, h, i): pass
x = lambda a, b, c, d, e, f, g, h, i, j: 0
"""
    tree = ast.parse(source)
    counts = {
        n.name: parameter_count(n, method=n.name in ("m", "k", "s", "outer"))
        for n in ast.walk(tree)
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
    }
    assert counts == {"f": 7, "m": 8, "k": 9, "s": 8, "outer": 0, "inner": 9, "g": 9}
    # The rule reads the name, as a reader would: a first parameter called self or cls in a
    # class body is not counted (even on a static method); in a function nested in a method it is.
    assert [(name, count) for name, _, count in long_signatures(tree)] == [
        ("C.k", 9),
        ("C.outer.inner", 9),
        ("g", 9),
    ]
