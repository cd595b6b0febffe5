"""A run's resources as AWS has them now: found by name or by the run's tag.

``launch`` (:mod:`spotsafe.cloud.aws.launch.up`), ``down`` and ``status`` all look
here first; nothing in this module changes anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from spotsafe.cloud.aws.clients import TAG, TAG_STORE, Clients, aws_call, error_code, is_ours
from spotsafe.cloud.aws.launch.spec import PREFIX
from spotsafe.errors import LaunchError


def run_volumes(ec2: Any, name: str) -> list[dict[str, Any]]:
    """The volumes tagged ``spotsafe-run=NAME`` that are not being deleted."""
    r = aws_call(
        "DescribeVolumes",
        ec2.describe_volumes,
        Filters=[{"Name": f"tag:{TAG}", "Values": [name]}],
    )
    return [v for v in r.get("Volumes", []) if v.get("State") not in ("deleting", "deleted")]


def _ec2_exists(ec2: Any, kind: str, resource_id: str) -> bool:
    """False for a volume, snapshot or launch template that is gone (or going); True otherwise."""
    if kind == "launch-template":
        return find_template(ec2, "", resource_id) is not None
    call = {
        "volume": ("describe_volumes", "VolumeIds", "Volumes"),
        "snapshot": ("describe_snapshots", "SnapshotIds", "Snapshots"),
    }
    if kind not in call:
        return True
    method, key, field_ = call[kind]
    try:
        found = getattr(ec2, method)(**{key: [resource_id]}).get(field_, [])
    except Exception as e:
        if "NotFound" in error_code(e):
            return False
        raise LaunchError(f"{method} {resource_id}: {e}") from e
    return any(f.get("State") not in ("deleting", "deleted") for f in found)


def find_template(ec2: Any, name: str, template_id: str | None = None) -> dict[str, Any] | None:
    """The launch template of that name (or id); None when there is none."""
    try:
        if template_id:
            r = ec2.describe_launch_templates(LaunchTemplateIds=[template_id])
        else:
            r = ec2.describe_launch_templates(LaunchTemplateNames=[name])
    except Exception as e:
        if "NotFound" in error_code(e):
            return None
        raise LaunchError(f"DescribeLaunchTemplates {name}: {e}") from e
    found = r.get("LaunchTemplates", [])
    return found[0] if found else None


def find_group(asg: Any, name: str) -> dict[str, Any] | None:
    """The Auto Scaling group of that name unless it is being deleted; None when there is none."""
    r = aws_call(f"DescribeAutoScalingGroups {name}", asg.describe_auto_scaling_groups, AutoScalingGroupNames=[name])
    groups = [g for g in r.get("AutoScalingGroups", []) if g.get("Status") != "Delete in progress"]
    return groups[0] if groups else None


@dataclass(frozen=True)
class Tagged:
    """A resource that still carries ``spotsafe-run=NAME``."""

    kind: str
    resource_id: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind} {self.resource_id}" + (f" ({self.detail})" if self.detail else "")


def tagged_resources(aws: Clients, name: str) -> list[Tagged]:
    """Everything in the region (and IAM) still tagged ``spotsafe-run=NAME``; terminated instances excepted."""
    out: list[Tagged] = []
    ec2 = aws.ec2
    r = aws_call(
        "DescribeTags",
        ec2.describe_tags,
        Filters=[{"Name": "key", "Values": [TAG]}, {"Name": "value", "Values": [name]}],
    )
    instances = sorted({t["ResourceId"] for t in r.get("Tags", []) if t["ResourceType"] == "instance"})
    live: set[str] = set()
    states: dict[str, str] = {}
    if instances:
        for res in aws_call("DescribeInstances", ec2.describe_instances, InstanceIds=instances).get("Reservations", []):
            for i in res["Instances"]:
                states[i["InstanceId"]] = i["State"]["Name"]
                if i["State"]["Name"] != "terminated":
                    live.add(i["InstanceId"])
    for t in sorted(r.get("Tags", []), key=lambda t: (t["ResourceType"], t["ResourceId"])):
        if t["ResourceType"] == "instance" and t["ResourceId"] not in live:
            continue
        # A deleted resource's tags can outlive it in DescribeTags (moto does): ask the resource.
        if not _ec2_exists(ec2, str(t["ResourceType"]), str(t["ResourceId"])):
            continue
        detail = states.get(t["ResourceId"], "")
        out.append(Tagged(str(t["ResourceType"]), str(t["ResourceId"]), detail))
    asg = aws.autoscaling
    r = aws_call(
        "DescribeTags (auto scaling)",
        asg.describe_tags,
        Filters=[{"Name": "key", "Values": [TAG]}, {"Name": "value", "Values": [name]}],
    )
    for t in r.get("Tags", []):
        out.append(Tagged("auto-scaling-group", str(t["ResourceId"])))
    iam = aws.iam
    res = PREFIX + name
    for kind, getter, key, tag_key in (
        ("iam-role", iam.get_role, "RoleName", "Role"),
        ("instance-profile", iam.get_instance_profile, "InstanceProfileName", "InstanceProfile"),
    ):
        try:
            got = getter(**{key: res})[tag_key]
        except Exception as e:
            if error_code(e) != "NoSuchEntity":
                raise LaunchError(f"{kind} {res}: {e}") from e
            continue
        if is_ours(got.get("Tags", []), name):
            out.append(Tagged(kind, res))
    return out


def run_store(aws: Clients, name: str) -> str | None:
    """The run's store, from the tag launch put on its launch template or group."""
    res = PREFIX + name
    r = aws_call(
        "DescribeTags (auto scaling)",
        aws.autoscaling.describe_tags,
        Filters=[{"Name": "auto-scaling-group", "Values": [res]}, {"Name": "key", "Values": [TAG_STORE]}],
    )
    for t in r.get("Tags", []):
        return str(t["Value"])
    lt = find_template(aws.ec2, res)
    for t in (lt or {}).get("Tags", []):
        if t["Key"] == TAG_STORE:
            return str(t["Value"])
    return None
