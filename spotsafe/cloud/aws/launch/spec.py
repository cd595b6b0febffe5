"""What ``spotsafe launch`` is asked for, and the IAM policies that follow from it.

:class:`LaunchSpec` is the run's description (validated before anything is asked of
AWS); :func:`instance_policy` is the least policy its instances need, and
:data:`OPERATOR_POLICY` what the person running ``launch``, ``status``, ``down`` and
``price`` needs (both are printed in docs/launch.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from spotsafe.cloud.aws.clients import TAG
from spotsafe.cloud.aws.secrets import SecretRef, parse_refs
from spotsafe.cloud.aws.volume.policy import iam_policy as volume_iam_policy
from spotsafe.errors import LaunchConfigError

#: On a volume launch creates: the first boot may format it (the volume tool clears it).
TAG_NEW = "spotsafe-new"
#: Prefix of the role, instance profile, launch template and group names.
PREFIX = "spotsafe-"
#: The role's one inline policy.
POLICY_NAME = "spotsafe-run"
#: Where the volume is mounted on the instance (the boot script's default).
MOUNT = "/mnt/spotsafe"

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,47}")
#: Who may assume the run's role: EC2, for the run's instances.
EC2_TRUST = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}],
}

#: What the person running ``launch``, ``status``, ``down`` and ``price`` needs.
#: tests/test_launch.py records every API call those commands make and checks each is here.
OPERATOR_POLICY: dict[str, Any] = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Sid": "SpotsafeLaunchEC2",
            "Effect": "Allow",
            "Action": [
                "ec2:DescribeSubnets",
                "ec2:DescribeSpotPriceHistory",
                "ec2:DescribeInstances",
                "ec2:DescribeVolumes",
                "ec2:DescribeTags",
                "ec2:DescribeSnapshots",
                "ec2:DescribeLaunchTemplates",
                "ec2:DescribeLaunchTemplateVersions",
                "ec2:CreateLaunchTemplate",
                "ec2:CreateLaunchTemplateVersion",
                "ec2:ModifyLaunchTemplate",
                "ec2:DeleteLaunchTemplate",
                "ec2:CreateVolume",
                "ec2:DeleteVolume",
                "ec2:CreateTags",
                "ec2:RunInstances",
            ],
            "Resource": "*",
        },
        {
            "Sid": "SpotsafeLaunchGroup",
            "Effect": "Allow",
            "Action": [
                "autoscaling:DescribeAutoScalingGroups",
                "autoscaling:DescribeTags",
                "autoscaling:CreateAutoScalingGroup",
                "autoscaling:UpdateAutoScalingGroup",
                "autoscaling:DeleteAutoScalingGroup",
                "autoscaling:CreateOrUpdateTags",
            ],
            "Resource": "*",
        },
        {
            "Sid": "SpotsafeLaunchRole",
            "Effect": "Allow",
            "Action": [
                "iam:GetRole",
                "iam:CreateRole",
                "iam:DeleteRole",
                "iam:TagRole",
                "iam:GetRolePolicy",
                "iam:PutRolePolicy",
                "iam:DeleteRolePolicy",
                "iam:ListRolePolicies",
                "iam:ListAttachedRolePolicies",
                "iam:PassRole",
            ],
            "Resource": "arn:aws:iam::*:role/spotsafe-*",
        },
        {
            "Sid": "SpotsafeLaunchInstanceProfile",
            "Effect": "Allow",
            "Action": [
                "iam:GetInstanceProfile",
                "iam:CreateInstanceProfile",
                "iam:DeleteInstanceProfile",
                "iam:TagInstanceProfile",
                "iam:AddRoleToInstanceProfile",
                "iam:RemoveRoleFromInstanceProfile",
            ],
            "Resource": "arn:aws:iam::*:instance-profile/spotsafe-*",
        },
        {
            "Sid": "SpotsafeAutoScalingServiceRole",
            "Effect": "Allow",
            "Action": "iam:CreateServiceLinkedRole",
            "Resource": "arn:aws:iam::*:role/aws-service-role/autoscaling.amazonaws.com/*",
            "Condition": {"StringLike": {"iam:AWSServiceName": "autoscaling.amazonaws.com"}},
        },
        {
            "Sid": "SpotsafeStoreStatusAndDelete",
            "Effect": "Allow",
            "Action": ["s3:ListBucket", "s3:GetObject", "s3:DeleteObject"],
            "Resource": ["arn:aws:s3:::*"],
        },
    ],
}


# --------------------------------------------------------------------------- the run's description
@dataclass(frozen=True)
class LaunchSpec:
    """What ``spotsafe launch`` is asked for (validated by :meth:`validate`)."""

    name: str
    store: str
    instance_types: tuple[str, ...]
    image_id: str
    command: str
    subnets: tuple[str, ...] = ()
    repo: str | None = None
    ref: str | None = None
    #: GiB: volume mode (the store on a persistent EBS volume) when set.
    volume_size: int | None = None
    region: str | None = None
    security_groups: tuple[str, ...] = ()
    #: An EC2 key pair for SSH (none: no key on the instances).
    key_name: str | None = None
    #: The training user on the image (owns the mount, runs training); None: the boot script's default.
    user: str | None = None
    #: How the instance installs spotsafe (SPOTSAFE_PIP_SPEC); None: the boot script's default.
    pip_spec: str | None = None
    #: The sha256 of the wheel ``pip_spec`` names (SPOTSAFE_PIP_SHA256).
    pip_sha256: str | None = None
    #: A python on the image that has spotsafe (SPOTSAFE_PYTHON); None: a venv.
    python: str | None = None
    #: A requirements file in the checkout, pip-installed on boot.
    requirements: str | None = None
    #: Scale the group to zero and shut down once the run is complete.
    shutdown_when_done: bool = True
    #: Volume mode: where the instance mounts the volume (the store is a directory under it).
    mount: str = MOUNT
    #: ``NAME=ssm:/path`` / ``NAME=secretsmanager:ID``: read on the instance into the training environment.
    secrets: tuple[str, ...] = ()

    @property
    def secret_refs(self) -> list[SecretRef]:
        return parse_refs(" ".join(self.secrets))

    @property
    def volume_mode(self) -> bool:
        return self.volume_size is not None

    @property
    def resource_name(self) -> str:
        """The name of the role, instance profile, launch template and group."""
        return PREFIX + self.name

    def validate(self) -> None:
        """Raise :class:`LaunchConfigError` naming the first bad input."""
        check_name(self.name)
        if not self.instance_types or any(not t or "," in t for t in self.instance_types):
            raise LaunchConfigError(
                f"--instance-types: give one or more types, e.g. g5.xlarge,g6.xlarge (got {self.instance_types!r})"
            )
        if len(self.instance_types) > 40:
            raise LaunchConfigError(
                f"--instance-types: {len(self.instance_types)} types; an Auto Scaling group takes 40"
            )
        if len(self.store) > 256:
            raise LaunchConfigError(f"--store: {len(self.store)} characters; a tag (where launch keeps it) takes 256")
        if not re.fullmatch(r"ami-[0-9a-f]+", self.image_id):
            raise LaunchConfigError(f"--image-id: {self.image_id!r} is not an AMI id (ami-...)")
        if not self.command.strip():
            raise LaunchConfigError("--command: the training command is empty")
        if self.ref and not self.repo:
            raise LaunchConfigError("--ref needs --repo (the git URL whose revision to run)")
        if self.volume_size is not None:
            if not 1 <= self.volume_size <= 16384:
                raise LaunchConfigError(f"--volume-size: {self.volume_size} GiB is outside EBS's 1..16384")
            if not self.mount.startswith("/") or not self.store.startswith(self.mount.rstrip("/") + "/"):
                raise LaunchConfigError(
                    f"--store {self.store!r}: in volume mode (--volume-size) the store is a directory on the "
                    f"volume, under {self.mount} (e.g. {self.mount}/{self.name})"
                )
        else:
            s3_location(self.store)
        for sg in self.security_groups:
            if not sg.startswith("sg-"):
                raise LaunchConfigError(f"--security-groups: {sg!r} is not a security group id (sg-...)")
        for sub in self.subnets:
            if not sub.startswith("subnet-"):
                raise LaunchConfigError(f"--subnets: {sub!r} is not a subnet id (subnet-...)")
        self.secret_refs  # noqa: B018 - parsed to refuse a bad --secret now
        check_no_credentials(self.repo, self.command)
        for key, value in self._settings_values():
            # The boot script writes its settings to a systemd environment file in single quotes.
            if "'" in value or "\n" in value:
                raise LaunchConfigError(f"{key}: {value!r} may not contain a single quote or a newline")

    def _settings_values(self) -> list[tuple[str, str]]:
        out = [("--command", self.command), ("--store", self.store)]
        for key, value in (
            ("--user", self.user),
            ("--pip-sha256", self.pip_sha256),
            ("--repo", self.repo),
            ("--ref", self.ref),
            ("--pip-spec", self.pip_spec),
            ("--python", self.python),
            ("--requirements", self.requirements),
        ):
            if value is not None:
                out.append((key, value))
        return out


#: An assignment in a shell command: NAME=value (after a start, a space or ; & | ( and an optional export).
_ASSIGNMENT_RE = re.compile(r"(?:^|[\s;&|(])(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(\S*)")
#: Names whose value is a secret: *_KEY, *_TOKEN, *SECRET*, *PASSWORD*.
_SECRET_NAME_RE = re.compile(r"(?i).*(_KEY|_TOKEN|SECRET|PASSWORD|PASSWD).*")
_WHERE = (
    "it would be in the launch template's user data (readable by anyone allowed "
    "ec2:DescribeLaunchTemplateVersions, and by any process on the instance through IMDS) and in the "
    "instance's settings file"
)


def check_no_credentials(repo: str | None, command: str) -> None:
    """Refuse a ``--repo`` URL with credentials and a ``--command`` assigning what looks like a secret."""
    if repo:
        m = re.match(r"[A-Za-z][A-Za-z0-9+.-]*://([^/@]*)@", repo)
        if m and (":" in m.group(1) or repo.lower().startswith(("http://", "https://"))):
            raise LaunchConfigError(
                f"--repo: the URL carries credentials ({m.group(1).split(':')[0]}:...@): {_WHERE}. Clone "
                "without them (a public URL, or an SSH deploy key in the image), and give the training "
                "process its tokens with --secret NAME=ssm:/path"
            )
    for m in _ASSIGNMENT_RE.finditer(command):
        name, value = m.group(1), m.group(2)
        if _SECRET_NAME_RE.fullmatch(name) and value and not value.startswith(("$", '"$')):
            raise LaunchConfigError(
                f"--command: {name}=... looks like a secret: {_WHERE}. Put it in SSM Parameter Store (or "
                f"Secrets Manager) and pass --secret {name}=ssm:/path/to/it: the instance reads it with its "
                "role into the training process's environment only"
            )


def check_name(name: str) -> str:
    """A run name: letters, digits and dashes, 1-48 characters (it names IAM and EC2 resources)."""
    if not _NAME_RE.fullmatch(name):
        raise LaunchConfigError(
            f"run name {name!r}: use 1-48 letters, digits and dashes, starting with a letter or digit"
        )
    return name


def s3_location(store: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix without slashes at the ends)."""
    m = re.fullmatch(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])/(.+)", store)
    if not m or not m.group(2).strip("/"):
        raise LaunchConfigError(
            f"--store {store!r}: give s3://BUCKET/PREFIX (the instance role is scoped to that prefix), "
            f"or a directory under {MOUNT} with --volume-size for volume mode"
        )
    prefix = m.group(2).strip("/")
    wild = sorted(set(prefix) & set("*?"))
    if wild:
        raise LaunchConfigError(
            f"--store {store!r}: {' and '.join(repr(c) for c in wild)} in the prefix would be a wildcard in the "
            "instance role's policy, covering other runs' prefixes: name one prefix, e.g. s3://BUCKET/runs/NAME"
        )
    return m.group(1), prefix


