"""A real S3 API on loopback for tests: moto's server, and a fault-injecting proxy.

The fixtures on these (``moto_server``, ``s3_client``, ``s3_bucket``, ``s3_options``,
``s3_proxy``, ``s3_proxy_options``) are in tests/plugins/servers.py: a test asks for them by name.

- :class:`MotoServer`: ``ThreadedMotoServer`` on 127.0.0.1, port chosen by the OS.
- :class:`FaultProxy`: an HTTP proxy in front of the moto server. ``inject("503",
  count=3)`` makes the next three matching requests fail with 503 SlowDown; ``"500"``,
  ``"403"``, ``"501"`` (NotImplemented), ``"drop"`` (close without answering) and ``"reset"``
  (TCP RST) too; ``"lost"`` forwards the request and drops the answer (the server acted, the
  client never hears). Hostile ones, that hold a connection without ever timing out a socket
  read: ``"trickle"`` (the real answer, its body one byte every ``trickle_interval``),
  ``"slow-read"`` (reads the request body one byte every ``trickle_interval``, never
  answers) and ``"hang"`` (reads the request, never answers); they let go when the
  client closes or at :meth:`FaultProxy.stop_holding` / shutdown. ``"slow"`` answers the
  request as the server did, ``slow_delay`` seconds late.
  ``delay`` slows every request; ``requests`` logs what went through. ``strip_headers``
  (lower-case names) are dropped before forwarding: ``{"if-none-match"}`` makes moto a
  server that ignores conditional writes (it answers 200 and overwrites).
"""

from __future__ import annotations

import http.client
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_ERROR_BODIES = {
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "403": (403, "AccessDenied", "Access Denied"),
    "501": (501, "NotImplemented", "A header you provided implies functionality that is not implemented."),
}


class MotoServer:
    """moto's S3 in server mode on 127.0.0.1 (an OS-chosen port), in a daemon thread."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)

    def start(self) -> MotoServer:
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.port = port
        return self

    def shutdown(self) -> None:
        self._server.stop()
        inner = getattr(self._server, "_server", None)
        if inner is not None:
            inner.server_close()


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    fault: str | None


class _Fault:
    def __init__(self, kind: str, count: int, match: Callable[[str, str], bool] | None):
        self.kind = kind
        self.left = count
        self.match = match


class FaultProxy:
    """An HTTP/1.1 proxy on 127.0.0.1 in front of ``upstream`` that can fail requests on demand."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.requests: list[Request] = []
        self.delay = 0.0
        self.strip_headers: set[str] = set()
        self.trickle_interval = 0.5
        self.slow_delay = 1.5
        self._holding = threading.Event()  # set: hostile faults let go of their connections
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                proxy._serve(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="spotsafe-test-s3proxy", daemon=True)

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def shutdown(self) -> None:
        self.stop_holding()
        self._httpd.shutdown()
        self._thread.join()
        self._httpd.server_close()

    def inject(self, kind: str, count: int = 1, match: Callable[[str, str], bool] | None = None) -> None:
        """Fail the next ``count`` requests for which ``match(method, path)`` holds."""
        if kind not in (*_ERROR_BODIES, "drop", "reset", "trickle", "slow-read", "hang", "lost", "slow"):
            raise ValueError(f"unknown fault {kind!r}")
        with self._lock:
            self._faults.append(_Fault(kind, count, match))

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def stop_holding(self) -> None:
        """Let every connection held by a trickle, slow-read or hang fault go (its handler thread ends)."""
        self._holding.set()

    @property
    def faults_left(self) -> int:
        with self._lock:
            return sum(f.left for f in self._faults)

    def count(self, method: str, contains: str = "", fault: bool | None = False) -> int:
        """How many requests with this method (and ``contains`` in the path) went through."""
        return sum(
            1
            for r in list(self.requests)
            if r.method == method and contains in r.path and (fault is None or (r.fault is not None) == fault)
        )

    def _take_fault(self, method: str, path: str) -> str | None:
        with self._lock:
            for f in self._faults:
                if f.left > 0 and (f.match is None or f.match(method, path)):
                    f.left -= 1
                    return f.kind
        return None

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        fault = self._take_fault(h.command, h.path)
        if fault in ("slow-read", "hang"):
            self.requests.append(Request(h.command, h.path, dict(h.headers.items()), fault))
            self._hold(h, length, slow=fault == "slow-read")
            return
        body = h.rfile.read(length) if length else b""
        self.requests.append(Request(h.command, h.path, dict(h.headers.items()), fault))
        if self.delay:
            time.sleep(self.delay)
        if fault == "slow":  # the real answer, late
            time.sleep(self.slow_delay)
        if fault in ("drop", "reset"):
            if fault == "reset":
                h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.close_connection = True  # closed without an answer
            return
        if fault is not None and fault not in ("trickle", "lost", "slow"):
            status, code, message = _ERROR_BODIES[fault]
            payload = (
                f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message></Error>'
            ).encode()
            h.send_response(status)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(payload) if h.command != "HEAD" else 0))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(payload)
            return
        conn = http.client.HTTPConnection(self.upstream, timeout=60)
        try:
            dropped = {"connection", *self.strip_headers}
            headers = {k: v for k, v in h.headers.items() if k.lower() not in dropped}
            conn.request(h.command, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            if fault == "lost":  # the server did it; its answer never reaches the client
                h.close_connection = True
                return
            h.send_response_only(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in ("connection", "transfer-encoding", "content-length", "server", "date"):
                    h.send_header(k, v)
            if h.command == "HEAD":
                h.send_header("Content-Length", resp.getheader("Content-Length") or "0")
            else:
                h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            if fault == "trickle":
                self._trickle(h, data)
            elif h.command != "HEAD":
                h.wfile.write(data)
        finally:
            conn.close()

    def _trickle(self, h: BaseHTTPRequestHandler, data: bytes) -> None:
        h.close_connection = True
        try:
            for i in range(len(data)):
                if self._holding.wait(self.trickle_interval):
                    return
                h.wfile.write(data[i : i + 1])
        except OSError:
            return  # the client gave up

    def _hold(self, h: BaseHTTPRequestHandler, length: int, *, slow: bool) -> None:
        h.close_connection = True
        sock = h.connection
        try:
            if slow:  # from the socket itself: rfile would take 8 KiB at a time
                for _ in range(length):
                    if self._holding.wait(self.trickle_interval) or not sock.recv(1):
                        return
            elif length:
                h.rfile.read(length)
            while not self._holding.wait(0.1):  # never answer; end when the client closes
                if select.select([sock], [], [], 0)[0] and not sock.recv(1, socket.MSG_PEEK):
                    return
        except OSError:
            return
