"""Shared fixtures: tiny synthetic worlds, the mirror, and a scriptable hostile HTTP server.

Everything runs on 127.0.0.1; no test reaches the internet.
"""

from __future__ import annotations

import html as htmllib
import io
import json
import re
import signal
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from demo.mirror import MirrorServer
from demo.settings import RenderParams, WorldMix
from demo.world import build_world

REPO = Path(__file__).resolve().parents[1]

# A suite started as a background job of a non-interactive shell (`make test &`) inherits SIGINT
# ignored, and so would every process it starts: the signal tests need the default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
TINY_CLASSES = ["T-shirt/top", "Trouser", "Bag"]


def synthetic_items(per_class: int, num_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """28x28 grey 'items' (bright blobs on black), a different shape per class."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28]
    images, labels = [], []
    for k in range(num_classes):
        for _ in range(per_class):
            cx, cy = 14 + rng.normal(0, 1.5, size=2)
            rx, ry = 4 + 3 * (k % 3) + rng.uniform(0, 2), 10 - 2 * (k % 3) + rng.uniform(0, 2)
            mask = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
            img = (mask * rng.uniform(120, 255, size=(28, 28))).astype(np.uint8)
            images.append(img)
            labels.append(k)
    return np.stack(images), np.array(labels, dtype=np.uint8)


def make_world(out_dir: Path, results_per_class: int = 12, seed: int = 0, mix: WorldMix | None = None) -> Path:
    images, labels = synthetic_items(40, len(TINY_CLASSES), seed)
    mix = mix or WorldMix(0.6, 0.1, 0.1, 0.1, 0.1)
    render = RenderParams(min_size=24, max_size=64)
    build_world(
        images, labels, TINY_CLASSES, out_dir, seed=seed, results_per_class=results_per_class, mix=mix, render=render
    )
    return out_dir


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-class world, 12 results per class (built once; read-only for tests)."""
    return make_world(tmp_path_factory.mktemp("world") / "world")


@pytest.fixture()
def mirror(tiny_world: Path, tmp_path: Path) -> Iterator[MirrorServer]:
    with MirrorServer(tiny_world, log_path=tmp_path / "mirror.log") as server:
        yield server


def jpeg_bytes(size: tuple[int, int] = (32, 24), colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png_bytes(size: tuple[int, int] = (20, 20), seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_idx(folder: Path, images: np.ndarray, labels: np.ndarray, prefix: str = "train") -> None:
    """Fashion-MNIST's idx format, uncompressed, so the world stage reads it like the real files."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(images)
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(
        b"\x00\x00\x08\x03" + b"".join(int(v).to_bytes(4, "big") for v in (n, 28, 28)) + images.tobytes()
    )
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + n.to_bytes(4, "big") + labels.tobytes())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------------------------
# a scriptable server that misbehaves on purpose
# --------------------------------------------------------------------------------------------

Route = Callable[[socket.socket, dict[str, Any]], None]


def respond(status: int, body: bytes = b"", headers: dict[str, str] | None = None, length: int | None = None) -> Route:
    """A route that sends one complete response (optionally lying about Content-Length)."""

    def route(sock: socket.socket, req: dict[str, Any]) -> None:
        h = {"Content-Type": "image/jpeg", "Content-Length": str(len(body) if length is None else length)}
        h.update(headers or {})
        head = f"HTTP/1.1 {status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "Connection: close\r\n\r\n"
        sock.sendall(head.encode() + body)

    return route


def sequence(*routes: Route) -> Route:
    """Route i for the i-th request to this path; the last one repeats."""
    calls = {"n": 0}

    def route(sock: socket.socket, req: dict[str, Any]) -> None:
        i = min(calls["n"], len(routes) - 1)
        calls["n"] += 1
        routes[i](sock, req)

    return route


class HostileServer(socketserver.ThreadingTCPServer):
    """Raw-socket HTTP server: ``routes[path](sock, request)`` writes whatever it likes."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.log: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _RawHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def hits(self, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [e for e in self.log if e["path"] == path]


class _RawHandler(socketserver.BaseRequestHandler):
    server: HostileServer

    def handle(self) -> None:
        sock = self.request
        sock.settimeout(30)
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    return
                data += chunk
        except OSError:
            return
        line, *header_lines = data.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
        method, path, _ = line.split(" ", 2)
        headers = dict(h.split(": ", 1) for h in header_lines if ": " in h)
        req = {"method": method, "path": path, "headers": headers, "time": time.monotonic()}
        with self.server.lock:
            self.server.log.append(req)
        route = self.server.routes.get(path, respond(404, b"nope", {"Content-Type": "text/plain"}))
        try:
            route(sock, req)
        except OSError:
            pass


@pytest.fixture()
def hostile() -> Iterator[HostileServer]:
    server = HostileServer()
    yield server
    server.shutdown()
    server.server_close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def copy_repo(dst: Path) -> Path:
    """The repository's files (tracked and new, not ignored) copied into ``dst``, as a clone would have them."""
    import shutil
    import subprocess

    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dst / f)
    return dst


def git_commit_all(folder: Path) -> None:
    """``git init`` + commit everything, so DVC sees a repository."""
    import subprocess

    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy"],
    ):
        subprocess.run(cmd, cwd=folder, check=True, capture_output=True)


def run_in(cmd: list[str], cwd: Path, timeout: float = 300) -> Any:
    """Run a command (``dvc``, ``kd3``) from this venv in ``cwd``; returns the CompletedProcess."""
    import os
    import subprocess
    import sys

    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
    }
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def crawl_urls(out: Path, tmp_path: Path, fetcher: Any, urls: dict[str, list[str]], **kw: Any) -> list[Any]:
    """One run of the ``urls`` engine over ``urls`` (class name -> URLs): a list of ``ClassReport``."""
    # imported here: the GPU machine runs tests/test_gpu.py through this conftest without icrawler
    from crawl.classes import parse_classes
    from crawl.crawler import Crawler
    from crawl.sources import SearchContext, make_source

    tsv = tmp_path / "urls.tsv"
    tsv.write_text("".join(f"{name}\t{u}\n" for name, us in urls.items() for u in us))
    ctx = SearchContext(fetcher, urls_file=str(tsv))
    args = {"workers": 4, "per_class": 100, "min_per_class": 0, "progress": False, **kw}
    classes = parse_classes("\n".join(urls))
    return Crawler(out, {"urls": make_source("urls", ctx)}, lambda c: [c.name], fetcher, **args).run(classes)  # type: ignore[arg-type]


