"""The offline web: a threaded loopback HTTP server over a world built by ``demo.world``.

Endpoints:

- ``GET /images/async?q=<query>&first=<offset>&count=<n>`` — a results page in Bing's async
  format (``<div class="imgpt"><a class="iusc" m='{"murl": ...}'>``), so the ``mirror`` engine
  runs the same parser as a real Bing crawl. The query picks the class whose name it contains
  (the longest such name); other words in the query reorder the list a little, as a real engine's
  would. An unknown query gets an empty page.
- ``GET /img/<file>`` — the world's files, with the broken entries behaving as declared (404,
  HTML served as ``image/jpeg``, truncated files, a generic ``application/octet-stream`` type).

Every request is logged (time, path, status, bytes) in memory and, if ``log_path`` is given, to a
JSONL file: the tests read the log to count what a crawl requested.
"""

from __future__ import annotations

import html
import json
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from crawl.classes import normalise

PAGE_MAX = 150


class MirrorServer(ThreadingHTTPServer):
    """Serve ``world_dir`` on ``host:port`` (port 0 = a free port)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        world_dir: str | Path,
        host: str = "127.0.0.1",
        port: int = 0,
        log_path: str | Path | None = None,
        delay_s: float = 0.0,
    ) -> None:
        self.world_dir = Path(world_dir)
        self.delay_s = delay_s  # added latency per image response (benchmarks, kill tests)
        index_path = self.world_dir / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{self.world_dir}: no index.json (build the world first: kd3 world)")
        self.index = json.loads(index_path.read_text(encoding="utf-8"))
        self.by_key = {normalise(name): name for name in self.index["classes"]}
        self.requests: list[dict[str, Any]] = []
        self._log_lock = threading.Lock()
        self._log_file = open(log_path, "a", encoding="utf-8") if log_path else None  # noqa: SIM115
        super().__init__((host, port), _Handler)
        self._thread: threading.Thread | None = None

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up mid-response (a killed crawl) is routine, not a traceback."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def log_request_line(self, entry: dict[str, Any]) -> None:
        with self._log_lock:
            self.requests.append(entry)
            if self._log_file is not None:
                self._log_file.write(json.dumps(entry) + "\n")
                self._log_file.flush()

    def results_for(self, query: str) -> list[str]:
        """Entry ids for ``query``: its class's list, lightly reordered by the extra words."""
        q = normalise(query)
        matches = [key for key in self.by_key if key in q]
        if not matches:
            return []
        key = max(matches, key=len)
        listing = list(self.index["results"][self.by_key[key]])
        if q != key:  # "shirt photo" ranks like "shirt", with local swaps
            rng = np.random.default_rng(zlib.crc32(q.encode()))
            noisy = np.arange(len(listing)) + rng.normal(0, 0.15 * len(listing), size=len(listing))
            listing = [listing[i] for i in np.argsort(noisy, kind="stable")]
        return listing

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> MirrorServer:
        self._thread = threading.Thread(target=self.serve_forever, name="kd3-mirror", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._log_file is not None:
            self._log_file.close()

    def __enter__(self) -> MirrorServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    server: MirrorServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: avoid the 40 ms delayed-ACK stall

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        pass  # logged as JSON in _send instead

    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        parts = urlsplit(self.path)
        if parts.path == "/images/async":
            self._search(parse_qs(parts.query))
        elif parts.path.startswith("/img/"):
            self._image(parts.path[len("/img/") :])
        else:
            self._send(404, b"not found\n", "text/plain")

    def _search(self, qs: dict[str, list[str]]) -> None:
        query = qs.get("q", [""])[0]
        try:
            first = max(0, int(qs.get("first", ["0"])[0]))
            count = min(PAGE_MAX, max(1, int(qs.get("count", ["35"])[0])))
        except ValueError:
            self._send(400, b"bad paging parameters\n", "text/plain")
            return
        ids = self.server.results_for(query)[first : first + count]
        host = self.headers.get("Host") or "{}:{}".format(*self.server.server_address[:2])
        items = []
        for entry_id in ids:
            entry = self.server.index["entries"][entry_id]
            meta = {
                "murl": f"http://{host}/{entry['path']}",
                "turl": f"http://{host}/{entry['path']}?thumb=1",
                "t": f"result {entry_id}",
            }
            m = html.escape(json.dumps(meta, separators=(",", ":")))  # Bing's compact JSON in the m attribute
            items.append(
                f'<div class="imgpt"><a class="iusc" href="/images/search?view=detailV2" m="{m}">'
                f'<img class="mimg" src="{meta["turl"]}"></a></div>'
            )
        body = (
            '<!DOCTYPE html><html><body><div class="dgControl"><ul><li>'
            + "</li><li>".join(items)
            + "</li></ul></div></body></html>\n"
        ).encode()
        self._send(200, body, "text/html; charset=utf-8")

    def _image(self, name: str) -> None:
        entry_id = name.split(".", 1)[0]
        entry = self.server.index["entries"].get(entry_id)
        path = self.server.world_dir / "files" / name
        if entry is None or entry["serve"] == "http_404" or "/" in name or not path.is_file():
            self._send(404, b"<html><body>404 Not Found</body></html>\n", "text/html")
            return
        content_type = "application/octet-stream" if entry["serve"] == "octet" else entry["content_type"]
        if self.server.delay_s:
            time.sleep(self.server.delay_s)
        self._send(200, path.read_bytes(), content_type)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        # logged before the body goes out, so a client that has its response always finds it logged
        self.server.log_request_line(
            {"time": time.time(), "method": "GET", "path": self.path, "status": status, "bytes": len(body)}
        )
        self.wfile.write(body)
