"""A local fake of the Compute Engine REST API (compute/v1): what spotsafe calls, checked against the reference.

Where each fact comes from (the Compute Engine API reference, v1,
https://cloud.google.com/compute/docs/reference/rest/v1/, and its discovery document
https://compute.googleapis.com/discovery/v1/apis/compute/v1/rest, which google-cloud-compute
is generated from):

- ``instanceGroupManagers.resize``: ``POST .../zones/{zone}/instanceGroupManagers/{name}/resize``,
  query parameter ``size`` (integer, required, >= 0), **no request body**; answers an
  ``Operation`` (``kind: compute#operation``, ``status`` PENDING | RUNNING | DONE,
  ``targetLink``, ``operationType``) -- reference page instanceGroupManagers/resize.
- ``instanceGroupManagers.get``: ``GET .../instanceGroupManagers/{name}``: the resource
  with ``targetSize`` (integer) -- reference page instanceGroupManagers/get.
- ``zoneOperations.get``: ``GET .../zones/{zone}/operations/{operation}`` -- reference page
  zoneOperations/get.
- Errors: ``{"error": {"code", "message", "errors": [...]}}`` with the HTTP status
  (404 for a missing resource) -- the API's "Errors" page (Google JSON error format).
"""

from __future__ import annotations

import itertools
import re
from typing import Any

from tests.restfake import Answer, Request, RestFake

PROJECT = r"/compute/v1/projects/(?P<project>[^/]+)"
ZONE = PROJECT + r"/zones/(?P<zone>[^/]+)"


class ComputeFake(RestFake):
    """Managed instance groups and zone operations, in memory; ``groups[(project, zone, name)]``."""

    name = "compute"

    def __init__(self) -> None:
        super().__init__()
        self.groups: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.operations: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._ids = itertools.count(7000000000000000001)
        self.route("GET", ZONE + r"/instanceGroupManagers/(?P<name>[^/]+)", self._get_group)
        self.route("POST", ZONE + r"/instanceGroupManagers/(?P<name>[^/]+)/resize", self._resize)
        self.route("GET", ZONE + r"/operations/(?P<op>[^/]+)", self._get_operation)

    def add_group(self, project: str, zone: str, name: str, *, target_size: int = 1) -> dict[str, Any]:
        """A managed instance group as ``gcloud compute instance-groups managed create`` leaves it."""
        group = {
            "kind": "compute#instanceGroupManager",
            "id": str(next(self._ids)),
            "name": name,
            "zone": f"{self.endpoint}/compute/v1/projects/{project}/zones/{zone}",
            "targetSize": target_size,
            "baseInstanceName": name,
            "selfLink": f"{self.endpoint}/compute/v1/projects/{project}/zones/{zone}/instanceGroupManagers/{name}",
        }
        with self.lock:
            self.groups[(project, zone, name)] = group
        return group

    def _not_found(self, what: str) -> Answer:
        body = {
            "error": {
                "code": 404,
                "message": f"The resource '{what}' was not found",
                "errors": [
                    {"domain": "global", "reason": "notFound", "message": f"The resource '{what}' was not found"}
                ],
            }
        }
        return 404, body, {}

    def _operation(self, r: Request, kind: str, target: str) -> dict[str, Any]:
        op_name = f"operation-{next(self._ids)}"
        base = f"{self.endpoint}/compute/v1/projects/{r.match['project']}/zones/{r.match['zone']}"
        op = {
            "kind": "compute#operation",
            "id": str(next(self._ids)),
            "name": op_name,
            "zone": base,
            "operationType": kind,
            "targetLink": target,
            "status": "DONE",
            "progress": 100,
            "selfLink": f"{base}/operations/{op_name}",
        }
        self.operations[(r.match["project"], r.match["zone"], op_name)] = op
        return op

    def _get_group(self, r: Request) -> Answer:
        group = self.groups.get((r.match["project"], r.match["zone"], r.match["name"]))
        if group is None:
            return self._not_found(
                f"projects/{r.match['project']}/zones/{r.match['zone']}/instanceGroupManagers/{r.match['name']}"
            )
        return 200, group, {}

    def _resize(self, r: Request) -> Answer:
        from tests.restfake import SchemaError

        if r.body not in (None, {}, ""):
            raise SchemaError(f"resize takes no request body, got {r.body!r}")
        size = r.query.get("size")
        if size is None or not re.fullmatch(r"\d+", size):
            raise SchemaError(f"resize: the required query parameter size (integer >= 0) is {size!r}")
        key = (r.match["project"], r.match["zone"], r.match["name"])
        group = self.groups.get(key)
        if group is None:
            return self._not_found("/".join(("projects", key[0], "zones", key[1], "instanceGroupManagers", key[2])))
        group["targetSize"] = int(size)
        return 200, self._operation(r, "compute.instanceGroupManagers.resize", group["selfLink"]), {}

    def _get_operation(self, r: Request) -> Answer:
        op = self.operations.get((r.match["project"], r.match["zone"], r.match["op"]))
        if op is None:
            return self._not_found(r.match["op"])
        return 200, op, {}
