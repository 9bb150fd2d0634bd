"""The offline wheelhouse carries everything serving imports: the packages the server and each engine import
(read from the source), or packages those depend on, are all among the requirements `--offline-wheels` fetches."""

from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from edgepack.bundle.wheels import OPTIONAL_ENGINE_MODULES, serve_requirements

ROOT = Path(__file__).resolve().parents[2]
PROJECT = ("edgepack", "converters", "runtimes")
# what `edgepack serve` imports when it starts (module level), before it loads the engine
SERVER_ROOTS = ("edgepack.cli", "edgepack.serve.app", "edgepack.serve.session", "edgepack.bundle.verify")
ENGINE_MODULES = {"llamacpp": "runtimes.llamacpp", "onnxrt": "runtimes.onnxrt"}


def module_file(name: str) -> Path | None:
    base = ROOT / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports_of(name: str, module_level_only: bool) -> set[str]:
    tree = ast.parse(module_file(name).read_text(encoding="utf-8"))
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names
                      if module_file(f"{node.module}.{alias.name}")}
    return found


def third_party_imports(roots: tuple[str, ...], module_level_only: bool) -> set[str]:
    """Top-level names of non-project, non-standard-library modules imported from `roots` and the project modules
    they import in turn; the packages above a module count with their module-level imports only (importing a.b runs
    a/__init__.py, not the functions in it)."""
    seen, todo, outside = set(), [(root, module_level_only) for root in roots], set()
    while todo:
        name, level_only = todo.pop()
        if (name, level_only) in seen:
            continue
        seen.add((name, level_only))
        parts = name.split(".")
        todo += [(".".join(parts[:i]), True) for i in range(1, len(parts)) if module_file(".".join(parts[:i]))]
        for imported in imports_of(name, level_only):
            top = imported.split(".")[0]
            if top in PROJECT:
                if module_file(imported):
                    todo.append((imported, level_only))
            elif top not in sys.stdlib_module_names and top != "__future__":
                outside.add(top)
    return outside


def distributions_allowed(requirements: list[str]) -> set[str]:
    """The requirements' distributions and everything they depend on, as installed here."""
    allowed, todo = set(), [Requirement(text).name for text in requirements]
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in allowed:
            continue
        allowed.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [Requirement(text).name for text in requires if "extra ==" not in text]
    return allowed


@pytest.mark.parametrize("engine", sorted(ENGINE_MODULES))
def test_the_wheelhouse_covers_what_serving_with_the_engine_imports(engine):
    modules = third_party_imports(SERVER_ROOTS, module_level_only=True) | \
        third_party_imports((ENGINE_MODULES[engine],), module_level_only=False)
    allowed = distributions_allowed(serve_requirements(engine, f"{sys.version_info.major}.{sys.version_info.minor}"))
    providers = metadata.packages_distributions()
    optional = set(OPTIONAL_ENGINE_MODULES.get(engine, ()))
    missing = {module: providers.get(module, [module]) for module in modules - optional
               if not any(re.sub(r"[-_.]+", "-", d).lower() in allowed for d in providers.get(module, [module]))}
    assert not missing, f"serving with {engine} imports these, and --offline-wheels would not carry them: {missing}"


def test_a_serving_package_edgepack_does_not_declare_is_refused_not_dropped(monkeypatch):
    from edgepack.bundle import wheels
    from edgepack.core.errors import EdgepackError

    monkeypatch.setattr(wheels, "SERVE_PACKAGES", (*wheels.SERVE_PACKAGES, "not-a-dependency"))
    with pytest.raises(EdgepackError, match=r"serving needs not-a-dependency, which pyproject.toml's \[project\] "
                                            r"dependencies do not declare: add them there"):
        serve_requirements("llamacpp", "3.11")
