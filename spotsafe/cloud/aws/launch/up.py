"""A self-replacing spot trainer on AWS in one command, and nothing left behind.

``spotsafe launch NAME ...`` creates, each tagged ``spotsafe-run=NAME``:

1. an IAM role ``spotsafe-NAME`` with one inline policy: the store's prefix on S3 (or,
   in volume mode, attaching the run's EBS volume) and scaling its own group to zero
   when the run is complete; nothing else (:func:`instance_policy`);
2. an instance profile ``spotsafe-NAME`` holding that role;
3. in volume mode (``--volume-size``): the run's EBS volume, in the cheapest zone of
   the given subnets (tagged ``spotsafe-new=true`` so that the first boot formats it);
4. a launch template ``spotsafe-NAME``: the image, the profile, IMDSv2 required, and the
   user data (:func:`user_data`: the run's settings, then ``userdata/spot-boot.sh``
   unchanged), the code pinned to one commit;
5. an Auto Scaling group ``spotsafe-NAME`` of exactly one spot instance over the given
   instance types and subnets (mixed-instances policy, price-capacity-optimized,
   capacity rebalancing on).

Every step looks first and creates only what is missing, so a second call changes
nothing and an interrupted call is completed by the next one. Without ``--yes`` the
plan is printed and nothing changes.

``spotsafe status NAME``, ``spotsafe down NAME [--yes] [--delete-store]`` and
``spotsafe price --instance-types ...`` complete the set. The design (zones, the
policy, the Terraform equivalent) is in docs/launch.md.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import io
import json
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, TextIO

from spotsafe.errors import LaunchConfigError, LaunchError, SpotsafeError, require

#: The tag every resource of a run carries; its value is the run's name.
TAG = "spotsafe-run"
#: On the launch template and the group: the run's store (``status`` and ``down`` read it).
TAG_STORE = "spotsafe-store"
#: On a volume launch creates: the first boot may format it (the volume tool clears it).
TAG_NEW = "spotsafe-new"
#: Prefix of the role, instance profile, launch template and group names.
PREFIX = "spotsafe-"
#: The role's one inline policy.
POLICY_NAME = "spotsafe-run"
#: Where the volume is mounted on the instance (the boot script's default).
MOUNT = "/mnt/spotsafe"
#: EC2's limit on user data, in bytes, before base64.
USER_DATA_LIMIT = 16384
#: A setting the packaged boot script must honour for a volume-less (S3) run.
NO_VOLUME_SETTING = "SPOTSAFE_ATTACH"

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,47}")
_SHA_RE = re.compile(r"[0-9a-f]{40}")
_ALLOCATION = "price-capacity-optimized"
_EC2_TRUST = {
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
    return m.group(1), m.group(2).strip("/")


# --------------------------------------------------------------------------- the instance's policy


def _volume_statement(sid: str) -> dict[str, Any]:
    from spotsafe.cloud.aws import volume

    for st in volume.IAM_POLICY["Statement"]:
        if st["Sid"] == sid:
            return json.loads(json.dumps(st))  # type: ignore[no-any-return]  # a deep copy of a dict
    raise KeyError(sid)  # pragma: no cover - the volume tool's policy names both


def instance_policy(spec: LaunchSpec) -> dict[str, Any]:
    """The least policy the run's instances need.

    S3 mode: the store's objects (read, write, delete, multipart) under its prefix, and
    listing the bucket. Volume mode: attaching the run's volume (the volume tool's first
    statement; no zone moves, so none of its snapshot actions). Either mode, when
    ``shutdown_when_done``: scaling its own group to zero. No wildcard action anywhere.
    """
    statements: list[dict[str, Any]] = []
    if spec.volume_mode:
        statements.append(_volume_statement("SpotsafeAttachVolume"))
    else:
        bucket, prefix = s3_location(spec.store)
        statements.append(
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
            }
        )
        statements.append(
            {
                "Sid": "SpotsafeStoreList",
                "Effect": "Allow",
                "Action": ["s3:ListBucket", "s3:ListBucketMultipartUploads"],
                "Resource": f"arn:aws:s3:::{bucket}",
            }
        )
    if spec.shutdown_when_done:
        # A group, not a spot request, replaces these instances; the group's own name only.
        statements.append(
            {
                "Sid": "SpotsafeFindOwnGroup",
                "Effect": "Allow",
                "Action": ["autoscaling:DescribeAutoScalingInstances"],
                "Resource": "*",  # Describe* has no resource-level permissions
            }
        )
        statements.append(
            {
                "Sid": "SpotsafeScaleOwnGroupToZero",
                "Effect": "Allow",
                "Action": ["autoscaling:UpdateAutoScalingGroup"],
                "Resource": f"arn:aws:autoscaling:*:*:autoScalingGroup:*:autoScalingGroupName/{spec.resource_name}",
            }
        )
    return {"Version": "2012-10-17", "Statement": statements}


# --------------------------------------------------------------------------- user data


def boot_script() -> str:
    """The text of ``userdata/spot-boot.sh`` (``spotsafe/userdata`` links to it; wheels carry it there)."""
    here = Path(__file__).resolve().parents[3]  # the spotsafe package: spotsafe/cloud/aws/launch/
    for cand in (here / "userdata" / "spot-boot.sh", here.parent / "userdata" / "spot-boot.sh"):
        if cand.is_file():
            return cand.read_text()
    raise LaunchError(f"userdata/spot-boot.sh is not found next to {here}: reinstall spotsafe from its repository")


def run_settings(spec: LaunchSpec, *, region: str, volume_id: str | None, ref: str | None) -> list[tuple[str, str]]:
    """The SPOTSAFE_* settings of the boot script for this run, in order."""
    settings = [
        ("SPOTSAFE_RUN", spec.name),
        ("SPOTSAFE_REGION", region),
        ("SPOTSAFE_STORE", spec.store),
        ("SPOTSAFE_TRAIN_COMMAND", spec.command),
        ("SPOTSAFE_SHUTDOWN_WHEN_DONE", "1" if spec.shutdown_when_done else "0"),
        # Never an idle GPU after a failed boot: the group replaces the instance.
        ("SPOTSAFE_SHUTDOWN_ON_FAILURE", "1"),
    ]
    if spec.repo:
        settings += [("SPOTSAFE_REPO", spec.repo), ("SPOTSAFE_REF", ref or "HEAD")]
    if spec.volume_mode:
        # No id: the boot script finds the volume by its tag spotsafe-run=NAME.
        settings += [("SPOTSAFE_VOLUME_ID", volume_id)] if volume_id else []
        settings += [
            # The group stays in the volume's zone: no moves (docs/launch.md, "Zones").
            ("SPOTSAFE_MOVE", "0"),
            ("SPOTSAFE_MOUNT", _mount(spec)),
        ]
    else:
        settings += [(NO_VOLUME_SETTING, "0"), ("SPOTSAFE_MOUNT", "/var/lib/spotsafe")]
    for key, value in (
        ("SPOTSAFE_USER", spec.user),
        ("SPOTSAFE_PIP_SPEC", spec.pip_spec),
        ("SPOTSAFE_PIP_SHA256", spec.pip_sha256),
        ("SPOTSAFE_PYTHON", spec.python),
        ("SPOTSAFE_REQUIREMENTS", spec.requirements),
    ):
        if value is not None:
            settings.append((key, value))
    return settings


def _mount(spec: LaunchSpec) -> str:
    return spec.mount.rstrip("/") or "/"


def user_data(
    spec: LaunchSpec, *, region: str, volume_id: str | None, ref: str | None, script: str | None = None
) -> str:
    """The launch template's user data: the run's settings, then the boot script unchanged.

    Each setting is assigned only when the environment has none (as the script's own
    ``: "${VAR:=default}"`` lines do), so an operator can still override one.
    """
    lines = [
        "#!/usr/bin/env bash",
        f"# spotsafe launch {spec.name}: this run's settings (generated; `spotsafe launch` rewrites them),",
        "# then userdata/spot-boot.sh unchanged. Settings already in the environment win.",
    ]
    for key, value in run_settings(spec, region=region, volume_id=volume_id, ref=ref):
        # A string for `bash -c` later, quotes and all: not meant to be split or expanded here.
        quiet = "# shellcheck disable=SC2016,SC2089,SC2090\n" if any(c in value for c in '"\\$`') else ""
        lines.append(f'{quiet}[ -n "${{{key}:-}}" ] || {key}={shlex.quote(value)}')
        lines.append(f"{quiet}export {key}")
    return "\n".join(lines) + "\n\n" + (boot_script() if script is None else script)


def encode_user_data(text: str) -> str:
    """Gzipped (cloud-init unpacks it) and base64-encoded, as a launch template takes it.

    EC2 takes at most 16 KiB of user data and the boot script alone is larger; gzip
    brings it to about a third. ``mtime=0``: the same text always encodes the same, so
    a rerun of ``launch`` sees no change.
    """
    raw = gzip.compress(text.encode(), compresslevel=9, mtime=0)
    if len(raw) > USER_DATA_LIMIT:
        raise LaunchError(
            f"the user data is {len(raw)} bytes gzipped, over EC2's {USER_DATA_LIMIT}: shorten the settings"
        )
    return base64.b64encode(raw).decode()


def decode_user_data(b64: str) -> str:
    """What cloud-init runs: the base64 user data, gunzipped when it is gzip."""
    raw = base64.b64decode(b64)
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return raw.decode()


def settings_from_user_data(text: str) -> dict[str, str]:
    """The settings a generated header assigns (``status`` and tests read them back)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        m = re.fullmatch(r'\[ -n "\$\{(SPOTSAFE_[A-Z_]+):-\}" \] \|\| \1=(.*)', line)
        if m:
            out[m.group(1)] = shlex.split(m.group(2))[0] if m.group(2) else ""
    return out


