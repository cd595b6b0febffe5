"""Azure Scheduled Events: ``Preempt`` and ``Terminate`` for this VM, and their acknowledgement."""

from __future__ import annotations

import json
import logging
import re
from datetime import timedelta
from typing import Any

from spotsafe.cloud.http import MetadataResponse, http_request
from spotsafe.cloud.notice import Notice, Source
from spotsafe.cloud.times import parse_rfc1123, utcnow
from spotsafe.errors import MetadataError
from spotsafe.settings import Settings

__all__ = ["AZURE_NOTICE_SECONDS", "AzureSource"]

log = logging.getLogger(__name__)

#: An Azure event with an empty NotBefore has started; assume the 30 s Spot minimum.
AZURE_NOTICE_SECONDS = 30.0

_AZURE_EVENTS_API = "2020-07-01"
_AZURE_VM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,79}")
_AZURE_INSTANCE_API = "2021-02-01"


class AzureSource(Source):
    """Azure Scheduled Events: ``Preempt`` and ``Terminate`` events for this VM."""

    name = "azure"

    def __init__(self, endpoint: str | None = None, *, timeout: float = 1.0) -> None:
        self.endpoint = (endpoint or Settings.from_env().azure_endpoint).rstrip("/")
        self.events_url = f"{self.endpoint}/metadata/scheduledevents"
        self.timeout = float(timeout)
        self.vm_name: str | None = None
        self.incarnation: int | None = None

    def __repr__(self) -> str:
        return f"AzureSource({self.endpoint!r})"

    def _request(self, method: str, url: str, params: dict[str, str], json_body: Any = None) -> MetadataResponse:
        headers = {"Metadata": "true"}
        body = None
        if json_body is not None:
            headers["Content-Type"] = "application/json"
            body = json.dumps(json_body).encode()
        return http_request(method, url, headers, self.timeout, params=params, body=body)

    def _fetch_vm_name(self) -> str | None:
        url = f"{self.endpoint}/metadata/instance/compute/name"
        r = self._request("GET", url, {"api-version": _AZURE_INSTANCE_API, "format": "text"})
        # A VM name, not whatever a web server answering 200 to everything says (a captive portal's HTML).
        if r.status_code == 200 and _AZURE_VM_NAME.fullmatch(r.text.strip()):
            return r.text.strip()
        return None

    def probe(self, timeout: float) -> bool:
        # The instance endpoint answers at once; the first scheduledevents call on a
        # real VM may take minutes while the service starts, so it is not the probe.
        saved = self.timeout
        self.timeout = timeout
        try:
            self.vm_name = self._fetch_vm_name()
            return self.vm_name is not None
        except MetadataError as e:
            log.debug("no Azure IMDS at %s: %s", self.endpoint, e)
            return False
        finally:
            self.timeout = saved

    def events(self) -> dict[str, Any]:
        """The current Scheduled Events document (``DocumentIncarnation``, ``Events``)."""
        r = self._request("GET", self.events_url, {"api-version": _AZURE_EVENTS_API})
        if r.status_code != 200:
            raise MetadataError(f"{self.events_url}: HTTP {r.status_code}")
        try:
            doc = json.loads(r.text)
        except (ValueError, RecursionError) as e:
            raise MetadataError(f"{self.events_url}: not JSON ({e!r}): {r.text[:200]!r}") from e
        if not isinstance(doc, dict) or not isinstance(doc.get("Events"), list):
            raise MetadataError(f"{self.events_url}: no Events list in {str(doc)[:200]!r}")
        return doc

    def poll(self, wait: float) -> Notice | None:
        if self.vm_name is None:
            try:
                self.vm_name = self._fetch_vm_name()
            except MetadataError as e:
                log.debug("Azure VM name unavailable: %s", e)
        doc = self.events()
        self.incarnation = doc.get("DocumentIncarnation")
        now = utcnow()
        for event in doc["Events"]:
            if not isinstance(event, dict) or event.get("EventType") not in ("Preempt", "Terminate"):
                continue
            if event.get("EventStatus", "Scheduled") not in ("Scheduled", "Started"):
                continue
            resources = event.get("Resources") or []
            if resources and self.vm_name is not None and self.vm_name not in resources:
                continue  # another VM of the scale set or availability set
            not_before = str(event.get("NotBefore") or "").strip()
            try:
                deadline = parse_rfc1123(not_before) if not_before else now + timedelta(seconds=AZURE_NOTICE_SECONDS)
            except (ValueError, TypeError):
                log.warning(
                    "malformed NotBefore %r in Azure event %s: assuming %d s",
                    not_before,
                    event.get("EventId"),
                    AZURE_NOTICE_SECONDS,
                )
                deadline = now + timedelta(seconds=AZURE_NOTICE_SECONDS)
            return Notice("azure", "terminate", deadline, now, event)
        return None

    def acknowledge(self, notice: Notice) -> None:
        event_id = notice.payload.get("EventId") if isinstance(notice.payload, dict) else None
        if not event_id:
            return
        body = {"StartRequests": [{"EventId": event_id}]}
        r = self._request("POST", self.events_url, {"api-version": _AZURE_EVENTS_API}, body)
        if r.status_code not in (200, 201, 202, 204):
            raise MetadataError(f"{self.events_url}: acknowledging {event_id} answered HTTP {r.status_code}")
        log.info("acknowledged Azure event %s", event_id)
