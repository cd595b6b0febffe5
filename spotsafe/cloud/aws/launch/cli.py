"""The ``launch``, ``status``, ``down`` and ``price`` commands of ``spotsafe`` (spotsafe/cli/main.py adds them)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TextIO

from spotsafe.cloud.aws.clients import TAG, Clients
from spotsafe.cloud.aws.launch.down import down
from spotsafe.cloud.aws.launch.spec import MOUNT, LaunchSpec
from spotsafe.cloud.aws.launch.status import format_status, status
from spotsafe.cloud.aws.launch.up import launch
from spotsafe.cloud.aws.launch.userdata import resolve_ref, user_data
from spotsafe.cloud.aws.prices import spot_prices
from spotsafe.cloud.azure.launch.cli import add_azure_options, run_azure
from spotsafe.cloud.gcp.launch.cli import add_cloud_options, run_gcp
from spotsafe.cloud.plan import Step
from spotsafe.cloud.pricing import print_table
from spotsafe.errors import LaunchConfigError, SpotsafeError


def _types(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def add_parsers(sub: Any) -> None:
    """Add ``launch``, ``status``, ``down`` and ``price`` to the ``spotsafe`` command's subparsers."""
    p = sub.add_parser("launch", help="create a self-replacing spot trainer on AWS (plan only without --yes)")
    p.add_argument("name", help="the run's name: every resource is tagged spotsafe-run=NAME")
    p.add_argument("--store", help=f"s3://BUCKET/PREFIX, or with --volume-size a directory under {MOUNT}")
    p.add_argument("--instance-types", type=_types, metavar="T1,T2", help="AWS: e.g. g5.xlarge,g6.xlarge (required)")
    p.add_argument("--image-id", help="AWS: the AMI (with a GPU driver and python3; required)")
    p.add_argument(
        "--command",
        dest="train_command",
        metavar="CMD",
        required=True,
        help='the training command, e.g. "python train.py"',
    )
    p.add_argument(
        "--secret",
        dest="secrets",
        action="append",
        default=[],
        metavar="NAME=ssm:/path",
        help="an environment variable of the training process read on the instance from SSM Parameter Store "
        "(or NAME=secretsmanager:ID), never put in the user data; repeatable",
    )
    p.add_argument("--subnets", type=_types, default=(), help="comma-separated subnet ids (default: the default VPC's)")
    p.add_argument("--repo", help="git URL of the training code (cloned on the instance)")
    p.add_argument("--ref", help="branch, tag or commit; pinned to its commit at launch (default: HEAD)")
    p.add_argument("--volume-size", type=int, help="GiB: keep the store on a persistent EBS volume (volume mode)")
    p.add_argument("--mount", default=MOUNT, help=f"volume mode: where the instance mounts it (default {MOUNT})")
    p.add_argument("--region", help="AWS region (default: the configured one)")
    p.add_argument("--security-groups", type=_types, default=(), help="comma-separated security group ids")
    p.add_argument("--key-name", help="an EC2 key pair, for SSH to the instances")
    p.add_argument("--user", help="the training user on the image (default: the boot script's)")
    p.add_argument("--pip-spec", help="how the instance installs spotsafe: git+https://...@COMMIT or a wheel URL")
    p.add_argument("--pip-sha256", help="the sha256 of the wheel --pip-spec names (SPOTSAFE_PIP_SHA256)")
    p.add_argument("--python", help="a python on the image that has spotsafe (SPOTSAFE_PYTHON)")
    p.add_argument("--requirements", help="a requirements file in the checkout, installed on boot")
    p.add_argument("--keep-running-when-done", action="store_true", help="do not scale to zero when the run completes")
    p.add_argument("--yes", action="store_true", help="make the changes (without it: print the plan only)")
    p.add_argument(
        "--print-user-data",
        action="store_true",
        help="print the user data this run's launch template gets (for Terraform and the like), change nothing",
    )
    add_cloud_options(p, launch=True)
    add_azure_options(p, launch=True)
    p = sub.add_parser("status", help="a launched run: its instance, newest checkpoint, interruptions and cost")
    add_cloud_options(p)
    add_azure_options(p)
    p.add_argument("name")
    p.add_argument("--region")
    p.add_argument("--on-demand-price", type=float, help="USD per hour on demand, to compare the spot cost with")
    p = sub.add_parser("down", help="delete what launch created and list anything still tagged (plan without --yes)")
    add_cloud_options(p)
    add_azure_options(p)
    p.add_argument("name")
    p.add_argument("--region")
    p.add_argument("--yes", action="store_true", help="make the changes (without it: print the plan only)")
    p.add_argument("--delete-store", action="store_true", help="delete the checkpoints too (the volume or S3 prefix)")
    p.add_argument("--store", help="the store, when no launch template or group names it any more")
    p = sub.add_parser("price", help="spot price per zone now, cheapest first")
    add_cloud_options(p)
    add_azure_options(p)
    p.add_argument("--instance-types", required=True, type=_types, help="EC2 types, GCP machine types or Azure sizes")
    p.add_argument("--region", help="AWS / GCP region or Azure location (GCP, Azure: default every one)")
    p.add_argument("--api-key", help="GCP: a Cloud Billing Catalog API key (default: SPOTSAFE_GCP_API_KEY, then ADC)")


