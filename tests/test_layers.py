"""The package's import graph: acyclic and layered, imports inside functions included (read from the source's AST,
so an import that only runs on some path counts as well). docs/layout.md names the layers."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hallo3_cli"

#: Lowest first. A module may import its own layer or lower ones; the root package (the public API) is the top.
LAYERS = [
    ("core", ["version", "errors", "fsutil", "progress", "formatting"]),
    ("configuration", ["presets", "store", "components", "runtime", "geometry", "options"]),
    ("models and schedulers", ["models", "sampler", "scheduling_hallo3", "parallel"]),
    ("media", ["audio_io", "image_io", "video_io", "audio", "vocals", "face"]),
    ("pipeline", ["networks", "conditioning", "pipeline_hallo3"]),
    ("weights and planning", ["hub", "tracing", "plan"]),
    ("loading", ["loading"]),
    ("stage files", ["stages"]),
    ("commands", ["jobs", "evaluate", "doctor", "training"]),
    ("interfaces", ["cli", "__main__", "web"]),
]
TOP = len(LAYERS)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def graph() -> dict[str, set[str]]:
    """module → the package's modules it imports (``from pkg import submodule`` counts as the submodule)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges[name].add(target)
    return {name: edges.get(name, set()) for name in modules}


def layer(module: str) -> int:
    if module == "hallo3_cli":
        return TOP
    top = module.split(".")[1]
    for index, (_, members) in enumerate(LAYERS):
        if top in members:
            return index
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS and to docs/layout.md")


def test_every_module_has_a_layer():
    for module in graph():
        layer(module)


def test_no_upward_imports():
    upward = [f"{module} ({LAYERS[layer(module)][0]}) imports {target} ({LAYERS[layer(target)][0]})"
              for module, targets in graph().items() for target in targets if layer(target) > layer(module)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in edges[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    assert not cycles, cycles


@pytest.mark.parametrize("source, expected", [
    ("from hallo3_cli.jobs import parallel_session", "hallo3_cli.jobs.parallel_session"),
    ("from hallo3_cli import stages", "hallo3_cli.stages"),
    ("from hallo3_cli.stages import save_stage", "hallo3_cli.stages"),
    ("import hallo3_cli.evaluate.frames as vf", "hallo3_cli.evaluate.frames"),
])
def test_the_walker_resolves_imports(tmp_path, monkeypatch, source, expected):
    """The graph this test checks sees every form of import (a walker that missed one would pass anything)."""
    import sys

    package = tmp_path / "hallo3_cli"
    for module in ("__init__", "stages", "jobs/__init__", "jobs/parallel_session", "evaluate/__init__", "evaluate/frames"):
        (package / f"{module}.py").parent.mkdir(parents=True, exist_ok=True)
        (package / f"{module}.py").write_text("")
    (package / "cli.py").write_text(f"def main():\n    {source}\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    assert graph()["hallo3_cli.cli"] == {expected}
