"""GCE preemption notices: ``instance/preempted`` (hanging GETs with ETags) and ``instance/maintenance-event``."""

from __future__ import annotations

import logging
import math
from datetime import timedelta

from spotsafe.cloud.http import MetadataResponse, http_request
from spotsafe.cloud.notice import Notice, Source
from spotsafe.cloud.times import utcnow
from spotsafe.errors import MetadataError
from spotsafe.settings import Settings

__all__ = ["GCP_NOTICE_SECONDS", "GCPSource"]

log = logging.getLogger(__name__)

#: GCP gives 30 s between the preemption notice and the hard stop.
GCP_NOTICE_SECONDS = 30.0


class GCPSource(Source):
    """GCE preemption (``instance/preempted``) and host-maintenance termination.

    ``preempted`` is watched with hanging GETs (``wait_for_change=true`` with the
    last ETag, bounded by ``timeout_sec`` = the poll interval rounded up, so that
    :meth:`InterruptionWatcher.stop` returns within about one poll interval).
    """

    name = "gcp"
    blocking = True

    def __init__(self, host: str | None = None, *, timeout: float = 1.0) -> None:
        self.host = host or Settings.from_env().gcp_host
        self.base = f"http://{self.host}/computeMetadata/v1/"
        self.timeout = float(timeout)
        self._etag: str | None = None
        self._etag_changed = True

    def __repr__(self) -> str:
        return f"GCPSource({self.host!r})"

    def _get(self, path: str, params: dict[str, str] | None = None, wait: float = 0.0) -> MetadataResponse:
        """GET ``path``, bounded as a whole by the timeout plus ``wait`` (a hanging GET's own wait)."""
        url = self.base + path
        r = http_request("GET", url, {"Metadata-Flavor": "Google"}, self.timeout + wait, params=params)
        if r.headers.get("metadata-flavor") != "Google":
            raise MetadataError(f"{url}: answered without the Metadata-Flavor: Google header (HTTP {r.status_code})")
        return r

    def probe(self, timeout: float) -> bool:
        saved = self.timeout
        self.timeout = timeout
        try:
            return self._get("instance/id").status_code == 200
        except MetadataError as e:
            log.debug("no GCP metadata server at %s: %s", self.host, e)
            return False
        finally:
            self.timeout = saved

    def poll(self, wait: float) -> Notice | None:
        hang = max(1, math.ceil(wait))
        if self._etag is None:
            params, extra = None, 0.0
        else:
            params = {"wait_for_change": "true", "timeout_sec": str(hang), "last_etag": self._etag}
            extra = hang + max(self.timeout, 2.0)
        r = self._get("instance/preempted", params, extra)
        if r.status_code != 200:
            raise MetadataError(f"{self.base}instance/preempted: HTTP {r.status_code}")
        value = r.text.strip().upper()
        etag = r.headers.get("etag")
        if value not in ("TRUE", "FALSE"):
            # Nothing about an unreadable body says a preemption is coming: an error, not a notice.
            raise MetadataError(f"{self.base}instance/preempted: unexpected body {value[:100]!r}")
        self._etag_changed = etag is not None and etag != self._etag
        self._etag = etag
        now = utcnow()
        if value == "TRUE":
            return Notice("gcp", "terminate", now + timedelta(seconds=GCP_NOTICE_SECONDS), now, {"preempted": "TRUE"})
        r = self._get("instance/maintenance-event")
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise MetadataError(f"{self.base}instance/maintenance-event: HTTP {r.status_code}")
        event = r.text.strip()
        if event == "TERMINATE_ON_HOST_MAINTENANCE":
            return Notice(
                "gcp", "terminate", now + timedelta(seconds=GCP_NOTICE_SECONDS), now, {"maintenance-event": event}
            )
        return None

    def next_delay(self, elapsed: float, interval: float) -> float:
        # The hanging GET did the waiting; only a server that does not hang needs a pause.
        if self._etag_changed or elapsed >= interval * 0.5:
            return 0.0
        return interval - elapsed
