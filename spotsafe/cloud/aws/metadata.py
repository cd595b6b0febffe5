"""A tiny EC2 instance metadata (IMDS) client, shared by the watcher and the volume tool.

IMDSv2 tokens with IMDSv1 fallback; volatile values are properties that do I/O on
every read, the identity is read once. Every request goes straight to the endpoint
(no proxy from the environment: nothing here reads the proxy variables, as botocore does for IMDS) and is bounded as a whole:

- a **whole-request deadline** (``timeout``): connect, send, headers and body together;
  a server that trickles its answer a byte at a time is cut off at the deadline, where a
  per-read timeout would wait for ever;
- **no redirects**: a 3xx is an error, so the IMDSv2 token never leaves the endpoint;
- a **body cap** (:data:`MAX_BODY`): IMDS answers are a few hundred bytes;
- :meth:`AWSMetadata.probe` recognises the real service (a token with its TTL header,
  an ``i-...`` instance id), not any HTTP server that answers 200.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from typing import Any
from urllib.parse import urlencode, urlsplit

from spotsafe.errors import MetadataError
from spotsafe.settings import Settings

__all__ = ["MAX_BODY", "AWSMetadata", "BodyTooLarge", "MetadataResponse", "http_request"]

log = logging.getLogger(__name__)

#: The most bytes of one metadata answer spotsafe reads; more is not an IMDS answer.
MAX_BODY = 64 << 10


def _parse_iso(text: str) -> datetime:
    """An ISO 8601 time as AWS writes it (``2026-11-22T08:22:00Z``), UTC-aware.

    ValueError for anything else, including a time that cannot be expressed in UTC
    (``9999-12-31T23:59:59-12:00``).
    """
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    try:
        return parsed.astimezone(timezone.utc)
    except OverflowError as e:
        raise ValueError(f"{text[:64]!r} is out of range in UTC") from e


class BodyTooLarge(MetadataError):
    """An answer longer than :data:`MAX_BODY`; ``head`` holds its first bytes as text."""

    def __init__(self, message: str, status: int, head: str) -> None:
        super().__init__(message)
        self.status = status
        self.head = head


class _NoAnswer(MetadataError):
    """Connected, but no complete answer before the deadline."""


@dataclass(frozen=True)
class MetadataResponse:
    """One metadata answer, read whole (at most :data:`MAX_BODY` bytes) before the deadline."""

    status_code: int
    headers: dict[str, str] = field(repr=False)
    content: bytes = field(repr=False)

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")


class _DeadlineSocket(socket.socket):
    """A socket whose every send and receive is bounded by one deadline (time.monotonic())."""

    deadline: float = 0.0

    def _arm(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the whole-request deadline passed")
        self.settimeout(left)

    def recv_into(self, *args: Any, **kwargs: Any) -> int:
        self._arm()
        return super().recv_into(*args, **kwargs)

    def recv(self, *args: Any, **kwargs: Any) -> bytes:
        self._arm()
        return super().recv(*args, **kwargs)

    def sendall(self, *args: Any, **kwargs: Any) -> None:
        self._arm()
        super().sendall(*args, **kwargs)


def _resolve(host: str, port: int | None, deadline: float) -> list[Any]:
    """getaddrinfo bounded by ``deadline``: a name (metadata.google.internal) behind a stuck resolver
    must not hold the caller; the lookup thread is left to the resolver's own timeout."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:  # a literal address: nothing to look up
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out: list[Any] = []
    errors: list[OSError] = []

    def lookup() -> None:
        try:
            out.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as e:
            errors.append(e)

    t = threading.Thread(target=lookup, name="spotsafe-resolve", daemon=True)
    t.start()
    t.join(max(0.0, deadline - time.monotonic()))
    if t.is_alive():
        raise TimeoutError(f"resolving {host} did not finish before the deadline")
    if errors:
        raise errors[0]
    return out


