"""The lab tools and benchmarks run on a GPU only, so a name of the library they read that was
renamed or removed goes unseen on the CPU until someone runs them there. Every such name they
import, and every attribute they read of a library module, must exist."""

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p for folder in ("tools", "bench") for p in (ROOT / folder).glob("*.py"))


def _library_names(tree: ast.AST) -> tuple:
    """(the modules a script binds to names: {name: module}, the missing imports: [(line, what)])."""
    modules, missing = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "fgcupy":
            parent = importlib.import_module(node.module)
            for alias in node.names:
                try:
                    modules[alias.asname or alias.name] = importlib.import_module(f"{node.module}.{alias.name}")
                except ModuleNotFoundError:
                    if not hasattr(parent, alias.name):
                        missing.append((node.lineno, f"from {node.module} import {alias.name}"))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "fgcupy":
                    bound = alias.asname or alias.name.split(".")[0]
                    modules[bound] = importlib.import_module(alias.name if alias.asname else bound)
    return modules, missing


def _missing_names(source: str, filename: str = "<script>") -> list:
    """[(line, what)]: the library names ``source`` imports or reads that do not exist."""
    tree = ast.parse(source, filename=filename)
    modules, missing = _library_names(tree)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and not hasattr(modules[node.value.id], node.attr)):
            missing.append((node.lineno, f"{node.value.id}.{node.attr}"))
    return missing


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_library_name_a_script_reads_exists(script):
    missing = _missing_names(script.read_text(), str(script))
    assert not missing, f"{script.name} reads names the library does not have: {missing}"


def test_the_check_finds_a_missing_name():
    source = ("from fgcupy import auto_mask\nfrom fgcupy.mask import no_such_name\nimport fgcupy.oracle as oracle\n"
              "auto_mask._no_such_helper(1)\noracle.Judge\noracle.no_judge\n")
    assert sorted(_missing_names(source)) == [(2, "from fgcupy.mask import no_such_name"),
                                              (4, "auto_mask._no_such_helper"), (6, "oracle.no_judge")]
