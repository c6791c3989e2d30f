"""``kd3 report``: the run's page, from whatever the stages have written so far, checked in a real browser.

The whole pipeline's page is checked in tests/test_dvc.py (the end-to-end run); here the page is
built from a fresh project, from hostile values in the stage files, and from a damaged file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app

from conftest import REPO, render_in_browser

runner = CliRunner()
STAGES = {"crawl": "crawl", "clean": "clean", "teacher": "label", "training": "distill", "student": "distill"}


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder with the shipped params.yaml and nothing run yet."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def sections(page: Path) -> dict[str, str]:
    """Section id -> its HTML."""
    html = page.read_text(encoding="utf-8")
    parts = html.split('<section id="')[1:]
    return {p.split('"', 1)[0]: p.split("</section>", 1)[0] for p in parts}


def test_a_fresh_project_gets_a_page_that_says_what_to_run(project: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["report"])
    assert result.exit_code == 0, result.output
    page = project / "data/report/index.html"
    assert f"report: {Path('data/report/index.html')}" in result.output
    got = sections(page)
    assert list(got) == ["glance", "crawl", "clean", "teacher", "training", "accuracy", "student", "settings"]
    for section, stage in STAGES.items():
        assert f"run `kd3 {stage}`" in got[section], section
    # every setting is listed with where its value came from
    assert "distill.kd3.query_prior" in got["settings"] and "params.yaml (default: 0.0)" in got["settings"]
    assert "report.title" in got["settings"]
    seen = render_in_browser(page, tmp_path)
    assert seen["errors"] == [] and seen["broken"] == [] and seen["scripts"] == 1  # only the injected checker
    assert dict(seen["sections"])["settings"] is True and dict(seen["sections"])["crawl"] is False


def test_values_from_stage_files_are_escaped_never_run(project: Path, tmp_path: Path) -> None:
    """A class name or failure reason from the web is text on the page, not markup or script."""
    evil = '<img src=x onerror="document.title=1"></table><script>document.title=2</script>'
    (project / "data/crawl").mkdir(parents=True)
    report = {
        "downloaded": 1,
        "engines": ["urls"],
        "seconds": 1.0,
        "classes": [{"name": evil, "candidates": {"urls": 2}, "downloaded": 1, "failed": {evil: 1}, "deferred": {}}],
        "problems": [evil],
    }
    (project / "data/crawl/report.json").write_text(json.dumps(report))
    manifest = {"engine": evil, "status": "failed", "reason": evil}
    (project / "data/crawl/manifest.jsonl").write_text(json.dumps(manifest) + "\n{torn")
    assert runner.invoke(app, ["report"]).exit_code == 0
    crawl = sections(project / "data/report/index.html")["crawl"]
    assert "<script>" not in crawl and "&lt;script&gt;document.title=2&lt;/script&gt;" in crawl
    seen = render_in_browser(project / "data/report/index.html", tmp_path)
    assert seen["scripts"] == 1 and seen["errors"] == [] and seen["broken"] == []
    assert seen["images"] == 1  # the failure-reason chart; no <img> from the class name
    assert dict(seen["sections"])["crawl"] is True


def test_a_damaged_stage_file_costs_only_its_section(project: Path) -> None:
    (project / "data/clean").mkdir(parents=True)
    (project / "data/clean/report.json").write_text('{"objects": 3, "kept"')
    result = runner.invoke(app, ["report"])
    assert result.exit_code == 0, result.output
    got = sections(project / "data/report/index.html")
    assert "could not read this section" in got["clean"] and "report.json" in got["clean"]
    assert "run `kd3 crawl`" in got["crawl"]  # the other sections are unaffected


def test_screenshot_is_the_page_as_a_browser_draws_it(project: Path, tmp_path: Path) -> None:
    from pipeline.report_stage import find_browser

    if find_browser() is None:
        pytest.skip("no Chromium on PATH")
    result = runner.invoke(app, ["report", "--screenshot", str(tmp_path / "shot.png")])
    assert result.exit_code == 0, result.output
    shot = Image.open(tmp_path / "shot.png").convert("L")
    assert shot.size == (1200, 1600)
    assert shot.getextrema()[0] < 100  # text was drawn, not a blank page
