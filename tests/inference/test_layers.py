"""inference/'s layers import only what their __init__ allows: the runtime nothing of
api/ or edge/, the edge nothing of api/."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "inference"
FORBIDDEN = {"runtime": ("inference.api", "inference.edge", "inference.cli"),
             "edge": ("inference.api", "inference.cli")}


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_imports_only_what_it_may(layer):
    wrong = [f"{path.relative_to(ROOT.parent)}: {name}"
             for path in sorted((ROOT / layer).rglob("*.py")) for name in sorted(imported(path))
             if name.startswith(FORBIDDEN[layer])]
    assert not wrong
