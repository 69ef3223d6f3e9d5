"""A loopback HTTP proxy in front of a tracking server that loses some answers, as a gateway that times out.

Every request (any method, its headers and body, artifact uploads and downloads too) is forwarded to the
server. A ``POST .../runs/create`` whose run name is in ``drop`` is forwarded and committed there, and
then answered ``504 Gateway Timeout`` instead of the server's answer, ``drop[name]`` times: the client
retries it and the server holds one run more than the client was told about.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import threading
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


class LossyProxy(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, target: str, drop: dict[str, int]):
        super().__init__(("127.0.0.1", 0), _Handler)
        parsed = urllib.parse.urlparse(target)
        self.target = (parsed.hostname, parsed.port)
        self.left = Counter(drop)  # run name -> 504s still to answer on its create
        self.dropped = Counter()  # run name -> 504s answered (each a run the server committed)
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def take_drop(self, path: str, body: bytes) -> bool:
        """Whether this request, a create the server committed, is answered 504."""
        if not path.split("?")[0].endswith("/runs/create"):
            return False
        try:
            name = json.loads(body or b"{}").get("run_name")
        except ValueError:
            return False
        with self.lock:
            if self.left[name] <= 0:
                return False
            self.left[name] -= 1
            self.dropped[name] += 1
            return True


class _Handler(BaseHTTPRequestHandler):
    server: LossyProxy

    def _forward(self) -> None:
        body = self._body()
        upstream = http.client.HTTPConnection(*self.server.target, timeout=120)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP | {"host"}}
            if body or self.command in ("POST", "PUT", "PATCH"):
                headers["Content-Length"] = str(len(body))
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            content = response.read()
        finally:
            upstream.close()
        if response.status == 200 and self.server.take_drop(self.path, body):  # committed; the answer is lost
            self._answer(504, [("Content-Type", "text/plain")], b"gateway timeout")
            return
        kept = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP | {"content-length"}]
        self._answer(response.status, kept, content)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip(), 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _answer(self, status: int, headers: list[tuple[str, str]], content: bytes) -> None:
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(content)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(content)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _forward

    def log_message(self, format, *args):  # quiet: the test reads the counters
        pass


@contextlib.contextmanager
def lossy_proxy(target: str, drop: dict[str, int]) -> Iterator[LossyProxy]:
    """A ``LossyProxy`` serving on 127.0.0.1 in a thread; ``proxy.url`` is where clients point."""
    proxy = LossyProxy(target, drop)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy.shutdown()
        proxy.server_close()
        thread.join(timeout=5)
