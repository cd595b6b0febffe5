"""The persistent EBS volume: find it, bring it to this instance, mount it (formatting only when blank).

A spot run keeps its checkpoints, data and logs on one EBS volume that outlives
the instances it is attached to. On every boot, a replacement instance:

1. finds the volume by id or by tag (``spotsafe-run=mnist``), with its own
   instance id, zone and region taken from the instance metadata service;
2. waits for the volume to leave the old instance (a bounded force-detach only
   when the old instance is gone: terminated, stopped or unknown);
3. if the volume is in another availability zone and ``move`` is asked for,
   snapshots it and creates a copy here with the same tags (the old one is
   retired only once the copy is attached *and* mounted);
4. attaches it and finds its block device (on Nitro by the NVMe serial number,
   which is the volume id without the dash; else the requested ``/dev/sdX`` or
   its ``/dev/xvdX`` twin);
5. mounts it, creating a filesystem only on a device that is blank (no
   signature, zeros at the start) *and* when asked (``--mkfs``, or the volume
   tagged ``spotsafe-new=true``). A device with data is never formatted.

Every step is idempotent: attach + mount twice is a no-op the second time.

Command line (``python -m spotsafe.volume`` or ``spotsafe volume``)::

    attach   --tag spotsafe-run=mnist [--move] [--device /dev/sdf]     prints the block device
    mount    --tag spotsafe-run=mnist [--mountpoint /mnt/spotsafe] [--mkfs] [--owner ubuntu] [--fstab]
    unmount  [--mountpoint /mnt/spotsafe]
    detach   --tag spotsafe-run=mnist [--force]
    status   [--tag spotsafe-run=mnist] [--json]
    finish   [--no-asg] [--no-spot]    tell the Auto Scaling group / spot request to stop replacing us

Each failure kind has its own exit status (see :data:`EXIT_CODES` and docs/volume.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import glob
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from spotsafe.errors import (
    MetadataError,
    MissingDependency,
    VolumeAmbiguous,
    VolumeAWSError,
    VolumeBusy,
    VolumeDeviceNotFound,
    VolumeError,
    VolumeMountError,
    VolumeNoFilesystem,
    VolumeNotBlank,
    VolumeNotFound,
    VolumePermissionDenied,
    VolumeTimeout,
    VolumeWrongZone,
)

log = logging.getLogger("spotsafe.volume")

# --------------------------------------------------------------------------- exit codes

EXIT_OK = 0
#: Any other volume failure.
EXIT_FAILED = 1
#: Bad command line (argparse's own status).
EXIT_USAGE = 2
#: No volume with that id or tag.
EXIT_NOT_FOUND = 3
#: Several volumes match the tag and none is clearly the one.
EXIT_AMBIGUOUS = 4
#: The instance role is not allowed to do an EC2 call (IAM).
EXIT_PERMISSION = 5
#: The volume is in another availability zone and ``--move`` was not given.
EXIT_WRONG_ZONE = 6
#: The volume is still attached to another instance that is alive, or never let go.
EXIT_BUSY = 7
#: An EC2 state change (attach, snapshot, create) did not finish in time.
EXIT_TIMEOUT = 8
#: The volume is attached but its block device never appeared.
EXIT_NO_DEVICE = 9
#: The device has no filesystem and formatting was not allowed (``--mkfs`` / ``spotsafe-new=true``).
EXIT_NO_FILESYSTEM = 10
#: The device holds data that is not a filesystem spotsafe can mount: never formatted.
EXIT_NOT_BLANK = 11
#: mount / umount / mkfs failed, or the mount point holds another device.
EXIT_MOUNT = 12
#: The instance metadata service (IMDS) could not be read: not on EC2?
EXIT_METADATA = 13
#: Another EC2 API failure (network, throttling, credentials).
EXIT_AWS = 14
#: boto3 is not installed (``pip install spotsafe[aws]``).
EXIT_MISSING_DEPENDENCY = 15

#: Exception class -> exit status. The most specific class wins (checked in this order).
EXIT_CODES: dict[type[BaseException], int] = {
    VolumeNotFound: EXIT_NOT_FOUND,
    VolumeAmbiguous: EXIT_AMBIGUOUS,
    VolumePermissionDenied: EXIT_PERMISSION,
    VolumeWrongZone: EXIT_WRONG_ZONE,
    VolumeBusy: EXIT_BUSY,
    VolumeTimeout: EXIT_TIMEOUT,
    VolumeDeviceNotFound: EXIT_NO_DEVICE,
    VolumeNoFilesystem: EXIT_NO_FILESYSTEM,
    VolumeNotBlank: EXIT_NOT_BLANK,
    VolumeMountError: EXIT_MOUNT,
    MetadataError: EXIT_METADATA,
    VolumeAWSError: EXIT_AWS,
    MissingDependency: EXIT_MISSING_DEPENDENCY,
    VolumeError: EXIT_FAILED,
}

# --------------------------------------------------------------------------- tags

#: Tag that allows the first mount to create a filesystem (removed once it has one).
TAG_NEW = "spotsafe-new"
#: On a copy made by a zone move: the id of the volume it was copied from (retired after mount).
TAG_MOVED_FROM = "spotsafe-moved-from"
#: On a copy made by a zone move: the snapshot it was made from (deleted with the old volume).
TAG_MOVE_SNAPSHOT = "spotsafe-move-snapshot"

DEFAULT_MOUNTPOINT = "/mnt/spotsafe"
DEFAULT_FSTYPE = "ext4"
#: Device names tried, in order, when none is asked for (the EC2 recommended range for EBS).
DEVICE_NAMES = tuple(f"/dev/sd{c}" for c in "fghijklmnop")
NITRO_BY_ID_PREFIX = "nvme-Amazon_Elastic_Block_Store_"

#: The minimal IAM policy the instance role needs (``python -m spotsafe.volume iam-policy`` prints it).
#: Tested against moto with IAM enforcement: this exact document allows attach, move, retire,
#: detach and finish. Drop the second statement if you never use ``--move``, the third if you
#: never set SPOTSAFE_SHUTDOWN_WHEN_DONE.
IAM_POLICY: dict[str, Any] = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Sid": "SpotsafeAttachVolume",
            "Effect": "Allow",
            "Action": [
                "ec2:DescribeVolumes",
                "ec2:DescribeInstances",
                "ec2:AttachVolume",
                "ec2:DetachVolume",
                "ec2:DeleteTags",
            ],
            "Resource": "*",
        },
        {
            "Sid": "SpotsafeMoveVolumeAcrossZones",
            "Effect": "Allow",
            "Action": [
                "ec2:CreateSnapshot",
                "ec2:DescribeSnapshots",
                "ec2:CreateVolume",
                "ec2:CreateTags",
                "ec2:DeleteVolume",
                "ec2:DeleteSnapshot",
            ],
            "Resource": "*",
        },
        {
            "Sid": "SpotsafeStopReplacingWhenDone",
            "Effect": "Allow",
            "Action": [
                "autoscaling:DescribeAutoScalingInstances",
                "autoscaling:UpdateAutoScalingGroup",
                "ec2:DescribeSpotInstanceRequests",
                "ec2:CancelSpotInstanceRequests",
            ],
            "Resource": "*",
        },
    ],
}

_GONE_STATES = frozenset({"terminated", "stopped"})
_PERMISSION_CODES = frozenset({"UnauthorizedOperation", "AccessDenied", "AccessDeniedException", "UnauthorizedAccess"})
_BLANK_PROBE_BYTES = 1 << 20


# --------------------------------------------------------------------------- data


class InstanceIdentity(Protocol):
    """Who and where this instance is: :class:`spotsafe.interruption.AWSMetadata` fits."""

    @property
    def instance_id(self) -> str: ...

    @property
    def availability_zone(self) -> str: ...

    @property
    def region(self) -> str: ...


@dataclass(frozen=True)
class Timeouts:
    """Bounds of every wait loop, in seconds; tests shrink them."""

    poll: float = 2.0
    #: attach_volume until the attachment is "attached".
    attach: float = 180.0
    #: the volume leaving the old instance (including the force-detach).
    detach: float = 600.0
    #: how long a gone instance gets to let go by itself before a force-detach.
    force_detach_after: float = 60.0
    #: the block device appearing after the attachment is "attached".
    device: float = 120.0
    #: snapshot completion and volume creation during a zone move.
    snapshot: float = 7200.0
    create: float = 600.0


@dataclass(frozen=True)
class VolumeInfo:
    """One EBS volume as EC2 describes it (a point in time: refresh with :meth:`VolumeManager.describe`)."""

    volume_id: str
    availability_zone: str
    state: str  # creating | available | in-use | deleting | deleted | error
    size: int  # GiB
    volume_type: str
    tags: Mapping[str, str]
    instance_id: str | None = None  # attached to
    attachment_state: str | None = None  # attaching | attached | detaching | busy
    device_name: str | None = None  # the name given to attach_volume, e.g. /dev/sdf
    iops: int | None = None
    throughput: int | None = None
    encrypted: bool = False
    kms_key_id: str | None = None

    @property
    def nvme_serial(self) -> str:
        """The serial number a Nitro instance shows for this volume: the id without the dash."""
        return self.volume_id.replace("-", "")

    @classmethod
    def from_api(cls, v: Mapping[str, Any]) -> VolumeInfo:
        attachments = [a for a in v.get("Attachments", []) if a.get("State") != "detached"]
        a = attachments[0] if attachments else {}
        return cls(
            volume_id=v["VolumeId"],
            availability_zone=v["AvailabilityZone"],
            state=v.get("State", "unknown"),
            size=int(v.get("Size", 0)),
            volume_type=v.get("VolumeType", "gp3"),
            tags={t["Key"]: t["Value"] for t in v.get("Tags", []) or []},
            instance_id=a.get("InstanceId"),
            attachment_state=a.get("State"),
            device_name=a.get("Device"),
            iops=v.get("Iops"),
            throughput=v.get("Throughput"),
            encrypted=bool(v.get("Encrypted", False)),
            kms_key_id=v.get("KmsKeyId"),
        )

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tags"] = dict(self.tags)
        return d


@dataclass(frozen=True)
class Attachment:
    """What :meth:`VolumeManager.attach` did: the volume (after any move) and its block device."""

    volume: VolumeInfo
    device: str  # the real block device path, e.g. /dev/nvme1n1
    attached_now: bool  # False when it already was attached here (idempotent re-run)
    moved_from: str | None = None  # the old volume id when a zone move made this one


@dataclass(frozen=True)
class MountResult:
    device: str
    mountpoint: str
    fstype: str
    uuid: str | None
    formatted: bool  # a filesystem was created now
    already_mounted: bool  # it was mounted there before this call
    fstab_added: bool = False


# --------------------------------------------------------------------------- tag helpers


def parse_tags(items: Iterable[str]) -> dict[str, str]:
    """``["k=v", ...]`` -> ``{"k": "v"}``; a bad item raises ValueError naming it."""
    tags: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"tag {item!r} is not KEY=VALUE")
        tags[key] = value
    return tags


def _tag_list(tags: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in tags.items()]


def _describe_selector(volume_id: str | None, tags: Mapping[str, str] | None) -> str:
    if volume_id:
        return volume_id
    return "volume tagged " + ", ".join(f"{k}={v}" for k, v in (tags or {}).items())


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------- AWS errors


def _aws_error(e: BaseException, what: str) -> VolumeError:
    """Turn a botocore exception into the VolumeError a caller (and the exit code) can act on."""
    response = getattr(e, "response", None)
    if isinstance(response, Mapping):
        err = response.get("Error", {}) or {}
        code = str(err.get("Code", ""))
        message = str(err.get("Message", "")) or str(e)
        if code in _PERMISSION_CODES:
            return VolumePermissionDenied(
                f"{what}: permission denied by IAM ({code}: {message}); the instance role needs "
                "the policy in docs/volume.md"
            )
        if code.startswith("InvalidVolume.NotFound") or code == "InvalidVolumeID.Malformed":
            return VolumeNotFound(f"{what}: no such volume ({code}: {message})")
        if code in ("VolumeInUse", "IncorrectState", "InvalidAttachment.NotFound"):
            return VolumeBusy(f"{what}: {code}: {message}")
        return VolumeAWSError(f"{what}: EC2 error {code}: {message}")
    return VolumeAWSError(f"{what}: {type(e).__name__}: {e}")


def _is_botocore_error(e: BaseException) -> bool:
    return type(e).__module__.startswith(("botocore", "boto3"))


class _Calls:
    """Wraps every EC2 call so a botocore error becomes a VolumeError naming the call."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def __call__(self, op: str, what: str, **kwargs: Any) -> Any:
        try:
            return getattr(self.client, op)(**kwargs)
        except Exception as e:
            if _is_botocore_error(e):
                raise _aws_error(e, f"{what} ({op})") from e
            raise


