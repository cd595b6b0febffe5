"""The IMDS client against a hostile metadata server on 127.0.0.1: deadlines, no redirects, a body cap, the probe.

The server is tiny and real (a socket server on loopback, torn down with shutdown()
+ join()); each mode misbehaves one way a broken or malicious endpoint could.
"""

from __future__ import annotations

import json
import socketserver
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import pytest

from spotsafe.cloud.aws.metadata import AWSMetadata
from spotsafe.cloud.aws.notices import AWSSource
from spotsafe.cloud.http import MAX_BODY, BodyTooLarge
from spotsafe.cloud.watcher import InterruptionWatcher
from spotsafe.errors import MetadataError
from spotsafe.rehearsal.simulators.aws import AWSSimulator
from tests.helpers import wait_until

if TYPE_CHECKING:
    from typing_extensions import Self

TOKEN = "AQAEAFakeTokenForTests0123456789abcdefABCDEF=="
ACTION = "/latest/meta-data/spot/instance-action"


class Hostile(socketserver.ThreadingTCPServer):
    """An HTTP/1.0-ish server whose answers are set per mode; records every request it gets."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.mode = "imds"
        self.action_body = json.dumps({"action": "terminate", "time": "2026-11-22T08:22:00Z"})
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()  # trickling handlers end
        self.shutdown()
        self.thread.join(10)
        self.server_close()


class _Handler(socketserver.StreamRequestHandler):
    server: Hostile

    def handle(self) -> None:
        line = self.rfile.readline(65537).decode("latin-1").strip()
        if not line:
            return
        method, path = line.split()[:2]
        headers: dict[str, str] = {}
        while True:
            h = self.rfile.readline(65537).decode("latin-1").strip()
            if not h:
                break
            k, _, v = h.partition(":")
            headers[k.strip().lower()] = v.strip()
        with self.server.lock:
            self.server.requests.append((method, path, headers))
        try:
            self.answer(self.server.mode, method, path)
        except OSError:
            pass  # the client hung up (what a capped or timed-out client does)

    def send(self, status: int, body: bytes, extra: dict[str, str] | None = None, *, length: bool = True) -> None:
        head = f"HTTP/1.1 {status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in (extra or {}).items())
        if length:
            head += f"Content-Length: {len(body)}\r\n"
        self.wfile.write((head + "Connection: close\r\n\r\n").encode() + body)

    def trickle(self, data: bytes) -> None:
        for i in range(len(data)):
            if self.server.stopping.wait(0.5):
                return
            self.wfile.write(data[i : i + 1])
            self.wfile.flush()

    def answer(self, mode: str, method: str, path: str) -> None:
        if mode == "trickle-body":  # headers at once, then one body byte every 0.5 s
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
            self.trickle(b"x" * 100_000)
        elif mode == "trickle-headers":  # even the status line a byte at a time
            self.trickle(b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"y" * 100_000)
        elif mode == "html":  # a captive portal or any web server: 200 to everything
            self.send(200, b"<html><body>Welcome!</body></html>", {"Content-Type": "text/html"})
        elif mode == "redirect" and method == "GET":
            self.send(302, b"", {"Location": self.server.redirect_to + path})  # type: ignore[attr-defined]
        elif mode == "huge" and method == "GET" and path == ACTION:
            self.wfile.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")  # no length: until closed
            chunk = b"z" * (1 << 20)
            for _ in range(60):  # 60 MB
                self.wfile.write(chunk)
        elif mode == "huge-length" and method == "GET":
            self.wfile.write(f"HTTP/1.1 200 OK\r\nContent-Length: {60 << 20}\r\n\r\n".encode() + b"{" * 1024)
        elif method == "PUT" and path == "/latest/api/token":  # a real-looking IMDSv2
            self.send(200, TOKEN.encode(), {"X-aws-ec2-metadata-token-ttl-seconds": "21600"})
        elif path == "/latest/meta-data/instance-id":
            self.send(200, b"i-0123456789abcdef0")
        elif path == ACTION and mode in ("imds", "redirect", "huge", "huge-length"):
            self.send(200, self.server.action_body.encode())
        else:
            self.send(404, b"Not Found")


@pytest.fixture
def hostile() -> Iterator[Hostile]:
    with Hostile() as server:
        yield server


@pytest.mark.parametrize("mode", ["trickle-body", "trickle-headers"])
def test_a_trickling_answer_is_cut_off_at_the_deadline(hostile: Hostile, mode: str) -> None:
    hostile.mode = mode
    md = AWSMetadata(hostile.endpoint, timeout=1.0)
    t0 = time.monotonic()
    with pytest.raises(MetadataError, match="no complete answer"):
        md.get_text(ACTION)
    # token PUT (1 s, then IMDSv1) + the GET (1 s); a per-read timeout would wait ~14 h
    assert time.monotonic() - t0 < 10


def test_the_watcher_outlives_a_trickling_endpoint_and_stops_at_once(hostile: Hostile) -> None:
    hostile.mode = "trickle-body"
    source = AWSSource(metadata=AWSMetadata(hostile.endpoint, timeout=0.5))
    watcher = InterruptionWatcher([source], poll_interval=0.2, signals=())
    watcher.start()
    try:
        wait_until(lambda: len(hostile.requests) >= 3, 30, what="the watcher to keep polling")  # not stuck
        hostile.mode = "imds"  # the endpoint recovers and a notice is there: it is seen
        notice = watcher.wait(30)
        assert notice is not None and notice.action == "terminate" and notice.source == "aws"
    finally:
        t0 = time.monotonic()
        watcher.stop()
        assert time.monotonic() - t0 < 5
    assert not [t for t in threading.enumerate() if t.name.startswith("spotsafe-watcher")]


def test_redirects_are_not_followed_and_the_token_never_leaves(hostile: Hostile) -> None:
    with Hostile() as elsewhere:
        hostile.mode = "redirect"
        hostile.redirect_to = elsewhere.endpoint  # type: ignore[attr-defined]
        md = AWSMetadata(hostile.endpoint, timeout=2.0)
        with pytest.raises(MetadataError, match="HTTP 302"):
            md.get_text("/latest/dynamic/instance-identity/document")
        assert elsewhere.requests == []
    sent = [h for m, p, h in hostile.requests if m == "GET"]
    assert sent and all(h.get("x-aws-ec2-metadata-token") == TOKEN for h in sent)  # to the endpoint only


def test_a_server_answering_200_to_everything_is_not_imds(hostile: Hostile, monkeypatch: pytest.MonkeyPatch) -> None:
    hostile.mode = "html"
    assert AWSMetadata(hostile.endpoint).probe(1.0) is False
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", hostile.endpoint)
    with InterruptionWatcher("auto", poll_interval=0.1, signals=(), probe_timeout=1.0) as w:
        assert "aws" not in w.sources
        assert w.wait(0.5) is None  # no false notice (every boot used to exit 75)
    hostile.mode = "imds"
    assert AWSMetadata(hostile.endpoint).probe(1.0) is True  # the real thing is recognised


def test_the_simulator_is_recognised_as_imds() -> None:
    with AWSSimulator() as sim, AWSSimulator(require_token=True) as v2:
        assert AWSMetadata(sim.endpoint).probe(1.0) is True
        assert AWSMetadata(v2.endpoint).probe(1.0) is True


@pytest.mark.parametrize("mode", ["huge", "huge-length"])
def test_a_huge_body_is_capped(hostile: Hostile, mode: str) -> None:
    hostile.mode = mode
    md = AWSMetadata(hostile.endpoint, timeout=5.0)
    t0 = time.monotonic()
    with pytest.raises(BodyTooLarge, match=f"more than {MAX_BODY}"):
        md.get_text(ACTION)
    assert time.monotonic() - t0 < 5
    # A 200 on instance-action is still a notice: its body is malformed, so terminate, payload kept short.
    notice = AWSSource(metadata=md).poll(1.0)
    assert notice is not None and notice.action == "terminate"
    assert len(str(notice.payload)) <= 1000


@pytest.mark.parametrize(
    "body",
    [
        json.dumps({"action": "terminate", "time": "9999-12-31T23:59:59-12:00"}),  # past datetime.max in UTC
        "[" * 100_000 + "]" * 100_000,  # nested past the JSON parser's recursion limit
        json.dumps({"action": "stop", "time": "0001-01-01T00:00:00+14:00"}),
    ],
    ids=["out-of-range-time", "deep-json", "before-year-1"],
)
def test_a_malformed_notice_body_means_terminate(hostile: Hostile, body: str) -> None:
    hostile.action_body = body
    before = datetime.now(timezone.utc)
    notice = AWSSource(metadata=AWSMetadata(hostile.endpoint, timeout=2.0)).poll(1.0)
    assert notice is not None and notice.action == "terminate"
    assert before + timedelta(seconds=100) < notice.deadline < before + timedelta(seconds=200)


def test_timeout_is_validated() -> None:
    for bad in (0, -1, float("nan"), 1e9):
        with pytest.raises(ValueError, match="timeout"):
            AWSMetadata("http://127.0.0.1:9", timeout=bad)


@pytest.mark.parametrize("provider", ["gcp", "azure"])
def test_gcp_and_azure_requests_have_the_same_deadline(hostile: Hostile, provider: str) -> None:
    from spotsafe.cloud.azure.notices import AzureSource
    from spotsafe.cloud.gcp.notices import GCPSource

    hostile.mode = "trickle-headers"
    source = GCPSource(hostile.endpoint.removeprefix("http://"), timeout=1.0) if provider == "gcp" else None
    source = source or AzureSource(hostile.endpoint, timeout=1.0)
    t0 = time.monotonic()
    assert source.probe(1.0) is False
    with pytest.raises(MetadataError, match="no complete answer"):
        source.poll(0.5)
    assert time.monotonic() - t0 < 15
    hostile.mode = "html"  # and a server answering 200 to everything passes as neither
    assert GCPSource(hostile.endpoint.removeprefix("http://"), timeout=1.0).probe(1.0) is False
    assert AzureSource(hostile.endpoint, timeout=1.0).probe(1.0) is False


def test_a_stuck_name_lookup_is_within_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """metadata.google.internal behind a resolver that never answers (cannot be made real here: patched)."""
    import socket

    real = socket.getaddrinfo
    release = threading.Event()

    def stuck(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "metadata.invalid":
            release.wait(30)
            raise socket.gaierror("gave up")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", stuck)
    try:
        t0 = time.monotonic()
        with pytest.raises(MetadataError, match=r"resolving metadata\.invalid"):
            AWSMetadata("http://metadata.invalid", timeout=0.5).get_text(ACTION)
        assert time.monotonic() - t0 < 5
    finally:
        release.set()
