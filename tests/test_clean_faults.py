"""``kd3 clean`` under faults, as a real process: a full disk, kill -9, Ctrl-C and SIGTERM.

Each run gets a marker in its environment, which its decoder workers inherit, so a test finds
every process the run started, even after its parent is gone. A slowed-down decode (a
``sitecustomize`` that sleeps before each real ``analyze_file``) keeps the run busy long enough
to be interrupted mid-analysis.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_clean_stage import crawled  # noqa: F401  (the module-scoped crawl fixture)

from crawl.images import AnalyzeParams
from pipeline import clean_stage
from pipeline.config import CleanConfig

from conftest import REPO

SETTINGS = {"image_size": 32, "min_side": 16, "workers": 2, "progress": False}
OUTPUTS = ("images.npy", "kept.jsonl", "dropped.jsonl", "clusters.jsonl")
SLOW_DECODE = """
import time
import crawl.images as images

real = images.analyze_file
calls = 0


def analyze_file(*args, **kwargs):
    global calls
    calls += 1
    time.sleep(0.05 if calls <= 16 else 2.0)  # each worker's first chunk, then a crawl
    return real(*args, **kwargs)


images.analyze_file = analyze_file
"""


def write_params(folder: Path, crawl_dir: Path, out: Path, **overrides: object) -> Path:
    clean = {"crawl_dir": str(crawl_dir), "out_dir": str(out), **SETTINGS, **overrides}
    params = folder / "params.yaml"
    params.write_text(json.dumps({"clean": clean, "teacher": {"input_size": 32}}))  # JSON is YAML
    return params


def start_clean(params: Path, marker: str, slow: bool = False, new_session: bool = False) -> subprocess.Popen[str]:
    """``kd3 clean``; ``slow``: 32 files decode at once, the rest take 2 s each (time to interrupt)."""
    env = {**os.environ, "KD3_TEST_MARKER": marker}
    if slow:
        site = params.parent / "slow"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(SLOW_DECODE)
        env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "clean", "--params", str(params)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=new_session,
    )


def marked(marker: str) -> set[int]:
    """Live processes (zombies excluded) whose environment carries ``marker``."""
    found = set()
    needle = f"KD3_TEST_MARKER={marker}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state not in "ZX" and needle in (entry / "environ").read_bytes().split(b"\0"):
                found.add(int(entry.name))
        except (OSError, IndexError):
            continue
    return found


@pytest.fixture()
def marker() -> Iterator[str]:
    """A fresh marker; whatever still carries it at the end is killed (only after a failed test)."""
    m = uuid.uuid4().hex
    yield m
    for pid in marked(m):
        os.kill(pid, signal.SIGKILL)


def wait_for(condition: object, proc: subprocess.Popen[str], what: str, timeout: float = 30.0) -> None:
    t0 = time.monotonic()
    while not condition():  # type: ignore[operator]
        assert proc.poll() is None, f"kd3 clean ended before {what}: {proc.communicate()}"
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.02)


def analysed(out: Path) -> int:
    """Records the run has made durable in its resume checkpoint so far."""
    try:
        return (out.with_name(out.name + ".tmp") / "analysed" / "records.jsonl").read_bytes().count(b"\n")
    except OSError:
        return 0


def kill9(proc: subprocess.Popen[str]) -> None:
    """SIGKILL, and wait for the process only: orphaned workers would hold its pipes open."""
    proc.kill()
    proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def gone_within(marker: str, seconds: float) -> set[int]:
    t0 = time.monotonic()
    while (alive := marked(marker)) and time.monotonic() - t0 < seconds:
        time.sleep(0.05)
    return alive


@pytest.fixture(scope="module")
def reference(crawled: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """The same settings, run once without any fault."""
    out = tmp_path_factory.mktemp("ref") / "clean"
    clean_stage.run(CleanConfig(crawl_dir=str(crawled), out_dir=str(out), **SETTINGS), image_size=32)  # type: ignore[arg-type]
    return out


def assert_same_outputs(out: Path, reference: Path) -> None:
    for name in OUTPUTS:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_exits_with_one_line_and_the_rerun_resumes(
    crawled: Path,  # noqa: F811
    reference: Path,
    tmp_path: Path,
    marker: str,
    signum: int,
) -> None:
    out = tmp_path / "clean"
    params = write_params(tmp_path, crawled, out)
    # a new session, signalled as a whole: what Ctrl-C in a terminal does to the run and its workers
    proc = start_clean(params, marker, slow=True, new_session=True)
    wait_for(lambda: analysed(out) >= 1, proc, "the first checkpointed record")
    os.killpg(proc.pid, signum)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"interrupted ({signal.Signals(signum).name}; {out} is unchanged;"), last
    assert "rerun to resume" in last
    assert not gone_within(marker, 5.0), "decoder workers outlived the interrupted run"
    assert not out.exists()
    assert [p.name for p in out.with_name("clean.tmp").iterdir()] == ["analysed"]  # the checkpoint only
    done = analysed(out)

    if signum == signal.SIGTERM:  # other analysis settings: the checkpoint is not reused
        params = write_params(tmp_path, crawled, out, resize="pad")
    rerun = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "clean", "--params", str(params)], cwd=REPO, capture_output=True
    )
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads((out / "report.json").read_text())
    assert not out.with_name("clean.tmp").exists()
    if signum == signal.SIGTERM:
        assert report["resumed"] == 0
    else:
        assert 1 <= done <= report["resumed"] < report["objects"]
        assert_same_outputs(out, reference)


@pytest.mark.slow
def test_kill9_takes_the_workers_with_it_and_the_rerun_resumes(
    crawled: Path,  # noqa: F811
    reference: Path,
    tmp_path: Path,
    marker: str,
) -> None:
    out = tmp_path / "clean"
    params = write_params(tmp_path, crawled, out)
    proc = start_clean(params, marker, slow=True)
    wait_for(lambda: analysed(out) >= 1 and len(marked(marker)) >= 3, proc, "two workers and a checkpointed record")
    workers = marked(marker) - {proc.pid}
    assert len(workers) >= 2
    kill9(proc)
    done = analysed(out)
    assert not gone_within(marker, 5.0), "decoder workers outlived kill -9 of their parent"

    rerun = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "clean", "--params", str(params)], cwd=REPO, capture_output=True
    )
    assert rerun.returncode == 0, rerun.stderr
    assert done <= json.loads((out / "report.json").read_text())["resumed"] < 35
    assert_same_outputs(out, reference)


def mount_tmpfs(folder: Path, size_kib: int, remount: bool = False) -> None:
    options = f"remount,size={size_kib}k" if remount else f"size={size_kib}k"
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")


def test_checkpoint_cuts_a_torn_tail_and_is_dropped_for_other_settings(tmp_path: Path) -> None:
    """A kill mid-append leaves a torn last line: the next open cuts it and keeps the rest."""
    params = AnalyzeParams(image_size=8)
    cache = clean_stage.AnalysisCache(tmp_path / "analysed", params)
    cache.reserve(3)
    pixels, small = bytes(range(8 * 8 * 3)), bytes(16 * 16 * 3)
    cache.add("a" * 64, {"reason": None, "width": 10}, pixels, small)
    cache.add("b" * 64, {"reason": "truncated"}, None, None)
    cache.add("c" * 64, {"reason": "sha_mismatch"}, None, None)  # depends on the store: never kept
    cache.flush()
    cache.close()
    with open(tmp_path / "analysed" / "records.jsonl", "ab") as f:
        f.write(b'{"sha256": "' + b"d" * 64 + b'", "slot": 1, "val')  # torn by a kill

    again = clean_stage.AnalysisCache(tmp_path / "analysed", params)
    assert sorted(again.records) == ["a" * 64, "b" * 64] and again.slots == 1
    assert (tmp_path / "analysed" / "records.jsonl").read_bytes().endswith(b"}\n")
    assert again.get("a" * 64) == {"sha256": "a" * 64, "slot": 0, "value": {"reason": None, "width": 10}}
    images, thumbs = again.arrays()
    assert images[0].tobytes() == pixels and thumbs.shape == (1, 16, 16, 3)
    again.close()

    other = clean_stage.AnalysisCache(tmp_path / "analysed", AnalyzeParams(image_size=8, resize="pad"))
    assert other.records == {} and other.slots == 0
    other.close()


POOL_PARENT = """
import sys, time
from crawl.isolate import IsolatedPool

