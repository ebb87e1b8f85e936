"""Every module of the package opens with what it is for and one runnable command or call (as nanoGPT's files
do); the calls (``>>>``) run here and must give what the docstring shows."""

from __future__ import annotations

import ast
import doctest
import importlib
from pathlib import Path

import pytest

import epure

PACKAGE = Path(epure.__file__).parent
MODULES = sorted(".".join(("epure", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
                 for path in PACKAGE.rglob("*.py"))
EXAMPLE_STARTS = (">>> ", "epure ", "python ", "torchrun ")


def module_docstring(name: str) -> str:
    path = PACKAGE.joinpath(*name.split(".")[1:])
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    return ast.get_docstring(ast.parse(path.read_text()), clean=False) or ""  # indentation kept


@pytest.mark.parametrize("name", MODULES)
def test_each_module_says_what_it_is_for_and_shows_one_example(name: str) -> None:
    docstring = module_docstring(name)
    summary, _, rest = docstring.partition("\n")
    assert summary.strip(), f"{name}: no docstring"
    examples = [line.strip() for line in rest.splitlines() if line.startswith("    ")
                and line.strip().startswith(EXAMPLE_STARTS)]
    assert examples, f"{name}: its docstring shows no command or call (an indented line starting with one of " \
                     f"{EXAMPLE_STARTS})"


@pytest.mark.parametrize("name", [name for name in MODULES if ">>> " in module_docstring(name)])
def test_the_docstrings_calls_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0 and result.failed == 0, f"{name}: {result.failed} of {result.attempted} failed"
