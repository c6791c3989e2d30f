"""The distill stage through the CLI: export, evaluate with the student, kill -9 and resume, signals, DDP."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from distill.export import load_exported
from distill.models import build_model
from pipeline.cli import app

from blocked_imports import BLOCKED, blocked_env
from conftest import REPO, TINY_CLASSES
from tiny_project import build_stage_inputs

runner = CliRunner()
KD3 = [sys.executable, "-m", "pipeline.cli"]


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny project (built once)."""
    return build_stage_inputs(tmp_path_factory.mktemp("distill"))


def write_params(root: Path, work: Path, epochs: int = 2, **distill: object) -> Path:
    """A params file for the tiny stage inputs; ``distill`` keys override the defaults (no duplicate keys)."""
    keys: dict[str, object] = {
        "clean_dir": f"{root}/clean",
        "label_dir": f"{root}/label",
        "teacher_dir": f"{root}/teacher",
        "out_dir": f"{work}/distill",
        "metrics_dir": f"{work}/metrics",
        "student": "resnet8",
        "epochs": epochs,
        "batch_size": 16,
        "device": "cpu",
        "holdout": 0.1,
        "eval": {"eval_dir": f"{root}/eval", "last": None},
        **distill,
    }
    evaluate = {
        "teacher_dir": f"{root}/teacher",
        "eval_dir": f"{root}/eval",
        "out_dir": f"{work}/metrics",
        "device": "cpu",
        "student_dir": f"{work}/distill",
    }
    p = work / "params.yaml"
    p.write_text(json.dumps({"distill": keys, "evaluate": evaluate}, indent=1) + "\n")  # JSON is YAML
    return p


def test_distill_exports_a_student_that_evaluate_scores(stage_inputs: Path, tmp_path: Path) -> None:
    params = str(write_params(stage_inputs, tmp_path))
    result = runner.invoke(app, ["distill", "--params", params])
    assert result.exit_code == 0, result.output
    out = tmp_path / "distill"
    model, meta = load_exported(out)
    assert meta["classes"] == TINY_CLASSES and meta["input_size"] == 32 and meta["method"] == "kd3"
    weights = torch.load(out / "student.pt", weights_only=True)
    assert not any(k.startswith("student.head") for k in weights)  # the contrastive head is training-only
    x = torch.rand(2, 3, 32, 32)
    assert model(x).shape == (2, 3)
    rows = (tmp_path / "metrics" / "distill_epochs.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,") and "feature_align" in rows[0] and "val_accuracy" in rows[0] and len(rows) == 3
    summary = json.loads((tmp_path / "metrics" / "distill.json").read_text())
    assert summary["epochs"] == 2 and summary["train_images"] + round(0.1 * 96) >= 80
    result = runner.invoke(app, ["evaluate", "--params", params])
    assert result.exit_code == 0, result.output
    student = json.loads((tmp_path / "metrics" / "student.json").read_text())
    assert 0 <= student["student_accuracy"] <= 1 and 0 <= student["agreement_eval"] <= 1
    assert student["heldout_web_images"] > 0 and 0 <= student["agreement_heldout_web"] <= 1
    assert student["parameters"] > 0 and student["cpu_images_per_second"] > 0 and student["weights_bytes"] > 0
    with open(tmp_path / "metrics" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))  # DVC's confusion template reads class names from here
    assert len(rows) == student["eval_images"] and set(rows[0]) == {"image", "actual", "teacher", "student"}
    right = sum(r["actual"] == r["student"] for r in rows) / len(rows)
    assert abs(right - student["student_accuracy"]) < 1e-3 and {r["student"] for r in rows} <= set(TINY_CLASSES)
    assert (out / "sheets" / "selection_kept.png").is_file()


@pytest.mark.parametrize("method", ["kd", "dfnd"])
def test_baselines_run_through_the_same_stage(stage_inputs: Path, tmp_path: Path, method: str) -> None:
    params = str(write_params(stage_inputs, tmp_path, epochs=1))
    result = runner.invoke(app, ["distill", "--params", params, "--method", method])
    assert result.exit_code == 0, result.output
    assert load_exported(tmp_path / "distill")[1]["method"] == method


