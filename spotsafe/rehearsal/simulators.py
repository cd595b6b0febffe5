"""Real HTTP simulators of the AWS, GCP and Azure metadata endpoints, on loopback.

They serve what spotsafe (and botocore, google-auth, curl) read from the real
services, close enough that the same client code runs against both: IMDSv2
tokens and their rules, spot instance-action and rebalance recommendations, GCP's
hanging ``wait_for_change`` GETs with ETags, Azure Scheduled Events with
``DocumentIncarnation`` and acknowledgements. Use them to rehearse a preemption on
a laptop and in tests::

    with AWSSimulator() as sim:
        os.environ.update(simulated_environment(sim))
        ...                      # start training; spotsafe now watches the simulator
        sim.arm("terminate")     # the spot interruption notice appears

From a shell: ``python -m spotsafe.simulate aws`` prints the ``export`` line and
serves until interrupted; another process arms it with
``curl -X POST $ENDPOINT/spotsafe/arm?action=terminate``.

Every simulator can inject faults (:meth:`inject`: an HTTP status, a garbage body,
a delay) to prove that errors never turn into false notices.
"""

from __future__ import annotations

import argparse
import email.utils
import hashlib
import json
import logging
import secrets
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "AWSSimulator",
    "AzureSimulator",
    "GCPSimulator",
    "main",
    "simulated_environment",
]

log = logging.getLogger(__name__)

Response = tuple[int, Mapping[str, str], "str | bytes"]


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


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

    def __init__(self, port: int, handler: type[BaseHTTPRequestHandler], sim: _Simulator) -> None:
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


class _Simulator:
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


# --------------------------------------------------------------------------- AWS


