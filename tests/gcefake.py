"""A local fake of the Compute Engine REST API (compute/v1): what spotsafe calls, checked against the discovery document.

Request bodies are checked against Google's discovery document ``compute.v1`` (the
machine-readable description Google publishes and google-cloud-compute is generated from;
google-api-python-client ships it, tests/apischema.py reads it): closed objects, types, enums,
patterns and the method's required fields; a violation is a 400 and lands in ``violations``.
What the fake *does* with a request (the paths, the ``Operation`` it answers, that a group
creates one VM and keeps a stateful disk) is the reference pages' description
(https://cloud.google.com/compute/docs/reference/rest/v1/), not observed:

- ``instanceGroupManagers.resize``: ``POST .../zones/{zone}/instanceGroupManagers/{name}/resize``,
  query parameter ``size`` (integer >= 0), **no request body**; answers an ``Operation``.
- ``instanceGroupManagers.get`` / ``insert`` / ``delete``, ``instanceTemplates.insert`` / ``get`` /
  ``delete``, ``zoneOperations.get``, ``globalOperations.get``.
- ``disks.list`` / ``instances.list`` take ``filter`` (``labels.KEY=VALUE``), answer ``{items: [...]}``;
  ``disks.delete``.
- Errors: ``{"error": {"code", "message", "errors": [...]}}`` with the HTTP status (404 for a
  missing resource, 409 ``alreadyExists``) -- Google's JSON error format.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

from tests.apischema import discovery_schema
from tests.gcpiamfake import GoogleIam
from tests.restfake import Answer, Request, RestFake, SchemaError, check

PROJECT = r"/compute/v1/projects/(?P<project>[^/]+)"
ZONE = PROJECT + r"/zones/(?P<zone>[^/]+)"

#: The request bodies' schemas, from Google's discovery document compute.v1 (tests/apischema.py).
INSTANCE_TEMPLATE = discovery_schema("compute.v1", "InstanceTemplate", "compute.instanceTemplates.insert")
GROUP = discovery_schema("compute.v1", "InstanceGroupManager", "compute.instanceGroupManagers.insert")


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
        self.route("GET", PROJECT + r"/global/operations/(?P<op>[^/]+)", self._get_operation)
        self.templates: dict[tuple[str, str], dict[str, Any]] = {}
        self.disks: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.instances: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.route("POST", PROJECT + r"/global/instanceTemplates", self._insert_template)
        self.route("GET", PROJECT + r"/global/instanceTemplates/(?P<name>[^/]+)", self._get_template)
        self.route("DELETE", PROJECT + r"/global/instanceTemplates/(?P<name>[^/]+)", self._delete_template)
        self.route("POST", ZONE + r"/instanceGroupManagers", self._insert_group)
        self.route("DELETE", ZONE + r"/instanceGroupManagers/(?P<name>[^/]+)", self._delete_group)
        self.route("GET", ZONE + r"/disks", lambda r: self._list(r, self.disks))
        self.route("GET", ZONE + r"/instances", lambda r: self._list(r, self.instances))
        self.route("DELETE", ZONE + r"/disks/(?P<name>[^/]+)", self._delete_disk)
        #: IAM, Resource Manager and Cloud Storage IAM on the same server (tests/gcpiamfake.py)
        self.iam = GoogleIam(self)

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

    def _google_error(self, code: int, reason: str, message: str) -> Answer:
        """Google's JSON error: ``{"error": {"code", "message", "errors": [{domain, reason, message}]}}``."""
        errors = [{"domain": "global", "reason": reason, "message": message}]
        return code, {"error": {"code": code, "message": message, "errors": errors}}, {}

    def _not_found(self, what: str) -> Answer:
        return self._google_error(404, "notFound", f"The resource '{what}' was not found")

    def _exists(self, what: str) -> Answer:
        return self._google_error(409, "alreadyExists", f"The resource '{what}' already exists")

    def _operation(self, r: Request, kind: str, target: str, *, zone: str | None = None) -> dict[str, Any]:
        """A finished ``Operation`` (zonal, or ``zone="global"``), kept for ``zoneOperations.get`` / ``globalOperations.get``."""
        where = zone or r.match["zone"]
        op_name = f"operation-{next(self._ids)}"
        scope = "global" if where == "global" else f"zones/{where}"
        base = f"{self.endpoint}/compute/v1/projects/{r.match['project']}/{scope}"
        op = {
            "kind": "compute#operation",
            "id": str(next(self._ids)),
            "name": op_name,
            **({} if where == "global" else {"zone": base}),
            "operationType": kind,
            "targetLink": target,
            "status": "DONE",
            "progress": 100,
            "selfLink": f"{base}/operations/{op_name}",
        }
        self.operations[(r.match["project"], where, op_name)] = op
        return op

    def _get_group(self, r: Request) -> Answer:
        group = self.groups.get((r.match["project"], r.match["zone"], r.match["name"]))
        if group is None:
            return self._not_found(
                f"projects/{r.match['project']}/zones/{r.match['zone']}/instanceGroupManagers/{r.match['name']}"
            )
        return 200, group, {}

    def _resize(self, r: Request) -> Answer:
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
        op = self.operations.get((r.match["project"], r.match.get("zone", "global"), r.match["op"]))
        return (200, op, {}) if op is not None else self._not_found(r.match["op"])

    def _insert_template(self, r: Request) -> Answer:
        check(r.body, INSTANCE_TEMPLATE)
        key = (r.match["project"], r.body["name"])
        link = f"{self.endpoint}/compute/v1/projects/{key[0]}/global/instanceTemplates/{key[1]}"
        if key in self.templates:
            return self._exists(f"projects/{key[0]}/global/instanceTemplates/{key[1]}")
        self.templates[key] = {
            **r.body,
            "kind": "compute#instanceTemplate",
            "id": str(next(self._ids)),
            "selfLink": link,
        }
        return 200, self._operation(r, "insert", link, zone="global"), {}

    def _get_template(self, r: Request) -> Answer:
        t = self.templates.get((r.match["project"], r.match["name"]))
        return (200, t, {}) if t is not None else self._not_found(f"instanceTemplates/{r.match['name']}")

    def _delete_template(self, r: Request) -> Answer:
        key = (r.match["project"], r.match["name"])
        if key not in self.templates:
            return self._not_found(f"instanceTemplates/{key[1]}")
        if any(g.get("instanceTemplate", "").endswith(f"/instanceTemplates/{key[1]}") for g in self.groups.values()):
            body = {
                "error": {
                    "code": 400,
                    "message": f"The instance_template resource '{key[1]}' is already being used",
                    "errors": [{"domain": "global", "reason": "resourceInUseByAnotherResource"}],
                }
            }
            return 400, body, {}
        link = self.templates.pop(key)["selfLink"]
        return 200, self._operation(r, "delete", link, zone="global"), {}

    def _insert_group(self, r: Request) -> Answer:
        check(r.body, GROUP)
        project, zone, name = r.match["project"], r.match["zone"], r.body["name"]
        if (project, zone, name) in self.groups:
            return self._exists(f"instanceGroupManagers/{name}")
        template_name = r.body["instanceTemplate"].rsplit("/", 1)[-1]
        template = self.templates.get((project, template_name))
        if template is None:
            raise SchemaError(f"instanceTemplate {r.body['instanceTemplate']!r} does not exist")
        group = self.add_group(project, zone, name, target_size=int(r.body["targetSize"]))
        group.update({k: v for k, v in r.body.items() if k != "targetSize"})
        # What the group then does: one VM from the template, its disks created (labels and all).
        props = template["properties"]
        vm = f"{r.body.get('baseInstanceName', name)}-x1y2"
        self.instances[(project, zone, vm)] = {"name": vm, "labels": dict(props.get("labels", {})), "status": "RUNNING"}
        for disk in props["disks"]:
            init = disk.get("initializeParams", {})
            disk_name = init.get("diskName") or f"{vm}-{len(self.disks)}"
            if not disk.get("autoDelete", True):
                self.disks.setdefault(
                    (project, zone, disk_name), {"name": disk_name, "labels": dict(init.get("labels", {}))}
                )
        return 200, self._operation(r, "insert", group["selfLink"]), {}

    def _delete_group(self, r: Request) -> Answer:
        key = (r.match["project"], r.match["zone"], r.match["name"])
        group = self.groups.pop(key, None)
        if group is None:
            return self._not_found(f"instanceGroupManagers/{key[2]}")
        base = group.get("baseInstanceName", key[2])
        for k in [k for k in self.instances if k[:2] == key[:2] and k[2].startswith(f"{base}-")]:
            del self.instances[k]  # the group's VMs go with it; stateful disks (autoDelete NEVER) stay
        return 200, self._operation(r, "delete", group["selfLink"]), {}

    def _list(self, r: Request, table: dict[tuple[str, str, str], dict[str, Any]]) -> Answer:
        import re as _re

        items = [v for k, v in table.items() if k[:2] == (r.match["project"], r.match["zone"])]
        flt = r.query.get("filter", "")
        m = _re.fullmatch(r"labels\.([-a-z0-9_]+)\s*=\s*\"?([-a-z0-9_]+)\"?", flt)
        if flt and m is None:
            raise SchemaError(f"filter {flt!r}: spotsafe sends labels.KEY=VALUE only")
        if m is not None:
            items = [v for v in items if v.get("labels", {}).get(m[1]) == m[2]]
        return 200, {"kind": "compute#list", "items": items}, {}

    def _delete_disk(self, r: Request) -> Answer:
        key = (r.match["project"], r.match["zone"], r.match["name"])
        if key not in self.disks:
            return self._not_found(f"disks/{key[2]}")
        del self.disks[key]
        return 200, self._operation(r, "delete", key[2]), {}
