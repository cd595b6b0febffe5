"""The GCE metadata server on loopback: ``Metadata-Flavor: Google``, ETags, hanging GETs."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Mapping
from typing import Any

from spotsafe.rehearsal.simulators.server import Response, Simulator

__all__ = ["GCPSimulator"]


class GCPSimulator(Simulator):
    """The GCE metadata server: ``Metadata-Flavor: Google``, ETags, hanging GETs.

    :meth:`preempt` sets ``instance/preempted`` to ``TRUE``; :meth:`maintenance`
    sets ``instance/maintenance-event``. A ``wait_for_change=true`` GET returns at
    once when ``last_etag`` differs from the current ETag, else when the value
    changes or ``timeout_sec`` passes.

    What a boot script reads is there too: ``instance/attributes/*`` (``attributes``;
    a VM of a managed instance group has ``created-by``, the group's partial URL:
    ``group`` sets it), the zone, and the default service account: its
    ``?recursive=true`` description and ``token`` (a fresh opaque bearer token per
    request, recorded in :attr:`tokens_issued`), as google-auth's
    ``compute_engine.Credentials`` reads them.
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
        attributes: Mapping[str, str] | None = None,
        group: str | None = None,
        service_account: str = "spotsafe-sim@spotsafe-sim.iam.gserviceaccount.com",
    ) -> None:
        super().__init__(port=port, notice_after=notice_after)
        self.zone = zone
        self.project_id = project_id
        self.service_account = service_account
        #: Every access token handed out, in order (a client's ``Authorization: Bearer`` is one of them).
        self.tokens_issued: list[str] = []
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
            "instance/service-accounts/default/email": service_account,
            "instance/service-accounts/default/scopes": "https://www.googleapis.com/auth/cloud-platform",
            "universe/universe-domain": "googleapis.com",
        }
        if group is not None:
            # As GCE sets it on a managed instance group's VMs: the group's partial URL.
            self.values["instance/attributes/created-by"] = (
                f"projects/123456789012/zones/{zone}/instanceGroupManagers/{group}"
            )
        for key, value in (attributes or {}).items():
            self.values[f"instance/attributes/{key}"] = value

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
        account = "instance/service-accounts/default/"
        if key == f"{account}token":
            return 200, {**base, "Content-Type": "application/json"}, json.dumps(self._token())
        if key == account and query.get("recursive", "").lower() == "true":
            with self._lock:
                email = self.values[f"{account}email"]
                scopes = self.values[f"{account}scopes"].split()
            described = {"aliases": ["default"], "email": email, "scopes": scopes}
            return 200, {**base, "Content-Type": "application/json"}, json.dumps(described)
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

    def _token(self) -> dict[str, Any]:
        token = f"ya29.sim-{secrets.token_urlsafe(24)}"
        with self._lock:
            self.tokens_issued.append(token)
        return {"access_token": token, "expires_in": 3599, "token_type": "Bearer"}

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