def test_bad_distill_params_name_the_key(stage_inputs: Path, tmp_path: Path) -> None:
    params = str(write_params(stage_inputs, tmp_path, methd="kd"))
    result = runner.invoke(app, ["distill", "--params", params])
    assert result.exit_code == 2 and "distill.methd: unknown key" in result.output
    params = str(write_params(stage_inputs, tmp_path, crop_scale=[0.9, 0.2]))
    result = runner.invoke(app, ["distill", "--params", params])
    assert result.exit_code == 2 and "distill.crop_scale" in result.output


def _run_until(cmd: list[str], cwd: Path, ckpt: Path, timeout: float = 120) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert ckpt.exists(), proc.communicate()[0].decode()[-2000:]
    return proc


def test_kill9_mid_run_then_rerun_resumes_and_finishes(stage_inputs: Path, tmp_path: Path) -> None:
    params = write_params(stage_inputs, tmp_path, epochs=6)
    ckpt = tmp_path / "distill" / "checkpoint.pt"
    proc = _run_until([*KD3, "distill", "--params", str(params)], REPO, ckpt)
    proc.kill()  # kill -9 right after the first checkpoint
    proc.communicate()
    done = torch.load(ckpt, weights_only=True)["epoch"]
    assert 1 <= done < 6
    result = subprocess.run(
        [*KD3, "distill", "--params", str(params)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming at epoch {done + 1}" in result.stderr
    history = json.loads((tmp_path / "distill" / "report.json").read_text())["history"]
    assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5, 6]
    with open(tmp_path / "metrics" / "distill_epochs.csv", newline="") as f:  # one row per epoch, none twice
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signals_exit_non_zero_with_a_checkpoint(stage_inputs: Path, tmp_path: Path, signum: int, code: int) -> None:
    params = write_params(stage_inputs, tmp_path, epochs=50)
    ckpt = tmp_path / "distill" / "checkpoint.pt"
    proc = _run_until([*KD3, "distill", "--params", str(params)], REPO, ckpt)
    proc.send_signal(signum)
    out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == code, out[-2000:]
    assert "checkpoint saved; rerun to resume" in out
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] < 50 and not (tmp_path / "distill" / "student.json").exists()


@pytest.mark.slow
def test_torchrun_two_processes_match_one(stage_inputs: Path, tmp_path: Path) -> None:
    """DDP on CPU (gloo): two processes, each half of every batch, end close to one process."""
    results = {}
    torch.manual_seed(0)  # the students' initial weights, as the stage seeds them
    first_weights = build_model("resnet8", 3).state_dict()  # student.pt loads into the plain architecture
    for n in (1, 2):
        work = tmp_path / f"n{n}"
        work.mkdir()
        params = write_params(
            stage_inputs,
            work,
            epochs=3,
            method="kd",
            lr=0.2,
            batch_size=48,
            holdout=0.0,
            flip=False,
            crop_scale=[1.0, 1.0],
            crop_ratio=[1.0, 1.0],
        )
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        bin_dir = Path(sys.executable).parent  # as the README says: torchrun --no-python ... kd3 distill
        cmd = [
            str(bin_dir / "torchrun"),
            "--standalone",
            "--no-python",
            f"--nproc_per_node={n}",
            str(bin_dir / "kd3"),
            "distill",
            "--params",
            str(params),
        ]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads((work / "distill" / "report.json").read_text())
        assert report["world_size"] == n
        results[n] = (report["history"], torch.load(work / "distill" / "student.pt", weights_only=True))
    (h1, w1), (h2, w2) = results[1], results[2]
    assert [r["selected"] for r in h1] == [r["selected"] for r in h2]
    for a, b in zip(h1, h2, strict=True):  # per-rank BN statistics and crops differ, so: close, not equal
        assert abs(a["loss"] - b["loss"]) <= 0.25 * abs(a["loss"]) + 1e-3
    for k, w0 in first_weights.items():  # what DDP changes is small next to what training changed
        if w0.ndim > 1:  # (BatchNorm sees 24 images per process instead of 48: not bitwise)
            moved, apart = float((w1[k] - w0).norm()), float((w1[k] - w2[k]).norm())
            assert apart < 0.4 * moved, (k, apart, moved)