with IsolatedPool(time.sleep, workers=3, timeout_s=120) as pool:
    print("started", flush=True)
    for _ in pool.imap_unordered([(0, (0.1,)), (1, (120,))]):  # one worker done, one busy, one never used
        pass
"""


def test_pool_workers_die_with_a_killed_parent(tmp_path: Path, marker: str) -> None:
    """Idle workers (blocked on their pipe) and busy ones (in a long call) alike."""
    proc = subprocess.Popen(
        [sys.executable, "-c", POOL_PARENT],
        cwd=REPO,
        env={**os.environ, "KD3_TEST_MARKER": marker},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "started\n"
    wait_for(lambda: len(marked(marker)) >= 4, proc, "three workers")  # type: ignore[arg-type]
    time.sleep(0.3)  # the first task done: that worker waits on its pipe again
    kill9(proc)
    assert not gone_within(marker, 5.0), "pool workers outlived kill -9 of their parent"


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An empty folder on which a test mounts a small tmpfs (needs root, as in CI containers)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        yield disk
    finally:
        if os.path.ismount(disk):
            subprocess.run(["umount", "-l", str(disk)], check=True)  # lazy: even if a stray process holds it


# The tiny crawl's checkpoint takes 35 pages (140 KiB) of tmpfs, images.npy another 23.
@pytest.mark.parametrize(
    ("size_kib", "where"),
    [(64, "analysed/pixels.bin"), (160, "images.npy")],
    ids=["reserving-the-checkpoint", "writing-the-outputs"],
)
def test_full_disk_is_an_error_naming_the_file_and_the_rerun_resumes(
    crawled: Path,  # noqa: F811
    reference: Path,
    small_disk: Path,
    marker: str,
    size_kib: int,
    where: str,
) -> None:
    mount_tmpfs(small_disk, size_kib)
    out = small_disk / "clean"
    params = write_params(small_disk.parent, crawled, out)
    proc = start_clean(params, marker)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err  # not SIGBUS (-7) from a write through a memory map
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: {small_disk}/clean.tmp/") and "No space left on device" in last, last
    assert f"clean.tmp/{where}: No space left on device" in last, last
    assert f"analysed images are kept in {small_disk}/clean.tmp/analysed for the rerun" in last, last
    assert not marked(marker), "decoder workers outlived the failed run"
    assert not out.exists()
    assert [p.name for p in (small_disk / "clean.tmp").iterdir()] == ["analysed"]

    mount_tmpfs(small_disk, 4096, remount=True)  # space freed
    rerun = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "clean", "--params", str(params)], cwd=REPO, capture_output=True
    )
    assert rerun.returncode == 0, rerun.stderr
    resumed = json.loads((out / "report.json").read_text())["resumed"]
    assert resumed == 0 if where == "analysed/pixels.bin" else resumed > 0  # the space was reserved up front
    assert not (small_disk / "clean.tmp").exists()
    assert_same_outputs(out, reference)


def test_a_file_size_limit_is_an_error_naming_the_file(crawled: Path, tmp_path: Path, marker: str) -> None:  # noqa: F811
    """``ulimit -f``: the kernel refuses the write (EFBIG; Python ignores SIGXFSZ); the error names the file."""
    out = tmp_path / "clean"
    params = write_params(tmp_path, crawled, out)
    limit = 100_000  # below the checkpoint's 134,400 bytes

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "clean", "--params", str(params)],
        cwd=REPO,
        env={**os.environ, "KD3_TEST_MARKER": marker, "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        preexec_fn=limited,
    )
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {tmp_path}/clean.tmp/analysed/pixels.bin: File too large"), last
    assert not marked(marker) and not out.exists()