# --------------------------------------------------------------------------- the instance's policy
def instance_policy(spec: LaunchSpec) -> dict[str, Any]:
    """The least policy the run's instances need, every statement conditioned to the run.

    S3 mode: the store's objects (read, write, delete, multipart) under its prefix, and
    listing the bucket under that prefix. Volume mode: attaching the run's volume to the
    run's instances (both tagged ``spotsafe-run=NAME``) and removing the format permission
    tag from it (the volume tool's statements, :mod:`spotsafe.cloud.aws.volume.policy`; no
    zone moves, so none of its snapshot actions). Either mode, when ``shutdown_when_done``:
    setting its own group's minimum to 0. No wildcard action anywhere.
    """
    tag = f"{TAG}={spec.name}"
    finish = spec.shutdown_when_done
    if spec.volume_mode:
        volume = volume_iam_policy(
            tag, move=False, snapshots=False, finish=finish, spot_requests=False, group=spec.resource_name
        )
        return {"Version": "2012-10-17", "Statement": volume["Statement"] + _secret_statements(spec)}
    statements = _s3_statements(spec.store) + _secret_statements(spec)
    if finish:
        group = volume_iam_policy(tag, move=False, snapshots=False, spot_requests=False, group=spec.resource_name)
        statements.append(
            {
                "Sid": "SpotsafeFindOwnGroup",
                "Effect": "Allow",
                "Action": ["autoscaling:DescribeAutoScalingInstances", "ec2:DescribeSpotInstanceRequests"],
                "Resource": "*",  # Describe* calls have no resource-level permissions
            }
        )
        statements += [st for st in group["Statement"] if st["Sid"] == "SpotsafeScaleRunGroupToZero"]
    return {"Version": "2012-10-17", "Statement": statements}


