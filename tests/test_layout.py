"""The package layout is the architecture: each package imports only the layers its
``__init__`` names, and the Layout section of docs/development.md lists every module there is."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "stowd"
BASE = "base"  # the modules directly in stowd/


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def layer_of(module: str) -> str:
    """``stowd.pipeline.queue`` -> ``pipeline``; ``stowd.errors`` -> base."""
    parts = module.split(".")
    folder = PACKAGE.joinpath(*parts[1:2])
    return parts[1] if len(parts) > 1 and folder.is_dir() else BASE


def allowed(layer: str) -> set[str]:
    init = PACKAGE / "__init__.py" if layer == BASE else PACKAGE / layer / "__init__.py"
    found = re.search(
        r"^May import: (.*)\.$", ast.get_docstring(ast.parse(init.read_text())) or "", re.M
    )
    assert found, f"{init} does not say what it may import"
    return {name.strip() for name in found[1].split(",")} | {layer}


def stowd_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "stowd":
                found |= {f"stowd.{alias.name}" for alias in node.names}
            elif node.module.startswith("stowd."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("stowd.")}
    return found


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_a_module_imports_only_the_layers_its_package_may(path: Path) -> None:
    name = module_name(path)
    if name == "stowd.__main__":
        return  # the entry point runs the command line
    own = layer_of(name)
    wrong = {m for m in stowd_imports(path) if layer_of(m) not in allowed(own)}
    assert wrong == set(), f"{name} ({own}) may import {sorted(allowed(own))}"


def test_the_layers_are_ordered_without_cycles() -> None:
    layers = [BASE, *sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())]
    below = {layer: allowed(layer) - {layer} for layer in layers}
    seen: list[str] = []
    while below:
        ready = [layer for layer, needs in below.items() if needs <= set(seen)]
        assert ready, f"the layers import each other in a circle: {below}"
        seen += ready
        for layer in ready:
            del below[layer]


def listed_in_readme() -> set[str]:
    """The modules of the Layout block of docs/development.md: a folder line
    (``stowd/pipeline/``, or ``stowd/pipeline/queue/``), then its modules indented under it
    (``  watch.py  ...``)."""
    readme = (ROOT / "docs" / "development.md").read_text()
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    listed, folder = set(), ""
    for line in section.splitlines():
        heading = re.match(r"(stowd/(?:\w+/)*)\s", line + " ")
        if heading:
            folder = heading[1]
        elif folder and (entry := re.match(r"\s+(\w+\.py)\s", line + " ")):
            listed.add(folder + entry[1])
    return listed


def test_the_readme_layout_lists_every_module_and_no_other() -> None:
    packages = {p for p in modules() if p.name == "__init__.py" and p.parent != PACKAGE}
    present = {str(p.relative_to(ROOT)) for p in modules() if p not in packages}
    listed = listed_in_readme()
    assert listed == present, (
        f"missing: {sorted(present - listed)}; gone: {sorted(listed - present)}"
    )
