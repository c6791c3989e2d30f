"""Real ``dvc repro`` runs of the world and crawl stages in a temporary copy of the repository."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import copy_repo, free_port, git_commit_all, render_in_browser, synthetic_items, write_idx
from conftest import run_in as run

pytestmark = pytest.mark.slow


@pytest.fixture()
def repo_copy(tmp_path: Path) -> Path:
    """The repository's files (tracked and new) in a fresh git repo, with tiny demo params."""
    dst = copy_repo(tmp_path / "repo")
    images, labels = synthetic_items(30, 10)
    order = np.random.default_rng(0).permutation(len(images))
    write_idx(tmp_path / "fmnist", images[order], labels[order])
    write_idx(tmp_path / "fmnist", *synthetic_items(4, 10, seed=1), prefix="t10k")
    params = yaml.safe_load((dst / "params.yaml").read_text())
    params["world"].update(source=str(tmp_path / "fmnist"), first=0, last=300, results_per_class=6)
    params["world"]["render"].update(min_size=24, max_size=40)
    params["crawl"].update(per_class=3, min_per_class=1, progress=False)
    params["clean"].update(progress=False, min_side=16)
    params["label"]["truth"] = None
    params["teacher"]["demo"].update(source=str(tmp_path / "fmnist"), last=300, epochs=1, batch_size=32)
    params["distill"].update(epochs=2, batch_size=8, eval={"fashion_mnist": str(tmp_path / "fmnist"), "last": 20})
    params["evaluate"].update(fashion_mnist=str(tmp_path / "fmnist"), first=20)
    params["crawl"]["mirror"]["port"] = free_port()
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git_commit_all(dst)
    return dst


def test_dvc_repro_crawl_then_nothing_then_resume_on_a_param_change(repo_copy: Path) -> None:
    first = run(["dvc", "repro", "crawl"], repo_copy)
    assert first.returncode == 0, first.stdout + first.stderr
    report = json.loads((repo_copy / "data/crawl/report.json").read_text())
    assert [c["downloaded"] for c in report["classes"]] == [3] * 10
    objects = {p.name for p in (repo_copy / "data/crawl/objects").rglob("*") if p.is_file()}
    assert len(objects) == 30

    again = run(["dvc", "repro", "crawl"], repo_copy)
    assert again.returncode == 0, again.stderr
    assert "didn't change" in again.stdout and "Running stage 'crawl'" not in again.stdout

    # a larger target re-runs the stage; persist keeps the store, so it only adds
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["crawl"]["per_class"] = 5
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = run(["dvc", "repro", "crawl"], repo_copy)
    assert third.returncode == 0, third.stdout + third.stderr
    assert "Running stage 'crawl'" in third.stdout and "Running stage 'world'" not in third.stdout
    report = json.loads((repo_copy / "data/crawl/report.json").read_text())
    assert [c["downloaded"] for c in report["classes"]] == [5] * 10
    assert all(c["new"] == 2 for c in report["classes"])  # the 30 earlier images were not fetched again
    after = {p.name for p in (repo_copy / "data/crawl/objects").rglob("*") if p.is_file()}
    assert objects < after and len(after) == 50
    status = run(["dvc", "status", "crawl"], repo_copy)
    assert "up to date" in status.stdout, status.stdout


def test_dvc_repro_clean_runs_after_the_crawl_and_only_when_needed(repo_copy: Path) -> None:
    first = run(["dvc", "repro", "clean"], repo_copy)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Running stage 'crawl'" in first.stdout and "Running stage 'clean'" in first.stdout
    report = json.loads((repo_copy / "data/clean/report.json").read_text())
    assert report["objects"] == 30 and report["kept"] + report["dropped"] == 30
    images = np.load(repo_copy / "data/clean/images.npy", mmap_mode="r")
    assert images.shape == (report["kept"], 48, 48, 3)
    again = run(["dvc", "repro", "clean"], repo_copy)
    assert "Running stage" not in again.stdout, again.stdout
    # a clean-only parameter re-runs clean, not the crawl
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["clean"]["image_size"] = 32
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = run(["dvc", "repro", "clean"], repo_copy)
    assert third.returncode == 0, third.stderr
    assert "Running stage 'clean'" in third.stdout and "Running stage 'crawl'" not in third.stdout
    assert np.load(repo_copy / "data/clean/images.npy", mmap_mode="r").shape[1:] == (32, 32, 3)


