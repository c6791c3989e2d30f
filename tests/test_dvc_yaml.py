"""``dvc.yaml`` agrees with the code: each stage's command exists, its params are config fields, and
its ``deps`` cover every project module the stage's code imports (so editing one re-runs the stage)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import yaml

from pipeline import config
from pipeline.cli import app

from conftest import REPO

PACKAGES = ("pipeline", "crawl", "distill", "kd3util", "demo")
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    """The source file of a project module (``a.b`` -> ``a/b.py`` or ``a/b/__init__.py``), else None."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = REPO.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_files(start: Path) -> set[str]:
    """Every project file ``start`` imports, directly or not, including imports inside functions."""
    seen: set[Path] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        source = path.read_text(encoding="utf-8")
        if "iter_modules(__path__)" in source:  # a plugin package imports every module in its folder
            todo += [p for p in path.parent.glob("*.py") if p != path]
        for node in ast.walk(ast.parse(source)):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # "from pkg import mod" imports pkg.mod when it is a module, else a name of pkg
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            for name in names:
                parts = name.split(".")
                for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
                    found = module_file(".".join(parts[:i]))
                    if found is not None:
                        todo.append(found)
    return {str(p.relative_to(REPO)) for p in seen if not _only_docstring(p)}


def _only_docstring(path: Path) -> bool:
    """An ``__init__.py`` that holds only a docstring changes nothing a stage does."""
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def covered(file: str, deps: list[str]) -> bool:
    return any(file == d or file.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", sorted(DVC))
def test_each_stage_depends_on_the_code_it_imports(stage: str) -> None:
    cmd = DVC[stage]["cmd"].split()
    assert cmd[:2] == ["kd3", stage], f"{stage}: the command should be 'kd3 {stage}', got {DVC[stage]['cmd']!r}"
    deps = [d if isinstance(d, str) else next(iter(d)) for d in DVC[stage].get("deps", [])]
    needed = imported_files(REPO / "pipeline" / f"{stage}_stage.py")
    missing = sorted(f for f in needed if not covered(f, deps))
    assert not missing, f"dvc.yaml stage {stage!r} lacks deps on code it imports: {missing}"
    stale = sorted(d for d in deps if d.endswith(".py") and d not in needed)
    assert not stale, f"dvc.yaml stage {stage!r} depends on code it does not import: {stale}"


@pytest.mark.parametrize("stage", sorted(DVC))
def test_each_stage_is_a_command_and_its_params_are_config_fields(stage: str) -> None:
    commands = {c.name or c.callback.__name__ for c in app.registered_commands}  # type: ignore[union-attr]
    assert stage in commands
    fields = {f.name for f in dataclasses.fields(config.SECTIONS[stage])}
    for entry in DVC[stage].get("params", []):
        section, _, key = (entry if isinstance(entry, str) else next(iter(entry))).partition(".")
        cls = config.SECTIONS[section]
        assert key == "" or key.split(".")[0] in {f.name for f in dataclasses.fields(cls)}, entry
    assert fields  # the stage has a config section


def test_the_dependency_walk_sees_imports_inside_functions() -> None:
    # evalset imports the image decoder only when an image folder is used; the walk must still see it
    assert "crawl/images.py" in imported_files(REPO / "pipeline" / "evalset.py")


def test_the_dependency_walk_sees_every_module_of_a_plugin_package() -> None:
    # distill/methods discovers its modules at run time: each method file is a dependency of distill
    found = imported_files(REPO / "distill" / "methods" / "__init__.py")
    assert {"distill/methods/kd3.py", "distill/methods/kd.py", "distill/methods/dfnd.py"} <= found
