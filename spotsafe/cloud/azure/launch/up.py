"""``launch``, ``status`` and ``down`` for Azure: one Spot VM in a Flexible scale set, an ``az://`` store.

``launch`` creates, only when missing, the scale set ``spotsafe-NAME`` (tagged
``spotsafe-run=NAME`` and ``spotsafe-settings=<sha256 of the custom data, 16 hex>``): one VM,
``priority=Spot``, eviction ``Delete`` (the store is ``az://``: nothing on the VM needs keeping),
spot restore on (the scale set brings an evicted VM back when capacity returns), a
system-assigned identity, custom data = the run's settings then ``spot-boot.sh``; the VM's OS
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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from spotsafe.cloud.aws.launch.status import StoreFacts, format_group
from spotsafe.cloud.azure.launch import identity
from spotsafe.cloud.bootscript import boot_script
from spotsafe.cloud.plan import Result, RunSpec, Step, settings_script
from spotsafe.errors import LaunchConfigError, LaunchError

TAG = "spotsafe-run"
#: Where the VM mounts the run's data disk (data-disk mode).
MOUNT = "/mnt/spotsafe"
SETTINGS_TAG = "spotsafe-settings"
#: The run's store (status reads the progress from it).
STORE_TAG = "spotsafe-store"
#: The container scope of the Storage Blob Data Contributor assignment (down finds it here).
BLOB_SCOPE_TAG = "spotsafe-blob-scope"
_NAME_RE = re.compile(r"[a-z][-a-z0-9]{0,40}[a-z0-9]|[a-z]")


@dataclass(frozen=True, kw_only=True)
class AzureLaunchSpec(RunSpec):
    """What ``spotsafe launch NAME --cloud azure`` is asked for."""

    resource_group: str
    location: str
    vm_size: str
    image: str  # publisher:offer:sku:version
    subnet_id: str
    ssh_public_key: str
    admin_user: str = "azureuser"
    #: GiB: a managed data disk at LUN 0 holds the store (eviction Deallocate keeps it); else az://
    disk_size: int | None = None
    #: the az:// store's storage account (a name in the resource group, or a resource id)
    storage_account: str | None = None

    def validate(self) -> None:
        if not _NAME_RE.fullmatch(self.name):
            raise LaunchConfigError(f"run name {self.name!r}: 1-42 lowercase letters, digits and '-'")
        if self.disk_size is None and not self.store.startswith("az://"):
            raise LaunchConfigError(
                f"--store {self.store!r}: give az://CONTAINER/PREFIX, or --volume-size for a data disk "
                f"(the store then a directory under {MOUNT})"
            )
        if self.disk_size is not None and (self.disk_size < 4 or not self.store.startswith(MOUNT + "/")):
            raise LaunchConfigError(f"--volume-size: at least 4 GiB, with the store a directory under {MOUNT}")
        if self.store.startswith("az://") and not self.storage_account:
            raise LaunchConfigError(
                "--storage-account: the az:// store's account (its name in the resource group, or its resource id): "
                "the VM's identity gets Storage Blob Data Contributor on the container, and the VM the account's name"
            )
        if len(self.image.split(":")) != 4:
            raise LaunchConfigError(f"--image {self.image!r}: publisher:offer:sku:version, as az vm image list shows")
        if "/subnets/" not in self.subnet_id:
            raise LaunchConfigError(f"--subnet-id {self.subnet_id!r}: the subnet's resource id (.../subnets/NAME)")


#: Azure's limit on a VM's custom data, before base64 (the API takes at most 87,380 base64 characters).
CUSTOM_DATA_LIMIT = 64 * 1024


def custom_data(spec: AzureLaunchSpec) -> str:
    """The run's settings, then ``userdata/spot-boot.sh`` unchanged (cloud-init runs it as a script)."""
    settings = spec.run_settings("azure")
    if spec.disk_size is not None:
        # The scale set creates the data disk blank for the first VM: that boot may format it (blank only).
        settings += [("SPOTSAFE_DISK_LUN", "0"), ("SPOTSAFE_MKFS", "1"), ("SPOTSAFE_MOUNT", MOUNT)]
    else:
        settings += [("SPOTSAFE_ATTACH", "0"), ("SPOTSAFE_MOUNT", "/var/lib/spotsafe")]
        account = (spec.storage_account or "").rstrip("/").rsplit("/", 1)[-1]
        settings += [("AZURE_STORAGE_ACCOUNT_NAME", account)] if account else []
    header = f"spotsafe launch {spec.name} --cloud azure: settings, then spot-boot.sh."
    text = settings_script(header, settings + spec.source_settings(), boot_script())
    size = len(text.encode())
    if size > CUSTOM_DATA_LIMIT:
        raise LaunchConfigError(
            f"the custom data of {spec.name} is {size} bytes, over Azure's {CUSTOM_DATA_LIMIT} (64 KiB): "
            "shorten --command or the settings (the boot script itself is about 40 KB)"
        )
    return text


