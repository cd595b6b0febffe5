"""One bounded HTTP request to a metadata endpoint: what the AWS, GCP and Azure clients share.

Every request goes straight to the endpoint (no proxy from the environment: nothing here reads
the proxy variables, as botocore does for IMDS) and is bounded as a whole:

- a **whole-request deadline** (``timeout``): connect, send, headers and body together;
  a server that trickles its answer a byte at a time is cut off at the deadline, where a
  per-read timeout would wait for ever;
- **no redirects**: a 3xx is an answer, never followed, so a token never leaves the endpoint;
- a **body cap** (:data:`MAX_BODY`): metadata answers are a few hundred bytes.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

from spotsafe.errors import MetadataError

__all__ = ["MAX_BODY", "BodyTooLarge", "MetadataResponse", "NoAnswer", "http_request"]

#: The most bytes of one metadata answer spotsafe reads; more is not a metadata answer.
MAX_BODY = 64 << 10


class BodyTooLarge(MetadataError):
    """An answer longer than :data:`MAX_BODY`; ``head`` holds its first bytes as text."""

    def __init__(self, message: str, status: int, head: str) -> None:
        super().__init__(message)
        self.status = status
        self.head = head


class NoAnswer(MetadataError):
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
    ``NoAnswer`` when the server accepted the connection but did not answer in time,
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
            raise NoAnswer(f"{url}: no complete answer within {timeout:g} s") from e
        except (OSError, http.client.HTTPException) as e:
            raise MetadataError(f"{url}: {e!r}") from e
    finally:
        conn.close()
