"""The base of the local fakes of cloud REST APIs (tests/gcefake.py: Compute Engine; tests/armfake.py: ARM).

A fake is a real HTTP(S) server on 127.0.0.1 that keeps resources in memory and checks
every request body it is sent against the published schema of that request, field by
field (:func:`check`: unknown fields, wrong types and values outside an enum are answered
400 and recorded in :attr:`RestFake.violations`, so a test fails on them even where the
client swallows the error). The schemas come from the services' machine-readable
descriptions (tests/apischema.py: Google's discovery documents, the Azure SDKs' models
generated from the OpenAPI specs); objects are closed, so a field the API does not have is a
violation, as it is a 400 from the real service.
"""

from __future__ import annotations

import json
import re
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

#: A route's answer: (status, body as a JSON value, extra headers).
Answer = tuple[int, Any, Mapping[str, str]]
Handler = Callable[["Request"], Answer]


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: Mapping[str, str]
    body: Any
    match: dict[str, str] = field(default_factory=dict)


class SchemaError(ValueError):
    pass


def check(value: Any, schema: Mapping[str, Any], where: str = "body") -> None:
    """Check ``value`` against a small JSON-schema subset: type, properties (closed), required, enum, items."""
    kind = schema.get("type")
    types: dict[str, Any] = {
        "object": dict,
        "array": list,
        "string": str,
        "boolean": bool,
        "integer": int,
        "number": (int, float),
        "int64": (int, str),  # Google's JSON encodes int64 as a string (int accepted too)
    }
    if kind is not None:
        expected = types[kind]
        if isinstance(value, bool) and kind in ("integer", "int64", "number"):
            raise SchemaError(f"{where}: a boolean where {kind} is documented")
        if not isinstance(value, expected):
            raise SchemaError(f"{where}: {type(value).__name__} where {kind} is documented")
        if kind == "int64" and isinstance(value, str) and not re.fullmatch(r"-?\d+", value):
            raise SchemaError(f"{where}: {value!r} is not an int64")
    if "enum" in schema and value not in schema["enum"]:
        raise SchemaError(f"{where}: {value!r} is not one of the documented values {schema['enum']}")
    if "pattern" in schema and not re.fullmatch(schema["pattern"], str(value)):
        raise SchemaError(f"{where}: {value!r} does not match {schema['pattern']}")
    if kind == "object":
        props = schema.get("properties")
        for name in schema.get("required", ()):
            if name not in value:
                raise SchemaError(f"{where}: the required field {name!r} is missing")
        if props is not None:
            for name, item in value.items():
                if name not in props:
                    raise SchemaError(f"{where}.{name}: not a field of the documented schema (or not checked here)")
                check(item, props[name], f"{where}.{name}")
        elif "additional" in schema:
            for name, item in value.items():
                check(item, schema["additional"], f"{where}[{name!r}]")
    if kind == "array" and "items" in schema:
        for i, item in enumerate(value):
            check(item, schema["items"], f"{where}[{i}]")


class RestFake:
    """An HTTP(S) server on 127.0.0.1 dispatching to routes ``(method, regex) -> handler``."""

    name = "rest"

    def __init__(self, *, tls: ssl.SSLContext | None = None) -> None:
        self.routes: list[tuple[str, re.Pattern[str], Handler]] = []
        self.lock = threading.RLock()
        #: (method, path, query, body) of every request, in order
        self.log: list[tuple[str, str, dict[str, str], Any]] = []
        #: the Authorization header of every request, in order ("" without one)
        self.authorizations: list[str] = []
        #: every schema violation seen (a test asserts this stays empty)
        self.violations: list[str] = []
        #: method+path-pattern -> number of calls still to fail with 503 *after* doing the work
        self.crash_after: dict[str, int] = {}
        fake = self

        class _H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _do(self) -> None:
                fake._serve(self)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _do

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _H)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.scheme = "https" if tls is not None else "http"
        self.thread = threading.Thread(target=self.server.serve_forever, name=f"fake-{self.name}", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> RestFake:
        self.thread.start()
        return self

    def shutdown(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def route(self, method: str, pattern: str, handler: Handler) -> None:
        self.routes.append((method, re.compile(pattern), handler))

    def calls(self, method: str, pattern: str) -> list[tuple[str, str, dict[str, str], Any]]:
        rx = re.compile(pattern)
        with self.lock:
            return [c for c in self.log if c[0] == method and rx.fullmatch(c[1])]

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(h.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        status: int
        payload: Any
        extra: Mapping[str, str] = {}
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        with self.lock:
            self.log.append((h.command, parts.path, query, body))
            self.authorizations.append(h.headers.get("Authorization") or "")
        for method, rx, handler in self.routes:
            m = rx.fullmatch(parts.path)
            if method == h.command and m is not None:
                try:
                    with self.lock:
                        status, payload, extra = handler(
                            Request(h.command, parts.path, query, h.headers, body, m.groupdict())
                        )
                        key = f"{method} {rx.pattern}"
                        if status < 300 and self.crash_after.get(key, 0) > 0:
                            # The work is done, the answer is lost: what a client that dies
                            # right after its request leaves behind.
                            self.crash_after[key] -= 1
                            status, payload, extra = 503, self.error(503, "injected: the answer was lost"), {}
                except SchemaError as e:
                    with self.lock:
                        self.violations.append(f"{h.command} {parts.path}: {e}")
                    status, payload, extra = 400, self.error(400, str(e)), {}
                break
        else:
            status, payload = 404, self.error(404, f"no route for {h.command} {parts.path}")
        data = b"" if payload is None else json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json; charset=utf-8")
        for k, v in extra.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def error(self, status: int, message: str) -> Any:
        return {"error": {"code": status, "message": message}}