COMMANDS = ("launch", "status", "down", "price")


def run_command(ns: Any, out: TextIO | None = None, *, session: Any | None = None) -> int:
    """Run a parsed ``launch``/``status``/``down``/``price`` command; the exit status."""
    try:
        return _run_command(ns, out or sys.stdout, session)
    except SpotsafeError as e:
        print(f"spotsafe {ns.command}: {e}", file=sys.stderr)
        return 2


def _run_command(ns: Any, out: TextIO, session: Any | None) -> int:
    if getattr(ns, "cloud", "aws") == "gcp":
        return run_gcp(ns, out)
    if getattr(ns, "cloud", "aws") == "azure":
        return run_azure(ns, out)
    aws = Clients(ns.region, session=session)
    if ns.command == "price":
        return _price(ns, aws, out)
    if ns.command == "status":
        format_status(status(ns.name, aws, on_demand_price=ns.on_demand_price), out)
        return 0
    if ns.command == "down":
        return _down(ns, aws, out)
    return _launch(ns, aws, out)


def _say(out: TextIO) -> Callable[[Step], None]:
    def say(step: Step) -> None:
        print(step, file=out, flush=True)

    return say


def _price(ns: Any, aws: Clients, out: TextIO) -> int:
    prices = spot_prices(aws.ec2, ns.instance_types)
    if not prices:
        print(f"no spot price for {','.join(ns.instance_types)} in {aws.region}", file=out)
        return 1
    rows = [["ZONE", "TYPE", "USD/H", "SINCE"]]
    rows += [[p.zone, p.instance_type, f"{p.price:.4f}", p.time.strftime("%Y-%m-%d %H:%M")] for p in prices]
    print_table(rows, out)
    return 0


def _down(ns: Any, aws: Clients, out: TextIO) -> int:
    d = down(ns.name, aws, apply=ns.yes, delete_store=ns.delete_store, store=ns.store, on_step=_say(out))
    if not ns.yes:
        print("plan only: rerun with --yes to delete" if d.changes_planned else "nothing to delete", file=out)
        return 0
    for t in d.kept:
        print(f"kept    {t}", file=out)
    if d.left:
        print(f"still tagged {TAG}={ns.name}:", file=out)
        for t in d.left:
            print(f"  {t}", file=out)
        return 1
    print(f"nothing tagged {TAG}={ns.name} is left" + (" but the kept store" if d.kept else ""), file=out)
    return 0


def _spec(ns: Any) -> LaunchSpec:
    """The run ``spotsafe launch`` is asked for (not validated yet)."""
    store = ns.store
    if store is None and ns.volume_size is not None:
        store = f"{ns.mount.rstrip('/')}/{ns.name}"
    if store is None:
        raise LaunchConfigError("--store: give s3://BUCKET/PREFIX (or --volume-size for a store on an EBS volume)")
    for option, value in (("--instance-types", ns.instance_types), ("--image-id", ns.image_id)):
        if not value:
            raise LaunchConfigError(f"{option} is required on AWS")
    return LaunchSpec(
        name=ns.name,
        store=store,
        instance_types=ns.instance_types,
        image_id=ns.image_id,
        command=ns.train_command,
        subnets=ns.subnets,
        repo=ns.repo,
        ref=ns.ref,
        volume_size=ns.volume_size,
        region=ns.region,
        security_groups=ns.security_groups,
        key_name=ns.key_name,
        user=ns.user,
        pip_spec=ns.pip_spec,
        pip_sha256=ns.pip_sha256,
        python=ns.python,
        requirements=ns.requirements,
        shutdown_when_done=not ns.keep_running_when_done,
        mount=ns.mount,
        secrets=tuple(ns.secrets),
    )


def _launch(ns: Any, aws: Clients, out: TextIO) -> int:
    spec = _spec(ns)
    if ns.print_user_data:
        spec.validate()
        ref = resolve_ref(spec.repo, spec.ref) if spec.repo else None
        out.write(user_data(spec, region=aws.region, volume_id=None, ref=ref))
        return 0
    result = launch(spec, aws, apply=ns.yes, on_step=_say(out))
    if not ns.yes:
        print("plan only: rerun with --yes to make these changes" if result.changes else "nothing to change", file=out)
    elif result.changes:
        print(f"launched: spotsafe status {spec.name} --region {aws.region}; spotsafe down {spec.name} --yes", file=out)
    else:
        print("nothing changed: everything was already there", file=out)
    return 0