class AWSSimulator(_Simulator):
    """EC2 instance metadata (IMDS) with IMDSv2 tokens and spot interruption notices.

    ``require_token=True`` behaves like an instance with ``HttpTokens=required``.
    :meth:`arm` makes ``spot/instance-action`` (and, for terminate, the legacy
    ``spot/termination-time``) appear after ``delay`` seconds, with ``time`` 120 s
    after it appears; :meth:`arm_rebalance` makes the rebalance recommendation
    appear, independently.
    """

    name = "aws"

    def __init__(
        self,
        *,
        port: int = 0,
        instance_id: str = "i-0123456789abcdef0",
        availability_zone: str = "us-east-1a",
        notice_after: float | None = None,
        action: str = "terminate",
        require_token: bool = False,
        instance_type: str = "g5.xlarge",
        account_id: str = "123456789012",
        market: str = "spot",
    ) -> None:
        super().__init__(port=port, notice_after=notice_after)
        _check_action(action)
        self.instance_id = instance_id
        self.availability_zone = availability_zone
        self.region = availability_zone[:-1] if availability_zone[-1:].isalpha() else availability_zone
        self.action = action
        self.require_token = require_token
        self.instance_type = instance_type
        self.account_id = account_id
        #: What ``instance-life-cycle`` answers: "spot" or "on-demand".
        self.market = market
        self.tokens_issued = 0
        self._tokens: dict[str, float] = {}  # token -> monotonic expiry
        self._itn: tuple[str, float, str] | None = None  # (action, visible at, time)
        self._rebalance: str | None = None
        self._started_at = _utcnow()

    def _on_notice_after(self) -> None:
        self.arm(self.action)

    def arm(self, action: str = "terminate", *, delay: float = 0.0) -> None:
        """The spot interruption notice appears ``delay`` seconds from now."""
        _check_action(action)
        if delay < 0:
            raise ValueError(f"delay must be >= 0, not {delay}")
        deadline = _utcnow() + timedelta(seconds=delay + 120)
        with self._lock:
            self._itn = (action, time.monotonic() + delay, _iso(deadline))

    def arm_rebalance(self) -> None:
        """The rebalance recommendation appears now."""
        with self._lock:
            self._rebalance = _iso(_utcnow())

    def disarm(self) -> None:
        """Withdraw the interruption notice and the rebalance recommendation."""
        with self._lock:
            self._itn = None
            self._rebalance = None

    def expire_tokens(self) -> None:
        """Invalidate every issued token (GETs using one answer 401)."""
        with self._lock:
            self._tokens.clear()

    def _visible_itn(self) -> tuple[str, str] | None:
        with self._lock:
            itn = self._itn
        if itn is None or time.monotonic() < itn[1]:
            return None
        return itn[0], itn[2]

    def identity_document(self) -> dict[str, Any]:
        return {
            "accountId": self.account_id,
            "architecture": "x86_64",
            "availabilityZone": self.availability_zone,
            "billingProducts": None,
            "devpayProductCodes": None,
            "marketplaceProductCodes": None,
            "imageId": "ami-0123456789abcdef0",
            "instanceId": self.instance_id,
            "instanceType": self.instance_type,
            "kernelId": None,
            "pendingTime": _iso(self._started_at),
            "privateIp": "10.0.0.12",
            "ramdiskId": None,
            "region": self.region,
            "version": "2017-09-30",
        }

    def state(self) -> dict[str, Any]:
        itn = self._visible_itn()
        with self._lock:
            return {
                "provider": "aws",
                "endpoint": self.endpoint,
                "armed": self._itn is not None,
                "instance_action": {"action": itn[0], "time": itn[1]} if itn else None,
                "rebalance": {"noticeTime": self._rebalance} if self._rebalance else None,
                "require_token": self.require_token,
                "tokens_issued": self.tokens_issued,
                "requests": len(self.requests),
            }

    def control(self, method: str, action: str, query: Mapping[str, str]) -> bool:
        if action == "arm":
            self.arm(query.get("action", "terminate"), delay=float(query.get("delay", "0")))
        elif action == "rebalance":
            self.arm_rebalance()
        elif action == "disarm":
            self.disarm()
        elif action == "expire-tokens":
            self.expire_tokens()
        else:
            return False
        return True

    def respond(self, method: str, path: str, query: Mapping[str, str], headers: Any, body: bytes) -> Response:
        if path == "/latest/api/token":
            if method != "PUT":
                return 405, {}, "Method Not Allowed"
            if headers.get("X-Forwarded-For") is not None:
                return 403, {}, "Forbidden"
            ttl = headers.get("X-aws-ec2-metadata-token-ttl-seconds")
            try:
                seconds = int(ttl)
            except (TypeError, ValueError):
                return 400, {}, "Bad Request"
            if not 1 <= seconds <= 21600:
                return 400, {}, "Bad Request"
            token = secrets.token_urlsafe(40)
            with self._lock:
                self._tokens[token] = time.monotonic() + seconds
                self.tokens_issued += 1
            return 200, {"X-aws-ec2-metadata-token-ttl-seconds": str(seconds)}, token
        if method != "GET":
            return 405, {}, "Method Not Allowed"
        token = headers.get("X-aws-ec2-metadata-token")
        if token is not None:
            with self._lock:
                expiry = self._tokens.get(token)
            if expiry is None or time.monotonic() >= expiry:
                return 401, {}, "Unauthorized"
        elif self.require_token:
            return 401, {}, "Unauthorized"
        return self._metadata(path)

    def _metadata(self, path: str) -> Response:
        text = {"Content-Type": "text/plain"}
        json_type = {"Content-Type": "application/json"}
        if path in ("/latest/meta-data", "/latest/meta-data/"):
            listing = "ami-id\nevents/\nhostname\ninstance-id\ninstance-life-cycle\ninstance-type\nlocal-ipv4\nplacement/\nspot/"
            return 200, text, listing
        values = {
            "/latest/meta-data/instance-id": self.instance_id,
            "/latest/meta-data/instance-type": self.instance_type,
            "/latest/meta-data/ami-id": "ami-0123456789abcdef0",
            "/latest/meta-data/local-ipv4": "10.0.0.12",
            "/latest/meta-data/hostname": "ip-10-0-0-12.ec2.internal",
            "/latest/meta-data/placement/availability-zone": self.availability_zone,
            "/latest/meta-data/placement/region": self.region,
            "/latest/meta-data/instance-life-cycle": self.market,
        }
        if path in values:
            return 200, text, values[path]
        if path == "/latest/dynamic/instance-identity/document":
            return 200, json_type, json.dumps(self.identity_document(), indent=2)
        itn = self._visible_itn()
        if path == "/latest/meta-data/spot/instance-action" and itn is not None:
            return 200, json_type, json.dumps({"action": itn[0], "time": itn[1]})
        if path == "/latest/meta-data/spot/termination-time" and itn is not None and itn[0] == "terminate":
            return 200, text, itn[1]
        with self._lock:
            rebalance = self._rebalance
        if path == "/latest/meta-data/events/recommendations/rebalance" and rebalance is not None:
            return 200, json_type, json.dumps({"noticeTime": rebalance})
        return 404, {"Content-Type": "text/html"}, "<html><body><h1>404 - Not Found</h1></body></html>"