def ec2_client(region: str, *, endpoint_url: str | None = None) -> Any:
    """A boto3 EC2 client for ``region``. ``AWS_ENDPOINT_URL_EC2`` is honoured by botocore."""
    return _client("ec2", region, endpoint_url=endpoint_url)


def _client(service: str, region: str, *, endpoint_url: str | None = None) -> Any:
    from spotsafe.errors import require

    boto3 = require("boto3", "aws")
    kwargs: dict[str, Any] = {"region_name": region}
    if endpoint_url:
        kwargs["endpoint_url"] = endpoint_url
    return boto3.client(service, **kwargs)


# --------------------------------------------------------------------------- the manager


class VolumeManager:
    """Finds, moves, attaches and detaches the run's EBS volume for this instance.

    ``ec2`` is a boto3 EC2 client; ``identity`` anything with ``instance_id``,
    ``availability_zone`` and ``region`` (:class:`spotsafe.interruption.AWSMetadata`).
    Every method does EC2 I/O; every wait is bounded by ``timeouts``.
    """

    def __init__(
        self,
        ec2: Any,
        identity: InstanceIdentity,
        *,
        timeouts: Timeouts | None = None,
        sys_root: str = "/sys",
        dev_root: str = "/dev",
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.ec2 = ec2
        self.identity = identity
        self.timeouts = timeouts or Timeouts()
        self.sys_root = sys_root
        self.dev_root = dev_root
        self._sleep = sleep
        self._call = _Calls(ec2)

    @property
    def instance_id(self) -> str:
        return self.identity.instance_id

    @property
    def availability_zone(self) -> str:
        return self.identity.availability_zone

    # ---------------------------------------------------------------- finding

    def describe(self, volume_id: str) -> VolumeInfo:
        """The volume as EC2 sees it now; :class:`VolumeNotFound` when it does not exist."""
        r = self._call("describe_volumes", f"describe {volume_id}", VolumeIds=[volume_id])
        vols = r.get("Volumes", [])
        if not vols:
            raise VolumeNotFound(f"no volume {volume_id} in {self.identity.region}")
        return VolumeInfo.from_api(vols[0])

    def _exists(self, volume_id: str) -> VolumeInfo | None:
        try:
            return self.describe(volume_id)
        except VolumeNotFound:
            return None

    def find(self, volume_id: str | None = None, tags: Mapping[str, str] | None = None) -> VolumeInfo:
        """The run's volume, by id or by tags.

        Among several volumes with the tags: the ones being deleted are ignored, so
        is a volume superseded by a zone-move copy (``spotsafe-moved-from``); one
        attached to this instance wins; otherwise exactly one must remain, else
        :class:`VolumeAmbiguous` lists them.
        """
        if volume_id:
            return self.describe(volume_id)
        if not tags:
            raise VolumeError("find: give a volume id or at least one tag")
        what = _describe_selector(None, tags)
        filters = [{"Name": f"tag:{k}", "Values": [v]} for k, v in tags.items()]
        r = self._call("describe_volumes", f"find {what}", Filters=filters)
        vols = [VolumeInfo.from_api(v) for v in r.get("Volumes", [])]
        vols = [v for v in vols if v.state not in ("deleting", "deleted", "error")]
        if not vols:
            raise VolumeNotFound(f"no {what} in {self.identity.region}")
        superseded = {v.tags.get(TAG_MOVED_FROM) for v in vols}
        live = [v for v in vols if v.volume_id not in superseded]
        mine = [v for v in live if v.instance_id == self.instance_id]
        if len(mine) == 1:
            return mine[0]
        if len(live) == 1:
            return live[0]
        listing = ", ".join(
            f"{v.volume_id} ({v.availability_zone}, {v.state}"
            + (f", attached to {v.instance_id}" if v.instance_id else "")
            + ")"
            for v in sorted(live, key=lambda v: v.volume_id)
        )
        raise VolumeAmbiguous(f"{len(live)} volumes match {what}: {listing}; pass --volume-id")

    def instance_state(self, instance_id: str) -> str | None:
        """EC2 state name of an instance, or None when EC2 no longer knows it."""
        try:
            r = self.ec2.describe_instances(InstanceIds=[instance_id])
        except Exception as e:
            if not _is_botocore_error(e):
                raise
            code = (getattr(e, "response", None) or {}).get("Error", {}).get("Code", "")
            if code.startswith("InvalidInstanceID"):
                return None
            raise _aws_error(e, f"describe instance {instance_id}") from e
        for res in r.get("Reservations", []):
            for inst in res.get("Instances", []):
                if inst.get("InstanceId") == instance_id:
                    return str(inst.get("State", {}).get("Name", "unknown"))
        return None

    # ---------------------------------------------------------------- detaching

    def wait_detached(self, volume: VolumeInfo) -> VolumeInfo:
        """Wait until ``volume`` is attached to no other instance; returns it refreshed.

        While the old instance is alive (running, shutting-down, stopping) it is
        given the whole ``timeouts.detach`` to let go: it may still be flushing
        its last checkpoint. Once it is gone (terminated, stopped, unknown to EC2)
        a plain detach is asked for, and after ``timeouts.force_detach_after`` a
        forced one. Raises :class:`VolumeBusy` when the volume is still held at the end.
        """
        t = self.timeouts
        start = time.monotonic()
        gone_since: float | None = None
        asked = forced = False
        while True:
            volume = self.describe(volume.volume_id)
            old = volume.instance_id
            if old is None or old == self.instance_id:
                return volume
            state = self.instance_state(old)
            now = time.monotonic()
            if state is None or state in _GONE_STATES:
                if gone_since is None:
                    gone_since = now
                    log.info("volume %s still attached to %s (%s): detaching", volume.volume_id, old, state or "gone")
                if not asked:
                    self._detach_call(volume.volume_id, old, force=False)
                    asked = True
                elif not forced and now - gone_since >= t.force_detach_after:
                    log.warning(
                        "volume %s not released by %s (%s) after %.0f s: force-detaching",
                        volume.volume_id,
                        old,
                        state or "gone",
                        now - gone_since,
                    )
                    self._detach_call(volume.volume_id, old, force=True)
                    forced = True
            else:
                log.info("volume %s attached to %s, which is %s: waiting", volume.volume_id, old, state)
            if now - start >= t.detach:
                raise VolumeBusy(
                    f"volume {volume.volume_id} is still attached to {old} ({state or 'gone'}) after "
                    f"{t.detach:.0f} s"
                    + (
                        ""
                        if state is None or state in _GONE_STATES
                        else "; that instance is alive: is another copy of this run using it?"
                    )
                )
            self._sleep(t.poll)

    def _detach_call(self, volume_id: str, instance_id: str, *, force: bool) -> None:
        try:
            self._call(
                "detach_volume",
                f"detach {volume_id} from {instance_id}",
                VolumeId=volume_id,
                InstanceId=instance_id,
                Force=force,
            )
        except VolumeBusy as e:  # already detaching / detached meanwhile: the loop sees it
            log.info("%s", e)

    def detach(self, volume: VolumeInfo, *, force: bool = False) -> VolumeInfo:
        """Detach ``volume`` from this instance (unmount it first) and wait until it is free.

        Idempotent: a volume that is not attached here is left alone.
        """
        volume = self.describe(volume.volume_id)
        if volume.instance_id != self.instance_id:
            return volume
        self._detach_call(volume.volume_id, self.instance_id, force=force)
        return self._wait(
            volume.volume_id,
            lambda v: v.instance_id is None,
            self.timeouts.detach,
            f"volume {volume.volume_id} to detach from {self.instance_id}",
            busy=True,
        )

    # ---------------------------------------------------------------- moving

    def move_to_az(self, volume: VolumeInfo) -> VolumeInfo:
        """A copy of ``volume`` in this instance's zone, with the same tags.

        Snapshot, wait, create from it here (same type, size, IOPS, throughput,
        encryption), wait until available. The copy is tagged
        ``spotsafe-moved-from=<old id>`` and ``spotsafe-move-snapshot=<snap>``: the
        old volume stays until :meth:`retire_superseded` runs after the mount. A
        copy left by an interrupted earlier move is reused.
        """
        here = self.availability_zone
        r = self._call(
            "describe_volumes",
            f"look for an earlier move of {volume.volume_id}",
            Filters=[
                {"Name": f"tag:{TAG_MOVED_FROM}", "Values": [volume.volume_id]},
                {"Name": "availability-zone", "Values": [here]},
            ],
        )
        for v in r.get("Volumes", []):
            info = VolumeInfo.from_api(v)
            if info.state in ("creating", "available", "in-use"):
                log.info("reusing %s, an earlier copy of %s in %s", info.volume_id, volume.volume_id, here)
                return self._wait_available(info)
        volume = self.wait_detached(volume)
        log.info("moving %s from %s to %s: snapshot", volume.volume_id, volume.availability_zone, here)
        keep = {k: v for k, v in volume.tags.items() if not k.startswith("aws:") and k != TAG_NEW}
        snap = self._call(
            "create_snapshot",
            f"snapshot {volume.volume_id}",
            VolumeId=volume.volume_id,
            Description=f"spotsafe: move of {volume.volume_id} to {here}",
            TagSpecifications=[
                {"ResourceType": "snapshot", "Tags": _tag_list({**keep, "spotsafe-move-of": volume.volume_id})}
            ],
        )
        snap_id = snap["SnapshotId"]
        self._wait_snapshot(snap_id)
        args: dict[str, Any] = {
            "AvailabilityZone": here,
            "SnapshotId": snap_id,
            "VolumeType": volume.volume_type,
            "Size": volume.size,
            "TagSpecifications": [
                {
                    "ResourceType": "volume",
                    "Tags": _tag_list({**keep, TAG_MOVED_FROM: volume.volume_id, TAG_MOVE_SNAPSHOT: snap_id}),
                }
            ],
        }
        if volume.volume_type in ("io1", "io2", "gp3") and volume.iops:
            args["Iops"] = volume.iops
        if volume.volume_type == "gp3" and volume.throughput:
            args["Throughput"] = volume.throughput
        if volume.encrypted:
            args["Encrypted"] = True
            if volume.kms_key_id:
                args["KmsKeyId"] = volume.kms_key_id
        created = self._call("create_volume", f"create a copy of {volume.volume_id} in {here}", **args)
        new = VolumeInfo.from_api(created)
        log.info("created %s in %s from %s", new.volume_id, here, snap_id)
        return self._wait_available(new)

    def _wait_snapshot(self, snap_id: str) -> None:
        start = time.monotonic()
        while True:
            r = self._call("describe_snapshots", f"describe {snap_id}", SnapshotIds=[snap_id])
            s = r["Snapshots"][0]
            if s["State"] == "completed":
                return
            if s["State"] == "error":
                raise VolumeError(f"snapshot {snap_id} failed: {s.get('StateMessage', 'error')}")
            if time.monotonic() - start >= self.timeouts.snapshot:
                raise VolumeTimeout(
                    f"snapshot {snap_id} not completed after {self.timeouts.snapshot:.0f} s ({s.get('Progress')})"
                )
            self._sleep(self.timeouts.poll)

    def _wait_available(self, volume: VolumeInfo) -> VolumeInfo:
        if volume.state in ("available", "in-use"):
            return volume
        return self._wait(
            volume.volume_id,
            lambda v: v.state in ("available", "in-use"),
            self.timeouts.create,
            f"volume {volume.volume_id} to become available",
        )

    def _wait(
        self, volume_id: str, done: Callable[[VolumeInfo], bool], timeout: float, what: str, *, busy: bool = False
    ) -> VolumeInfo:
        start = time.monotonic()
        while True:
            v = self.describe(volume_id)
            if done(v):
                return v
            if v.state == "error":
                raise VolumeError(f"volume {volume_id} is in state error while waiting for {what}")
            if time.monotonic() - start >= timeout:
                cls = VolumeBusy if busy else VolumeTimeout
                raise cls(
                    f"timed out after {timeout:.0f} s waiting for {what} (state {v.state}, "
                    f"attachment {v.attachment_state})"
                )
            self._sleep(self.timeouts.poll)

    def retire_superseded(self, volume: VolumeInfo) -> list[str]:
        """After ``volume`` (a zone-move copy) is attached and mounted: delete the old one and the snapshot.

        Returns what was deleted. Idempotent; an old volume attached somewhere is kept (logged).
        """
        old_id = volume.tags.get(TAG_MOVED_FROM)
        if not old_id:
            return []
        deleted: list[str] = []
        old = self._exists(old_id)
        if old is not None:
            if old.instance_id is not None:
                log.warning("not retiring %s: it is attached to %s", old_id, old.instance_id)
                return []
            self._call("delete_volume", f"retire {old_id}", VolumeId=old_id)
            deleted.append(old_id)
        snap = volume.tags.get(TAG_MOVE_SNAPSHOT)
        if snap:
            try:
                self._call("delete_snapshot", f"delete move snapshot {snap}", SnapshotId=snap)
                deleted.append(snap)
            except VolumeAWSError as e:
                if "NotFound" not in str(e):
                    raise
        self._call(
            "delete_tags",
            f"untag {volume.volume_id}",
            Resources=[volume.volume_id],
            Tags=[{"Key": TAG_MOVED_FROM}, {"Key": TAG_MOVE_SNAPSHOT}],
        )
        log.info("retired %s", ", ".join(deleted) or "nothing (already gone)")
        return deleted

    # ---------------------------------------------------------------- attaching

    def _free_device_name(self) -> str:
        r = self._call("describe_instances", f"describe {self.instance_id}", InstanceIds=[self.instance_id])
        used: set[str] = set()
        for res in r.get("Reservations", []):
            for inst in res.get("Instances", []):
                used.update(m.get("DeviceName", "") for m in inst.get("BlockDeviceMappings", []))
        for name in DEVICE_NAMES:
            if name not in used and name.replace("/dev/sd", "/dev/xvd") not in used:
                return name
        raise VolumeError(f"no free device name in {DEVICE_NAMES[0]}..{DEVICE_NAMES[-1]} on {self.instance_id}")

    def attach(
        self,
        volume_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        *,
        device_name: str | None = None,
        move: bool = False,
        wait_device: bool = True,
    ) -> Attachment:
        """Bring the run's volume to this instance and return its block device.

        Idempotent: a volume already attached here is only looked up. A volume in
        another zone raises :class:`VolumeWrongZone` unless ``move``.
        """
        volume = self.find(volume_id, tags)
        moved_from: str | None = None
        if volume.instance_id == self.instance_id and volume.attachment_state in ("attached", "attaching"):
            volume = self._wait_attached(volume)
            device = self.find_device(volume, wait=wait_device)
            log.info("volume %s already attached here as %s", volume.volume_id, device)
            return Attachment(volume, device, attached_now=False, moved_from=volume.tags.get(TAG_MOVED_FROM))
        if volume.availability_zone != self.availability_zone:
            if not move:
                raise VolumeWrongZone(
                    f"volume {volume.volume_id} is in {volume.availability_zone}, this instance "
                    f"({self.instance_id}) in {self.availability_zone}: pass --move to copy it here "
                    "(snapshot + new volume), or launch in its zone"
                )
            moved_from = volume.volume_id
            volume = self.move_to_az(volume)
            if volume.instance_id == self.instance_id:
                volume = self._wait_attached(volume)
                return Attachment(volume, self.find_device(volume, wait=wait_device), False, moved_from)
        volume = self.wait_detached(volume)
        if volume.state == "creating":
            volume = self._wait_available(volume)
        name = device_name or self._free_device_name()
        log.info("attaching %s to %s as %s", volume.volume_id, self.instance_id, name)
        self._call(
            "attach_volume",
            f"attach {volume.volume_id} to {self.instance_id}",
            VolumeId=volume.volume_id,
            InstanceId=self.instance_id,
            Device=name,
        )
        volume = self._wait_attached(volume)
        device = self.find_device(volume, wait=wait_device)
        log.info("volume %s attached as %s", volume.volume_id, device)
        return Attachment(volume, device, attached_now=True, moved_from=moved_from)

    def _wait_attached(self, volume: VolumeInfo) -> VolumeInfo:
        return self._wait(
            volume.volume_id,
            lambda v: v.instance_id == self.instance_id and v.attachment_state == "attached",
            self.timeouts.attach,
            f"volume {volume.volume_id} to attach to {self.instance_id}",
        )

    def find_device(self, volume: VolumeInfo, *, wait: bool = True) -> str:
        """The block device of an attached volume (see :func:`find_device`)."""
        return find_device(
            volume.volume_id,
            volume.device_name,
            sys_root=self.sys_root,
            dev_root=self.dev_root,
            timeout=self.timeouts.device if wait else 0.0,
            poll=min(self.timeouts.poll, 0.5),
        )


# --------------------------------------------------------------------------- block devices


def _is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def _nvme_serial_matches(sys_root: str, dev_root: str, serial: str) -> str | None:
    # udev's stable name first, then the serial number of every NVMe controller.
    by_id = os.path.join(dev_root, "disk", "by-id", NITRO_BY_ID_PREFIX + serial)
    if _is_block_device(by_id):
        return os.path.realpath(by_id)
    for serial_file in sorted(glob.glob(os.path.join(sys_root, "block", "nvme*", "device", "serial"))):
        try:
            with open(serial_file, encoding="ascii", errors="replace") as f:
                found = f.read().strip()
        except OSError:
            continue
        # Some instance types report the serial without the dash, some with.
        if found.replace("-", "") == serial:
            name = os.path.basename(os.path.dirname(os.path.dirname(serial_file)))
            dev = os.path.join(dev_root, name)
            if _is_block_device(dev):
                return os.path.realpath(dev)
    return None


def _named_candidates(dev_root: str, device_name: str) -> list[str]:
    base = os.path.basename(device_name)
    names = [base]
    if base.startswith("sd"):
        names.append("xvd" + base[2:])
    elif base.startswith("xvd"):
        names.append("sd" + base[3:])
    return [os.path.join(dev_root, n) for n in names]


def find_device(
    volume_id: str,
    device_name: str | None = None,
    *,
    sys_root: str = "/sys",
    dev_root: str = "/dev",
    timeout: float = 120.0,
    poll: float = 0.5,
) -> str:
    """The block device of an attached EBS volume, waiting up to ``timeout`` for it to appear.

    On Nitro instances (NVMe) the device is the one whose controller serial
    number is the volume id without the dash (``/sys/block/nvme*/device/serial``,
    or udev's ``/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol…``); device
    names given to the API mean nothing there. Otherwise (Xen) it is the
    requested name or its ``xvd`` twin. Returns the resolved path; raises
    :class:`VolumeDeviceNotFound`.
    """
    serial = volume_id.replace("-", "")
    start = time.monotonic()
    nvme_present = False
    while True:
        found = _nvme_serial_matches(sys_root, dev_root, serial)
        if found:
            return found
        nvme_present = nvme_present or bool(glob.glob(os.path.join(sys_root, "block", "nvme*")))
        # On Nitro the /dev/sdX name may be a udev symlink to *any* NVMe disk
        # only when ec2-utils made it for this volume; trust the serial there.
        if device_name and not nvme_present:
            for cand in _named_candidates(dev_root, device_name):
                if _is_block_device(cand):
                    return os.path.realpath(cand)
        if time.monotonic() - start >= timeout:
            looked = f"NVMe serial {serial} under {sys_root}/block"
            if device_name:
                looked += f", {' or '.join(_named_candidates(dev_root, device_name))}"
            raise VolumeDeviceNotFound(
                f"volume {volume_id} is attached but no block device appeared after {timeout:.0f} s "
                f"(looked for {looked})"
            )
        time.sleep(poll)


# --------------------------------------------------------------------------- filesystems


def _run(cmd: Sequence[str], what: str, *, ok: Iterable[int] = (0,)) -> subprocess.CompletedProcess[str]:
    try:
        p = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise VolumeMountError(f"{what}: {cmd[0]} is not installed") from e
    if p.returncode not in set(ok):
        detail = (p.stderr or p.stdout).strip()
        raise VolumeMountError(f"{what}: {' '.join(cmd)} exited {p.returncode}: {detail}")
    return p


def probe(device: str) -> dict[str, str]:
    """What ``blkid -p`` (a low-level probe, no cache) finds on ``device``: TYPE, UUID, PTTYPE…; {} when nothing."""
    p = _run(["blkid", "-p", "-o", "export", device], f"probe {device}", ok=(0, 2))
    found: dict[str, str] = {}
    if p.returncode == 2:
        return found
    for line in p.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            found[key.strip()] = value.strip()
    return found


def filesystem_type(device: str) -> str | None:
    """The filesystem on ``device`` (``ext4``, ``xfs``…) or None when blkid finds none."""
    return probe(device).get("TYPE")


def is_blank(device: str, nbytes: int = _BLANK_PROBE_BYTES) -> bool:
    """True when the first ``nbytes`` of ``device`` are all zero (a new EBS volume is)."""
    try:
        with open(device, "rb") as f:
            data = f.read(nbytes)
    except OSError as e:
        raise VolumeMountError(f"cannot read {device}: {e.strerror}") from e
    return data.count(0) == len(data)


@dataclass(frozen=True)
class _MountEntry:
    source: str
    mountpoint: str
    fstype: str
    majmin: str


def _unescape(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def _mounts() -> list[_MountEntry]:
    entries: list[_MountEntry] = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            lf, rf = left.split(), right.split()
            if len(lf) < 5 or len(rf) < 2:
                continue
            entries.append(_MountEntry(_unescape(rf[1]), _unescape(lf[4]), rf[0], lf[2]))
    return entries


def _majmin(device: str) -> str:
    st = os.stat(device)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def mounted_at(mountpoint: str) -> _MountEntry | None:
    """The (topmost) mount at ``mountpoint``, or None."""
    target = os.path.realpath(mountpoint)
    found = None
    for m in _mounts():
        if m.mountpoint == target:
            found = m
    return found


def mountpoints_of(device: str) -> list[str]:
    """Where ``device`` is mounted now."""
    mm = _majmin(device)
    return [m.mountpoint for m in _mounts() if m.majmin == mm]


def _chown(path: str, owner: str) -> None:
    import grp
    import pwd

    user, _, group = owner.partition(":")
    try:
        pw = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
    except KeyError as e:
        raise VolumeMountError(f"chown {path}: no user {user!r} on this machine") from e
    gid = pw.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid if not group.isdigit() else int(group)
        except KeyError as e:
            raise VolumeMountError(f"chown {path}: no group {group!r} on this machine") from e
    os.chown(path, pw.pw_uid, gid)


def _add_fstab(fstab_path: str, uuid: str, mountpoint: str, fstype: str) -> bool:
    """Add ``UUID=… mountpoint fstype defaults,nofail 0 2`` unless the mount point is listed; atomic."""
    try:
        with open(fstab_path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        text = ""
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and not fields[0].startswith("#") and _unescape(fields[1]) == mountpoint:
            return False
    # nofail: a boot without the volume (it is attached later, by us) must not hang in emergency mode.
    entry = f"UUID={uuid} {mountpoint.replace(' ', chr(92) + '040')} {fstype} defaults,nofail 0 2\n"
    if text and not text.endswith("\n"):
        text += "\n"
    directory = os.path.dirname(os.path.abspath(fstab_path))
    fd, tmp = tempfile.mkstemp(prefix=".fstab.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text + entry)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(fstab_path):
            shutil.copymode(fstab_path, tmp)
        else:
            os.chmod(tmp, 0o644)
        os.replace(tmp, fstab_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return True


def mount(
    device: str,
    mountpoint: str = DEFAULT_MOUNTPOINT,
    *,
    mkfs: bool = False,
    fstype: str = DEFAULT_FSTYPE,
    label: str | None = "spotsafe",
    owner: str | None = None,
    fstab: bool = False,
    fstab_path: str = "/etc/fstab",
    options: str | None = None,
) -> MountResult:
    """Mount ``device`` at ``mountpoint``, creating a filesystem only when allowed *and* the device is blank.

    Idempotent: the same device already mounted there is fine. Raises
    :class:`VolumeNoFilesystem` (blank, ``mkfs`` not allowed), :class:`VolumeNotBlank`
    (data without a filesystem signature, or a partition table: never formatted),
    :class:`VolumeMountError` (mount point holds another device, mount failed).
    """
    if not _is_block_device(device):
        raise VolumeDeviceNotFound(f"{device} is not a block device")
    mountpoint = os.path.abspath(mountpoint)
    current = mounted_at(mountpoint)
    formatted = False
    if current is not None:
        if current.majmin != _majmin(device):
            raise VolumeMountError(
                f"{mountpoint} already has {current.source} mounted ({current.fstype}), not {device}"
            )
        info = probe(device)
        fs, already = current.fstype, True
    else:
        elsewhere = mountpoints_of(device)
        if elsewhere:
            raise VolumeMountError(f"{device} is already mounted at {', '.join(elsewhere)}; unmount it first")
        info = probe(device)
        detected = info.get("TYPE")
        if detected is None:
            if info.get("PTTYPE"):
                raise VolumeNotBlank(
                    f"{device} has a {info['PTTYPE']} partition table and no filesystem on the whole "
                    "device: mount the partition itself (--device …p1); spotsafe never formats it"
                )
            if not is_blank(device):
                raise VolumeNotBlank(
                    f"{device} has no filesystem signature but is not blank (non-zero bytes in its first "
                    f"{_BLANK_PROBE_BYTES >> 20} MiB): refusing to format a device that holds data"
                )
            if not mkfs:
                raise VolumeNoFilesystem(
                    f"{device} is blank (no filesystem): pass --mkfs (or tag the volume {TAG_NEW}=true) "
                    "to create one on this first use"
                )
            _mkfs(device, fstype, label)
            formatted = True
            info = probe(device)
            detected = info.get("TYPE", fstype)
        fs = detected
        os.makedirs(mountpoint, exist_ok=True)
        cmd = ["mount", "-t", fs]
        if options:
            cmd += ["-o", options]
        _run([*cmd, device, mountpoint], f"mount {device} at {mountpoint}")
        already = False
    if owner:
        _chown(mountpoint, owner)
    uuid = info.get("UUID")
    added = False
    if fstab:
        if not uuid:
            raise VolumeMountError(f"fstab: {device} has no filesystem UUID")
        added = _add_fstab(fstab_path, uuid, mountpoint, fs)
    log.info(
        "%s %s at %s (%s%s)",
        device,
        "was mounted" if already else "mounted",
        mountpoint,
        fs,
        ", new filesystem" if formatted else "",
    )
    return MountResult(device, mountpoint, fs, uuid, formatted, already, added)


def _mkfs(device: str, fstype: str, label: str | None) -> None:
    # Re-probe right before formatting: nothing may have appeared since the check.
    if probe(device) or not is_blank(device):
        raise VolumeNotBlank(f"{device} is no longer blank; not formatting it")
    if fstype.startswith("ext"):
        # lazy init keeps mkfs of a large EBS volume to seconds; discard would touch every block.
        cmd = [f"mkfs.{fstype}", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"]
        if label:
            cmd += ["-L", label[:16]]
    elif fstype == "xfs":
        cmd = ["mkfs.xfs", "-q", "-K"]
        if label:
            cmd += ["-L", label[:12]]
    else:
        cmd = [f"mkfs.{fstype}"]
    log.info("creating a %s filesystem on blank %s", fstype, device)
    _run([*cmd, device], f"mkfs {device}")


def unmount(mountpoint: str = DEFAULT_MOUNTPOINT) -> bool:
    """Unmount ``mountpoint`` (after a sync); False when nothing was mounted there (idempotent)."""
    mountpoint = os.path.abspath(mountpoint)
    if mounted_at(mountpoint) is None:
        return False
    os.sync()
    _run(["umount", mountpoint], f"unmount {mountpoint}")
    return True


# --------------------------------------------------------------------------- finishing


def finish(
    identity: InstanceIdentity,
    *,
    ec2: Any | None = None,
    autoscaling: Any | None = None,
    asg: bool = True,
    spot: bool = True,
) -> list[str]:
    """Tell AWS to stop replacing this instance once its run is complete.

    If it belongs to an Auto Scaling group: the group's min and desired capacity
    go to 0. If it was launched by a persistent spot request: the request is
    cancelled. Returns what was done (human-readable), [] when nothing applied.
    Shutting the machine down is the caller's part (the boot script does it).
    """
    done: list[str] = []
    iid = identity.instance_id
    if asg:
        autoscaling = autoscaling or _client("autoscaling", identity.region)
        try:
            r = autoscaling.describe_auto_scaling_instances(InstanceIds=[iid])
            groups = {i["AutoScalingGroupName"] for i in r.get("AutoScalingInstances", [])}
            for name in sorted(groups):
                autoscaling.update_auto_scaling_group(AutoScalingGroupName=name, MinSize=0, DesiredCapacity=0)
                done.append(f"auto scaling group {name}: desired capacity 0")
        except Exception as e:
            if _is_botocore_error(e):
                raise _aws_error(e, f"scale down the auto scaling group of {iid}") from e
            raise
    if spot:
        calls = _Calls(ec2 or ec2_client(identity.region))
        r = calls(
            "describe_spot_instance_requests",
            f"find the spot request of {iid}",
            Filters=[{"Name": "instance-id", "Values": [iid]}],
        )
        requests = sorted(
            q["SpotInstanceRequestId"]
            for q in r.get("SpotInstanceRequests", [])
            if q.get("State") in ("open", "active", "disabled")
        )
        if requests:
            # A persistent request would launch a replacement for a finished run.
            calls("cancel_spot_instance_requests", f"cancel the spot request of {iid}", SpotInstanceRequestIds=requests)
            done.extend(f"spot request {rid}: cancelled" for rid in requests)
    return done


# --------------------------------------------------------------------------- command line


@dataclass(frozen=True)
class Identity:
    """This instance's id, zone and region (read once from IMDS)."""

    instance_id: str
    availability_zone: str
    region: str

    @classmethod
    def from_metadata(cls, endpoint: str | None = None, *, timeout: float = 2.0, retry_for: float = 0.0) -> Identity:
        """Read it through :class:`spotsafe.imds.AWSMetadata`; raises MetadataError.

        ``retry_for``: keep trying this many seconds (IMDS can throttle, or lag early in a boot).
        """
        from spotsafe.imds import AWSMetadata

        deadline = time.monotonic() + retry_for
        while True:
            md = AWSMetadata(endpoint, timeout=timeout)
            try:
                return cls(md.instance_id, md.availability_zone, md.region)
            except Exception as e:
                err = (
                    e
                    if isinstance(e, MetadataError)
                    else MetadataError(f"cannot read this instance's identity from IMDS at {md.endpoint}: {e}")
                )
                if time.monotonic() + 1.0 > deadline:
                    if err is e:
                        raise
                    raise err from e
                log.info("IMDS not answering yet (%s): retrying", e)
            finally:
                md.close()
            time.sleep(1.0)


def _identity(args: argparse.Namespace) -> Identity:
    return Identity.from_metadata(
        args.metadata_endpoint, timeout=args.metadata_timeout, retry_for=args.metadata_retry_for
    )


def _manager(args: argparse.Namespace) -> VolumeManager:
    identity = _identity(args)
    region = args.region or identity.region
    timeouts = Timeouts(
        poll=args.poll_interval,
        attach=args.attach_timeout,
        detach=args.detach_timeout,
        force_detach_after=args.force_detach_after,
        device=args.device_timeout,
        snapshot=args.snapshot_timeout,
        create=args.snapshot_timeout,
    )
    return VolumeManager(
        ec2_client(region, endpoint_url=args.endpoint_url),
        identity,
        timeouts=timeouts,
        sys_root=args.sys_root,
        dev_root=args.dev_root,
    )


def _selector(args: argparse.Namespace) -> tuple[str | None, dict[str, str]]:
    tags = parse_tags(args.tag or [])
    return args.volume_id, tags


def _has_selector(args: argparse.Namespace) -> bool:
    return bool(args.volume_id or args.tag)


def _cmd_attach(args: argparse.Namespace) -> int:
    if not _has_selector(args):
        raise VolumeError("attach: give --volume-id or --tag KEY=VALUE")
    mgr = _manager(args)
    vid, tags = _selector(args)
    a = mgr.attach(vid, tags, device_name=args.device, move=args.move)
    if args.json:
        print(
            json.dumps(
                {
                    "volume": a.volume.to_json(),
                    "device": a.device,
                    "attached_now": a.attached_now,
                    "moved_from": a.moved_from,
                }
            )
        )
    else:
        print(a.device)
    return EXIT_OK


def _cmd_mount(args: argparse.Namespace) -> int:
    mgr: VolumeManager | None = None
    volume: VolumeInfo | None = None
    mkfs = args.mkfs
    device = args.device
    if _has_selector(args):
        mgr = _manager(args)
        vid, tags = _selector(args)
        volume = mgr.find(vid, tags)
        if volume.instance_id != mgr.instance_id:
            raise VolumeError(
                f"mount: volume {volume.volume_id} is not attached to this instance ({mgr.instance_id}); "
                "run `python -m spotsafe.volume attach` first"
            )
        mkfs = mkfs or _truthy(volume.tags.get(TAG_NEW))
        if device is None:
            device = mgr.find_device(volume)
    if device is None:
        raise VolumeError("mount: give --device, or --volume-id / --tag to find it")
    result = mount(
        device,
        args.mountpoint,
        mkfs=mkfs,
        fstype=args.fstype,
        owner=args.owner,
        fstab=args.fstab,
        fstab_path=args.fstab_path,
        options=args.options,
    )
    if mgr is not None and volume is not None:
        if TAG_NEW in volume.tags:
            # It has a filesystem now: the permission to format is spent.
            mgr._call("delete_tags", f"untag {volume.volume_id}", Resources=[volume.volume_id], Tags=[{"Key": TAG_NEW}])
        if not args.keep_old:
            mgr.retire_superseded(volume)
    if args.json:
        print(json.dumps(dataclasses.asdict(result)))
    else:
        print(result.mountpoint)
    return EXIT_OK


def _cmd_unmount(args: argparse.Namespace) -> int:
    unmount(args.mountpoint)
    return EXIT_OK


def _cmd_detach(args: argparse.Namespace) -> int:
    if not _has_selector(args):
        raise VolumeError("detach: give --volume-id or --tag KEY=VALUE")
    mgr = _manager(args)
    vid, tags = _selector(args)
    volume = mgr.find(vid, tags)
    if volume.instance_id == mgr.instance_id:
        # Never pull a mounted filesystem from under itself: unmount first.
        try:
            dev = mgr.find_device(volume, wait=False)
        except VolumeDeviceNotFound:
            dev = None
        if dev is not None:
            for mp in mountpoints_of(dev):
                unmount(mp)
    mgr.detach(volume, force=args.force)
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    out: dict[str, Any] = {"mountpoint": os.path.abspath(args.mountpoint)}
    m = mounted_at(args.mountpoint)
    out["mounted"] = None if m is None else {"source": m.source, "fstype": m.fstype}
    if _has_selector(args):
        mgr = _manager(args)
        vid, tags = _selector(args)
        out["instance_id"] = mgr.instance_id
        out["availability_zone"] = mgr.availability_zone
        volume = mgr.find(vid, tags)
        out["volume"] = volume.to_json()
        out["attached_here"] = volume.instance_id == mgr.instance_id
        out["device"] = None
        if out["attached_here"]:
            try:
                out["device"] = mgr.find_device(volume, wait=False)
            except VolumeDeviceNotFound:
                pass
    if args.json:
        print(json.dumps(out, default=str))
        return EXIT_OK
    mounted = out["mounted"]
    print(
        f"mount point  {out['mountpoint']}: "
        + (f"{mounted['source']} ({mounted['fstype']})" if mounted else "nothing mounted")
    )
    if "volume" in out:
        v = out["volume"]
        where = f"attached to {v['instance_id']} ({v['attachment_state']})" if v["instance_id"] else v["state"]
        print(f"this instance {out['instance_id']} in {out['availability_zone']}")
        print(f"volume       {v['volume_id']} in {v['availability_zone']}, {v['size']} GiB {v['volume_type']}, {where}")
        print(f"device       {out['device'] or '-'}")
    return EXIT_OK


def _cmd_finish(args: argparse.Namespace) -> int:
    identity = _identity(args)
    ec2 = ec2_client(args.region or identity.region, endpoint_url=args.endpoint_url)
    done = finish(identity, ec2=ec2, asg=not args.no_asg, spot=not args.no_spot)
    for line in done:
        print(line)
    if not done:
        print(f"{identity.instance_id}: no auto scaling group or spot request to stop")
    return EXIT_OK


def _add_common(p: argparse.ArgumentParser, *, selector: bool = True, aws: bool = True) -> None:
    if selector:
        p.add_argument("--volume-id", help="the volume's id (vol-…)")
        p.add_argument(
            "--tag",
            action="append",
            metavar="KEY=VALUE",
            help="find the volume by tag (repeatable), e.g. spotsafe-run=mnist",
        )
    if aws:
        p.add_argument("--region", help="EC2 region (default: this instance's, from IMDS)")
        p.add_argument("--endpoint-url", help="EC2 endpoint (default: botocore's; AWS_ENDPOINT_URL_EC2 works too)")
        p.add_argument(
            "--metadata-endpoint",
            default=None,
            help="IMDS base URL (default: AWS_EC2_METADATA_SERVICE_ENDPOINT or 169.254.169.254)",
        )
        p.add_argument("--metadata-timeout", type=float, default=2.0, help="seconds per IMDS request")
        p.add_argument(
            "--metadata-retry-for",
            type=float,
            default=30.0,
            help="keep retrying IMDS this many seconds before giving up (exit 13)",
        )
        p.add_argument("--sys-root", default="/sys", help=argparse.SUPPRESS)
        p.add_argument("--dev-root", default="/dev", help=argparse.SUPPRESS)
        d = Timeouts()
        p.add_argument("--poll-interval", type=float, default=d.poll, help="seconds between EC2 polls")
        p.add_argument("--attach-timeout", type=float, default=d.attach)
        p.add_argument(
            "--detach-timeout",
            type=float,
            default=d.detach,
            help="how long to wait for the volume to leave the old instance",
        )
        p.add_argument(
            "--force-detach-after",
            type=float,
            default=d.force_detach_after,
            help="force-detach from a terminated/stopped old instance after this many seconds",
        )
        p.add_argument("--device-timeout", type=float, default=d.device)
        p.add_argument("--snapshot-timeout", type=float, default=d.snapshot)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m spotsafe.volume",
        description="Attach and mount the persistent EBS volume of a spot training run.",
        epilog="exit status: " + ", ".join(f"{c} {n}" for n, c in _EXIT_NAMES) + " (docs/volume.md)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("attach", help="find the volume and attach it here; prints the block device")
    _add_common(p)
    p.add_argument("--device", help="device name for attach_volume (default: first free of /dev/sdf..sdp)")
    p.add_argument(
        "--move", action="store_true", help="if the volume is in another zone: snapshot it and create a copy here"
    )
    p = sub.add_parser("mount", help="mount the attached volume (mkfs only if blank and allowed)")
    _add_common(p)
    p.add_argument("--device", help="the block device (default: found from the volume)")
    p.add_argument("--mountpoint", default=DEFAULT_MOUNTPOINT)
    p.add_argument("--mkfs", action="store_true", help="allow creating a filesystem on a BLANK device")
    p.add_argument("--fstype", default=DEFAULT_FSTYPE, help="filesystem for --mkfs (ext4, xfs)")
    p.add_argument("--options", help="mount options (-o)")
    p.add_argument("--owner", metavar="USER[:GROUP]", help="chown the mount point for the training user")
    p.add_argument("--fstab", action="store_true", help="add an fstab entry (UUID, nofail)")
    p.add_argument("--fstab-path", default="/etc/fstab", help=argparse.SUPPRESS)
    p.add_argument(
        "--keep-old",
        action="store_true",
        help="after a zone move, keep the old volume and snapshot instead of deleting them",
    )
    p = sub.add_parser("unmount", help="unmount the volume (no-op when not mounted)")
    _add_common(p, selector=False, aws=False)
    p.add_argument("--mountpoint", default=DEFAULT_MOUNTPOINT)
    p = sub.add_parser("detach", help="unmount and detach the volume from this instance")
    _add_common(p)
    p.add_argument("--force", action="store_true", help="force-detach (can lose unflushed writes)")
    p = sub.add_parser("status", help="what is attached and mounted")
    _add_common(p)
    p.add_argument("--mountpoint", default=DEFAULT_MOUNTPOINT)
    p = sub.add_parser("finish", help="stop the auto scaling group / spot request from replacing this instance")
    _add_common(p, selector=False)
    p.add_argument("--no-asg", action="store_true", help="leave the auto scaling group alone")
    p.add_argument("--no-spot", action="store_true", help="leave the spot request alone")
    sub.add_parser("iam-policy", help="print the minimal IAM policy the instance role needs")
    return parser


_EXIT_NAMES = [
    (name.removeprefix("EXIT_").lower().replace("_", "-"), code)
    for name, code in sorted(globals().items(), key=lambda kv: kv[1] if isinstance(kv[1], int) else 0)
    if name.startswith("EXIT_") and isinstance(code, int)
]

_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "attach": _cmd_attach,
    "mount": _cmd_mount,
    "unmount": _cmd_unmount,
    "detach": _cmd_detach,
    "status": _cmd_status,
    "finish": _cmd_finish,
    "iam-policy": lambda args: print(json.dumps(IAM_POLICY, indent=2)) or EXIT_OK,
}


def exit_code(e: BaseException) -> int:
    """The documented exit status for an exception (:data:`EXIT_CODES`)."""
    for cls, code in EXIT_CODES.items():
        if isinstance(e, cls):
            return code
    return EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Progress to stderr (the boot log), stdout keeps the result for scripts; only
    # spotsafe's own messages: botocore's INFO chatter stays out.
    pkg = logging.getLogger("spotsafe")
    if not pkg.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("spotsafe.volume: %(message)s"))
        pkg.addHandler(handler)
        pkg.setLevel(logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    try:
        return _COMMANDS[args.command](args)
    except (VolumeError, MetadataError, MissingDependency) as e:
        print(f"spotsafe.volume {args.command}: error: {e}", file=sys.stderr)
        return exit_code(e)
    except ValueError as e:  # bad --tag
        print(f"spotsafe.volume {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except PermissionError as e:
        print(f"spotsafe.volume {args.command}: error: {e} (run as root)", file=sys.stderr)
        return EXIT_MOUNT if e.errno in (errno.EPERM, errno.EACCES) else EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
