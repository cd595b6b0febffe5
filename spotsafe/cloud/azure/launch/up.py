"""``launch``, ``status`` and ``down`` for Azure: one Spot VM in a Flexible scale set, an ``az://`` store.

``launch`` creates, only when missing, the scale set ``spotsafe-NAME`` (tagged
``spotsafe-run=NAME`` and ``spotsafe-settings=<sha256 of the custom data, 16 hex>``): one VM,
``priority=Spot``, eviction ``Delete`` (the store is ``az://``: nothing on the VM needs keeping),
spot restore on (the scale set brings an evicted VM back when capacity returns), a
system-assigned identity, custom data = the run's settings then ``cloud-boot.sh``; the VM's OS
disk, NIC and public address are deleted with it (``deleteOption: Delete``). A launch whose
settings differ is refused ("`spotsafe down` first"). ``down`` deletes the scale set and lists
what is still tagged. The identity's role assignment (scale itself to 0; the store's container)
is the operator's: docs/launch.md has the ``az`` lines. The data-disk variant (eviction
``Deallocate``) is documented there, not launched here.
"""

from __future__ import annotations

import base64
import hashlib
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from spotsafe.cloud.gcp.launch.spec import boot_script
from spotsafe.errors import LaunchConfigError, LaunchError

TAG = "spotsafe-run"
SETTINGS_TAG = "spotsafe-settings"
_NAME_RE = re.compile(r"[a-z][-a-z0-9]{0,40}[a-z0-9]|[a-z]")


@dataclass(frozen=True)
class AzureLaunchSpec:
    name: str
    resource_group: str
    location: str
    vm_size: str
    image: str  # publisher:offer:sku:version
    subnet_id: str
    ssh_public_key: str
    command: str
    store: str
    admin_user: str = "azureuser"
    repo: str | None = None
    ref: str | None = None
    pip_spec: str | None = None
    pip_sha256: str | None = None
    shutdown_when_done: bool = True

    @property
    def resource(self) -> str:
        return f"spotsafe-{self.name}"

    def validate(self) -> None:
        if not _NAME_RE.fullmatch(self.name):
            raise LaunchConfigError(f"run name {self.name!r}: 1-42 lowercase letters, digits and '-'")
        if not self.store.startswith("az://"):
            raise LaunchConfigError(
                f"--store {self.store!r}: the Azure launcher takes an az://CONTAINER/PREFIX store "
                "(a data disk with eviction Deallocate: docs/launch.md, by hand)"
            )
        if len(self.image.split(":")) != 4:
            raise LaunchConfigError(f"--image {self.image!r}: publisher:offer:sku:version, as az vm image list shows")
        if "/subnets/" not in self.subnet_id:
            raise LaunchConfigError(f"--subnet-id {self.subnet_id!r}: the subnet's resource id (.../subnets/NAME)")


def custom_data(spec: AzureLaunchSpec) -> str:
    """The run's settings, then ``userdata/cloud-boot.sh`` unchanged (cloud-init runs it as a script)."""
    settings = [
        ("SPOTSAFE_CLOUD", "azure"),
        ("SPOTSAFE_RUN", spec.name),
        ("SPOTSAFE_STORE", spec.store),
        ("SPOTSAFE_TRAIN_COMMAND", spec.command),
        ("SPOTSAFE_ATTACH", "0"),
        ("SPOTSAFE_MOUNT", "/var/lib/spotsafe"),
        ("SPOTSAFE_SHUTDOWN_WHEN_DONE", "1" if spec.shutdown_when_done else "0"),
        ("SPOTSAFE_SHUTDOWN_ON_FAILURE", "1"),
    ]
    if spec.repo:
        settings += [("SPOTSAFE_REPO", spec.repo), ("SPOTSAFE_REF", spec.ref or "HEAD")]
    settings += [
        (k, v) for k, v in (("SPOTSAFE_PIP_SPEC", spec.pip_spec), ("SPOTSAFE_PIP_SHA256", spec.pip_sha256)) if v
    ]
    lines = ["#!/usr/bin/env bash", f"# spotsafe launch {spec.name} --cloud azure: settings, then cloud-boot.sh."]
    for key, value in settings:
        lines += [f'[ -n "${{{key}:-}}" ] || {key}={shlex.quote(value)}', f"export {key}"]
    return "\n".join(lines) + "\n\n" + boot_script()


