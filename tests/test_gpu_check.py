"""benchmarks/gpu_check.sh --dry: the GPU machine's script, run here on its packages (no imagehash,
icrawler, dvc or pytest plugins), so a broken step shows before the one short GPU run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import test_gpu

from blocked_imports import blocked_env
from conftest import REPO
from tiny_project import build_stage_inputs


@pytest.mark.slow
def test_gpu_check_dry_runs_every_step_without_the_crawl_packages(tmp_path: Path) -> None:
    data = build_stage_inputs(tmp_path / "project")  # what carrying data/clean, data/label, data/teacher brings
    env = {**blocked_env(tmp_path / "site"), "PYTHON": sys.executable, "KD3_DATA": str(data)}
    env.pop("OUT", None)
    results = tmp_path / "results"
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry", str(results)],
        cwd=tmp_path,  # the script finds the repository from its own path
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    steps = (results / "steps.txt").read_text().splitlines()
    assert [line.split("  ")[0] for line in steps] == [
        "versions",
        "GPU tests",
        "training speed (cpu)",
        "KD3 on the demo (cpu)",
    ]
    assert all(" ok, " in line for line in steps), steps
    log = (results / "gpu_check.log").read_text()
    assert "/dev/shm: " in log and "torch " in log and "nvidia-smi" in log
    assert log.index("| demo | ours |") < log.index("inside torch operators")  # a row prints when measured
    assert "| demo | ours |" in (results / "train_speed-cpu.md").read_text()
    summary = json.loads((results / "demo_kd3.json").read_text())
    assert summary["epochs"] == 1 and summary["device"] == "cpu" and summary["final_loss"] > 0
    assert (results / "gpu_tests.xml").is_file()


def test_gpu_check_fails_loudly_when_a_step_fails(tmp_path: Path) -> None:
    """No GPU and no --dry: every GPU step fails, the script goes on, names each and exits non-zero."""
    env = {**blocked_env(tmp_path / "site"), "PYTHON": sys.executable, "KD3_DATA": str(tmp_path / "none")}
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path / "results")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if "cuda:0" in proc.stdout:
        pytest.skip("this machine has a GPU")
    assert proc.returncode == 1
    steps = (tmp_path / "results" / "steps.txt").read_text()
    assert "versions" in steps and "FAILED" in steps and "training speed (cuda)" in steps
    assert "step(s) failed" in proc.stdout


def test_gpu_tests_show_warnings_without_failing() -> None:
    """pyproject makes every warning an error; CUDA-only warnings must not fail the one GPU run."""
    marks = [m for m in test_gpu.pytestmark if m.name == "filterwarnings"]
    assert [m.args for m in marks] == [("default",)]
