"""A GCP run's description, and the request bodies it turns into (the instance template, the group).

Every resource is named ``spotsafe-NAME`` and, where the resource has labels (VMs, disks),
labelled ``spotsafe-run=NAME``; an instance template and a managed instance group have no
labels in compute/v1, so their ``description`` says ``spotsafe-run=NAME`` and ``down``
recognises them by name *and* description.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from spotsafe.cloud.bootscript import boot_script
from spotsafe.cloud.gcp.launch.iam import account_email
from spotsafe.cloud.plan import RunSpec, settings_script
from spotsafe.errors import LaunchConfigError

LABEL = "spotsafe-run"
#: Where the VM mounts the run's stateful disk (volume mode).
MOUNT = "/mnt/spotsafe"
#: A setting that spotsafe launch writes and the boot script honours.
_NAME_RE = re.compile(r"[a-z]([-a-z0-9]{0,40}[a-z0-9])?")


@dataclass(frozen=True, kw_only=True)
class GcpLaunchSpec(RunSpec):
    """What ``spotsafe launch NAME --cloud gcp`` is asked for."""

    project: str
    zone: str
    machine_type: str
    image: str
    service_account: str | None = None  # None: launch creates spotsafe-NAME with the least it needs
    disk_size: int | None = None  # GiB: a stateful persistent disk (else a gs:// store)
    boot_disk_size: int = 100

    @property
    def account(self) -> str:
        """The VM's service account: the one given, else the run's own (spotsafe.cloud.gcp.launch.iam)."""
        return self.service_account or account_email(self.name, self.project)

    def validate(self) -> None:
        if not _NAME_RE.fullmatch(self.name):
            raise LaunchConfigError(
                f"run name {self.name!r}: use 1-42 lowercase letters, digits and '-', starting with a letter "
                "(it names GCE resources and labels, whose rules these are)"
            )
        if self.disk_size is None and not self.store.startswith("gs://"):
            raise LaunchConfigError(f"--store {self.store!r}: give gs://BUCKET/PREFIX, or --volume-size for a disk")
        if self.disk_size is not None and (self.disk_size < 10 or self.store.startswith("gs://")):
            raise LaunchConfigError("--volume-size: at least 10 GiB, with a store on the disk (not gs://)")
        if self.service_account is not None and "@" not in self.service_account:
            raise LaunchConfigError(
                f"--service-account {self.service_account!r}: the email of the VM's service account "
                "(docs/launch.md, GCP: the role it needs)"
            )


def settings(spec: GcpLaunchSpec) -> list[tuple[str, str]]:
    """The boot script's settings for this run, in order."""
    out = spec.run_settings("gcp")
    if spec.disk_size is not None:
        # The group creates the disk blank for the first VM: that boot may format it (a blank disk only).
        out += [("SPOTSAFE_DISK_NAME", spec.resource), ("SPOTSAFE_MKFS", "1"), ("SPOTSAFE_MOUNT", MOUNT)]
    else:
        out += [("SPOTSAFE_ATTACH", "0"), ("SPOTSAFE_MOUNT", "/var/lib/spotsafe")]
    return out + spec.source_settings()


def startup_script(spec: GcpLaunchSpec) -> str:
    """The VM's ``startup-script``: the run's settings, then ``userdata/spot-boot.sh`` unchanged."""
    header = f"spotsafe launch {spec.name} --cloud gcp: this run's settings, then userdata/spot-boot.sh unchanged."
    return settings_script(header, settings(spec), boot_script())


#: The ``shutdown-script``: on a preemption the unit stops, the supervisor gets SIGTERM.
SHUTDOWN_SCRIPT = "#!/bin/sh\nexec /usr/local/sbin/spotsafe-boot stop\n"


def template_body(spec: GcpLaunchSpec) -> dict[str, Any]:
    """The ``InstanceTemplate`` (compute/v1) of the run: one Spot VM, deleted on preemption."""
    disks: list[dict[str, Any]] = [
        {
            "boot": True,
            "autoDelete": True,
            "type": "PERSISTENT",
            "initializeParams": {"sourceImage": spec.image, "diskSizeGb": str(spec.boot_disk_size)},
        }
    ]
    if spec.disk_size is not None:
        disks.append(
            {
                "boot": False,
                "autoDelete": False,
                "type": "PERSISTENT",
                "deviceName": spec.resource,
                "initializeParams": {
                    "diskName": spec.resource,
                    "diskSizeGb": str(spec.disk_size),
                    "diskType": "pd-balanced",
                    "labels": {LABEL: spec.name},
                },
            }
        )
    return {
        "name": spec.resource,
        "description": f"{LABEL}={spec.name}",
        "properties": {
            "machineType": spec.machine_type,
            "labels": {LABEL: spec.name},
            "scheduling": {
                "provisioningModel": "SPOT",
                "instanceTerminationAction": "DELETE",
                "automaticRestart": False,
                "onHostMaintenance": "TERMINATE",
            },
            "disks": disks,
            "networkInterfaces": [
                {
                    "network": "global/networks/default",
                    "accessConfigs": [{"name": "External NAT", "type": "ONE_TO_ONE_NAT"}],
                }
            ],
            "serviceAccounts": [{"email": spec.account, "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}],
            "metadata": {
                "items": [
                    {"key": "startup-script", "value": startup_script(spec)},
                    {"key": "shutdown-script", "value": SHUTDOWN_SCRIPT},
                ]
            },
        },
    }


def group_body(spec: GcpLaunchSpec, template_link: str) -> dict[str, Any]:
    """The ``InstanceGroupManager``: one VM, recreated on preemption, the run's disk stateful."""
    body: dict[str, Any] = {
        "name": spec.resource,
        "description": f"{LABEL}={spec.name}",
        "baseInstanceName": spec.resource,
        "instanceTemplate": template_link,
        "targetSize": 1,
    }
    if spec.disk_size is not None:
        body["statefulPolicy"] = {"preservedState": {"disks": {spec.resource: {"autoDelete": "NEVER"}}}}
    return body