def scale_set_body(spec: AzureLaunchSpec) -> dict[str, Any]:
    """The ``VirtualMachineScaleSet`` (Microsoft.Compute) of the run."""
    text = custom_data(spec)
    publisher, offer, sku, version = spec.image.split(":")
    delete = "Delete"
    return {
        "location": spec.location,
        "tags": {TAG: spec.name, SETTINGS_TAG: hashlib.sha256(text.encode()).hexdigest()[:16]},
        "sku": {"name": spec.vm_size, "tier": "Standard", "capacity": 1},
        "identity": {"type": "SystemAssigned"},
        "properties": {
            "orchestrationMode": "Flexible",
            "platformFaultDomainCount": 1,
            "spotRestorePolicy": {"enabled": True, "restoreTimeout": "PT1H"},
            "virtualMachineProfile": {
                "priority": "Spot",
                "evictionPolicy": "Delete",
                "billingProfile": {"maxPrice": -1},
                "osProfile": {
                    "computerNamePrefix": spec.resource[:9],
                    "adminUsername": spec.admin_user,
                    "customData": base64.b64encode(text.encode()).decode(),
                    "linuxConfiguration": {
                        "disablePasswordAuthentication": True,
                        "ssh": {
                            "publicKeys": [
                                {
                                    "path": f"/home/{spec.admin_user}/.ssh/authorized_keys",
                                    "keyData": spec.ssh_public_key,
                                }
                            ]
                        },
                    },
                },
                "storageProfile": {
                    "imageReference": {"publisher": publisher, "offer": offer, "sku": sku, "version": version},
                    "osDisk": {
                        "createOption": "FromImage",
                        "caching": "ReadWrite",
                        "managedDisk": {"storageAccountType": "Premium_LRS"},
                        "deleteOption": delete,
                    },
                },
                "networkProfile": {
                    "networkApiVersion": "2020-11-01",
                    "networkInterfaceConfigurations": [
                        {
                            "name": f"{spec.resource}-nic",
                            "properties": {
                                "primary": True,
                                "deleteOption": delete,
                                "ipConfigurations": [
                                    {
                                        "name": "ipconfig1",
                                        "properties": {
                                            "primary": True,
                                            "subnet": {"id": spec.subnet_id},
                                            "publicIPAddressConfiguration": {
                                                "name": f"{spec.resource}-ip",
                                                "properties": {"deleteOption": delete},
                                            },
                                        },
                                    }
                                ],
                            },
                        }
                    ],
                },
            },
        },
    }


@dataclass(frozen=True)
class Step:
    verb: str
    kind: str
    name: str
    detail: str = ""

    def __str__(self) -> str:
        tail = f": {self.detail}" if self.detail else ""
        return f"{self.verb:<7} {self.kind} {self.name}{tail}"


@dataclass
class Result:
    steps: list[Step] = field(default_factory=list)
    applied: bool = False

    @property
    def changes(self) -> list[Step]:
        return [s for s in self.steps if s.verb in ("create", "delete")]


class Arm:
    """The Compute client of one subscription and resource group."""

    def __init__(self, client: Any, resource_group: str) -> None:
        self.client = client
        self.resource_group = resource_group

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

        try:
            return fn(*args, **kwargs)
        except ResourceNotFoundError:
            return None
        except HttpResponseError as e:
            raise LaunchError(f"{what}: {e.message}") from e


def _get(arm: Arm, name: str) -> Any:
    return arm.call(f"get scale set {name}", arm.client.virtual_machine_scale_sets.get, arm.resource_group, name)


def launch(spec: AzureLaunchSpec, arm: Arm, *, apply: bool, on_step: Callable[[Step], None] = print) -> Result:
    spec.validate()
    result = Result(applied=apply)
    body = scale_set_body(spec)
    current = _get(arm, spec.resource)
    if current is not None:
        tags = dict(current.tags or {})
        if tags.get(TAG) != spec.name:
            raise LaunchError(f"a scale set {spec.resource} exists that spotsafe did not create (no tag {TAG})")
        if tags.get(SETTINGS_TAG) != body["tags"][SETTINGS_TAG]:
            raise LaunchError(
                f"the scale set {spec.resource} was launched with other settings: "
                f"`spotsafe down {spec.name} --cloud azure --yes` first"
            )
        step = Step("keep", "scale set", spec.resource, f"capacity {current.sku.capacity}")
    else:
        step = Step("create", "scale set", spec.resource, f"1 Spot {spec.vm_size}, eviction Delete, {spec.location}")
    result.steps.append(step)
    on_step(step)
    if current is None and apply:
        poller = arm.call(
            f"create scale set {spec.resource}",
            arm.client.virtual_machine_scale_sets.begin_create_or_update,
            arm.resource_group,
            spec.resource,
            body,
        )
        arm.call(f"create scale set {spec.resource}", poller.result, timeout=900)
    return result


def tagged_disks(arm: Arm, name: str) -> list[str]:
    found = arm.call("list disks", arm.client.disks.list_by_resource_group, arm.resource_group) or []
    return [str(d.name) for d in found if (d.tags or {}).get(TAG) == name]


def down(name: str, arm: Arm, *, apply: bool, on_step: Callable[[Step], None] = print) -> tuple[Result, list[str]]:
    result = Result(applied=apply)
    resource = f"spotsafe-{name}"
    current = _get(arm, resource)
    if current is not None and dict(current.tags or {}).get(TAG) == name:
        step = Step("delete", "scale set", resource, "and its VM (OS disk, NIC, address with it)")
        result.steps.append(step)
        on_step(step)
        if apply:
            poller = arm.call(
                f"delete scale set {resource}",
                arm.client.virtual_machine_scale_sets.begin_delete,
                arm.resource_group,
                resource,
            )
            if poller is not None:
                arm.call(f"delete scale set {resource}", poller.result, timeout=900)
    left: list[str] = []
    if apply:
        if _get(arm, resource) is not None:
            left.append(f"scale set {resource}")
        left += [f"disk {d}" for d in tagged_disks(arm, name)]
    return result, left
