"""Azure Scheduled Events on loopback: ``DocumentIncarnation``, Preempt events and their acknowledgement."""

from __future__ import annotations

import email.utils
import json
import secrets
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from spotsafe.cloud.times import utcnow
from spotsafe.rehearsal.simulators.server import Response, Simulator

__all__ = ["AzureSimulator"]


class AzureSimulator(Simulator):
    """Azure IMDS Scheduled Events.

    Requests need ``Metadata: true`` and an ``api-version`` (else 400). Events go
    ``Scheduled`` -> ``Started`` when their ``NotBefore`` passes or when a
    ``StartRequests`` POST acknowledges them (recorded in :attr:`acknowledgements`);
    every change bumps ``DocumentIncarnation``.

    What a boot script reads is there too: ``/metadata/instance/compute`` with the
    subscription, resource group and scale set (``scale_set``; ``None``: a VM of no
    scale set), and the managed identity's token endpoint
    ``/metadata/identity/oauth2/token`` (``api-version`` and ``resource`` required, as
    on Azure; each token recorded in :attr:`tokens_issued` with its resource), as
    azure-identity's ``ManagedIdentityCredential`` reads it (point it here with
    ``AZURE_POD_IDENTITY_AUTHORITY_HOST``).
    """

    name = "azure"

    def __init__(
        self,
        *,
        port: int = 0,
        notice_after: float | None = None,
        vm_name: str = "spotsafe-sim-vm",
        location: str = "eastus",
        subscription_id: str = "00000000-0000-0000-0000-00000000c0de",
        resource_group: str = "spotsafe-sim",
        scale_set: str | None = None,
    ) -> None:
        super().__init__(port=port, notice_after=notice_after)
        self.vm_name = vm_name
        self.location = location
        self.subscription_id = subscription_id
        self.resource_group = resource_group
        self.scale_set = scale_set
        #: (resource, token) of every managed identity token handed out, in order
        self.tokens_issued: list[tuple[str, str]] = []
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
        not_before = utcnow() + timedelta(seconds=not_before_in)
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
        now = utcnow()
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
        if path == "/metadata/identity/oauth2/token":
            return self._token(query)
        compute = {
            "name": self.vm_name,
            "location": self.location,
            "vmId": self.vm_id,
            "priority": "Spot",
            "vmSize": "Standard_NC4as_T4_v3",
            "zone": "1",
            "osType": "Linux",
            "subscriptionId": self.subscription_id,
            "resourceGroupName": self.resource_group,
            "vmScaleSetName": self.scale_set or "",
            "resourceId": self._resource_id(),
        }
        if path == "/metadata/instance/compute/name":
            return 200, {"Content-Type": "text/plain; charset=utf-8"}, self.vm_name
        if path == "/metadata/instance/compute":
            return 200, json_type, json.dumps(compute)
        if path == "/metadata/instance":
            return 200, json_type, json.dumps({"compute": compute, "network": {"interface": []}})
        return 404, json_type, json.dumps({"error": "Not found"})

    def _resource_id(self) -> str:
        rg = f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}"
        return f"{rg}/providers/Microsoft.Compute/virtualMachines/{self.vm_name}"

    def _token(self, query: Mapping[str, str]) -> Response:
        json_type = {"Content-Type": "application/json; charset=utf-8"}
        resource = query.get("resource", "")
        if not resource:
            body = {"error": "invalid_request", "error_description": "Required query variable 'resource' is missing"}
            return 400, json_type, json.dumps(body)
        token = f"eyJ0eXAi.sim-{secrets.token_urlsafe(24)}"
        with self._lock:
            self.tokens_issued.append((resource, token))
        now = int(time.time())
        return (
            200,
            json_type,
            json.dumps(
                {
                    "access_token": token,
                    "client_id": str(uuid.UUID(int=0x1D)),
                    "expires_in": "86399",
                    "expires_on": str(now + 86399),
                    "ext_expires_in": "86399",
                    "not_before": str(now),
                    "resource": resource,
                    "token_type": "Bearer",
                }
            ),
        )

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
