"""``python -m spotsafe.cloud.gcp.finish``: a completed run stops its managed instance group recreating it.

Run on the VM by the boot script (``userdata/spot-boot.sh``) when the run in the store is complete:
it reads from the metadata server which group created this VM (the ``created-by``
attribute GCE sets on a managed instance group's VMs), the project, and a token of the
VM's service account (google-auth's ``compute_engine.Credentials``), and resizes that
group to 0 through the Compute API (``instanceGroupManagers.resize``). The group then
deletes this VM; the stateful disk stays (a group's stateful disks outlive its VMs).

The metadata server is ``GCE_METADATA_HOST`` (google-auth's variable; default
``metadata.google.internal``); ``SPOTSAFE_GCP_COMPUTE_ENDPOINT`` points the Compute API
client elsewhere (a private endpoint, a test's local server). The service account needs
``compute.instanceGroupManagers.update`` on the group (``spotsafe launch --cloud gcp``
grants it through a custom role), nothing else.
"""

from __future__ import annotations

import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

from spotsafe.cloud.finishing import finish_main
from spotsafe.errors import LaunchError

__all__ = ["Group", "created_by", "finish", "main"]

#: The partial URL GCE writes in ``instance/attributes/created-by`` for a zonal group.
_CREATED_BY = re.compile(r"^projects/(?P<project>[^/]+)/zones/(?P<zone>[^/]+)/instanceGroupManagers/(?P<name>[^/]+)$")


@dataclass(frozen=True)
class Group:
    """The zonal managed instance group this VM belongs to."""

    project: str
    zone: str
    name: str


def _metadata(path: str, *, timeout: float = 5.0) -> str | None:
    """One metadata value as text; None for a 404 (an attribute that is not set)."""
    host = os.environ.get("GCE_METADATA_HOST") or "metadata.google.internal"
    request = urllib.request.Request(f"http://{host}/computeMetadata/v1/{path}", headers={"Metadata-Flavor": "Google"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
    try:
        with opener.open(request, timeout=timeout) as response:
            return str(response.read().decode())
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise LaunchError(f"the metadata server answered {e.code} for {path}") from e
    except OSError as e:
        raise LaunchError(f"cannot reach the metadata server at {host} ({e}): is this a GCE VM?") from e


def created_by() -> Group:
    """The group that created this VM, from its ``created-by`` attribute and the project id."""
    value = _metadata("instance/attributes/created-by")
    if value is None:
        raise LaunchError(
            "this VM has no created-by attribute: it was not created by a managed instance group, "
            "so there is no group to resize (delete the VM yourself)"
        )
    match = _CREATED_BY.match(value.strip())
    if match is None:
        raise LaunchError(
            f"created-by is {value!r}, not a zonal managed instance group "
            "(projects/P/zones/Z/instanceGroupManagers/NAME): nothing spotsafe knows how to resize"
        )
    # created-by names the project by number; the API takes the id as well (read it, as gcloud shows it).
    project = (_metadata("project/project-id") or match["project"]).strip()
    return Group(project, match["zone"], match["name"])


def finish(group: Group | None = None) -> Group:
    """Resize this VM's managed instance group to 0 (the request only: the group deletes this VM)."""
    from google.auth import compute_engine
    from google.cloud import compute_v1

    group = group or created_by()
    endpoint = os.environ.get("SPOTSAFE_GCP_COMPUTE_ENDPOINT")
    client = compute_v1.InstanceGroupManagersClient(
        credentials=compute_engine.Credentials(),  # type: ignore[no-untyped-call]
        client_options={"api_endpoint": endpoint} if endpoint else None,
    )
    try:
        client.resize(project=group.project, zone=group.zone, instance_group_manager=group.name, size=0)
    except Exception as e:
        raise LaunchError(f"could not resize the group {group.name} in {group.zone} to 0: {e}") from e
    return group


def main(argv: Sequence[str] | None = None) -> int:
    return finish_main(
        "python -m spotsafe.cloud.gcp.finish",
        "Resize this VM's managed instance group to 0 (a completed run is not recreated).",
        finish,
        lambda g: f"resized managed instance group {g.name} ({g.project}, {g.zone}) to 0",
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
