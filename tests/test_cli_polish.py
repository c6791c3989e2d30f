"""The command line's shared options: --version, --set on every stage, defaults in --help, same names everywhere."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import SECTIONS as STAGES

from conftest import TINY_CLASSES, synthetic_items, write_idx

runner = CliRunner()
WIDE = {"COLUMNS": "200"}  # one help entry per line


@pytest.fixture()
def world_params(tmp_path: Path) -> Path:
    """A params file whose world stage builds 8 results per class from synthetic idx files in a second."""
    images, labels = synthetic_items(20, 3)
    write_idx(tmp_path / "fmnist", images, labels)
    (tmp_path / "classes.txt").write_text("\n".join(TINY_CLASSES) + "\n")
    world = {
        "source": str(tmp_path / "fmnist"),
        "classes": str(tmp_path / "classes.txt"),
        "out_dir": str(tmp_path / "world"),
        "first": 0,
        "last": 60,
        "results_per_class": 8,
        "render": {"min_size": 24, "max_size": 48},
    }
    p = tmp_path / "params.yaml"
    p.write_text(json.dumps({"world": world, "crawl": {"classes": str(tmp_path / "classes.txt")}}) + "\n")
    return p


def test_version_comes_from_the_package_metadata() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"kd3 {importlib.metadata.version('kd3')}"


@pytest.mark.parametrize("command", sorted(STAGES))
def test_every_stage_names_its_shared_options_the_same_way(command: str) -> None:
    text = runner.invoke(app, [command, "--help"], env=WIDE).stdout
    fields = {f.name for f in dataclasses.fields(STAGES[command])}
    assert "--params" in text and "-p" in text and "--set" in text and "KEY=VALUE" in text
    assert ("--device" in text) == ("device" in fields), command  # every section with a device takes --device
    assert ("--progress" in text) == ("progress" in fields), command
    if "device" in fields:
        assert f"[default: ({command}.device in the params file)]" in text


def test_help_shows_every_default() -> None:
    distill = runner.invoke(app, ["distill", "--help"], env=WIDE).stdout
    assert "[default: (distill.epochs in the params file)]" in distill
    assert "[default: (distill.method in the params file)]" in distill
    crawl = runner.invoke(app, ["crawl", "--help"], env=WIDE).stdout
    for key in ("classes", "engines", "per_class", "out_dir", "shard", "urls_file", "progress"):
        assert f"[default: (crawl.{key} in the params file)]" in crawl, key
    predict = runner.invoke(app, ["predict", "--help"], env=WIDE).stdout
    assert "[default: data/distill]" in predict and "[default: 64]" in predict and "[default: 1]" in predict


def test_set_overrides_the_commands_section_and_warns_about_dvc(world_params: Path) -> None:
    args = ["world", "--params", str(world_params), "--set", "results_per_class=4", "--set", "world.render.min_size=30"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads((world_params.parent / "world" / "summary.json").read_text())["entries"] == 12  # 3 x 4, not 3 x 8
    assert "DVC does not know about it" in result.stderr
    assert "dvc exp run -S world.results_per_class=4 -S world.render.min_size=30" in result.stderr
    nested = runner.invoke(app, ["world", "--params", str(world_params), "--set", "render.min_size=2"])
    assert nested.exit_code == 2 and "with --set: world.render.min_size" in nested.stderr  # checked like the file
    plain = runner.invoke(app, ["world", "--params", str(world_params)])
    assert plain.exit_code == 0 and "DVC" not in plain.stderr


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["epochs"], "--set epochs: expected KEY=VALUE with KEY a dotted key of the distill section"),
        (["=3"], "--set =3: expected KEY=VALUE"),
        (["epochs=[1"], "--set epochs=[1: not a YAML value"),
        (["epochs=zero"], "with --set: distill.epochs"),
        (["kd3.tau=2"], "with --set: distill.kd3.tau"),
        (["no_such_key=1"], "with --set: distill.no_such_key: unknown key"),
    ],
)
def test_bad_set_exits_2_naming_it(world_params: Path, sets: list[str], message: str) -> None:
    args = ["distill", "--params", str(world_params)] + [a for s in sets for a in ("--set", s)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr


def test_set_null_and_lists_are_yaml(world_params: Path) -> None:
    """A YAML null or list reaches the section as such: here both are checked by the section's own schema."""
    base = ["crawl", "--params", str(world_params)]
    result = runner.invoke(app, [*base, "--set", "engines=[nosuch]"])
    assert result.exit_code == 2 and "crawl.engines" in result.stderr and "nosuch" in result.stderr
    result = runner.invoke(app, [*base, "--set", "classes=null"])
    assert result.exit_code == 2 and "crawl.classes" in result.stderr, result.output