def resolve_ref(repo: str, ref: str | None, *, timeout: float = 60.0) -> str:
    """The commit ``ref`` names in ``repo`` now (``git ls-remote``), so every instance runs the same code."""
    if ref and _SHA_RE.fullmatch(ref):
        return ref
    want = ref or "HEAD"
    try:
        p = subprocess.run(
            ["git", "ls-remote", "--", repo, want, want + "^{}"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LaunchError(f"--repo {repo}: cannot run git ls-remote to pin --ref {want} ({e}); pass a commit id") from e
    if p.returncode != 0:
        raise LaunchError(
            f"--repo {repo}: git ls-remote failed ({p.stderr.strip() or p.returncode}); pass --ref as a commit id"
        )
    refs: dict[str, str] = {}
    for line in p.stdout.splitlines():
        sha, _, name = line.partition("\t")
        refs[name] = sha
    for name in (want, f"refs/heads/{want}", f"refs/tags/{want}^{{}}", f"refs/tags/{want}"):
        if name in refs:
            return refs[name]
    raise LaunchError(f"--repo {repo}: no branch or tag named {want!r} (pass --ref as a commit id)")


# --------------------------------------------------------------------------- AWS access


class Clients:
    """The boto3 clients of one region (botocore honours ``AWS_ENDPOINT_URL`` and friends)."""

    def __init__(self, region: str | None = None, *, session: Any | None = None) -> None:
        boto3 = require("boto3", "aws")
        self.session = session if session is not None else boto3.session.Session()
        self.region: str = region or self.session.region_name or ""
        if not self.region:
            raise LaunchConfigError("no AWS region: pass --region or set AWS_REGION / AWS_DEFAULT_REGION")
        self._clients: dict[str, Any] = {}

    def __call__(self, service: str) -> Any:
        if service not in self._clients:
            self._clients[service] = self.session.client(service, region_name=self.region)
        return self._clients[service]

    @property
    def ec2(self) -> Any:
        return self("ec2")

    @property
    def autoscaling(self) -> Any:
        return self("autoscaling")

    @property
    def iam(self) -> Any:
        return self("iam")

    @property
    def s3(self) -> Any:
        return self("s3")


def _code(e: BaseException) -> str:
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def _aws(what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
    """Call ``fn``; a botocore error becomes a :class:`LaunchError` naming ``what``."""
    try:
        return fn(**kwargs)
    except Exception as e:
        if _code(e) or type(e).__module__.startswith("botocore"):
            raise LaunchError(f"{what}: {e}") from e
        raise


def _ours(tags: Iterable[dict[str, Any]], name: str) -> bool:
    """True when ``tags`` (any AWS shape) include ``spotsafe-run=NAME``: launch made it for this run."""
    return any(t.get("Key") == TAG and t.get("Value") == name for t in tags)


def _not_ours(kind: str, res: str, name: str) -> LaunchError:
    return LaunchError(
        f"{kind} {res} exists but is not tagged {TAG}={name}: not made by spotsafe launch for this run; "
        "pick another run name"
    )


def _tags(name: str, store: str | None = None) -> list[dict[str, str]]:
    tags = [{"Key": TAG, "Value": name}]
    if store is not None:
        tags.append({"Key": TAG_STORE, "Value": store})
    return tags


# --------------------------------------------------------------------------- prices


@dataclass(frozen=True)
class SpotPrice:
    """The current spot price of one instance type in one zone (USD per hour, Linux)."""

    instance_type: str
    zone: str
    price: float
    time: datetime


def spot_prices(ec2: Any, instance_types: Sequence[str], *, now: datetime | None = None) -> list[SpotPrice]:
    """The newest spot price per (type, zone) from DescribeSpotPriceHistory, cheapest first."""
    latest: dict[tuple[str, str], SpotPrice] = {}
    kwargs: dict[str, Any] = {
        "InstanceTypes": list(instance_types),
        "ProductDescriptions": ["Linux/UNIX"],
        "StartTime": now or datetime.now(timezone.utc),
    }
    while True:
        r = _aws("DescribeSpotPriceHistory", ec2.describe_spot_price_history, **kwargs)
        for item in r.get("SpotPriceHistory", []):
            p = SpotPrice(item["InstanceType"], item["AvailabilityZone"], float(item["SpotPrice"]), item["Timestamp"])
            key = (p.instance_type, p.zone)
            if key not in latest or latest[key].time < p.time:
                latest[key] = p
        token = r.get("NextToken")
        if not token:
            break
        kwargs["NextToken"] = token
    return sorted(latest.values(), key=lambda p: (p.price, p.zone, p.instance_type))


def _usd(price: float) -> str:
    return f"${price:.4f}" if price >= 0.01 else f"${price:.2g}"


def zone_prices(prices: Iterable[SpotPrice]) -> dict[str, float]:
    """The cheapest of the types per zone."""
    out: dict[str, float] = {}
    for p in prices:
        out[p.zone] = min(out.get(p.zone, p.price), p.price)
    return out


# --------------------------------------------------------------------------- the plan


Verb = Literal["create", "update", "keep", "delete", "note"]


@dataclass(frozen=True)
class Step:
    """One line of a plan or of what was done."""

    verb: Verb
    kind: str
    name: str
    detail: str = ""

    def __str__(self) -> str:
        tail = f": {self.detail}" if self.detail else ""
        return f"{self.verb:<7} {self.kind} {self.name}{tail}"


@dataclass
class Subnet:
    subnet_id: str
    zone: str
    price: float | None = None


@dataclass
class LaunchResult:
    """What :func:`launch` planned or did; ``applied`` False for a plan only."""

    steps: list[Step] = field(default_factory=list)
    applied: bool = False
    region: str = ""
    subnets: list[Subnet] = field(default_factory=list)
    volume_id: str | None = None
    ref: str | None = None
    policy: dict[str, Any] = field(default_factory=dict)

    @property
    def changes(self) -> list[Step]:
        return [s for s in self.steps if s.verb in ("create", "update", "delete")]


class _Launch:
    def __init__(
        self,
        spec: LaunchSpec,
        aws: Clients,
        *,
        apply: bool,
        script: str | None,
        wait: float,
        on_step: Callable[[Step], None] | None,
    ) -> None:
        self.on_step = on_step
        self.spec = spec
        self.aws = aws
        self.apply = apply
        self.script = boot_script() if script is None else script
        self.wait = wait
        self.result = LaunchResult(applied=apply, region=aws.region)
        self.name = spec.resource_name

    def step(self, verb: Verb, kind: str, name: str, detail: str = "") -> None:
        # Announced before it is done: an interrupted launch shows where it stopped.
        self.result.steps.append(Step(verb, kind, name, detail))
        if self.on_step is not None:
            self.on_step(self.result.steps[-1])

    # ---- the pieces, in dependency order

    def run(self) -> LaunchResult:
        spec = self.spec
        if not spec.volume_mode and f"{NO_VOLUME_SETTING}:=" not in self.script:
            raise LaunchError(
                "S3 mode needs a boot script that can run without a volume "
                f"({NO_VOLUME_SETTING}=0), and userdata/spot-boot.sh has no such setting yet: "
                "use volume mode (--volume-size GiB with --store under /mnt/spotsafe) for now"
            )
        subnets = self.subnets()
        self.role()
        self.instance_profile()
        if spec.volume_mode:
            zone = self.volume(subnets)
            subnets = [s for s in subnets if s.zone == zone]
            if not subnets:
                raise LaunchError(
                    f"the run's volume {self.result.volume_id} is in {zone} and none of the subnets is: "
                    f"pass --subnets with one in {zone} (the group stays in the volume's zone)"
                )
        self.result.subnets = subnets
        self.launch_template()
        self.group(subnets)
        return self.result

    def subnets(self) -> list[Subnet]:
        ec2 = self.aws.ec2
        if self.spec.subnets:
            r = _aws("DescribeSubnets", ec2.describe_subnets, SubnetIds=list(self.spec.subnets))
        else:
            r = _aws(
                "DescribeSubnets (the default VPC's)",
                ec2.describe_subnets,
                Filters=[{"Name": "default-for-az", "Values": ["true"]}],
            )
        subnets = [Subnet(s["SubnetId"], s["AvailabilityZone"]) for s in r.get("Subnets", [])]
        if not subnets:
            raise LaunchConfigError(
                "no subnets: pass --subnets (this region has no default VPC subnets)"
                if not self.spec.subnets
                else f"--subnets {','.join(self.spec.subnets)}: none found in {self.aws.region}"
            )
        by_zone = zone_prices(spot_prices(ec2, self.spec.instance_types))
        for s in subnets:
            s.price = by_zone.get(s.zone)
        # Cheapest zone first: the volume goes there, and the plan reads in that order.
        subnets.sort(key=lambda s: (s.price is None, s.price or 0.0, s.zone, s.subnet_id))
        return subnets

    def role(self) -> None:
        iam = self.aws.iam
        policy = instance_policy(self.spec)
        self.result.policy = policy
        doc = json.dumps(policy, indent=2, sort_keys=True)
        try:
            role = iam.get_role(RoleName=self.name)["Role"]
            exists = True
        except Exception as e:
            if _code(e) != "NoSuchEntity":
                raise LaunchError(f"GetRole {self.name}: {e}") from e
            exists = False
        if exists and not _ours(role.get("Tags", []), self.spec.name):
            # Launch tags what it creates as it creates it: an untagged one is somebody else's.
            raise _not_ours("IAM role", self.name, self.spec.name)
        if not exists:
            self.step("create", "iam role", self.name, "trusted by ec2.amazonaws.com")
            if self.apply:
                _aws(
                    f"CreateRole {self.name}",
                    iam.create_role,
                    RoleName=self.name,
                    AssumeRolePolicyDocument=json.dumps(_EC2_TRUST),
                    Description=f"spotsafe run {self.spec.name}: its instances",
                    Tags=_tags(self.spec.name),
                )
        else:
            self.step("keep", "iam role", self.name)
        current = None
        if exists:
            try:
                got = iam.get_role_policy(RoleName=self.name, PolicyName=POLICY_NAME)["PolicyDocument"]
                current = json.loads(got) if isinstance(got, str) else got
            except Exception as e:
                if _code(e) != "NoSuchEntity":
                    raise LaunchError(f"GetRolePolicy {self.name}: {e}") from e
        if current == json.loads(doc):
            self.step("keep", "iam policy", f"{self.name}/{POLICY_NAME}")
            return
        self.step(
            "create" if current is None else "update",
            "iam policy",
            f"{self.name}/{POLICY_NAME}",
            ", ".join(sorted({a for st in policy["Statement"] for a in st["Action"]})),
        )
        if self.apply:
            _aws(
                f"PutRolePolicy {self.name}",
                iam.put_role_policy,
                RoleName=self.name,
                PolicyName=POLICY_NAME,
                PolicyDocument=doc,
            )

    def instance_profile(self) -> None:
        iam = self.aws.iam
        try:
            profile = iam.get_instance_profile(InstanceProfileName=self.name)["InstanceProfile"]
        except Exception as e:
            if _code(e) != "NoSuchEntity":
                raise LaunchError(f"GetInstanceProfile {self.name}: {e}") from e
            profile = None
        if profile is not None and not _ours(profile.get("Tags", []), self.spec.name):
            raise _not_ours("instance profile", self.name, self.spec.name)
        if profile is None:
            self.step("create", "instance profile", self.name)
            if self.apply:
                _aws(
                    f"CreateInstanceProfile {self.name}",
                    iam.create_instance_profile,
                    InstanceProfileName=self.name,
                    Tags=_tags(self.spec.name),
                )
            roles: list[str] = []
        else:
            self.step("keep", "instance profile", self.name)
            roles = [r["RoleName"] for r in profile.get("Roles", [])]
        if self.name not in roles:
            self.step("create", "instance profile role", f"{self.name} <- role {self.name}")
            if self.apply:
                _aws(
                    f"AddRoleToInstanceProfile {self.name}",
                    iam.add_role_to_instance_profile,
                    InstanceProfileName=self.name,
                    RoleName=self.name,
                )

    def volume(self, subnets: list[Subnet]) -> str:
        ec2 = self.aws.ec2
        vols = _run_volumes(ec2, self.spec.name)
        if len(vols) > 1:
            raise LaunchError(
                f"{len(vols)} volumes are tagged {TAG}={self.spec.name} "
                f"({', '.join(v['VolumeId'] for v in vols)}): keep one (the one with the checkpoints)"
            )
        if vols:
            v = vols[0]
            self.result.volume_id = v["VolumeId"]
            self.step("keep", "ebs volume", v["VolumeId"], f"{v['Size']} GiB in {v['AvailabilityZone']}")
            if v["Size"] != self.spec.volume_size:
                self.step(
                    "note", "ebs volume", v["VolumeId"], f"is {v['Size']} GiB, not {self.spec.volume_size}: left as is"
                )
            return str(v["AvailabilityZone"])
        zone = subnets[0].zone
        price = f", spot from {_usd(subnets[0].price)}/h there" if subnets[0].price is not None else ""
        self.step(
            "create", "ebs volume", f"{TAG}={self.spec.name}", f"{self.spec.volume_size} GiB gp3 in {zone}{price}"
        )
        if self.apply:
            r = _aws(
                "CreateVolume",
                ec2.create_volume,
                AvailabilityZone=zone,
                Size=self.spec.volume_size,
                VolumeType="gp3",
                Encrypted=True,
                TagSpecifications=[
                    {
                        "ResourceType": "volume",
                        "Tags": [*_tags(self.spec.name), {"Key": TAG_NEW, "Value": "true"}],
                    }
                ],
            )
            self.result.volume_id = r["VolumeId"]
        return zone

    def template_data(self, ref: str | None) -> dict[str, Any]:
        text = user_data(
            self.spec,
            region=self.aws.region,
            volume_id=self.result.volume_id or "(the volume created above)",
            ref=ref,
            script=self.script,
        )
        data: dict[str, Any] = {
            "ImageId": self.spec.image_id,
            "IamInstanceProfile": {"Name": self.name},
            "MetadataOptions": {
                "HttpTokens": "required",
                "HttpEndpoint": "enabled",
                # 2: a container on the instance can still reach IMDS (notices, identity).
                "HttpPutResponseHopLimit": 2,
            },
            "UserData": encode_user_data(text),
            "TagSpecifications": [{"ResourceType": "instance", "Tags": _tags(self.spec.name)}],
            # The boot script's shutdown (run complete, failed boot) ends the instance, not pauses it.
            "InstanceInitiatedShutdownBehavior": "terminate",
        }
        if self.spec.security_groups:
            data["SecurityGroupIds"] = list(self.spec.security_groups)
        if self.spec.key_name:
            data["KeyName"] = self.spec.key_name
        return data

    def launch_template(self) -> None:
        ec2 = self.aws.ec2
        lt = _template(ec2, self.name)
        if lt is not None and not _ours(lt.get("Tags", []), self.spec.name):
            raise _not_ours("launch template", self.name, self.spec.name)
        current = _template_data(ec2, self.name)
        ref = None
        if self.spec.repo:
            ref = self.spec.ref if self.spec.ref and _SHA_RE.fullmatch(self.spec.ref) else None
            if ref is None and current is not None:
                old = settings_from_user_data(_decode(current.get("UserData", "")))
                if old.get("SPOTSAFE_REPO") == self.spec.repo and _SHA_RE.fullmatch(old.get("SPOTSAFE_REF", "")):
                    # A branch is pinned once, at the first launch: a rerun never changes the code mid-run.
                    ref = old["SPOTSAFE_REF"]
                    self.step("note", "code", self.spec.repo, f"stays at {ref} (pass --ref COMMIT to change it)")
            if ref is None:
                ref = resolve_ref(self.spec.repo, self.spec.ref)
                self.step("note", "code", self.spec.repo, f"--ref {self.spec.ref or 'HEAD'} pinned at {ref}")
        self.result.ref = ref
        want = self.template_data(ref)
        if current is None:
            self.step(
                "create",
                "launch template",
                self.name,
                f"{self.spec.image_id}, IMDSv2 required, user data: store {self.spec.store}, command {self.spec.command!r}",
            )
            if self.apply:
                _aws(
                    f"CreateLaunchTemplate {self.name}",
                    self.aws.ec2.create_launch_template,
                    LaunchTemplateName=self.name,
                    VersionDescription=f"spotsafe launch {self.spec.name}",
                    LaunchTemplateData=want,
                    TagSpecifications=[
                        {"ResourceType": "launch-template", "Tags": _tags(self.spec.name, self.spec.store)}
                    ],
                )
            return
        have = dict(current)
        # Only instance tags belong in the data (moto echoes the template's own tags there too).
        have["TagSpecifications"] = [
            t for t in have.get("TagSpecifications", []) if t.get("ResourceType") != "launch-template"
        ] or None
        changed = sorted(k for k in set(want) | set(have) if _norm(want.get(k)) != _norm(have.get(k)))
        if not changed:
            self.step("keep", "launch template", self.name)
            return
        self.step("update", "launch template", self.name, f"new default version: {', '.join(changed)} changed")
        if self.apply:
            v = _aws(
                f"CreateLaunchTemplateVersion {self.name}",
                ec2.create_launch_template_version,
                LaunchTemplateName=self.name,
                VersionDescription=f"spotsafe launch {self.spec.name}",
                LaunchTemplateData=want,
            )["LaunchTemplateVersion"]["VersionNumber"]
            _aws(
                f"ModifyLaunchTemplate {self.name}",
                ec2.modify_launch_template,
                LaunchTemplateName=self.name,
                DefaultVersion=str(v),
            )

    def group_settings(self, subnets: list[Subnet]) -> dict[str, Any]:
        return {
            "VPCZoneIdentifier": ",".join(s.subnet_id for s in subnets),
            "MixedInstancesPolicy": {
                "LaunchTemplate": {
                    "LaunchTemplateSpecification": {"LaunchTemplateName": self.name, "Version": "$Default"},
                    "Overrides": [{"InstanceType": t} for t in self.spec.instance_types],
                },
                "InstancesDistribution": {
                    "OnDemandBaseCapacity": 0,
                    "OnDemandPercentageAboveBaseCapacity": 0,
                    "SpotAllocationStrategy": _ALLOCATION,
                },
            },
            "CapacityRebalance": True,
        }

    def group(self, subnets: list[Subnet]) -> None:
        asg = self.aws.autoscaling
        want = self.group_settings(subnets)
        g = _group(asg, self.name)
        zones = ", ".join(
            f"{s.subnet_id} ({s.zone}{'' if s.price is None else f' {_usd(s.price)}/h'})" for s in subnets
        )
        if g is None:
            self.step(
                "create",
                "auto scaling group",
                self.name,
                f"1 spot instance of {','.join(self.spec.instance_types)}, {_ALLOCATION}, "
                f"capacity rebalancing, subnets {zones}",
            )
            if self.apply:
                self._create_group(want)
            return
        if not _ours(g.get("Tags", []), self.spec.name):
            raise _not_ours("Auto Scaling group", self.name, self.spec.name)
        have = _group_settings(g)
        changed = sorted(k for k in want if _norm(want[k]) != _norm(have.get(k)))
        if g.get("DesiredCapacity") == 0:
            self.step(
                "note", "auto scaling group", self.name, "scaled to 0 (the run finished?): `spotsafe down` removes it"
            )
        if not changed:
            self.step("keep", "auto scaling group", self.name)
            return
        self.step("update", "auto scaling group", self.name, f"{', '.join(changed)} changed")
        if self.apply:
            _aws(
                f"UpdateAutoScalingGroup {self.name}",
                asg.update_auto_scaling_group,
                AutoScalingGroupName=self.name,
                **want,
            )

    def _create_group(self, want: dict[str, Any]) -> None:
        tags = [
            {
                "Key": t["Key"],
                "Value": t["Value"],
                "PropagateAtLaunch": t["Key"] == TAG,
                "ResourceId": self.name,
                "ResourceType": "auto-scaling-group",
            }
            for t in [*_tags(self.spec.name, self.spec.store), {"Key": "Name", "Value": self.name}]
        ]
        tags[-1]["PropagateAtLaunch"] = True
        deadline = time.monotonic() + self.wait
        while True:
            try:
                self.aws.autoscaling.create_auto_scaling_group(
                    AutoScalingGroupName=self.name,
                    MinSize=1,
                    DesiredCapacity=1,
                    # One instance trains; the second place lets capacity rebalancing start the
                    # replacement before it terminates the instance at risk (docs/launch.md).
                    MaxSize=2,
                    Tags=tags,
                    **want,
                )
                return
            except Exception as e:
                # IAM is eventually consistent: a profile made seconds ago may not be usable yet.
                fresh = _code(e) == "ValidationError" and "profile" in str(e).lower()
                if not fresh or time.monotonic() >= deadline:
                    if _code(e) or type(e).__module__.startswith("botocore"):
                        raise LaunchError(f"CreateAutoScalingGroup {self.name}: {e}") from e
                    raise
                time.sleep(5)


def _norm(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str)) if value is not None else None


def _decode(b64: str) -> str:
    try:
        return decode_user_data(b64)
    except (ValueError, OSError, EOFError):
        return ""


def _run_volumes(ec2: Any, name: str) -> list[dict[str, Any]]:
    r = _aws(
        "DescribeVolumes",
        ec2.describe_volumes,
        Filters=[{"Name": f"tag:{TAG}", "Values": [name]}],
    )
    return [v for v in r.get("Volumes", []) if v.get("State") not in ("deleting", "deleted")]


def _ec2_exists(ec2: Any, kind: str, resource_id: str) -> bool:
    """False for a volume, snapshot or launch template that is gone (or going); True otherwise."""
    if kind == "launch-template":
        return _template(ec2, "", resource_id) is not None
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
        if "NotFound" in _code(e):
            return False
        raise LaunchError(f"{method} {resource_id}: {e}") from e
    return any(f.get("State") not in ("deleting", "deleted") for f in found)


def _template(ec2: Any, name: str, template_id: str | None = None) -> dict[str, Any] | None:
    try:
        if template_id:
            r = ec2.describe_launch_templates(LaunchTemplateIds=[template_id])
        else:
            r = ec2.describe_launch_templates(LaunchTemplateNames=[name])
    except Exception as e:
        if "NotFound" in _code(e):
            return None
        raise LaunchError(f"DescribeLaunchTemplates {name}: {e}") from e
    found = r.get("LaunchTemplates", [])
    return found[0] if found else None


def _template_data(ec2: Any, name: str) -> dict[str, Any] | None:
    if _template(ec2, name) is None:
        return None
    r = _aws(
        f"DescribeLaunchTemplateVersions {name}",
        ec2.describe_launch_template_versions,
        LaunchTemplateName=name,
        Versions=["$Default"],
    )
    versions = r.get("LaunchTemplateVersions", [])
    return dict(versions[0]["LaunchTemplateData"]) if versions else {}


def _group(asg: Any, name: str) -> dict[str, Any] | None:
    r = _aws(f"DescribeAutoScalingGroups {name}", asg.describe_auto_scaling_groups, AutoScalingGroupNames=[name])
    groups = [g for g in r.get("AutoScalingGroups", []) if g.get("Status") != "Delete in progress"]
    return groups[0] if groups else None


def _group_settings(g: dict[str, Any]) -> dict[str, Any]:
    mip = g.get("MixedInstancesPolicy", {})
    lt = mip.get("LaunchTemplate", {})
    spec = lt.get("LaunchTemplateSpecification", {})
    dist = mip.get("InstancesDistribution", {})
    return {
        "VPCZoneIdentifier": g.get("VPCZoneIdentifier", ""),
        "MixedInstancesPolicy": {
            "LaunchTemplate": {
                "LaunchTemplateSpecification": {
                    "LaunchTemplateName": spec.get("LaunchTemplateName"),
                    "Version": spec.get("Version"),
                },
                "Overrides": [{"InstanceType": o.get("InstanceType")} for o in lt.get("Overrides", [])],
            },
            "InstancesDistribution": {
                "OnDemandBaseCapacity": dist.get("OnDemandBaseCapacity"),
                "OnDemandPercentageAboveBaseCapacity": dist.get("OnDemandPercentageAboveBaseCapacity"),
                "SpotAllocationStrategy": dist.get("SpotAllocationStrategy"),
            },
        },
        "CapacityRebalance": bool(g.get("CapacityRebalance")),
    }


def launch(
    spec: LaunchSpec,
    aws: Clients | None = None,
    *,
    apply: bool = False,
    script: str | None = None,
    profile_wait: float = 120.0,
    on_step: Callable[[Step], None] | None = None,
) -> LaunchResult:
    """Plan (``apply=False``: describes only) or create the run's resources; idempotent.

    ``script``: the boot script's text (default: ``userdata/spot-boot.sh``).
    ``profile_wait``: how long a fresh instance profile may take to become usable.
    ``on_step``: called with each step as it is decided, before it is carried out.
    """
    spec.validate()
    aws = aws or Clients(spec.region)
    return _Launch(spec, aws, apply=apply, script=script, wait=profile_wait, on_step=on_step).run()


# --------------------------------------------------------------------------- what is left of a run


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
    r = _aws(
        "DescribeTags",
        ec2.describe_tags,
        Filters=[{"Name": "key", "Values": [TAG]}, {"Name": "value", "Values": [name]}],
    )
    instances = sorted({t["ResourceId"] for t in r.get("Tags", []) if t["ResourceType"] == "instance"})
    live: set[str] = set()
    states: dict[str, str] = {}
    if instances:
        for res in _aws("DescribeInstances", ec2.describe_instances, InstanceIds=instances).get("Reservations", []):
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
    r = _aws(
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
            if _code(e) != "NoSuchEntity":
                raise LaunchError(f"{kind} {res}: {e}") from e
            continue
        if _ours(got.get("Tags", []), name):
            out.append(Tagged(kind, res))
    return out


# --------------------------------------------------------------------------- down


@dataclass
class DownResult:
    steps: list[Step] = field(default_factory=list)
    applied: bool = False
    #: Still tagged after ``down`` (with ``applied``): the kept store volume is in ``kept``, not here.
    left: list[Tagged] = field(default_factory=list)
    kept: list[Tagged] = field(default_factory=list)
    store: str | None = None

    @property
    def changes_planned(self) -> bool:
        return any(s.verb == "delete" for s in self.steps)


def run_store(aws: Clients, name: str) -> str | None:
    """The run's store, from the tag launch put on its launch template or group."""
    res = PREFIX + name
    r = _aws(
        "DescribeTags (auto scaling)",
        aws.autoscaling.describe_tags,
        Filters=[{"Name": "auto-scaling-group", "Values": [res]}, {"Name": "key", "Values": [TAG_STORE]}],
    )
    for t in r.get("Tags", []):
        return str(t["Value"])
    lt = _template(aws.ec2, res)
    for t in (lt or {}).get("Tags", []):
        if t["Key"] == TAG_STORE:
            return str(t["Value"])
    return None


def down(
    name: str,
    aws: Clients,
    *,
    apply: bool = False,
    delete_store: bool = False,
    store: str | None = None,
    timeout: float = 600.0,
    poll: float = 5.0,
    on_step: Callable[[Step], None] | None = None,
) -> DownResult:
    """Delete what :func:`launch` created (plan only without ``apply``); keep the store unless asked.

    Order: the group (its instances terminated), the launch template, the instance
    profile, the role; then, with ``delete_store``, the volume or the store's objects.
    Afterwards lists what is still tagged ``spotsafe-run=NAME``.
    """
    check_name(name)
    res = PREFIX + name
    out = DownResult(applied=apply)
    store = store or run_store(aws, name)
    out.store = store
    ec2, asg, iam = aws.ec2, aws.autoscaling, aws.iam

    def step(verb: Verb, kind: str, what: str, detail: str = "") -> None:
        out.steps.append(Step(verb, kind, what, detail))
        if on_step is not None:
            on_step(out.steps[-1])

    def foreign(kind: str, tags: Iterable[dict[str, Any]]) -> bool:
        if _ours(tags, name):
            return False
        step("note", kind, res, f"not tagged {TAG}={name}: not made by launch for this run, left alone")
        return True

    g = _group(asg, res)
    if g is not None and foreign("auto scaling group", g.get("Tags", [])):
        g = None
    if g is not None:
        n = len(g.get("Instances", []))
        step("delete", "auto scaling group", res, f"terminates its {n} instance(s)")
        if apply:
            _aws(
                f"DeleteAutoScalingGroup {res}",
                asg.delete_auto_scaling_group,
                AutoScalingGroupName=res,
                ForceDelete=True,
            )
    if apply:
        _wait_instances_gone(aws, name, timeout=timeout, poll=poll)
        if g is not None:
            _wait_group_gone(asg, res, timeout=timeout, poll=poll)
    lt = _template(ec2, res)
    if lt is not None and not foreign("launch template", lt.get("Tags", [])):
        step("delete", "launch template", res)
        if apply:
            _aws(f"DeleteLaunchTemplate {res}", ec2.delete_launch_template, LaunchTemplateName=res)
    try:
        profile = iam.get_instance_profile(InstanceProfileName=res)["InstanceProfile"]
    except Exception as e:
        if _code(e) != "NoSuchEntity":
            raise LaunchError(f"GetInstanceProfile {res}: {e}") from e
        profile = None
    if profile is not None and not foreign("instance profile", profile.get("Tags", [])):
        step("delete", "instance profile", res)
        if apply:
            for role in profile.get("Roles", []):
                _aws(
                    f"RemoveRoleFromInstanceProfile {res}",
                    iam.remove_role_from_instance_profile,
                    InstanceProfileName=res,
                    RoleName=role["RoleName"],
                )
            _aws(f"DeleteInstanceProfile {res}", iam.delete_instance_profile, InstanceProfileName=res)
    try:
        has_role = not foreign("iam role", iam.get_role(RoleName=res)["Role"].get("Tags", []))
    except Exception as e:
        if _code(e) != "NoSuchEntity":
            raise LaunchError(f"GetRole {res}: {e}") from e
        has_role = False
    if has_role:
        step("delete", "iam role", res, "and its inline policy")
        if apply:
            for pname in _aws("ListRolePolicies", iam.list_role_policies, RoleName=res).get("PolicyNames", []):
                _aws(f"DeleteRolePolicy {res}/{pname}", iam.delete_role_policy, RoleName=res, PolicyName=pname)
            attached = _aws("ListAttachedRolePolicies", iam.list_attached_role_policies, RoleName=res)
            if attached.get("AttachedPolicies"):
                raise LaunchError(
                    f"role {res} has managed policies attached by hand "
                    f"({', '.join(p['PolicyArn'] for p in attached['AttachedPolicies'])}): detach them, then rerun"
                )
            _aws(f"DeleteRole {res}", iam.delete_role, RoleName=res)
    vols = _run_volumes(ec2, name)
    for v in vols:
        if delete_store:
            step("delete", "ebs volume", v["VolumeId"], "the run's volume and its checkpoints (--delete-store)")
            if apply:
                _delete_volume(ec2, v["VolumeId"], timeout=timeout, poll=poll)
        else:
            step("keep", "ebs volume", v["VolumeId"], "holds the checkpoints: --delete-store deletes it")
    if store and store.startswith("s3://"):
        if delete_store:
            step("delete", "store", store, "every object under the prefix (--delete-store)")
            if apply:
                _delete_prefix(aws.s3, store)
        else:
            step("keep", "store", store, "the checkpoints: --delete-store deletes them")
    elif delete_store and store is None and not vols:
        step("note", "store", "unknown", "no launch template or group names it: pass --store to delete it")
    if apply:
        for t in tagged_resources(aws, name):
            if t.kind == "volume" and not delete_store:
                out.kept.append(t)
            else:
                out.left.append(t)
    return out


def _wait_instances_gone(aws: Clients, name: str, *, timeout: float, poll: float) -> None:
    """Until no instance of the run is alive (terminating ones release their role and volume)."""
    deadline = time.monotonic() + timeout
    ec2 = aws.ec2
    while True:
        r = _aws(
            "DescribeInstances",
            ec2.describe_instances,
            Filters=[
                {"Name": f"tag:{TAG}", "Values": [name]},
                {
                    "Name": "instance-state-name",
                    "Values": ["pending", "running", "stopping", "stopped", "shutting-down"],
                },
            ],
        )
        alive = [i["InstanceId"] for res in r.get("Reservations", []) for i in res["Instances"]]
        if not alive:
            return
        if time.monotonic() >= deadline:
            raise LaunchError(f"instances of run {name} still terminating after {timeout:.0f} s: {', '.join(alive)}")
        time.sleep(poll)


def _wait_group_gone(asg: Any, res: str, *, timeout: float, poll: float) -> None:
    """Until DescribeAutoScalingGroups forgets the group ("Delete in progress" lasts minutes on AWS)."""
    deadline = time.monotonic() + timeout
    while True:
        r = _aws(f"DescribeAutoScalingGroups {res}", asg.describe_auto_scaling_groups, AutoScalingGroupNames=[res])
        if not r.get("AutoScalingGroups"):
            return
        if time.monotonic() >= deadline:
            raise LaunchError(f"auto scaling group {res} is still being deleted after {timeout:.0f} s")
        time.sleep(poll)


def _delete_volume(ec2: Any, volume_id: str, *, timeout: float, poll: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        v = _aws("DescribeVolumes", ec2.describe_volumes, VolumeIds=[volume_id])["Volumes"][0]
        if v["State"] == "available":
            _aws(f"DeleteVolume {volume_id}", ec2.delete_volume, VolumeId=volume_id)
            return
        if v["State"] in ("deleting", "deleted"):
            return
        if time.monotonic() >= deadline:
            raise LaunchError(f"volume {volume_id} is still {v['State']} after {timeout:.0f} s: not deleted")
        time.sleep(poll)


def _delete_prefix(s3: Any, store: str) -> int:
    bucket, prefix = s3_location(store)
    n = 0
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix + "/"}
    while True:
        page = _aws(f"ListObjectsV2 {store}", s3.list_objects_v2, **kwargs)
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            r = _aws(
                f"DeleteObjects {store}", s3.delete_objects, Bucket=bucket, Delete={"Objects": keys, "Quiet": True}
            )
            if r.get("Errors"):
                e = r["Errors"][0]
                raise LaunchError(f"deleting {store}: {e.get('Key')}: {e.get('Code')} {e.get('Message')}")
            n += len(keys)
        if not page.get("IsTruncated"):
            return n
        kwargs["ContinuationToken"] = page["NextContinuationToken"]


# --------------------------------------------------------------------------- status


@dataclass
class Status:
    name: str
    region: str
    group: dict[str, Any] | None = None
    instances: list[dict[str, Any]] = field(default_factory=list)
    store: str | None = None
    volume: dict[str, Any] | None = None
    checkpoints: int | None = None
    newest: Any = None
    complete: dict[str, Any] | None = None
    store_error: str | None = None
    report: dict[str, Any] | None = None
    report_note: str | None = None
    prices: dict[tuple[str, str], float] = field(default_factory=dict)


def status(
    name: str,
    aws: Clients,
    *,
    storage_options: dict[str, Any] | None = None,
    on_demand_price: float | None = None,
) -> Status:
    """The run's group and instances, its newest checkpoint and progress, and the report's facts.

    ``on_demand_price`` (USD per hour): what the report compares the spot cost with.
    """
    check_name(name)
    res = PREFIX + name
    st = Status(name, aws.region)
    st.group = _group(aws.autoscaling, res)
    ids = [i["InstanceId"] for i in (st.group or {}).get("Instances", [])]
    if ids:
        for r in _aws("DescribeInstances", aws.ec2.describe_instances, InstanceIds=ids).get("Reservations", []):
            st.instances.extend(r["Instances"])
        types = sorted({i["InstanceType"] for i in st.instances})
        try:
            for p in spot_prices(aws.ec2, types):
                st.prices[(p.instance_type, p.zone)] = p.price
        except LaunchError:
            pass  # prices are a nicety here: status still shows the rest
    vols = _run_volumes(aws.ec2, name)
    st.volume = vols[0] if vols else None
    st.store = run_store(aws, name)
    if st.store and st.store.startswith("s3://"):
        from spotsafe.checkpoint.catalog import Catalog
        from spotsafe.checkpoint.completion import read_completion
        from spotsafe.storage.registry import open_store

        try:
            with open_store(st.store, storage_options=storage_options) as opened:
                catalog = Catalog(opened)
                infos = catalog.list()
                st.checkpoints = len(infos)
                st.newest = catalog.latest()
                st.complete = read_completion(opened)
        except (SpotsafeError, OSError) as e:
            st.store_error = str(e)
        st.report, st.report_note = _report_facts(st.store, on_demand_price)
    elif st.store:
        st.store_error = "on the run's EBS volume: readable from its instance (spotsafe ls there)"
    return st


def _report_facts(store: str, on_demand_price: float | None = None) -> tuple[dict[str, Any] | None, str | None]:
    """``spotsafe report STORE --json --lookup-prices`` where that capability exists (interruptions, cost)."""
    try:
        from spotsafe.story import report
    except ImportError:
        return None, "interruptions and cost: `spotsafe report` is not in this version"
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
            argv = [store, "--json", "--lookup-prices"]
            if on_demand_price is not None:
                argv += ["--on-demand-price", str(on_demand_price)]
            rc = report.main(argv)
        if rc not in (0, None):
            return None, f"interruptions and cost: spotsafe report exited {rc}"
        facts = json.loads(buf.getvalue())
    except Exception as e:  # noqa: BLE001 - the report is optional here: its failure is shown, not raised
        return None, f"interruptions and cost: spotsafe report failed ({e})"
    if not isinstance(facts, dict):
        return None, "interruptions and cost: spotsafe report printed no facts"
    return facts, None


def _cost_line(cost: Any) -> str | None:
    """The report's cost facts in one line: spot spent, and on demand for the same hours."""
    if not isinstance(cost, dict):
        return None
    billed = cost.get("billed_hours")
    spot = cost.get("spot_cost")
    parts = []
    if isinstance(billed, (int, float)):
        parts.append(f"{billed:.2f} instance-hours billed")
    parts.append("spot cost unknown" if not isinstance(spot, (int, float)) else f"spot ${spot:.2f}")
    same = cost.get("on_demand_cost_same_hours")
    if isinstance(same, (int, float)):
        saving = cost.get("savings")
        tail = f", {saving * 100:.0f}% saved" if isinstance(saving, (int, float)) else ""
        parts.append(f"on demand ${same:.2f} for the same hours{tail}")
    else:
        parts.append("on demand: pass --on-demand-price USD/h to compare")
    return "cost: " + "; ".join(parts)


def _ago(t: datetime) -> str:
    seconds = max(0.0, time.time() - t.timestamp())
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= n:
            return f"{seconds / n:.1f} {unit}"
    return f"{seconds:.0f} s"


def format_status(st: Status, out: TextIO) -> None:
    print(f"run {st.name} ({st.region})", file=out)
    g = st.group
    if g is None:
        print(f"  group {PREFIX}{st.name}: none (not launched, or taken down)", file=out)
    else:
        mip = g.get("MixedInstancesPolicy", {})
        types = ",".join(o.get("InstanceType", "?") for o in mip.get("LaunchTemplate", {}).get("Overrides", []))
        strategy = mip.get("InstancesDistribution", {}).get("SpotAllocationStrategy", "?")
        print(
            f"  group {g['AutoScalingGroupName']}: desired {g['DesiredCapacity']} (min {g['MinSize']}, "
            f"max {g['MaxSize']}), spot over {types}, {strategy}"
            + (", capacity rebalancing" if g.get("CapacityRebalance") else ""),
            file=out,
        )
        if g["DesiredCapacity"] == 0:
            print("  scaled to zero: the run finished (spotsafe down removes what is left)", file=out)
        by_id = {i["InstanceId"]: i for i in st.instances}
        for gi in g.get("Instances", []):
            inst = by_id.get(gi["InstanceId"], {})
            market = "spot" if inst.get("InstanceLifecycle") == "spot" else "on-demand"
            zone = gi.get("AvailabilityZone", "?")
            itype = gi.get("InstanceType") or inst.get("InstanceType") or "?"
            price = st.prices.get((itype, zone))
            up = ""
            if isinstance(inst.get("LaunchTime"), datetime):
                hours = (datetime.now(timezone.utc) - inst["LaunchTime"]).total_seconds() / 3600
                up = f", up {hours:.1f} h"
            print(
                f"  instance {gi['InstanceId']} {itype} {zone} {market} {gi.get('LifecycleState', '?')}"
                f" {gi.get('HealthStatus', '')}{up}" + (f", spot now {_usd(price)}/h" if price is not None else ""),
                file=out,
            )
    if st.volume is not None:
        v = st.volume
        held = ", ".join(a["InstanceId"] for a in v.get("Attachments", [])) or "not attached"
        print(f"  volume {v['VolumeId']}: {v['Size']} GiB in {v['AvailabilityZone']}, {held}", file=out)
    print(f"  store {st.store or '(unknown)'}", file=out)
    if st.store_error:
        print(f"    {st.store_error}", file=out)
    elif st.checkpoints is not None:
        n = st.newest
        if n is None:
            print(f"    no intact checkpoint yet ({st.checkpoints} listed)", file=out)
        else:
            epoch = "" if n.epoch is None else f", epoch {n.epoch}"
            print(
                f"    newest checkpoint: step {n.step}{epoch} ({n.reason}, {_ago(n.time)} ago); {st.checkpoints} kept",
                file=out,
            )
        if st.complete is not None:
            print(f"    run complete at step {st.complete.get('step')}", file=out)
    if st.report is not None:
        r = st.report
        interruptions = r.get("interruptions", [])
        count = len(interruptions) if isinstance(interruptions, list) else interruptions
        launches = r.get("launches", [])
        print(
            f"    interruptions: {count}; launches: {len(launches) if isinstance(launches, list) else launches}; "
            f"steps lost: {r.get('steps_lost', '?')}",
            file=out,
        )
        line = _cost_line(r.get("cost"))
        if line:
            print(f"    {line}", file=out)
    elif st.report_note:
        print(f"    {st.report_note}", file=out)


# --------------------------------------------------------------------------- command line


def _types(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def add_parsers(sub: Any) -> None:
    """Add ``launch``, ``status``, ``down`` and ``price`` to the ``spotsafe`` command's subparsers."""
    p = sub.add_parser("launch", help="create a self-replacing spot trainer on AWS (plan only without --yes)")
    p.add_argument("name", help="the run's name: every resource is tagged spotsafe-run=NAME")
    p.add_argument("--store", help=f"s3://BUCKET/PREFIX, or with --volume-size a directory under {MOUNT}")
    p.add_argument("--instance-types", required=True, type=_types, metavar="T1,T2", help="e.g. g5.xlarge,g6.xlarge")
    p.add_argument("--image-id", required=True, help="the AMI (with a GPU driver and python3)")
    p.add_argument(
        "--command",
        dest="train_command",
        metavar="CMD",
        required=True,
        help='the training command, e.g. "python train.py"',
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
    p = sub.add_parser("status", help="a launched run: its instance, newest checkpoint, interruptions and cost")
    p.add_argument("name")
    p.add_argument("--region")
    p.add_argument("--on-demand-price", type=float, help="USD per hour on demand, to compare the spot cost with")
    p = sub.add_parser("down", help="delete what launch created and list anything still tagged (plan without --yes)")
    p.add_argument("name")
    p.add_argument("--region")
    p.add_argument("--yes", action="store_true", help="make the changes (without it: print the plan only)")
    p.add_argument("--delete-store", action="store_true", help="delete the checkpoints too (the volume or S3 prefix)")
    p.add_argument("--store", help="the store, when no launch template or group names it any more")
    p = sub.add_parser("price", help="spot price per zone now, cheapest first")
    p.add_argument("--instance-types", required=True, type=_types)
    p.add_argument("--region")


COMMANDS = ("launch", "status", "down", "price")


def run_command(ns: Any, out: TextIO | None = None, *, session: Any | None = None) -> int:
    """Run a parsed ``launch``/``status``/``down``/``price`` command; the exit status."""
    try:
        return _run_command(ns, out or sys.stdout, session)
    except SpotsafeError as e:
        print(f"spotsafe {ns.command}: {e}", file=sys.stderr)
        return 2


def _run_command(ns: Any, out: TextIO, session: Any | None) -> int:
    aws = Clients(ns.region, session=session)

    def say(step: Step) -> None:
        print(step, file=out, flush=True)

    if ns.command == "price":
        prices = spot_prices(aws.ec2, ns.instance_types)
        if not prices:
            print(f"no spot price for {','.join(ns.instance_types)} in {aws.region}", file=out)
            return 1
        rows = [["ZONE", "TYPE", "USD/H", "SINCE"]]
        rows += [[p.zone, p.instance_type, f"{p.price:.4f}", p.time.strftime("%Y-%m-%d %H:%M")] for p in prices]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip(), file=out)
        return 0
    if ns.command == "status":
        format_status(status(ns.name, aws, on_demand_price=ns.on_demand_price), out)
        return 0
    if ns.command == "down":
        d = down(ns.name, aws, apply=ns.yes, delete_store=ns.delete_store, store=ns.store, on_step=say)
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
    store = ns.store
    if store is None and ns.volume_size is not None:
        store = f"{ns.mount.rstrip('/')}/{ns.name}"
    if store is None:
        raise LaunchConfigError("--store: give s3://BUCKET/PREFIX (or --volume-size for a store on an EBS volume)")
    spec = LaunchSpec(
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
    )
    if ns.print_user_data:
        spec.validate()
        ref = resolve_ref(spec.repo, spec.ref) if spec.repo else None
        out.write(user_data(spec, region=aws.region, volume_id=None, ref=ref))
        return 0
    result = launch(spec, aws, apply=ns.yes, on_step=say)
    if not ns.yes:
        print("plan only: rerun with --yes to make these changes" if result.changes else "nothing to change", file=out)
    elif result.changes:
        print(f"launched: spotsafe status {spec.name} --region {aws.region}; spotsafe down {spec.name} --yes", file=out)
    else:
        print("nothing changed: everything was already there", file=out)
    return 0
