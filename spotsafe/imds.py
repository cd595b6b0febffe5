"""A tiny EC2 instance metadata (IMDS) client, shared by the watcher and the volume tool.

IMDSv2 tokens with IMDSv1 fallback; volatile values are properties that do I/O on
every read, the identity is read once. Every request goes straight to the endpoint:
proxies from the environment are ignored (``Session.trust_env = False``), as botocore
does for IMDS.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import datetime, timezone
from functools import cached_property
from typing import Any

import requests

from spotsafe.errors import MetadataError
from spotsafe.settings import Settings

__all__ = ["AWSMetadata"]

log = logging.getLogger(__name__)


def _parse_iso(text: str) -> datetime:
    """An ISO 8601 time as AWS writes it (``2026-11-22T08:22:00Z``), UTC-aware."""
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc)


def _new_session() -> requests.Session:
    session = requests.Session()
    # Metadata endpoints are link-local: a proxy from the environment must never see them.
    session.trust_env = False
    return session


_TOKEN_PATH = "/latest/api/token"
_TOKEN_HEADER = "X-aws-ec2-metadata-token"
_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
_INSTANCE_ACTION = "/latest/meta-data/spot/instance-action"
_TERMINATION_TIME = "/latest/meta-data/spot/termination-time"
_REBALANCE = "/latest/meta-data/events/recommendations/rebalance"
_IDENTITY = "/latest/dynamic/instance-identity/document"


class AWSMetadata:
    """A tiny EC2 instance metadata (IMDS) client: IMDSv2 tokens, IMDSv1 fallback.

    The token is fetched with ``PUT /latest/api/token``, cached, refreshed before it
    expires and fetched again once when a GET answers 401. The client falls back to
    IMDSv1 (no token) when the PUT gets no answer (the response hop limit of 1 drops
    it inside containers) or answers 403/404/405.

    Volatile values (:attr:`instance_action`, :attr:`termination_time`,
    :attr:`rebalance_recommendation`) are properties that do I/O on every read;
    :attr:`identity` is read once. Failures raise :class:`MetadataError` naming the URL.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout: float = 1.0,
        session: requests.Session | None = None,
        token_ttl: int = 21600,
    ) -> None:
        if not 1 <= int(token_ttl) <= 21600:
            raise ValueError(f"token_ttl must be within 1..21600 seconds, not {token_ttl!r}")
        self.endpoint = (endpoint or Settings.from_env().aws_endpoint).rstrip("/")
        self.timeout = float(timeout)
        self.token_ttl = int(token_ttl)
        self._session = session if session is not None else _new_session()
        self._own_session = session is None
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

    def _fetch_token(self) -> None:
        """Get a fresh token, or switch to IMDSv1 when the service will not give one."""
        url = self.endpoint + _TOKEN_PATH
        try:
            r = self._session.put(url, headers={_TTL_HEADER: str(self.token_ttl)}, timeout=(self.timeout, self.timeout))
        except requests.ConnectTimeout as e:
            raise MetadataError(f"{url}: no connection ({e})") from e
        except requests.ReadTimeout:
            # Connected but no answer: the PUT response's hop limit dropped it (containers).
            log.info("IMDSv2 token PUT to %s got no answer; falling back to IMDSv1", url)
            self._v1, self._token = True, None
            return
        except requests.RequestException as e:
            raise MetadataError(f"{url}: {e}") from e
        with r:
            if r.status_code == 200 and r.text.strip():
                self._token = r.text.strip()
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

    def get(self, path: str, *, timeout: float | None = None) -> requests.Response:
        """GET ``path`` (``/latest/...``), with a token; retried once after a 401."""
        url = self.endpoint + path
        t = self.timeout if timeout is None else timeout
        response: requests.Response | None = None
        for attempt in range(2):
            headers = self._token_headers()
            try:
                response = self._session.get(url, headers=headers, timeout=(t, t))
            except requests.RequestException as e:
                raise MetadataError(f"{url}: {e}") from e
            if response.status_code == 401 and attempt == 0:
                response.close()
                log.debug("%s answered 401; fetching a new token", url)
                self._forget_token()
                continue
            break
        assert response is not None
        return response

    def get_text(self, path: str, *, timeout: float | None = None) -> str | None:
        """The body of ``path``, or None on 404; MetadataError on anything but 200/404."""
        with self.get(path, timeout=timeout) as r:
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
        except ValueError as e:
            raise MetadataError(f"{self.endpoint}{path}: not JSON ({e}): {text[:200]!r}") from e

    # -- volatile values (I/O on every read)

    @property
    def instance_action(self) -> dict[str, Any] | None:
        """``{"action": ..., "time": ...}`` when a spot interruption is scheduled, else None."""
        value = self._get_json(_INSTANCE_ACTION)
        if value is not None and not isinstance(value, dict):
            raise MetadataError(f"{self.endpoint}{_INSTANCE_ACTION}: not a JSON object: {value!r}")
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
            raise MetadataError(f"{self.endpoint}{_REBALANCE}: not a JSON object: {value!r}")
        return value

    # -- stable values (read once)

    @cached_property
    def identity(self) -> dict[str, Any]:
        """The instance identity document (instanceId, availabilityZone, region, ...)."""
        value = self._get_json(_IDENTITY)
        if not isinstance(value, dict):
            raise MetadataError(f"{self.endpoint}{_IDENTITY}: no identity document ({value!r})")
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
        """True when an IMDS answers at the endpoint. Never raises; bounded by ~``timeout``.

        A connect timeout (no host) ends it at once; only a host that accepted the
        connection but did not answer the token PUT (the container hop limit) gets a
        second, IMDSv1 request.
        """
        saved = self.timeout
        self.timeout = timeout
        try:
            with self._lock:
                self._fetch_token()
            if not self._v1:
                return True
            # The token was refused or unanswered (a hop limit): a real IMDS answers a GET
            # at once. GCE's metadata server shares the address: it is not IMDS.
            with self.get("/latest/meta-data/instance-id", timeout=min(timeout, 0.25)) as r:
                if r.status_code == 200 and r.headers.get("Metadata-Flavor") != "Google":
                    return r.text.strip().startswith("i-")
                if r.status_code == 401:
                    log.warning(
                        "IMDS at %s requires IMDSv2 but the token PUT got no answer; raise the "
                        "instance's HttpPutResponseHopLimit to 2 for containers",
                        self.endpoint,
                    )
                return False
        except (MetadataError, requests.RequestException) as e:
            log.debug("no AWS IMDS at %s: %s", self.endpoint, e)
            return False
        finally:
            self.timeout = saved

    def close(self) -> None:
        if self._own_session:
            self._session.close()