def _check_action(action: str) -> None:
    if action not in ("terminate", "stop", "hibernate"):
        raise ValueError(f"spot instance-action must be terminate, stop or hibernate, not {action!r}")


# --------------------------------------------------------------------------- GCP


class GCPSimulator(_Simulator):
    """The GCE metadata server: ``Metadata-Flavor: Google``, ETags, hanging GETs.

    :meth:`preempt` sets ``instance/preempted`` to ``TRUE``; :meth:`maintenance`
    sets ``instance/maintenance-event``. A ``wait_for_change=true`` GET returns at
    once when ``last_etag`` differs from the current ETag, else when the value
    changes or ``timeout_sec`` passes.
    """

    name = "gcp"
    PREFIX = "/computeMetadata/v1/"

    def __init__(
        self,
        *,
        port: int = 0,
        notice_after: float | None = None,
        instance_id: str = "4520031799277581759",
        instance_name: str = "spotsafe-sim",
        zone: str = "us-central1-a",
        project_id: str = "spotsafe-sim",
    ) -> None:
        super().__init__(port=port, notice_after=notice_after)
        self.values: dict[str, str] = {
            "instance/id": instance_id,
            "instance/name": instance_name,
            "instance/hostname": f"{instance_name}.{zone}.c.{project_id}.internal",
            "instance/zone": f"projects/123456789012/zones/{zone}",
            "instance/machine-type": "projects/123456789012/machineTypes/g2-standard-4",
            "instance/preempted": "FALSE",
            "instance/maintenance-event": "NONE",
            "instance/scheduling/preemptible": "TRUE",
            "project/project-id": project_id,
            "project/numeric-project-id": "123456789012",
        }

    def _set(self, key: str, value: str) -> None:
        with self._cond:
            self.values[key] = value
            self._cond.notify_all()

    def preempt(self) -> None:
        """``instance/preempted`` becomes ``TRUE`` (hanging GETs return now)."""
        self._set("instance/preempted", "TRUE")

    def maintenance(self, event: str = "TERMINATE_ON_HOST_MAINTENANCE") -> None:
        """``instance/maintenance-event`` becomes ``event``."""
        self._set("instance/maintenance-event", event)

    def reset(self) -> None:
        self._set("instance/preempted", "FALSE")
        self._set("instance/maintenance-event", "NONE")

    def _on_notice_after(self) -> None:
        self.preempt()

    @staticmethod
    def etag(value: str) -> str:
        return hashlib.sha1(value.encode()).hexdigest()[:16]

    def _base_headers(self) -> dict[str, str]:
        return {"Metadata-Flavor": "Google", "Server": "Metadata Server for VM"}

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {
                "provider": "gcp",
                "host": self.host,
                "preempted": self.values["instance/preempted"],
                "maintenance_event": self.values["instance/maintenance-event"],
                "requests": len(self.requests),
            }

    def control(self, method: str, action: str, query: Mapping[str, str]) -> bool:
        if action in ("preempt", "arm"):
            self.preempt()
        elif action == "maintenance":
            self.maintenance(query.get("event", "TERMINATE_ON_HOST_MAINTENANCE"))
        elif action in ("reset", "disarm"):
            self.reset()
        else:
            return False
        return True

    def respond(self, method: str, path: str, query: Mapping[str, str], headers: Any, body: bytes) -> Response:
        base = self._base_headers()
        if headers.get("X-Forwarded-For") is not None:
            return 403, base, "Request denied: X-Forwarded-For header is not allowed"
        if headers.get("Metadata-Flavor") != "Google":
            return 403, base, "Missing Metadata-Flavor:Google header."
        if method != "GET":
            return 405, base, "Method not allowed"
        if not path.startswith(self.PREFIX):
            return 404, base, "Not Found"
        key = path[len(self.PREFIX) :]
        if key == "" or key.endswith("/"):
            with self._lock:
                children = sorted(
                    {
                        k[len(key) :].split("/")[0] + ("/" if "/" in k[len(key) :] else "")
                        for k in self.values
                        if k.startswith(key)
                    }
                )
            if not children:
                return 404, base, "Not Found"
            return 200, {**base, "Content-Type": "application/text"}, "\n".join(children) + "\n"
        with self._lock:
            if key not in self.values:
                return 404, base, "Not Found"
            value = self.values[key]
        if query.get("wait_for_change", "").lower() == "true":
            value = self._wait_for_change(key, value, query)
        return 200, {**base, "Content-Type": "application/text", "ETag": self.etag(value)}, value

    def _wait_for_change(self, key: str, value: str, query: Mapping[str, str]) -> str:
        try:
            timeout = min(float(query.get("timeout_sec", "3600")), 3600.0)
        except ValueError:
            timeout = 3600.0
        last = query.get("last_etag") or self.etag(value)
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.etag(self.values[key]) == last and not self._closing.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self.values[key]


