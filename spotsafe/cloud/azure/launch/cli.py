"""``spotsafe launch/status/down --cloud azure`` (the AWS commands' parsers carry these options)."""

from __future__ import annotations

import os
from typing import Any, TextIO

from spotsafe.cloud.azure.launch.up import MOUNT, Arm, AzureLaunchSpec, down, format_status, launch, status
from spotsafe.cloud.azure.prices import spot_prices
from spotsafe.cloud.plan import report_down, report_launch, run_options
from spotsafe.cloud.pricing import show_prices
from spotsafe.errors import LaunchConfigError


def add_azure_options(p: Any, *, launch: bool = False) -> None:
    """The Azure options of one of the commands (``--cloud`` itself comes with the GCP ones)."""
    p.add_argument("--subscription", help="Azure: the subscription id (default: AZURE_SUBSCRIPTION_ID)")
    p.add_argument("--resource-group", help="Azure: the resource group of the scale set")
    if launch:
        p.add_argument("--location", help="Azure: e.g. eastus")
        p.add_argument("--vm-size", help="Azure: e.g. Standard_NC4as_T4_v3")
        p.add_argument("--azure-image", help="Azure: publisher:offer:sku:version")
        p.add_argument("--subnet-id", help="Azure: the subnet's resource id")
        p.add_argument("--ssh-public-key", help="Azure: the admin user's public key (a file or the key)")
        p.add_argument(
            "--storage-account",
            help="Azure: the az:// store's storage account (a name in --resource-group, or a resource id)",
        )


def _arm(ns: Any) -> Arm:
    from azure.identity import DefaultAzureCredential
    from azure.mgmt.compute import ComputeManagementClient

    subscription = ns.subscription or os.environ.get("AZURE_SUBSCRIPTION_ID")
    if not subscription or not ns.resource_group:
        raise LaunchConfigError("--cloud azure needs --subscription (or AZURE_SUBSCRIPTION_ID) and --resource-group")
    from azure.mgmt.authorization import AuthorizationManagementClient

    credential = DefaultAzureCredential()
    # SPOTSAFE_AZURE_ARM_ENDPOINT (as for spotsafe.cloud.azure.finish): another Resource Manager.
    base = os.environ.get("SPOTSAFE_AZURE_ARM_ENDPOINT") or "https://management.azure.com"
    return Arm(
        ComputeManagementClient(credential, subscription, base_url=base),
        ns.resource_group,
        auth=AuthorizationManagementClient(credential, subscription, base_url=base),
        subscription=subscription,
    )


def run_azure(ns: Any, out: TextIO) -> int:
    """Run a parsed command with ``--cloud azure``; the exit status."""
    if ns.command == "price":
        return show_prices(spot_prices(ns.instance_types, ns.region), ns.instance_types, ns.region, out)
    arm = _arm(ns)
    if ns.command == "status":
        format_status(ns.name, status(ns.name, arm, read_store=True), out)
        return 0
    if ns.command == "down":
        result, left = down(
            ns.name, arm, apply=ns.yes, delete_store=ns.delete_store, on_step=lambda s: print(s, file=out)
        )
        return report_down(result, left, ns.yes, out)
    run = run_options(ns, MOUNT)
    if not all((ns.location, ns.vm_size, ns.azure_image, ns.subnet_id, ns.ssh_public_key, run["store"])):
        raise LaunchConfigError(
            "--cloud azure launch needs --location, --vm-size, --azure-image, --subnet-id, --ssh-public-key "
            "and --store az://CONTAINER/PREFIX (or --volume-size: a data disk)"
        )
    key = ns.ssh_public_key
    if os.path.isfile(key):
        with open(key, encoding="utf-8") as f:
            key = f.read().strip()
    spec = AzureLaunchSpec(
        **run,
        resource_group=arm.resource_group,
        location=ns.location,
        vm_size=ns.vm_size,
        image=ns.azure_image,
        subnet_id=ns.subnet_id,
        ssh_public_key=key,
        disk_size=ns.volume_size,
        storage_account=ns.storage_account,
    )
    result = launch(spec, arm, apply=ns.yes, on_step=lambda s: print(s, file=out))
    report_launch(result, ns.yes, out)
    return 0
