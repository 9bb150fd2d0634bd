"""The tree's import rules, read from the source (every import in every module, at its top or inside a function):

    edgepack.core -> runtimes -> converters -> the stages -> edgepack.pipeline -> edgepack.cli

each layer imports only from layers to its left. The stages are ordered as the pipeline runs (student, convert,
quality, distill (which measures with the quality stage), measure, select, bundle, serve): a stage may use an
earlier one, never a later one. And no module imports itself back through others (no cycles)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("edgepack", "converters", "runtimes")

# (layer, prefixes), lowest first; a module belongs to the first entry with the longest matching prefix
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("core", ("edgepack.core",)),
    ("runtimes", ("runtimes",)),
    ("converters", ("converters",)),
    ("student", ("edgepack.student",)),
    ("convert", ("edgepack.convert",)),
    ("quality", ("edgepack.quality",)),
    ("distill", ("edgepack.distill",)),
    ("measure", ("edgepack.measure",)),
    ("select", ("edgepack.select",)),
    ("bundle", ("edgepack.bundle",)),
    ("serve", ("edgepack.serve",)),
    ("pipeline", ("edgepack.pipeline",)),
    ("cli", ("edgepack.cli", "edgepack.__main__")),
    ("package", ("edgepack",)),  # edgepack/__init__.py: the public facade (edgepack.load), lazily
)
RANK = {name: rank for rank, (name, _) in enumerate(LAYERS)}


def layer_of(module: str) -> str:
    best, length = None, -1
    for name, prefixes in LAYERS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > length:
                best, length = name, len(prefix)
    assert best is not None, f"{module} belongs to no layer; add it to LAYERS in {__file__}"
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import of a project module in `path`; `from a import b` counts as a.b when a.b is
    a module of ours, else as a."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                is_module = any((ROOT / Path(*candidate.split("."))).with_suffix(suffix).exists()
                                for suffix in (".py",)) or (ROOT / Path(*candidate.split("."))).is_dir()
                found.append((node.lineno, candidate if is_module else node.module))
    return [(line, name) for line, name in found if name.split(".")[0] in PACKAGES]


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def test_every_import_runs_from_a_higher_layer_to_a_lower_one():
    wrong = []
    for module, path in all_modules().items():
        mine = layer_of(module)
        for line, imported in project_imports(path):
            theirs = layer_of(imported)
            if RANK[theirs] > RANK[mine] and theirs != "package":
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {module} ({mine}) imports {imported} ({theirs})")
            if theirs == "package" and mine != "package":
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {module} imports the edgepack facade; import what it "
                             "re-exports from its own module")
    assert not wrong, "imports against the layers (core -> runtimes -> converters -> stages -> pipeline -> cli):\n" \
        + "\n".join(wrong)


def test_no_module_imports_itself_back():
    modules = all_modules()
    graph = {m: sorted({i for _, i in project_imports(p) if i in modules and i != m}) for m, p in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for nxt in graph[module]:
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]) if nxt in path else f"{module} -> {nxt}")
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_core_imports_no_other_edgepack_module():
    for module, path in all_modules().items():
        if layer_of(module) == "core":
            others = [i for _, i in project_imports(path) if layer_of(i) != "core"]
            assert not others, f"{module} imports {others}"


@pytest.mark.parametrize("bad", ["edgepack.cli.build", "edgepack.pipeline.build"])
def test_the_rule_catches_a_back_import(tmp_path, bad):
    """The check itself: a module of a lower layer importing a higher one is reported with its line."""
    source = tmp_path / "probe.py"
    source.write_text(f"import os\n\n\ndef f():\n    from {bad} import build\n")
    (line, imported), = [(n, m) for n, m in project_imports(source)]
    assert line == 5 and RANK[layer_of(imported)] > RANK[layer_of("edgepack.quality.gate")]


def test_ruff_is_clean():
    """The tree passes the linter with pyproject.toml's settings (pip install -e .[dev] brings ruff)."""
    import shutil
    import subprocess

    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e .[dev])")
    done = subprocess.run([ruff, "check", "--no-cache", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:]