# --------------------------------------------------------------------------- Azure


class AzureSimulator(_Simulator):
    """Azure IMDS Scheduled Events.

    Requests need ``Metadata: true`` and an ``api-version`` (else 400). Events go
    ``Scheduled`` -> ``Started`` when their ``NotBefore`` passes or when a
    ``StartRequests`` POST acknowledges them (recorded in :attr:`acknowledgements`);
    every change bumps ``DocumentIncarnation``.
    """

    name = "azure"

    def __init__(
        self,
        *,
        port: int = 0,
        notice_after: float | None = None,
        vm_name: str = "spotsafe-sim-vm",
        location: str = "eastus",
    ) -> None:
        super().__init__(port=port, notice_after=notice_after)
        self.vm_name = vm_name
        self.location = location
        self.vm_id = str(uuid.UUID(int=0x5B0751AFE))
        self.incarnation = 1
        self.events: list[dict[str, Any]] = []
        self._not_before: dict[str, datetime] = {}
        #: EventIds acknowledged through StartRequests, in order
        self.acknowledgements: list[str] = []

    def schedule_event(
        self,
        event_type: str = "Preempt",
        *,
        not_before_in: float = 30.0,
        resources: Sequence[str] | None = None,
    ) -> str:
        """Schedule an event for ``resources`` (default: this VM); returns its EventId."""
        event_id = str(uuid.uuid4()).upper()
        not_before = _utcnow() + timedelta(seconds=not_before_in)
        event = {
            "EventId": event_id,
            "EventStatus": "Scheduled",
            "EventType": event_type,
            "ResourceType": "VirtualMachine",
            "Resources": list(resources) if resources is not None else [self.vm_name],
            "NotBefore": email.utils.format_datetime(not_before.replace(microsecond=0), usegmt=True),
            "Description": f"Simulated {event_type} event (spotsafe)",
            "EventSource": "Platform",
            "DurationInSeconds": -1 if event_type in ("Preempt", "Terminate") else 0,
        }
        with self._lock:
            self.events.append(event)
            self._not_before[event_id] = not_before
            self.incarnation += 1
        return event_id

    def schedule_preempt(self, not_before_in: float = 30.0, *, resources: Sequence[str] | None = None) -> str:
        """A Spot eviction of this VM, ``not_before_in`` seconds from now; returns its EventId."""
        return self.schedule_event("Preempt", not_before_in=not_before_in, resources=resources)

    def clear(self) -> None:
        with self._lock:
            if self.events:
                self.events.clear()
                self.incarnation += 1

    def _on_notice_after(self) -> None:
        self.schedule_preempt()

    def _start_event(self, event: dict[str, Any]) -> None:
        # caller holds the lock
        if event["EventStatus"] != "Started":
            event["EventStatus"] = "Started"
            event["NotBefore"] = ""
            self.incarnation += 1

    def _refresh(self) -> None:
        now = _utcnow()
        with self._lock:
            for event in self.events:
                if event["EventStatus"] == "Scheduled" and now >= self._not_before[event["EventId"]]:
                    self._start_event(event)

    def document(self) -> dict[str, Any]:
        self._refresh()
        with self._lock:
            return {"DocumentIncarnation": self.incarnation, "Events": [dict(e) for e in self.events]}

    def state(self) -> dict[str, Any]:
        doc = self.document()
        with self._lock:
            return {
                "provider": "azure",
                "endpoint": self.endpoint,
                **doc,
                "acknowledgements": list(self.acknowledgements),
                "requests": len(self.requests),
            }

    def control(self, method: str, action: str, query: Mapping[str, str]) -> bool:
        if action in ("preempt", "arm"):
            self.schedule_preempt(float(query.get("not_before_in", "30")))
        elif action == "event":
            self.schedule_event(query.get("type", "Preempt"), not_before_in=float(query.get("not_before_in", "30")))
        elif action in ("clear", "disarm"):
            self.clear()
        else:
            return False
        return True

    def respond(self, method: str, path: str, query: Mapping[str, str], headers: Any, body: bytes) -> Response:
        json_type = {"Content-Type": "application/json; charset=utf-8"}
        if headers.get("X-Forwarded-For") is not None:
            return 400, json_type, json.dumps({"error": "Bad request. X-Forwarded-For header is not allowed"})
        if (headers.get("Metadata") or "").lower() != "true":
            return 400, json_type, json.dumps({"error": "Bad request. Required metadata header not specified"})
        if not query.get("api-version"):
            return 400, json_type, json.dumps({"error": "Bad request. api-version was not specified in the request."})
        if path == "/metadata/scheduledevents":
            if method == "GET":
                return 200, json_type, json.dumps(self.document())
            if method == "POST":
                return self._acknowledge(body)
            return 405, json_type, json.dumps({"error": "Method not allowed"})
        if method != "GET":
            return 405, json_type, json.dumps({"error": "Method not allowed"})
        compute = {
            "name": self.vm_name,
            "location": self.location,
            "vmId": self.vm_id,
            "priority": "Spot",
            "vmSize": "Standard_NC4as_T4_v3",
            "zone": "1",
            "osType": "Linux",
        }
        if path == "/metadata/instance/compute/name":
            return 200, {"Content-Type": "text/plain; charset=utf-8"}, self.vm_name
        if path == "/metadata/instance/compute":
            return 200, json_type, json.dumps(compute)
        if path == "/metadata/instance":
            return 200, json_type, json.dumps({"compute": compute, "network": {"interface": []}})
        return 404, json_type, json.dumps({"error": "Not found"})

    def _acknowledge(self, body: bytes) -> Response:
        json_type = {"Content-Type": "application/json; charset=utf-8"}
        try:
            requests_ = json.loads(body or b"{}")["StartRequests"]
            ids = [str(r["EventId"]) for r in requests_]
        except (ValueError, KeyError, TypeError):
            return 400, json_type, json.dumps({"error": 'Bad request. Expected {"StartRequests": [{"EventId": ...}]}'})
        with self._lock:
            by_id = {e["EventId"]: e for e in self.events}
            unknown = [i for i in ids if i not in by_id]
            if unknown:
                return 400, json_type, json.dumps({"error": f"Bad request. Unknown EventId {unknown[0]}"})
            for event_id in ids:
                self.acknowledgements.append(event_id)
                self._start_event(by_id[event_id])
        return 200, json_type, ""


