"""The ``kd3`` command line: help, exit codes, flag overrides, world + crawl through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from demo.mirror import MirrorServer
from pipeline.cli import app

from conftest import TINY_CLASSES, free_port, synthetic_items, write_idx

runner = CliRunner()


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """A params file for a 3-class world built from synthetic idx files, crawled via the mirror."""
    images, labels = synthetic_items(20, 3)
    order = np.random.default_rng(0).permutation(len(images))
    write_idx(tmp_path / "fmnist", images[order], labels[order])
    (tmp_path / "classes.txt").write_text("\n".join(TINY_CLASSES) + "\n")
    (tmp_path / "params.yaml").write_text(
        f"""world:
  source: {tmp_path / "fmnist"}
  classes: {tmp_path / "classes.txt"}
  out_dir: {tmp_path / "world"}
  first: 10
  last: 60
  results_per_class: 8
  render: {{min_size: 24, max_size: 48}}
crawl:
  classes: {tmp_path / "classes.txt"}
  out_dir: {tmp_path / "crawl"}
  per_class: 5
  min_per_class: 1
  progress: false
  http: {{workers: 2, per_host_concurrency: 2, per_host_delay_s: 0.0}}
  mirror: {{world_dir: {tmp_path / "world"}, port: {free_port()}}}