def _secret_statements(spec: LaunchSpec) -> list[dict[str, Any]]:
    """Reading exactly the parameters and secrets ``--secret`` names."""
    out = []
    for source, sid in (("ssm", "SpotsafeReadParameters"), ("secretsmanager", "SpotsafeReadSecrets")):
        refs = [r for r in spec.secret_refs if r.source == source]
        if refs:
            arns = sorted({r.arn for r in refs})
            out.append(
                {
                    "Sid": sid,
                    "Effect": "Allow",
                    "Action": refs[0].action,
                    "Resource": arns[0] if len(arns) == 1 else arns,
                }
            )
    return out


def _s3_statements(store: str) -> list[dict[str, Any]]:
    bucket, prefix = s3_location(store)
    return [
        {
            "Sid": "SpotsafeStoreObjects",
            "Effect": "Allow",
            "Action": [
                "s3:GetObject",
                "s3:PutObject",
                "s3:DeleteObject",
                "s3:AbortMultipartUpload",
                "s3:ListMultipartUploadParts",
            ],
            "Resource": f"arn:aws:s3:::{bucket}/{prefix}/*",
        },
        {
            # HeadBucket (the store's check that the bucket is there) is authorised as ListBucket
            # without a prefix: IfExists lets it through; a listing with a prefix stays in the run's.
            "Sid": "SpotsafeStoreList",
            "Effect": "Allow",
            "Action": "s3:ListBucket",
            "Resource": f"arn:aws:s3:::{bucket}",
            "Condition": {"StringLikeIfExists": {"s3:prefix": [f"{prefix}/", f"{prefix}/*"]}},
        },
        {
            # No condition key narrows it (AWS has no s3:prefix for it): the names of uploads in progress.
            "Sid": "SpotsafeStoreUploads",
            "Effect": "Allow",
            "Action": "s3:ListBucketMultipartUploads",
            "Resource": f"arn:aws:s3:::{bucket}",
        },
    ]
