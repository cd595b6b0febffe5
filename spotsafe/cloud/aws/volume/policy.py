"""The IAM policy of an instance that runs the volume tool, conditioned to one run's tag.

Every statement that changes something names the resources of one run only: volumes,
snapshots, instances, Auto Scaling groups and spot requests carrying the tag
``KEY=VALUE`` (``spotsafe-run=NAME`` for ``spotsafe launch``). Tags are created only on
what the tool creates (``ec2:CreateAction``) or, on the run's volume, only spotsafe's
own tag keys (``aws:TagKeys``); the same for deleting them. Only the ``Describe*`` calls,
which IAM cannot scope to a resource, are on ``"*"``.

``python -m spotsafe.volume iam-policy --tag KEY=VALUE`` prints :func:`iam_policy`;
docs/volume.md shows it for ``spotsafe-run=mnist`` (:data:`IAM_POLICY`).
"""

from __future__ import annotations

from typing import Any

from spotsafe.cloud.aws.volume.model import (
    TAG_CLAIM,
    TAG_MOVE_DONE,
    TAG_MOVE_SNAPSHOT,
    TAG_MOVED_BY,
    TAG_MOVED_FROM,
    TAG_NEW,
)

__all__ = ["IAM_POLICY", "iam_policy"]

VOLUMES = "arn:aws:ec2:*:*:volume/*"
SNAPSHOTS = "arn:aws:ec2:*:*:snapshot/*"
INSTANCES = "arn:aws:ec2:*:*:instance/*"
SPOT_REQUESTS = "arn:aws:ec2:*:*:spot-instances-request/*"
#: Tag keys the tool adds to a run's existing volume (a move's claim; a move's commit mark).
ADDED_KEYS = (TAG_CLAIM, TAG_MOVE_DONE)
#: Tag keys the tool removes from a run's volume (the format permission; a move's marks).
REMOVED_KEYS = (TAG_NEW, TAG_CLAIM, TAG_MOVED_FROM, TAG_MOVE_SNAPSHOT, TAG_MOVED_BY, TAG_MOVE_DONE)


def group_arn(group: str | None) -> str:
    """The ARN pattern of the Auto Scaling group named ``group`` (any group: ``None``)."""
    return f"arn:aws:autoscaling:*:*:autoScalingGroup:*:autoScalingGroupName/{group or '*'}"


