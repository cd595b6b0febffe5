"""``spotsafe launch/status/down/price --cloud gcp`` (the AWS commands' parsers carry these options)."""

from __future__ import annotations

import os
from typing import Any, TextIO

from spotsafe.cloud.gcp.launch.spec import MOUNT, GcpLaunchSpec
from spotsafe.cloud.gcp.launch.up import Compute, down, format_status, launch, status
from spotsafe.cloud.gcp.prices import spot_prices
from spotsafe.cloud.plan import report_down, report_launch, run_options
from spotsafe.cloud.pricing import show_prices
from spotsafe.errors import LaunchConfigError


def add_cloud_options(p: Any, *, launch: bool = False) -> None:
    """``--cloud`` and the GCP options of one of the four commands (the Azure ones: spotsafe.cloud.azure.launch.cli)."""
    p.add_argument("--cloud", choices=("aws", "gcp", "azure"), default="aws", help="where the run is (default aws)")
    p.add_argument("--project", help="GCP: the project (default: gcloud's / the environment's)")
    p.add_argument("--zone", help="GCP: the zone of the group and its disk, e.g. us-central1-a")
    if launch:
        p.add_argument("--machine-type", help="GCP: e.g. g2-standard-4 (one L4)")
        p.add_argument("--image", help="GCP: the boot image, e.g. projects/P/global/images/family/F")
        p.add_argument(
            "--service-account",
            help="GCP: the VM's service account email (default: launch creates spotsafe-NAME with only what the VM needs)",
        )


def _compute(ns: Any) -> Compute:
    import google.auth

    credentials, default_project = google.auth.default()
    project = ns.project or default_project
    if not project or not ns.zone:
        raise LaunchConfigError("--cloud gcp needs --project (or a default project) and --zone")
    # SPOTSAFE_GCP_COMPUTE_ENDPOINT (as for spotsafe.cloud.gcp.finish): one base for Compute, IAM,
    # Resource Manager and Storage (a private endpoint; a test's local server).
    return Compute(project, ns.zone, credentials=credentials, endpoint=os.environ.get("SPOTSAFE_GCP_COMPUTE_ENDPOINT"))


def run_gcp(ns: Any, out: TextIO) -> int:
    """Run a parsed command with ``--cloud gcp``; the exit status."""
    if ns.command == "price":
        return show_prices(
            spot_prices(ns.instance_types, ns.region, api_key=ns.api_key), ns.instance_types, ns.region, out
        )
    gce = _compute(ns)
    if ns.command == "status":
        format_status(ns.name, status(ns.name, gce, read_store=True), out)
        return 0
    if ns.command == "down":
        result, left = down(
            ns.name,
            gce,
            apply=ns.yes,
            delete_store=ns.delete_store,
            store=ns.store,
            on_step=lambda s: print(s, file=out),
        )
        return report_down(result, left, ns.yes, out)
    run = run_options(ns, MOUNT)
    if run["store"] is None or not ns.machine_type or not ns.image:
        raise LaunchConfigError(
            "--cloud gcp launch needs --machine-type, --image and --store gs://... (or --volume-size)"
        )
    spec = GcpLaunchSpec(
        **run,
        project=gce.project,
        zone=gce.zone,
        machine_type=ns.machine_type,
        image=ns.image,
        service_account=ns.service_account,
        disk_size=ns.volume_size,
    )
    result = launch(spec, gce, apply=ns.yes, on_step=lambda s: print(s, file=out))
    report_launch(result, ns.yes, out)
    return 0
