"""The benchmark scripts as a user runs them: ``--help``, a missing input, and one tiny real run.

They are not imported by the package, so nothing else would notice one that no longer starts, that
dies with a traceback on a fresh clone, or that stops writing its results file.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

SCRIPTS = sorted(p for p in (REPO / "benchmarks").glob("*.py") if not p.name.startswith("_"))
# the scripts that read the demo's outputs, with the arguments that point them at a folder without them
NEEDS_DEMO = {
    "accuracy.py": ["--params", str(REPO / "params.yaml")],
    "clean_speed.py": [],
    "crawl_speed.py": [],
    "dedup_quality.py": [],
}


def run_all(commands: list[list[str]], cwd: Path) -> list[subprocess.CompletedProcess[str]]:
    """Run the commands side by side (each pays for its own imports) and wait for all of them."""
    procs = [
        subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for cmd in commands
    ]
    done = []
    for cmd, p in zip(commands, procs, strict=True):
        out, err = p.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(cmd, p.returncode, out, err))
    return done


@pytest.mark.slow
def test_every_benchmark_says_what_it_needs_and_where_its_table_goes(tmp_path: Path) -> None:
    """``--help`` names the results file; without the demo's outputs a script stops with one line saying
    what is missing and how to make it, not a traceback."""
    assert {p.name for p in SCRIPTS} >= {*NEEDS_DEMO, "train_speed.py"}
    helps = run_all([[sys.executable, str(p), "--help"] for p in SCRIPTS], REPO)
    for script, res in zip(SCRIPTS, helps, strict=True):
        assert res.returncode == 0, f"{script.name} --help: {res.stderr}"
        assert f"benchmarks/results/{script.stem}.md" in res.stdout, script.name
    missing = run_all([[sys.executable, str(REPO / "benchmarks" / n), *a] for n, a in NEEDS_DEMO.items()], tmp_path)
    for name, res in zip(NEEDS_DEMO, missing, strict=True):
        assert res.returncode == 1, f"{name}: {res.stderr}"
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "missing" in lines[0] and "make demo" in lines[0], f"{name}: {res.stderr}"
    assert not (tmp_path / "benchmarks").exists()  # nothing written when the inputs are missing


@pytest.mark.slow
def test_crawl_speed_writes_its_table(tiny_world: Path, tmp_path: Path) -> None:
    """A real run over loopback (ours and icrawler) writes the printed table, machine line included."""
    out = tmp_path / "results" / "crawl_speed.md"
    cmd = [sys.executable, str(REPO / "benchmarks" / "crawl_speed.py"), "--world", str(tiny_world)]
    cmd += ["--images", "12", "--repeats", "1", "--latency", "0", "--threads", "2", "--out", str(out)]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    text = out.read_text()
    assert text.strip() in res.stdout  # the file holds exactly what was printed
    assert "| downloader | images stored | seconds | images/s | vs icrawler |" in text
    assert "| kd3 (ours) | " in text and "| icrawler 0.6.10 | " in text and "| 1.00x |" in text
    assert "CPU cores" in text and "torch " in text and "device cpu" in text
    assert [p.name for p in out.parent.iterdir()] == ["crawl_speed.md"]  # no temporary file left beside it