def test_dvc_repro_label_reruns_exactly_when_the_checkpoint_changes(repo_copy: Path) -> None:
    from distill.models import build_model

    torch.manual_seed(0)
    torch.save(build_model("resnet8", 10).state_dict(), repo_copy / "user.pt")
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["teacher"].update(checkpoint="user.pt", device="cpu")
    params["label"]["device"] = "cpu"
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    first = run(["dvc", "repro", "label"], repo_copy)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Running stage 'teacher'" in first.stdout and "Running stage 'label'" in first.stdout
    logits = (repo_copy / "data/label/logits.npy").read_bytes()

    again = run(["dvc", "repro", "label"], repo_copy)  # the teacher stage checks the file; nothing else runs
    assert again.returncode == 0, again.stderr
    assert "Running stage 'label'" not in again.stdout and "Running stage 'clean'" not in again.stdout

    torch.manual_seed(1)
    torch.save(build_model("resnet8", 10).state_dict(), repo_copy / "user.pt")  # the user swaps the checkpoint
    third = run(["dvc", "repro", "label"], repo_copy)
    assert third.returncode == 0, third.stderr
    assert "Running stage 'label'" in third.stdout and "Running stage 'crawl'" not in third.stdout
    assert (repo_copy / "data/label/logits.npy").read_bytes() != logits


def test_dvc_repro_runs_the_whole_pipeline_then_nothing(repo_copy: Path) -> None:
    """The end-to-end smoke test: world -> crawl -> clean -> teacher -> label -> distill -> evaluate -> report."""
    first = run(["dvc", "repro"], repo_copy)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for stage in ("world", "crawl", "clean", "teacher", "label", "distill", "evaluate", "report"):
        assert f"Running stage '{stage}'" in first.stdout, stage
    assert (repo_copy / "data/distill/student.ts").is_file()
    metrics = run(["dvc", "metrics", "show", "--json"], repo_copy)
    assert metrics.returncode == 0 and "student_accuracy" in metrics.stdout and "val_accuracy_last" in metrics.stdout
    plots = run(["dvc", "plots", "show", "--json"], repo_copy)
    assert plots.returncode == 0, plots.stderr
    shown = json.loads(plots.stdout)["data"]
    assert {"Loss", "Validation accuracy", "Student confusion", "Teacher confusion"} <= set(shown), list(shown)
    names = [n for n in (repo_copy / "classes.txt").read_text().splitlines() if n]
    drawn = json.dumps(shown["Student confusion"])
    assert sum(f'"{n}"' in drawn for n in names) >= 2  # confusion matrices by class name, not index
    # the page: every section has data and a real browser loads it without errors or broken images
    seen = render_in_browser(repo_copy / "data/report/index.html", repo_copy.parent)
    assert all(ok for _, ok in seen["sections"]), seen["sections"]
    assert seen["errors"] == [] and seen["broken"] == [] and seen["images"] >= 6, seen  # curves, matrices, sheets
    again = run(["dvc", "repro"], repo_copy)
    assert again.returncode == 0, again.stderr
    ran = [
        s
        for s in ("crawl", "clean", "label", "distill", "evaluate", "report")
        if f"Running stage '{s}'" in again.stdout
    ]
    assert ran == [], again.stdout

    # an experiment keeps its metrics: dvc exp show reads them back from the experiment's commit
    exp = run(["dvc", "exp", "run", "-S", "distill.epochs=1", "--name", "one-epoch"], repo_copy)
    assert exp.returncode == 0, exp.stdout[-3000:] + exp.stderr[-3000:]
    shown = run(["dvc", "exp", "show", "--json"], repo_copy)
    assert shown.returncode == 0, shown.stderr
    found = dict(experiment_metrics(json.loads(shown.stdout), "student_accuracy"))
    assert "one-epoch" in found and isinstance(found["one-epoch"], float), found


def experiment_metrics(node: object, key: str, name: str | None = None) -> Iterator[tuple[str | None, object]]:
    """(experiment name, value of ``key``) for every metrics file in ``dvc exp show --json`` output."""
    if isinstance(node, dict):
        name = node.get("name", name) if isinstance(node.get("name"), str) else name
        if key in node and not isinstance(node[key], (dict, list)):
            yield name, node[key]
        for value in node.values():
            yield from experiment_metrics(value, key, name)
    elif isinstance(node, list):
        for value in node:
            yield from experiment_metrics(value, key, name)