def iam_policy(
    tag: str = "spotsafe-run=mnist",
    *,
    move: bool = True,
    snapshots: bool = True,
    finish: bool = True,
    spot_requests: bool = True,
    group: str | None = None,
) -> dict[str, Any]:
    """The least policy for the volume tool on the run tagged ``tag`` (``KEY=VALUE``).

    ``move``: zone moves (snapshot-copy of the run's volume into another zone);
    ``snapshots``: periodic snapshots and create-or-restore; ``finish``: scale the
    instance's group (named ``group``, any group tagged with the run's tag by default)
    to zero, and with ``spot_requests`` cancel its persistent spot request.
    """
    key, sep, value = tag.partition("=")
    if not sep or not key or not value:
        raise ValueError(f"tag {tag!r}: give KEY=VALUE, e.g. spotsafe-run=mnist")
    own = {"StringEquals": {f"aws:ResourceTag/{key}": value}}
    statements: list[dict[str, Any]] = [
        {
            "Sid": "SpotsafeDescribe",
            "Effect": "Allow",
            "Action": _describe_actions(move or snapshots, finish),
            "Resource": "*",  # Describe* calls have no resource-level permissions
        },
        {
            "Sid": "SpotsafeAttachRunVolume",
            "Effect": "Allow",
            "Action": ["ec2:AttachVolume", "ec2:DetachVolume"],
            "Resource": [VOLUMES, INSTANCES],
            "Condition": own,
        },
        {
            "Sid": "SpotsafeUntagRunVolume",
            "Effect": "Allow",
            "Action": "ec2:DeleteTags",
            "Resource": VOLUMES,
            "Condition": {
                **own,
                "ForAllValues:StringEquals": {"aws:TagKeys": list(REMOVED_KEYS if move else REMOVED_KEYS[:2])},
                # DeleteTags without keys deletes every tag (the run's own included): never allowed.
                "Null": {"aws:TagKeys": "false"},
            },
        },
    ]
    if move:
        statements.append(
            {
                "Sid": "SpotsafeTagRunVolume",
                "Effect": "Allow",
                "Action": "ec2:CreateTags",
                "Resource": VOLUMES,
                "Condition": {
                    **own,
                    "ForAllValues:StringEquals": {"aws:TagKeys": list(ADDED_KEYS)},
                    "Null": {"aws:TagKeys": "false"},
                },
            }
        )
    if move or snapshots:
        statements += _copy_statements(key, value, own)
    if finish:
        statements.append(
            {
                "Sid": "SpotsafeScaleRunGroupToZero",
                "Effect": "Allow",
                "Action": "autoscaling:UpdateAutoScalingGroup",
                "Resource": group_arn(group),
                "Condition": {
                    "StringEquals": {f"autoscaling:ResourceTag/{key}": value},
                    # Only lowering: MinSize 0, MaxSize untouched (AWS has no key for DesiredCapacity).
                    "NumericEquals": {"autoscaling:MinSize": "0"},
                    "Null": {"autoscaling:MaxSize": "true"},
                },
            }
        )
        if spot_requests:
            statements.append(
                {
                    "Sid": "SpotsafeCancelRunSpotRequest",
                    "Effect": "Allow",
                    "Action": "ec2:CancelSpotInstanceRequests",
                    "Resource": SPOT_REQUESTS,
                    "Condition": own,
                }
            )
    return {"Version": "2012-10-17", "Statement": statements}


def _describe_actions(copies: bool, finish: bool) -> list[str]:
    actions = ["ec2:DescribeVolumes", "ec2:DescribeInstances"]
    if copies:
        actions.append("ec2:DescribeSnapshots")
    if finish:  # finish looks for both a group and a spot request
        actions += ["autoscaling:DescribeAutoScalingInstances", "ec2:DescribeSpotInstanceRequests"]
    return actions


def _copy_statements(key: str, value: str, own: dict[str, Any]) -> list[dict[str, Any]]:
    """Snapshots of the run's volume and volumes from the run's snapshots, each tagged as the run's."""
    request_tag = {"StringEquals": {f"aws:RequestTag/{key}": value}}
    return [
        {
            # The sources: the run's volume (CreateSnapshot), the run's snapshot (CreateVolume);
            # and deleting what a move or retention leaves behind of the run.
            "Sid": "SpotsafeCopyAndDeleteRunVolumes",
            "Effect": "Allow",
            "Action": ["ec2:CreateSnapshot", "ec2:CreateVolume", "ec2:DeleteSnapshot", "ec2:DeleteVolume"],
            "Resource": [VOLUMES, SNAPSHOTS],
            "Condition": own,
        },
        {
            "Sid": "SpotsafeNewRunSnapshot",
            "Effect": "Allow",
            "Action": "ec2:CreateSnapshot",
            "Resource": SNAPSHOTS,
            "Condition": request_tag,
        },
        {
            "Sid": "SpotsafeNewRunVolume",
            "Effect": "Allow",
            "Action": "ec2:CreateVolume",
            "Resource": VOLUMES,
            "Condition": request_tag,
        },
        {
            "Sid": "SpotsafeTagOnCreate",
            "Effect": "Allow",
            "Action": "ec2:CreateTags",
            "Resource": [VOLUMES, SNAPSHOTS],
            "Condition": {"StringEquals": {"ec2:CreateAction": ["CreateVolume", "CreateSnapshot"]}},
        },
    ]


#: The policy for the run tagged ``spotsafe-run=mnist`` with every feature (docs/volume.md prints it).
IAM_POLICY: dict[str, Any] = iam_policy()