"""
    )
    return tmp_path


def test_help_lists_the_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("world", "crawl", "clean", "mirror"):
        assert cmd in result.output
    assert "--shard" in runner.invoke(app, ["crawl", "--help"]).output


def test_world_then_crawl_through_the_cli(project: Path) -> None:
    params = str(project / "params.yaml")
    result = runner.invoke(app, ["world", "--params", params])
    assert result.exit_code == 0, result.output
    summary = json.loads((project / "world" / "summary.json").read_text())
    assert summary["entries"] == 24
    truth = [json.loads(x) for x in (project / "world" / "truth.jsonl").read_text().splitlines()]
    assert all(t["raw_index"] is None or 10 <= t["raw_index"] < 60 for t in truth)  # train[first:last] only
    result = runner.invoke(app, ["crawl", "--params", params])
    assert result.exit_code == 0, result.output
    report = json.loads((project / "crawl" / "report.json").read_text())
    assert [c["downloaded"] for c in report["classes"]] == [5, 5, 5]
    assert "TOTAL" in result.output and "peak RSS" in result.output
    classes = json.loads((project / "crawl" / "classes.json").read_text())
    assert [c["name"] for c in classes] == TINY_CLASSES


def test_clean_through_the_cli(project: Path) -> None:
    params = str(project / "params.yaml")
    p = project / "params.yaml"
    p.write_text(
        p.read_text() + f"clean:\n  crawl_dir: {project / 'crawl'}\n  out_dir: {project / 'clean'}\n"
        "  image_size: 16\n  min_side: 16\n  progress: false\n"
    )
    upsampled = runner.invoke(app, ["clean", "--params", params])  # the default teacher takes 32 px
    assert upsampled.exit_code == 2 and "clean.image_size: 16 is smaller than teacher.input_size 32" in upsampled.output
    p.write_text(p.read_text().replace("image_size: 16", "image_size: null"))  # the teacher's size x 1.5
    missing = runner.invoke(app, ["clean", "--params", params])
    assert missing.exit_code == 1 and "no crawl manifest (run kd3 crawl first)" in missing.output
    assert runner.invoke(app, ["world", "--params", params]).exit_code == 0
    assert runner.invoke(app, ["crawl", "--params", params]).exit_code == 0
    result = runner.invoke(app, ["clean", "--params", params])
    assert result.exit_code == 0, result.output
    assert "TOTAL" in result.output and "images/s" in result.output
    report = json.loads((project / "clean" / "report.json").read_text())
    assert report["objects"] == 15
    assert np.load(project / "clean" / "images.npy", mmap_mode="r").shape[1:] == (48, 48, 3)


def test_flags_override_params(project: Path) -> None:
    params = str(project / "params.yaml")
    assert runner.invoke(app, ["world", "--params", params]).exit_code == 0
    (project / "two.txt").write_text("Trouser\nBag\n")
    out = project / "other"
    args = ["crawl", "--params", params, "--classes", str(project / "two.txt"), "--per-class", "2", "--out", str(out)]
    p = project / "params.yaml"
    p.write_text(p.read_text().replace("min_per_class: 1", "min_per_class: 4"))  # lowered to 2 by --per-class
    result = runner.invoke(app, [*args, "--shard", "1/2"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert [(c["name"], c["downloaded"]) for c in report["classes"]] == [("Bag", 2)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--per-class", "0"], "--per-class: expected an integer >= 1"),
        (["--shard", "2/2"], "crawl.shard: expected 0 <= i < n"),
        (["--engine", "yahoo"], "crawl.engines: 'yahoo' is not one of"),
        (["--classes", "/nonexistent/classes.txt"], "/nonexistent/classes.txt: class file not found"),
    ],
)
def test_bad_usage_exits_2_with_the_name(project: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["crawl", "--params", str(project / "params.yaml"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_typo_in_params_exits_2_naming_key_and_file(project: Path) -> None:
    p = project / "params.yaml"
    p.write_text(p.read_text().replace("per_class: 5", "per_clas: 5"))
    result = runner.invoke(app, ["crawl", "--params", str(p)])
    assert result.exit_code == 2
    assert f"{p}: crawl.per_clas: unknown key" in result.output


def test_missing_world_is_a_clear_error(project: Path) -> None:
    result = runner.invoke(app, ["crawl", "--params", str(project / "params.yaml")])
    assert result.exit_code == 1
    assert "no index.json (build the world first: kd3 world)" in result.output


def test_world_without_fashion_mnist_says_how_to_get_it(project: Path) -> None:
    p = project / "params.yaml"
    p.write_text(p.read_text().replace(str(project / "fmnist"), str(project / "nowhere")))
    result = runner.invoke(app, ["world", "--params", str(p)])
    assert result.exit_code == 1 and "apt-get install dataset-fashion-mnist" in result.output


def test_world_is_skipped_without_the_mirror_engine(project: Path) -> None:
    p = project / "params.yaml"
    p.write_text(p.read_text().replace("crawl:\n", "crawl:\n  engines: [bing]\n") + "")
    p.write_text(p.read_text().replace(str(project / "fmnist"), str(project / "nowhere")))
    result = runner.invoke(app, ["world", "--params", str(p)])
    assert result.exit_code == 0, result.output
    assert "disabled" in json.loads((project / "world" / "index.json").read_text())


def test_world_is_deterministic(project: Path) -> None:
    params = str(project / "params.yaml")
    runner.invoke(app, ["world", "--params", params])
    first = {p.name: p.read_bytes() for p in (project / "world").rglob("*") if p.is_file()}
    runner.invoke(app, ["world", "--params", params])
    second = {p.name: p.read_bytes() for p in (project / "world").rglob("*") if p.is_file()}
    assert first == second


def test_mirror_serves_broken_entries_as_declared(project: Path) -> None:
    import requests

    assert runner.invoke(app, ["world", "--params", str(project / "params.yaml")]).exit_code == 0
    truth = [json.loads(x) for x in (project / "world" / "truth.jsonl").read_text().splitlines()]
    with MirrorServer(project / "world") as server:
        for t in truth:
            r = requests.get(f"{server.base_url}/{t['path']}", timeout=5)
            if t["serve"] == "http_404":
                assert r.status_code == 404
            else:
                assert r.status_code == 200 and len(r.content) > 0
                if t.get("broken") == "html_as_image":
                    assert r.headers["Content-Type"] == "image/jpeg" and r.content.startswith(b"<!DOCTYPE html>")
        assert len(server.requests) == len(truth)