def _torchrun(params: Path, n: int) -> subprocess.CompletedProcess[str]:
    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / "torchrun"), "--standalone", "--no-python", f"--nproc_per_node={n}"]
    cmd += [str(bin_dir / "kd3"), "distill", "--params", str(params)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("mix_weight", [0.5, 0.0])
def test_torchrun_kd3_with_every_component_on(stage_inputs: Path, tmp_path: Path, mix_weight: float) -> None:
    """DDP needs every trainable parameter reached by the loss: KD³'s student carries the backbone's
    own classifier (unused) and, with ``mix_weight: 0``, a contrastive head no term reads."""
    kd3 = {
        "selection": True,
        "shared_classifier": True,
        "feature_weighting": True,
        "mixdistribution": True,
        "mix_weight": mix_weight,
        "kd_weight": 0.5,
        "query_prior": 0.5,
        "tau": 0.3,
    }
    params = write_params(stage_inputs, tmp_path, epochs=2, batch_size=32, holdout=0.0, kd3=kd3, eval={})
    proc = _torchrun(params, 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "distill" / "report.json").read_text())
    assert report["world_size"] == 2 and [r["epoch"] for r in report["history"]] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["kd"] > 0 for r in report["history"])
    assert all(("instance_align" in r) == (mix_weight > 0) for r in report["history"])
    ranks = torch.load(tmp_path / "distill" / "checkpoint.pt", weights_only=True)["rng"]["ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["aug"], ranks[1]["aug"])  # each rank resumes its own crops


def test_distill_stage_runs_without_crawl_and_dvc_packages(stage_inputs: Path, tmp_path: Path) -> None:
    """The GPU machine's python has no imagehash, icrawler or dvc: the stage must import and train
    without them (benchmarks/gpu_check.sh runs it there, evaluation off)."""
    env = blocked_env(tmp_path / "site")
    probe = subprocess.run([sys.executable, "-c", "import imagehash"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "blocked" in probe.stderr  # the block is in force
    params = write_params(stage_inputs, tmp_path, epochs=1, eval={})
    code = (
        "import sys\nfrom pipeline import distill_stage\n"
        "from pipeline.config import DistillConfig, build, read_params\n"
        "distill_stage.run(build(DistillConfig, read_params(sys.argv[1])['distill'], 'distill'))\n"
        f"print('loaded:', sorted(m for m in sys.modules if m.partition('.')[0] in {BLOCKED!r}))"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(params)], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loaded: []" in proc.stdout
    assert (tmp_path / "distill" / "student.ts").is_file()


def test_kd3_distill_command_with_validation_runs_without_crawl_and_dvc_packages(
    stage_inputs: Path, tmp_path: Path
) -> None:
    """The same machine through the command line, with the per-epoch validation on an image folder:
    neither the CLI's error handling nor the folder reader may need the crawl's packages."""
    env = blocked_env(tmp_path / "site")
    params = write_params(stage_inputs, tmp_path, epochs=1)  # eval.eval_dir: a labelled image folder
    code = "import sys\nfrom pipeline.cli import app\nsys.argv = ['kd3', 'distill', '--params', sys.argv[1]]\napp()"
    proc = subprocess.run([sys.executable, "-c", code, str(params)], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "val_accuracy" in (tmp_path / "metrics" / "distill_epochs.csv").read_text()


def test_the_selection_sheet_says_what_it_shows_and_which_classes_have_no_row() -> None:
    from pipeline.distill_stage import sheet_title

    assert "no selection" in sheet_title(True, True, []) and "kept by" not in sheet_title(True, True, [])
    assert sheet_title(False, False, []).startswith("last epoch: dropped by the selection")
    assert sheet_title(False, True, ["Shirt", "Coat"]).endswith("; none for: Shirt, Coat")
    assert sheet_title(False, True, [f"c{i}" for i in range(12)]).endswith("c7 …")