def scale_set_body(spec: AzureLaunchSpec) -> dict[str, Any]:
    """The ``VirtualMachineScaleSet`` (Microsoft.Compute) of the run."""
    text = custom_data(spec)
    publisher, offer, sku, version = spec.image.split(":")
    delete = "Delete"
    storage: dict[str, Any] = {
        "imageReference": {"publisher": publisher, "offer": offer, "sku": sku, "version": version},
        "osDisk": {
            "createOption": "FromImage",
            "caching": "ReadWrite",
            "managedDisk": {"storageAccountType": "Premium_LRS"},
            "deleteOption": delete,
        },
    }
    if spec.disk_size is not None:
        storage["dataDisks"] = [
            {
                "lun": 0,
                "createOption": "Empty",
                "diskSizeGB": spec.disk_size,
                "caching": "None",
                "managedDisk": {"storageAccountType": "Premium_LRS"},
                "deleteOption": "Detach",  # the checkpoints outlive the VM (down --delete-store deletes it)
            }
        ]
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
                "evictionPolicy": "Delete" if spec.disk_size is None else "Deallocate",
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
                "storageProfile": storage,
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


class Arm:
    """The Compute and Authorization clients of one subscription and resource group."""

    def __init__(self, client: Any, resource_group: str, *, auth: Any, subscription: str) -> None:
        self.client = client
        self.auth = auth
        self.resource_group = resource_group
        self.subscription = subscription

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


def _assignments(arm: Arm, name: str, blob_scope: str | None) -> list[identity.Assignment]:
    wanted = identity.assignments(arm.subscription, arm.resource_group, f"spotsafe-{name}", "", None)
    if blob_scope:
        wanted.append(identity.Assignment(blob_scope, identity.BLOB_DATA_CONTRIBUTOR, "Storage Blob Data Contributor"))
    return wanted


def launch(spec: AzureLaunchSpec, arm: Arm, *, apply: bool, on_step: Callable[[Step], None] = print) -> Result:
    """Create what is missing: the scale set, then its identity's role assignments (a plan without ``apply``)."""
    spec.validate()
    result = Result(applied=apply)
    say = result.recorder(on_step)
    body = scale_set_body(spec)
    wanted = identity.assignments(arm.subscription, arm.resource_group, spec.resource, spec.store, spec.storage_account)
    if len(wanted) > 1:
        body["tags"][BLOB_SCOPE_TAG] = wanted[1].scope
    body["tags"][STORE_TAG] = spec.store
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
        say("keep", "scale set", spec.resource, f"capacity {current.sku.capacity}")
    else:
        eviction = "Delete" if spec.disk_size is None else f"Deallocate, a {spec.disk_size} GiB data disk"
        say("create", "scale set", spec.resource, f"1 Spot {spec.vm_size}, eviction {eviction}, {spec.location}")
        if apply:
            what = f"create scale set {spec.resource}"
            poller = arm.call(
                what,
                arm.client.virtual_machine_scale_sets.begin_create_or_update,
                arm.resource_group,
                spec.resource,
                body,
            )
            current = arm.call(what, poller.result, timeout=900)
    principal = current.identity.principal_id if current is not None and current.identity is not None else None
    identity.ensure(
        arm.auth,
        arm.subscription,
        spec.name,
        wanted,
        principal,
        apply=apply,
        say=say,
    )
    return result