class _Connection(http.client.HTTPConnection):
    def __init__(self, host: str, port: int | None, deadline: float) -> None:
        super().__init__(host, port)
        self._deadline = deadline

    def connect(self) -> None:
        last: OSError | None = None
        for family, kind, proto, _name, address in _resolve(self.host, self.port, self._deadline):
            sock = _DeadlineSocket(family, kind, proto)
            sock.deadline = self._deadline
            try:
                sock._arm()
                sock.connect(address)
            except OSError as e:
                sock.close()
                last = e
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock = sock
            return
        raise last or OSError(f"cannot resolve {self.host}")


def http_request(
    method: str,
    url: str,
    headers: dict[str, str],
    timeout: float,
    max_body: int = MAX_BODY,
    *,
    params: dict[str, str] | None = None,
    body: bytes | None = None,
) -> MetadataResponse:
    """One HTTP request bounded as a whole by ``timeout`` seconds; redirects are not followed.

    What every metadata source uses (AWS, GCP, Azure). Raises MetadataError:
    ``_NoAnswer`` when the server accepted the connection but did not answer in time,
    :class:`BodyTooLarge` past ``max_body``.
    """
    if params:
        url += ("&" if "?" in url else "?") + urlencode(params)
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise MetadataError(f"{url}: metadata endpoints are plain http://host[:port] URLs")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    deadline = time.monotonic() + timeout
    conn = _Connection(parts.hostname, parts.port, deadline)
    try:
        try:
            conn.connect()
        except OSError as e:
            raise MetadataError(f"{url}: no connection ({e})") from e
        try:
            conn.request(method, path, body=body, headers={**headers, "Connection": "close"})
            r = conn.getresponse()
            length = r.getheader("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_body:
                head = r.read(min(max_body, 4096)).decode("utf-8", errors="replace")
                raise BodyTooLarge(f"{url}: answered {length} bytes, more than {max_body}", r.status, head)
            body = r.read(max_body + 1)
            if len(body) > max_body:
                head = body[:4096].decode("utf-8", errors="replace")
                raise BodyTooLarge(f"{url}: answered more than {max_body} bytes", r.status, head)
            return MetadataResponse(r.status, {k.lower(): v for k, v in r.getheaders()}, body)
        except MetadataError:
            raise
        except TimeoutError as e:
            raise _NoAnswer(f"{url}: no complete answer within {timeout:g} s") from e
        except (OSError, http.client.HTTPException) as e:
            raise MetadataError(f"{url}: {e!r}") from e
    finally:
        conn.close()


_TOKEN_PATH = "/latest/api/token"
_TOKEN_HEADER = "X-aws-ec2-metadata-token"
_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
_INSTANCE_ACTION = "/latest/meta-data/spot/instance-action"
_TERMINATION_TIME = "/latest/meta-data/spot/termination-time"
_REBALANCE = "/latest/meta-data/events/recommendations/rebalance"
_IDENTITY = "/latest/dynamic/instance-identity/document"


_TOKEN = re.compile(r"[A-Za-z0-9_=+/\-]{16,1024}")
_INSTANCE_ID = re.compile(r"i-[0-9a-f]{8,17}")


class AWSMetadata:
    """A tiny EC2 instance metadata (IMDS) client: IMDSv2 tokens, IMDSv1 fallback.

    The token is fetched with ``PUT /latest/api/token``, cached, refreshed before it
    expires and fetched again once when a GET answers 401. The client falls back to
    IMDSv1 (no token) when the PUT gets no answer (the response hop limit of 1 drops
    it inside containers) or answers 403/404/405.

    Every request is bounded as a whole by ``timeout`` seconds, never follows a
    redirect and reads at most :data:`MAX_BODY` bytes (see the module docstring).

    Volatile values (:attr:`instance_action`, :attr:`termination_time`,
    :attr:`rebalance_recommendation`) are properties that do I/O on every read;
    :attr:`identity` is read once. Failures raise :class:`MetadataError` naming the URL.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout: float = 1.0,
        token_ttl: int = 21600,
    ) -> None:
        if not 1 <= int(token_ttl) <= 21600:
            raise ValueError(f"token_ttl must be within 1..21600 seconds, not {token_ttl!r}")
        if not 0 < float(timeout) <= 60:
            raise ValueError(f"timeout must be within (0, 60] seconds, not {timeout!r}")
        self.endpoint = (endpoint or Settings.from_env().aws_endpoint).rstrip("/")
        self.timeout = float(timeout)
        self.token_ttl = int(token_ttl)
        self._lock = threading.Lock()
        self._token: str | None = None
        self._token_refresh_at = 0.0
        self._v1 = False

    def __repr__(self) -> str:
        return f"AWSMetadata({self.endpoint!r})"

    # -- tokens

    @property
    def uses_imdsv1(self) -> bool:
        """True once the client has fallen back to IMDSv1 (no token)."""
        return self._v1

    def _fetch_token(self, *, strict: bool = False) -> None:
        """Get a fresh token, or switch to IMDSv1 when the service will not give one.

        ``strict`` (the probe): a 200 must look like IMDS's (the TTL header echoed, a
        token-shaped body), else MetadataError: any web server answers 200.
        """
        url = self.endpoint + _TOKEN_PATH
        try:
            r = http_request("PUT", url, {_TTL_HEADER: str(self.token_ttl)}, self.timeout)
        except _NoAnswer:
            # Connected but no answer: the PUT response's hop limit dropped it (containers).
            log.info("IMDSv2 token PUT to %s got no answer; falling back to IMDSv1", url)
            self._v1, self._token = True, None
            return
        token = r.text.strip()
        if r.status_code == 200 and token:
            if strict and (_TTL_HEADER.lower() not in r.headers or not _TOKEN.fullmatch(token)):
                raise MetadataError(f"{url}: answered 200, but not with an IMDSv2 token")
            self._token = token
            margin = min(60.0, self.token_ttl * 0.2)
            self._token_refresh_at = time.monotonic() + self.token_ttl - margin
            self._v1 = False
            return
        if r.status_code in (403, 404, 405):
            log.info("IMDSv2 token PUT to %s answered %d; falling back to IMDSv1", url, r.status_code)
            self._v1, self._token = True, None
            return
        raise MetadataError(f"{url}: token PUT answered HTTP {r.status_code}")

    def _token_headers(self) -> dict[str, str]:
        with self._lock:
            if not self._v1 and (self._token is None or time.monotonic() >= self._token_refresh_at):
                self._fetch_token()
            return {_TOKEN_HEADER: self._token} if (self._token and not self._v1) else {}

    def _forget_token(self) -> None:
        with self._lock:
            self._token, self._v1 = None, False

    # -- requests

    def get(self, path: str, *, timeout: float | None = None) -> MetadataResponse:
        """GET ``path`` (``/latest/...``), with a token; retried once after a 401.

        Bounded as a whole by ``timeout`` (default: the client's); a redirect is
        answered as it is, never followed; MetadataError on no answer or a body over
        :data:`MAX_BODY` (:class:`BodyTooLarge`).
        """
        url = self.endpoint + path
        t = self.timeout if timeout is None else timeout
        response: MetadataResponse | None = None
        for attempt in range(2):
            headers = self._token_headers()
            response = http_request("GET", url, headers, t)
            if response.status_code == 401 and attempt == 0:
                log.debug("%s answered 401; fetching a new token", url)
                self._forget_token()
                continue
            break
        assert response is not None
        return response

    def get_text(self, path: str, *, timeout: float | None = None) -> str | None:
        """The body of ``path``, or None on 404; MetadataError on anything but 200/404 (a redirect too)."""
        r = self.get(path, timeout=timeout)
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise MetadataError(f"{self.endpoint}{path}: HTTP {r.status_code}")
        return r.text

    def _get_json(self, path: str) -> Any:
        text = self.get_text(path)
        if text is None:
            return None
        try:
            return json.loads(text)
        except (ValueError, RecursionError) as e:
            raise MetadataError(f"{self.endpoint}{path}: not JSON ({e!r}): {text[:200]!r}") from e

    # -- volatile values (I/O on every read)

    @property
    def instance_action(self) -> dict[str, Any] | None:
        """``{"action": ..., "time": ...}`` when a spot interruption is scheduled, else None."""
        value = self._get_json(_INSTANCE_ACTION)
        if value is not None and not isinstance(value, dict):
            raise MetadataError(f"{self.endpoint}{_INSTANCE_ACTION}: not a JSON object: {str(value)[:200]!r}")
        return value

    @property
    def termination_time(self) -> datetime | None:
        """The legacy ``spot/termination-time``, or None."""
        text = self.get_text(_TERMINATION_TIME)
        if text is None:
            return None
        try:
            return _parse_iso(text)
        except ValueError as e:
            raise MetadataError(f"{self.endpoint}{_TERMINATION_TIME}: bad time {text[:100]!r}") from e

    @property
    def rebalance_recommendation(self) -> dict[str, Any] | None:
        """``{"noticeTime": ...}`` once EC2 recommends rebalancing, else None."""
        value = self._get_json(_REBALANCE)
        if value is not None and not isinstance(value, dict):
            raise MetadataError(f"{self.endpoint}{_REBALANCE}: not a JSON object: {str(value)[:200]!r}")
        return value

    # -- stable values (read once)

    @cached_property
    def identity(self) -> dict[str, Any]:
        """The instance identity document (instanceId, availabilityZone, region, ...)."""
        value = self._get_json(_IDENTITY)
        if not isinstance(value, dict):
            raise MetadataError(f"{self.endpoint}{_IDENTITY}: no identity document ({str(value)[:200]!r})")
        return value

    def _identity_field(self, key: str) -> str:
        try:
            return str(self.identity[key])
        except KeyError as e:
            raise MetadataError(f"{self.endpoint}{_IDENTITY}: no {key!r} in the identity document") from e

    @property
    def instance_id(self) -> str:
        return self._identity_field("instanceId")

    @property
    def availability_zone(self) -> str:
        return self._identity_field("availabilityZone")

    @property
    def region(self) -> str:
        return self._identity_field("region")

    # -- detection

    def probe(self, timeout: float = 0.5) -> bool:
        """True when the real IMDS answers at the endpoint. Never raises; bounded by ~2 × ``timeout``.

        Any web server answers 200; IMDS is recognised by what it says: a token PUT
        answered with the TTL header and a token-shaped body (or refused the IMDSv1
        way: 403/404/405, or no answer through a hop limit), then
        ``meta-data/instance-id`` answered with an ``i-...`` id. A connect failure
        (no host) ends it at once.
        """
        saved = self.timeout
        self.timeout = timeout
        try:
            with self._lock:
                self._fetch_token(strict=True)
            r = self.get("/latest/meta-data/instance-id", timeout=timeout if not self._v1 else min(timeout, 0.25))
            if r.status_code == 200 and r.headers.get("metadata-flavor") != "Google":
                if _INSTANCE_ID.fullmatch(r.text.strip()):
                    return True
                log.debug("%s answers, but not as IMDS (instance-id %r)", self.endpoint, r.text[:60])
                return False
            if r.status_code == 401 and self._v1:
                log.warning(
                    "IMDS at %s requires IMDSv2 but the token PUT got no answer; raise the "
                    "instance's HttpPutResponseHopLimit to 2 for containers",
                    self.endpoint,
                )
            return False
        except MetadataError as e:
            log.debug("no AWS IMDS at %s: %s", self.endpoint, e)
            return False
        finally:
            self.timeout = saved

    def close(self) -> None:
        """Nothing to release: every request has its own connection (closed when it ends)."""
