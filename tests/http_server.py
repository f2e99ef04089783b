"""A real HTTP server on 127.0.0.1 for tests of remote imagery: serves a folder, honours
``Range: bytes=a-b`` (206 Partial Content) as object stores and CDNs do, and counts the requests
and the body bytes it sent. No network beyond the loopback interface.

It runs in its own process: GDAL calls that hold the GIL while they wait on HTTP would otherwise
starve a server thread in the test's process.

    with RangeServer(folder) as server:
        url = server.url("naip/patch-0.tif")
        ...
        server.stats()  # {"bytes_sent": ..., "requests": [[method, path, range], ...]}
"""

from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")
_STATS, _RESET = "/__stats__", "/__reset__"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        srv = self.server
        if self.path in (_STATS, _RESET):
            with srv.lock:
                payload = json.dumps({"bytes_sent": srv.bytes_sent, "requests": srv.requests}).encode()
                if self.path == _RESET:
                    srv.bytes_sent, srv.requests = 0, []
            self._reply(200, payload, body, count=False)
            return
        with srv.lock:
            srv.requests.append([self.command, self.path, self.headers.get("Range")])
        path = (srv.root / self.path.split("?", 1)[0].lstrip("/")).resolve()
        if srv.root not in path.parents or not path.is_file():
            self._reply(404, b"not found", body)
            return
        data = path.read_bytes()
        size = len(data)
        m = _RANGE.match(self.headers.get("Range", "").strip())
        if m is None:
            self._reply(200, data, body, extra={"Accept-Ranges": "bytes"})
            return
        start_s, end_s = m.groups()
        if start_s:
            start, end = int(start_s), min(int(end_s) if end_s else size - 1, size - 1)
        else:  # suffix range: the last N bytes
            start, end = max(0, size - int(end_s)), size - 1
        if start >= size or end < start:
            self._reply(416, b"", body, extra={"Content-Range": f"bytes */{size}"})
            return
        extra = {"Accept-Ranges": "bytes", "Content-Range": f"bytes {start}-{end}/{size}"}
        self._reply(206, data[start : end + 1], body, extra=extra)

    def _reply(
        self, status: int, payload: bytes, body: bool, extra: dict[str, str] | None = None, count: bool = True
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Content-Type", "image/tiff" if status in (200, 206) else "text/plain")
        self.send_header("Last-Modified", "Mon, 01 Jan 2024 00:00:00 GMT")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if body and payload:
            self.wfile.write(payload)
            if count:
                with self.server.lock:
                    self.server.bytes_sent += len(payload)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.lock = threading.Lock()
        self.bytes_sent = 0
        self.requests: list[list[str | None]] = []


class RangeServer:
    """Serve ``root`` on ``http://127.0.0.1:PORT/`` from a child process (a context manager)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self.port = 0
        self._proc: subprocess.Popen[str] | None = None

    def url(self, rel: str | os.PathLike[str] = "") -> str:
        """The URL of ``rel`` (a path under ``root``)."""
        return f"http://127.0.0.1:{self.port}/" + str(rel).replace(os.sep, "/").lstrip("/")

    def stats(self, reset: bool = False) -> dict[str, Any]:
        """``{"bytes_sent": body bytes sent, "requests": [[method, path, Range header], ...]}`` since
        the start or the last reset; ``reset``: start counting afresh."""
        with urllib.request.urlopen(self.url(_RESET if reset else _STATS), timeout=10) as r:
            return json.loads(r.read())

    def __enter__(self) -> RangeServer:
        self._proc = subprocess.Popen(
            [sys.executable, __file__, str(self.root)], stdout=subprocess.PIPE, text=True, env={**os.environ}
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line.strip().isdigit():
            self._proc.kill()
            raise RuntimeError(f"the test HTTP server did not start ({line!r})")
        self.port = int(line)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)


if __name__ == "__main__":
    server = _Server(Path(sys.argv[1]).resolve())
    print(server.server_address[1], flush=True)
    server.serve_forever()
