"""A tiny EC2 instance metadata (IMDS) client, shared by the watcher and the volume tool.

IMDSv2 tokens with IMDSv1 fallback; one typed property per endpoint: volatile values
are properties that do I/O on every read, the identity is read once. Every request is
one :func:`spotsafe.cloud.http.http_request`: straight to the endpoint, bounded as a
whole, no redirects followed, at most :data:`spotsafe.cloud.http.MAX_BODY` bytes read.
:meth:`AWSMetadata.probe` recognises the real service (a token with its TTL header, an
``i-...`` instance id), not any HTTP server that answers 200.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from datetime import datetime
from functools import cached_property
from typing import Any

from spotsafe.cloud.http import BodyTooLarge, MetadataResponse, NoAnswer, http_request
from spotsafe.cloud.times import parse_iso
from spotsafe.errors import MetadataError
from spotsafe.settings import Settings

__all__ = ["AWSMetadata", "MalformedAnswer"]

log = logging.getLogger(__name__)

_TOKEN_PATH = "/latest/api/token"
_TOKEN_HEADER = "X-aws-ec2-metadata-token"
_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
_INSTANCE_ACTION = "/latest/meta-data/spot/instance-action"
_TERMINATION_TIME = "/latest/meta-data/spot/termination-time"
_REBALANCE = "/latest/meta-data/events/recommendations/rebalance"
_IDENTITY = "/latest/dynamic/instance-identity/document"


_TOKEN = re.compile(r"[A-Za-z0-9_=+/\-]{16,1024}")
_INSTANCE_ID = re.compile(r"i-[0-9a-f]{8,17}")


class MalformedAnswer(MetadataError):
    """A 200 whose body is not what the endpoint documents (a body over the cap too).

    ``body`` holds it (its first 200 characters when over the cap): a 200 on an interruption endpoint means
    something is coming whatever it says, so the watcher still makes it a notice.
    """

    def __init__(self, message: str, body: str) -> None:
        super().__init__(message)
        self.body = body


class AWSMetadata:
    """A tiny EC2 instance metadata (IMDS) client: IMDSv2 tokens, IMDSv1 fallback.

    The token is fetched with ``PUT /latest/api/token``, cached, refreshed before it
    expires and fetched again once when a GET answers 401. The client falls back to
    IMDSv1 (no token) when the PUT gets no answer (the response hop limit of 1 drops
    it inside containers) or answers 403/404/405.

    Every request is bounded as a whole by ``timeout`` seconds, never follows a
    redirect and reads at most :data:`spotsafe.cloud.http.MAX_BODY` bytes (see :mod:`spotsafe.cloud.http`).

    Volatile values (:attr:`instance_action`, :attr:`termination_time`,
    :attr:`rebalance_recommendation`) are properties that do I/O on every read;
    :attr:`identity` is read once. Failures raise :class:`MetadataError` naming the URL;
    a 200 whose body is not what the endpoint documents, :class:`MalformedAnswer` (it
    carries the body: :class:`spotsafe.cloud.aws.notices.AWSSource` still makes it a notice).
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
        except NoAnswer:
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
        :data:`spotsafe.cloud.http.MAX_BODY` (:class:`BodyTooLarge`).
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

    def _answer(self, path: str) -> str | None:
        """The body at ``path`` (None: 404); a 200 over the size cap is a :class:`MalformedAnswer`."""
        try:
            return self.get_text(path)
        except BodyTooLarge as e:
            if e.status != 200:
                raise
            raise MalformedAnswer(str(e), e.head[:200]) from e

    def _answer_object(self, path: str) -> tuple[dict[str, Any], str] | None:
        """The JSON object at ``path`` and its text (None: 404); MalformedAnswer for anything else."""
        text = self._answer(path)
        if text is None:
            return None
        try:
            value = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise MalformedAnswer(f"{self.endpoint}{path}: not JSON ({e!r}): {text[:200]!r}", text) from e
        if not isinstance(value, dict):
            raise MalformedAnswer(f"{self.endpoint}{path}: not a JSON object: {text[:200]!r}", text)
        return value, text

    # -- volatile values (I/O on every read)

    @property
    def instance_action(self) -> dict[str, Any] | None:
        """``{"action": ..., "time": ...}`` when a spot interruption is scheduled, else None.

        ``time`` is checked to be an ISO 8601 time (read it with
        :func:`spotsafe.cloud.times.parse_iso`); a 200 with any other body raises
        :class:`MalformedAnswer`.
        """
        answer = self._answer_object(_INSTANCE_ACTION)
        if answer is None:
            return None
        doc, text = answer
        try:
            str(doc["action"])
            parse_iso(str(doc["time"]))
        except (KeyError, ValueError) as e:
            raise MalformedAnswer(
                f"{self.endpoint}{_INSTANCE_ACTION}: no action and time ({e!r}): {text[:200]!r}", text
            ) from e
        return doc

    @property
    def termination_time(self) -> datetime | None:
        """The legacy ``spot/termination-time``, or None; :class:`MalformedAnswer` for a bad time."""
        text = self._answer(_TERMINATION_TIME)
        if text is None:
            return None
        try:
            return parse_iso(text)
        except ValueError as e:
            raise MalformedAnswer(f"{self.endpoint}{_TERMINATION_TIME}: bad time {text[:100]!r}", text) from e

    @property
    def rebalance_recommendation(self) -> dict[str, Any] | None:
        """``{"noticeTime": ...}`` once EC2 recommends rebalancing, else None; :class:`MalformedAnswer`
        for a body that is not a JSON object."""
        answer = self._answer_object(_REBALANCE)
        return None if answer is None else answer[0]

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
