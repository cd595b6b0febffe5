"""``python -m spotsafe.cloud.azure.finish``: a completed run stops its scale set recreating it.

Run on the VM by the boot script (``userdata/spot-boot.sh``) when the run in the store is complete:
it reads from the instance metadata service (IMDS) the subscription, resource group and
scale set of this VM, and sets the scale set's capacity to 0 through Azure Resource
Manager (``VirtualMachineScaleSets.Update``: ``PATCH`` of ``sku.capacity``) with a token of
the VM's managed identity (azure-identity's ``ManagedIdentityCredential``). The scale set
then deletes this VM; a managed data disk of the run is a separate resource and stays.

IMDS is ``SPOTSAFE_AZURE_METADATA_ENDPOINT`` (default ``http://169.254.169.254``; the
identity's tokens come from ``AZURE_POD_IDENTITY_AUTHORITY_HOST`` when set, else IMDS);
``AZURE_CLIENT_ID`` picks a user-assigned identity; ``SPOTSAFE_AZURE_ARM_ENDPOINT`` points the
client at another Resource Manager (a sovereign cloud, a test's local server). The
identity needs ``Microsoft.Compute/virtualMachineScaleSets/write`` (and ``/read``) on the
scale set only (``spotsafe launch --cloud azure`` assigns such a role).
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

from spotsafe.cloud.finishing import finish_main
from spotsafe.errors import LaunchError

__all__ = ["ScaleSet", "finish", "main", "scale_set"]

_IMDS_API_VERSION = "2021-02-01"


@dataclass(frozen=True)
class ScaleSet:
    """The Virtual Machine Scale Set this VM belongs to."""

    subscription_id: str
    resource_group: str
    name: str


def scale_set(*, timeout: float = 5.0) -> ScaleSet:
    """This VM's scale set, from IMDS ``/metadata/instance/compute``."""
    endpoint = (os.environ.get("SPOTSAFE_AZURE_METADATA_ENDPOINT") or "http://169.254.169.254").rstrip("/")
    request = urllib.request.Request(
        f"{endpoint}/metadata/instance/compute?api-version={_IMDS_API_VERSION}&format=json",
        headers={"Metadata": "true"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # IMDS never goes through a proxy
    try:
        with opener.open(request, timeout=timeout) as response:
            compute = json.loads(response.read())
    except (OSError, ValueError) as e:
        raise LaunchError(f"cannot read this VM's metadata from {endpoint} ({e}): is this an Azure VM?") from e
    name = str(compute.get("vmScaleSetName") or "")
    if not name:
        raise LaunchError(
            f"the VM {compute.get('name')!r} is in no scale set (IMDS vmScaleSetName is empty): "
            "nothing to scale to 0 (delete the VM yourself)"
        )
    return ScaleSet(str(compute["subscriptionId"]), str(compute["resourceGroupName"]), name)


def finish(target: ScaleSet | None = None) -> ScaleSet:
    """Set this VM's scale set capacity to 0 (the request only: the scale set deletes this VM)."""
    from azure.identity import ManagedIdentityCredential
    from azure.mgmt.compute import ComputeManagementClient
    from azure.mgmt.compute.models import Sku, VirtualMachineScaleSetUpdate

    target = target or scale_set()
    client_id = os.environ.get("AZURE_CLIENT_ID") or None
    credential = ManagedIdentityCredential(client_id=client_id) if client_id else ManagedIdentityCredential()
    endpoint = os.environ.get("SPOTSAFE_AZURE_ARM_ENDPOINT") or "https://management.azure.com"
    client = ComputeManagementClient(credential, target.subscription_id, base_url=endpoint)
    try:
        # The request is accepted (200/202) before the VM goes: not waiting for the operation,
        # whose end this VM does not see.
        client.virtual_machine_scale_sets.begin_update(
            target.resource_group, target.name, VirtualMachineScaleSetUpdate(sku=Sku(capacity=0))
        )
    except Exception as e:
        raise LaunchError(f"could not scale {target.name} in {target.resource_group} to 0: {e}") from e
    finally:
        client.close()
        credential.close()
    return target


def main(argv: Sequence[str] | None = None) -> int:
    return finish_main(
        "python -m spotsafe.cloud.azure.finish",
        "Set this VM's scale set capacity to 0 (a completed run is not recreated).",
        finish,
        lambda t: f"scale set {t.name} ({t.resource_group}) set to capacity 0",
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