def poison_loss_at_call(trainer: Any, call: int) -> dict[str, int]:
    """Make the ``call``-th training step of ``trainer`` (counting from 1) compute a NaN loss;
    returns the live count of steps taken (``["n"]``)."""
    forward, calls = trainer.method.forward, {"n": 0}

    def poisoned(*a: Any) -> Any:
        calls["n"] += 1
        out = forward(*a)
        if calls["n"] == call:
            out["loss"] = out["loss"] * float("nan")
        return out

    trainer.step_fn = poisoned
    return calls


# The checker injected into a report page before a headless browser loads it: it records script and
# resource errors from the first moment, then after "load" lists the images that did not decode and
# each section with whether it holds data, in a <pre id="kd3-check"> that --dump-dom prints.
_PAGE_CHECK = """<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push(String(e.message || (e.target && e.target.src))), true);
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const out = document.createElement("pre");
  out.id = "kd3-check";
  out.textContent = JSON.stringify({
    images: imgs.length,
    broken: imgs.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt),
    scripts: document.scripts.length,
    sections: [...document.querySelectorAll("section")].map(s => [s.id, !s.querySelector(".missing")]),
    errors: window.__errors,
  });
  document.body.appendChild(out);
});
</script>"""


def render_in_browser(page: Path, tmp: Path) -> dict[str, Any]:
    """Load a report page in headless Chromium; return what the injected checker saw (skips without Chromium)."""
    from pipeline.report_stage import browser, find_browser

    if find_browser() is None:
        pytest.skip("no Chromium on PATH (make test installs Debian's chromium where apt-get exists)")
    html = page.read_text(encoding="utf-8")
    assert html.count("<head>") == 1, "the page has one head to inject the checker into"
    probe = tmp / "probe.html"
    probe.write_text(html.replace("<head>", "<head>" + _PAGE_CHECK, 1), encoding="utf-8")
    done = browser(probe, "--dump-dom", "--virtual-time-budget=10000")
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r'<pre id="kd3-check">(.*?)</pre>', done.stdout, re.S)
    assert found, f"the checker did not run: {done.stdout[-500:]} {done.stderr[-1500:]}"
    return json.loads(htmllib.unescape(found.group(1)))