# --------------------------------------------------------------------------- helpers and CLI


def simulated_environment(*sims: _Simulator) -> dict[str, str]:
    """Environment variables that point spotsafe (and botocore / google-auth) at running simulators.

    ``SPOTSAFE_SOURCES`` names exactly the simulated providers plus ``signal``, so a
    rehearsal never probes the real metadata addresses.
    """
    if not sims:
        raise ValueError("simulated_environment needs at least one simulator")
    env: dict[str, str] = {}
    names: list[str] = []
    for sim in sims:
        if isinstance(sim, AWSSimulator):
            env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = sim.endpoint
        elif isinstance(sim, GCPSimulator):
            env["GCE_METADATA_HOST"] = sim.host
            env["GCE_METADATA_IP"] = sim.host
        elif isinstance(sim, AzureSimulator):
            env["SPOTSAFE_AZURE_METADATA_ENDPOINT"] = sim.endpoint
        else:
            raise TypeError(f"not a spotsafe simulator: {sim!r}")
        names.append(sim.name)
    env["SPOTSAFE_SOURCES"] = ",".join([*names, "signal"])
    return env


_CONTROL_HINTS = {
    "aws": ("arm?action=terminate&delay=0", "rebalance", "disarm"),
    "gcp": ("preempt", "maintenance", "reset"),
    "azure": ("preempt?not_before_in=30", "clear"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """``aws|gcp|azure [--port P] [--notice-after S]``: serve one simulator until stopped.

    ``python -m spotsafe.simulate`` (and ``spotsafe simulate``) also take ``rehearse ...``:
    :func:`spotsafe.rehearsal.cli.main` dispatches that to :mod:`spotsafe.rehearsal.rehearse`, which
    imports this module (never the other way round).
    """
    import sys

    args_list = list(sys.argv[1:] if argv is None else argv)

    parser = argparse.ArgumentParser(
        prog="python -m spotsafe.simulate",
        description="Serve a simulated cloud metadata endpoint on 127.0.0.1 for rehearsing preemptions. "
        "'rehearse ...' runs a full rehearsal (spotsafe.rehearsal.rehearse).",
    )
    sub = parser.add_subparsers(dest="provider", required=True, metavar="aws|gcp|azure|rehearse")
    for provider in ("aws", "gcp", "azure"):
        label = {
            "aws": "AWS EC2 instance metadata (IMDS)",
            "gcp": "GCE metadata server",
            "azure": "Azure Scheduled Events",
        }[provider]
        p = sub.add_parser(provider, help=f"simulate the {label}")
        p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
        p.add_argument(
            "--notice-after",
            type=float,
            default=None,
            metavar="S",
            help="the interruption notice appears S seconds after start",
        )
        p.add_argument("--duration", type=float, default=None, metavar="S", help="serve S seconds, then exit")
        if provider == "aws":
            p.add_argument("--action", choices=("terminate", "stop", "hibernate"), default="terminate")
            p.add_argument("--require-token", action="store_true", help="reject IMDSv1 requests (HttpTokens=required)")
    sub.add_parser("rehearse", help="run a full rehearsal (see python -m spotsafe.simulate rehearse --help)")
    args = parser.parse_args(args_list)

    sim: _Simulator
    if args.provider == "aws":
        sim = AWSSimulator(
            port=args.port, notice_after=args.notice_after, action=args.action, require_token=args.require_token
        )
    elif args.provider == "gcp":
        sim = GCPSimulator(port=args.port, notice_after=args.notice_after)
    else:
        sim = AzureSimulator(port=args.port, notice_after=args.notice_after)

    stop = threading.Event()
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, frame: stop.set())
    try:
        with sim:
            for key, value in simulated_environment(sim).items():
                print(f"export {key}={value}")
            for hint in _CONTROL_HINTS[sim.name]:
                print(f'# curl -X POST "{sim.endpoint}/spotsafe/{hint}"')
            print(f"# curl {sim.endpoint}/spotsafe/state", flush=True)
            deadline = None if args.duration is None else time.monotonic() + args.duration
            while not stop.wait(0.2):
                if deadline is not None and time.monotonic() >= deadline:
                    break
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0
