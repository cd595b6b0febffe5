"""``launch``, ``status`` and ``down`` for GCP: the reconciler over google-cloud-compute.

``launch`` creates, in order, each only when missing (so a second call changes nothing and
an interrupted call is completed by the next):

1. the instance template ``spotsafe-NAME`` (:func:`~spotsafe.cloud.gcp.launch.spec.template_body`):
   a Spot VM (``provisioningModel=SPOT``, ``instanceTerminationAction=DELETE``), the run's
   service account, the ``startup-script`` (the settings, then ``spot-boot.sh``) and the
   ``shutdown-script``; in volume mode a data disk ``spotsafe-NAME`` (device name the same);
2. the zonal managed instance group ``spotsafe-NAME`` of one VM; in volume mode its stateful
   policy keeps that disk (``autoDelete: NEVER``) and reattaches it to every recreated VM.

Without ``apply`` it only plans. ``down`` deletes the group (and with it the VM), then the
template, then (``delete_store``) the run's disk, and lists what is still labelled or named
for the run. Before the template, unless ``--service-account`` names one, ``launch`` creates the
run's own service account, custom role and conditional bindings
(:mod:`spotsafe.cloud.gcp.launch.iam`); ``down`` removes them after the group.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from spotsafe.cloud.aws.launch.status import StoreFacts, format_group
from spotsafe.cloud.gcp.launch import iam
from spotsafe.cloud.gcp.launch.iam import GoogleRest
from spotsafe.cloud.gcp.launch.spec import LABEL, GcpLaunchSpec, group_body, template_body
from spotsafe.cloud.plan import Result, Step
from spotsafe.errors import LaunchError


class Compute:
    """The compute/v1 clients of one project and zone (``endpoint``/``credentials``: tests and private endpoints)."""

    def __init__(self, project: str, zone: str, *, credentials: Any = None, endpoint: str | None = None) -> None:
        from google.cloud import compute_v1

        options = {"api_endpoint": endpoint} if endpoint else None
        self.project, self.zone = project, zone
        self.v1 = compute_v1
        self.templates = compute_v1.InstanceTemplatesClient(credentials=credentials, client_options=options)
        self.groups = compute_v1.InstanceGroupManagersClient(credentials=credentials, client_options=options)
        self.disks = compute_v1.DisksClient(credentials=credentials, client_options=options)
        self.instances = compute_v1.InstancesClient(credentials=credentials, client_options=options)
        self.rest = GoogleRest(credentials, endpoint)

    def call(self, what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        """One API call; a missing resource is None, any other failure a LaunchError naming ``what``."""
        from google.api_core import exceptions

        try:
            return fn(**kwargs)
        except exceptions.NotFound:
            return None
        except exceptions.GoogleAPICallError as e:
            raise LaunchError(f"{what}: {e}") from e

    def wait(self, what: str, operation: Any) -> None:
        try:
            operation.result(timeout=600)
        except Exception as e:
            raise LaunchError(f"{what}: {e}") from e


def _ours(resource: Any, spec_name: str) -> bool:
    return str(getattr(resource, "description", "")) == f"{LABEL}={spec_name}"


def launch(spec: GcpLaunchSpec, gce: Compute, *, apply: bool, on_step: Callable[[Step], None] = print) -> Result:
    """Create what is missing of the run (a plan only without ``apply``)."""
    spec.validate()
    result = Result(applied=apply)

    say = result.recorder(on_step)

    if spec.service_account is None:
        iam.ensure(
            gce.rest,
            spec.name,
            gce.project,
            gce.zone,
            spec.store,
            apply=apply,
            say=say,
        )
    name = spec.resource
    want = template_body(spec)
    current = gce.call(f"get template {name}", gce.templates.get, project=gce.project, instance_template=name)
    if current is not None:
        if not _ours(current, spec.name):
            raise LaunchError(f"an instance template {name} exists that spotsafe did not create (its description)")
        have = {i.key: i.value for i in current.properties.metadata.items}
        wanted = {i["key"]: i["value"] for i in want["properties"]["metadata"]["items"]}
        if have != wanted or current.properties.machine_type != spec.machine_type:
            raise LaunchError(
                f"the instance template {name} differs from this launch (settings or machine type): "
                f"templates cannot change; `spotsafe down {spec.name} --cloud gcp --yes` first (the disk stays)"
            )
        say("keep", "instance template", name, "")
    else:
        say("create", "instance template", name, f"{spec.machine_type}, Spot, {spec.image}")
        if apply:
            resource = gce.v1.InstanceTemplate.from_json(json.dumps(want))
            op = gce.call(
                f"create template {name}",
                gce.templates.insert,
                project=gce.project,
                instance_template_resource=resource,
            )
            gce.wait(f"create template {name}", op)
    link = f"projects/{gce.project}/global/instanceTemplates/{name}"
    group = gce.call(
        f"get group {name}", gce.groups.get, project=gce.project, zone=gce.zone, instance_group_manager=name
    )
    if group is not None:
        if not _ours(group, spec.name):
            raise LaunchError(f"a managed instance group {name} exists that spotsafe did not create")
        say("keep", "managed instance group", name, f"target size {group.target_size}")
    else:
        disk = f", stateful disk {name}" if spec.disk_size is not None else ""
        say("create", "managed instance group", name, f"1 VM in {gce.zone}{disk}")
        if apply:
            resource = gce.v1.InstanceGroupManager.from_json(json.dumps(group_body(spec, link)))
            op = gce.call(
                f"create group {name}",
                gce.groups.insert,
                project=gce.project,
                zone=gce.zone,
                instance_group_manager_resource=resource,
            )
            gce.wait(f"create group {name}", op)
    return result


@dataclass(kw_only=True)
class Status(StoreFacts):
    """The run's group, its VMs (name -> state), its disks, and the store's progress."""

    group: str | None = None
    target_size: int | None = None
    states: dict[str, str] = field(default_factory=dict)
    disks: list[str] = field(default_factory=list)

    @property
    def instances(self) -> list[str]:
        return sorted(self.states)


def status(name: str, gce: Compute, *, read_store: bool = False) -> Status:
    """What is there of the run; with ``read_store``, also the newest checkpoint (a ``gs://`` store)."""
    resource = f"spotsafe-{name}"
    group = gce.call("get group", gce.groups.get, project=gce.project, zone=gce.zone, instance_group_manager=resource)
    st = Status(
        group=resource if group is not None else None,
        target_size=int(group.target_size) if group is not None else None,
        states={str(i.name): str(i.status) for i in _labelled(gce, "instances", name)},
        disks=[str(d.name) for d in _labelled(gce, "disks", name)],
    )
    template = gce.call("get template", gce.templates.get, project=gce.project, instance_template=resource)
    st.store = _store_of(template) if template is not None and _ours(template, name) else None
    if read_store:
        st.read_remote("gs://", "disk")
    return st


def format_status(name: str, st: Status, out: TextIO) -> None:
    group = f"managed instance group {st.group}: target size {st.target_size}" if st.group else None
    members = [f"instance {vm} {state}" for vm, state in sorted(st.states.items())] + [f"disk {d}" for d in st.disks]
    missing = f"group spotsafe-{name}: none (not launched, or taken down)"
    format_group(out, f"run {name} (GCP)", group, st.target_size, missing, members, st)


def _labelled(gce: Compute, kind: str, name: str) -> list[Any]:
    flt = f"labels.{LABEL}={name}"
    client: Any
    request: Any
    if kind == "instances":
        client, request = gce.instances, gce.v1.ListInstancesRequest(project=gce.project, zone=gce.zone, filter=flt)
    else:
        client, request = gce.disks, gce.v1.ListDisksRequest(project=gce.project, zone=gce.zone, filter=flt)
    return list(gce.call(f"list {kind}", client.list, request=request) or [])


def down(
    name: str,
    gce: Compute,
    *,
    apply: bool,
    delete_store: bool,
    store: str | None = None,
    on_step: Callable[[Step], None] = print,
) -> tuple[Result, list[str]]:
    """Delete the group, the template and (``delete_store``) the disk; what is still there after."""
    result = Result(applied=apply)
    resource = f"spotsafe-{name}"

    say = result.recorder(on_step)

    group = gce.call("get group", gce.groups.get, project=gce.project, zone=gce.zone, instance_group_manager=resource)
    if group is not None and _ours(group, name):
        say("delete", "managed instance group", resource, "and its VM")
        if apply:
            op = gce.call(
                f"delete group {resource}",
                gce.groups.delete,
                project=gce.project,
                zone=gce.zone,
                instance_group_manager=resource,
            )
            if op is not None:
                gce.wait(f"delete group {resource}", op)
    template = gce.call("get template", gce.templates.get, project=gce.project, instance_template=resource)
    if template is not None and _ours(template, name):
        store = store or _store_of(template)
    iam.remove(
        gce.rest,
        name,
        gce.project,
        gce.zone,
        store,
        apply=apply,
        say=say,
    )
    if template is not None and _ours(template, name):
        say("delete", "instance template", resource, "")
        if apply:
            op = gce.call(
                f"delete template {resource}", gce.templates.delete, project=gce.project, instance_template=resource
            )
            if op is not None:
                gce.wait(f"delete template {resource}", op)
    for disk in [str(d.name) for d in _labelled(gce, "disks", name)]:
        if not delete_store:
            say("keep", "disk", disk, "the run's checkpoints (--delete-store deletes it)")
            continue
        say("delete", "disk", disk, "")
        if apply:
            op = gce.call(f"delete disk {disk}", gce.disks.delete, project=gce.project, zone=gce.zone, disk=disk)
            if op is not None:
                gce.wait(f"delete disk {disk}", op)
    left: list[str] = []
    if apply:
        st = status(name, gce)
        left += [f"managed instance group {st.group}"] if st.group else []
        left += [f"instance {i}" for i in st.instances]
        left += [f"disk {d}" for d in st.disks if delete_store]
        if gce.call("get template", gce.templates.get, project=gce.project, instance_template=resource):
            left.append(f"instance template {resource}")
        left += iam.left(gce.rest, name, gce.project, gce.zone, store)
    return result, left


def _store_of(template: Any) -> str | None:
    """The run's store, from the ``SPOTSAFE_STORE`` line launch wrote into the template's startup-script."""
    for item in template.properties.metadata.items:
        if item.key == "startup-script":
            for line in str(item.value).splitlines():
                if line.startswith('[ -n "${SPOTSAFE_STORE:-}" ] || SPOTSAFE_STORE='):
                    return str(shlex.split(line.split("SPOTSAFE_STORE=", 2)[-1])[0])
    return None