def tagged_disks(arm: Arm, name: str) -> list[str]:
    """The run's managed disks: tagged for it, or named for its scale set's VMs (``spotsafe-NAME_...``)."""
    found = arm.call("list disks", arm.client.disks.list_by_resource_group, arm.resource_group) or []
    return [
        str(d.name) for d in found if (d.tags or {}).get(TAG) == name or str(d.name).startswith(f"spotsafe-{name}_")
    ]


def down(
    name: str, arm: Arm, *, apply: bool, delete_store: bool = False, on_step: Callable[[Step], None] = print
) -> tuple[Result, list[str]]:
    """Delete the role assignments, the scale set and (``delete_store``) the data disk; what is left."""
    result = Result(applied=apply)
    say = result.recorder(on_step)
    resource = f"spotsafe-{name}"
    current = _get(arm, resource)
    ours = current is not None and dict(current.tags or {}).get(TAG) == name
    blob_scope = dict(current.tags or {}).get(BLOB_SCOPE_TAG) if ours else None
    wanted = _assignments(arm, name, blob_scope)
    left = identity.remove(arm.auth, name, wanted, apply=apply, say=say)
    if ours:
        say("delete", "scale set", resource, "and its VM (OS disk, NIC, address with it)")
        if apply:
            poller = arm.call(
                f"delete scale set {resource}",
                arm.client.virtual_machine_scale_sets.begin_delete,
                arm.resource_group,
                resource,
            )
            if poller is not None:
                arm.call(f"delete scale set {resource}", poller.result, timeout=900)
    for disk in tagged_disks(arm, name):
        if not delete_store:
            say("keep", "disk", disk, "the run's checkpoints (--delete-store deletes it)")
            continue
        say("delete", "disk", disk, "")
        if apply:
            poller = arm.call(f"delete disk {disk}", arm.client.disks.begin_delete, arm.resource_group, disk)
            if poller is not None:
                arm.call(f"delete disk {disk}", poller.result, timeout=900)
    if apply:
        if _get(arm, resource) is not None:
            left.append(f"scale set {resource}")
        left += [f"disk {d}" for d in tagged_disks(arm, name) if delete_store]
    return result, left


@dataclass(kw_only=True)
class Status(StoreFacts):
    """The run's scale set (capacity), its VMs (name -> provisioning state), disks, and the store's progress."""

    scale_set: str | None = None
    capacity: int | None = None
    eviction: str | None = None
    vms: dict[str, str] = field(default_factory=dict)
    disks: list[str] = field(default_factory=list)


def status(name: str, arm: Arm, *, read_store: bool = False) -> Status:
    resource = f"spotsafe-{name}"
    current = _get(arm, resource)
    st = Status(disks=tagged_disks(arm, name))
    if current is not None and dict(current.tags or {}).get(TAG) == name:
        st.scale_set, st.capacity = resource, int(current.sku.capacity or 0)
        profile = current.properties.virtual_machine_profile if current.properties else None
        policy = profile.eviction_policy if profile is not None else None
        st.eviction = str(getattr(policy, "value", policy)) if policy is not None else None
        st.store = dict(current.tags or {}).get(STORE_TAG)
        vms = arm.call("list VMs", arm.client.virtual_machines.list, arm.resource_group) or []
        for vm in vms:
            owner = vm.properties.virtual_machine_scale_set if vm.properties else None
            if owner is not None and str(owner.id).lower() == str(current.id).lower():
                st.vms[str(vm.name)] = str(vm.properties.provisioning_state)
    if read_store:
        st.read_remote("az://", "data disk")
    return st


def format_status(name: str, st: Status, out: TextIO) -> None:
    group = f"scale set {st.scale_set}: capacity {st.capacity}, Spot, eviction {st.eviction}" if st.scale_set else None
    members = [f"VM {vm} {state}" for vm, state in sorted(st.vms.items())] + [f"disk {d}" for d in st.disks]
    missing = f"scale set spotsafe-{name}: none (not launched, or taken down)"
    format_group(out, f"run {name} (Azure)", group, st.capacity, missing, members, st)
