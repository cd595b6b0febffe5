"""The simulator base: a metadata server on 127.0.0.1 in a daemon thread, with injectable faults.

Every simulator (:mod:`spotsafe.rehearsal.simulators.aws`, ``.gcp``, ``.azure``) is a
:class:`Simulator` that answers :meth:`Simulator.respond`; ``/spotsafe/...`` paths are its
control API (state, inject, clear-faults, and each simulator's own actions).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = ["Response", "Simulator"]

log = logging.getLogger(__name__)

#: What a simulator answers: (status, headers, body).
Response = tuple[int, Mapping[str, str], "str | bytes"]


@dataclass
class _Fault:
    status: int | None
    body: str | None
    delay: float
    path: str | None
    remaining: int


class _Server(ThreadingHTTPServer):
    """A threading server that tracks its connections so shutdown() can end them."""

    daemon_threads = True

    def __init__(self, port: int, handler: type[BaseHTTPRequestHandler], sim: Simulator) -> None:
        self.sim = sim
        self._conn_lock = threading.Lock()
        self._conns: dict[threading.Thread, socket.socket] = {}
        super().__init__(("127.0.0.1", port), handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        t = threading.Thread(
            target=self._serve_connection,
            args=(request, client_address),
            name=f"spotsafe-sim-{self.sim.name}-conn",
            daemon=True,
        )
        with self._conn_lock:
            self._conns[t] = request
        t.start()

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self._conn_lock:
                self._conns.pop(threading.current_thread(), None)

    def end_connections(self, timeout: float = 2.0) -> None:
        with self._conn_lock:
            conns = dict(self._conns)
        for sock in conns.values():
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in conns:
            t.join(timeout)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "spotsafe-simulator"
    sys_version = ""
    #: idle keep-alive connections are dropped after this many seconds
    timeout = 30
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s: " + format, self.server.sim.name, *args)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        sim = self.server.sim
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        try:
            if parts.path.startswith("/spotsafe/"):
                status, headers, payload = sim._control(method, parts.path, query, body)
            else:
                sim._record(method, parts.path)
                fault = sim._take_fault(parts.path)
                if fault is not None and fault.delay:
                    sim._closing.wait(fault.delay)
                if fault is not None and (fault.status is not None or fault.body is not None):
                    status = fault.status if fault.status is not None else 200
                    headers = sim._base_headers()
                    payload = fault.body if fault.body is not None else f"injected fault: HTTP {status}"
                else:
                    status, headers, payload = sim.respond(method, parts.path, query, self.headers, body)
        except Exception as e:  # a simulator bug must show up as a 500, not a hung client
            log.exception("%s simulator failed on %s %s", sim.name, method, self.path)
            status, headers, payload = 500, {}, f"simulator error: {e}"
        data = payload.encode() if isinstance(payload, str) else payload
        try:
            self.send_response(status)
            has_type = False
            for key, value in headers.items():
                self.send_header(key, value)
                has_type = has_type or key.lower() == "content-type"
            if not has_type:
                self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(data)
        except OSError:  # the client went away (or the simulator is shutting down)
            self.close_connection = True


class Simulator:
    """A metadata server on 127.0.0.1 in a daemon thread; a context manager."""

    name = "sim"

    def __init__(self, *, port: int = 0, notice_after: float | None = None) -> None:
        self.port = port
        self.notice_after = notice_after
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._closing = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._timers: list[threading.Thread] = []
        self._faults: list[_Fault] = []
        #: every metadata request served, as (method, path); control calls excluded
        self.requests: list[tuple[str, str]] = []

    # -- life cycle

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT`` (after :meth:`start`)."""
        if self._server is None:
            raise RuntimeError(f"{self.name} simulator is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT`` (after :meth:`start`)."""
        return self.endpoint[len("http://") :]

    def start(self) -> Any:
        if self._server is not None:
            return self
        self._closing.clear()
        self._server = _Server(self.port, _Handler, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"spotsafe-sim-{self.name}",
            daemon=True,
        )
        self._thread.start()
        if self.notice_after is not None:
            self._after(self.notice_after, self._on_notice_after)
        log.info("%s metadata simulator serving at %s", self.name, self.endpoint)
        return self

    def shutdown(self) -> None:
        """Stop serving, end open connections (hanging GETs included), join threads."""
        if self._server is None:
            return
        self._closing.set()
        with self._cond:
            self._cond.notify_all()
        self._server.shutdown()
        self._server.end_connections()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        for t in self._timers:
            t.join()
        self._server = self._thread = None
        self._timers = []

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _after(self, delay: float, fn: Callable[[], None]) -> None:
        def run() -> None:
            if not self._closing.wait(delay):
                fn()

        t = threading.Thread(target=run, name=f"spotsafe-sim-{self.name}-timer", daemon=True)
        self._timers.append(t)
        t.start()

    def _on_notice_after(self) -> None:
        raise NotImplementedError

    # -- faults

    def inject(
        self,
        status: int | None = 500,
        count: int = 1,
        *,
        body: str | None = None,
        delay: float = 0.0,
        path: str | None = None,
    ) -> None:
        """Make the next ``count`` metadata requests (under ``path``, if given) fail.

        ``status`` (None: the normal answer, after ``delay``), ``body`` (garbage in
        place of the answer; with ``status=200`` a well-formed response with a
        malformed payload), ``delay`` (seconds before answering: client timeouts).
        """
        if count < 1:
            raise ValueError(f"count must be >= 1, not {count}")
        with self._lock:
            self._faults.append(_Fault(status, body, float(delay), path, int(count)))

    @property
    def faults_pending(self) -> int:
        """Injected faults not yet served."""
        with self._lock:
            return sum(f.remaining for f in self._faults)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.path is None or path.startswith(fault.path):
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def _record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def count(self, method: str, path: str) -> int:
        """How many ``method path`` requests were served."""
        with self._lock:
            return sum(1 for r in self.requests if r == (method, path))

    # -- HTTP

    def _base_headers(self) -> dict[str, str]:
        return {}

    def respond(self, method: str, path: str, query: Mapping[str, str], headers: Any, body: bytes) -> Response:
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        raise NotImplementedError

    def control(self, method: str, action: str, query: Mapping[str, str]) -> bool:
        """Handle ``POST /spotsafe/<action>``; False when the action is unknown."""
        raise NotImplementedError

    def _control(self, method: str, path: str, query: Mapping[str, str], body: bytes) -> Response:
        action = path[len("/spotsafe/") :].strip("/")
        json_headers = {"Content-Type": "application/json"}
        try:
            if method == "GET" and action == "state":
                return 200, json_headers, json.dumps(self.state())
            if method != "POST":
                return 405, {}, f"use POST for /spotsafe/{action}"
            if action == "inject":
                status = query.get("status", "500")
                self.inject(
                    None if status in ("", "none") else int(status),
                    int(query.get("count", "1")),
                    body=query.get("body"),
                    delay=float(query.get("delay", "0")),
                    path=query.get("path"),
                )
            elif action == "clear-faults":
                self.clear_faults()
            elif not self.control(method, action, query):
                return 404, {}, f"unknown control action {action!r}"
        except (ValueError, KeyError) as e:
            return 400, {}, f"bad control request {path}: {e}"
        return 200, json_headers, json.dumps(self.state())
