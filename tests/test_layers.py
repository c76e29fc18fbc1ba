"""The imports of main.py and engine.py, which import-linter cannot read.

grimp builds its graph from packages only (a single-file module is not a root it accepts), so the contract in
pyproject.toml sees main and engine as imported names: it catches a lower layer importing them, not their own
imports. This reads those with `ast`, against the same layer order.
"""
import ast
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # import-linter brings tomli on Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
(CONTRACT,) = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
LAYERS = CONTRACT["layers"]  # highest first


def imported_packages(source: str) -> set[str]:
    """Top-level names of every absolute import in `source`, inside functions too."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.partition(".")[0])
    return names


def layers_above(module: str) -> set[str]:
    return set(LAYERS[:LAYERS.index(module)])


@pytest.mark.parametrize("module", ["main", "engine"])
def test_a_single_file_module_imports_no_layer_above_it(module: str) -> None:
    imported = imported_packages((REPO / f"{module}.py").read_text())
    assert imported & set(LAYERS), f"{module}.py imports none of the layers: the check reads nothing"
    assert not imported & layers_above(module)


def test_the_check_finds_an_upward_import_inside_a_function() -> None:
    source = "import torch\n\ndef evaluate():\n    from main import get_args_parser\n    import scripts.predict\n"
    assert imported_packages(source) & layers_above("engine") == {"main", "scripts"}
