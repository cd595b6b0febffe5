"""The EBS volume's EC2 lifecycle: find it, claim it, move it between zones, attach, detach, retire, snapshot.

A run's volume is found by id or tag. It normally lives in one availability zone;
an instance in another zone can *move* it: snapshot, create a copy in its own zone
with the same tags, mount it, and only then delete the original and the snapshot.
Three promises hold under races and interruptions:

- **One mover.** Before snapshotting, the mover *claims* the source volume with a
  tag (:data:`TAG_CLAIM`) and keeps the claim only if, after a settle time longer
  than EC2's tag propagation, the tag still holds its own value (a write then a
  read back: when several write at once, the last write is what all of them read,
  so exactly one wins). A claim by a live instance blocks every other mover and
  attacher; a claim by a gone instance (terminated, stopped, unknown) or older
  than :attr:`Timeouts.claim_ttl` is taken over.
- **One volume.** A copy is *committed* (:data:`TAG_MOVE_DONE`) once mounted; only
  then is its source superseded. An uncommitted copy (its mover was reclaimed
  before mounting) holds nothing newer than its source: an instance in the
  source's zone deletes it and its snapshot and uses the source, one in the
  copy's zone adopts it, one elsewhere moves the source again.
- **Cleanup never blocks training.** Deleting the old volume or the snapshot
  after a good mount only warns when it fails; the next mount tries again.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from spotsafe.cloud.aws.volume.devices import find_device
from spotsafe.cloud.aws.volume.filesystem import TAG_NEW
from spotsafe.errors import (
    MetadataError,
    VolumeAmbiguous,
    VolumeAWSError,
    VolumeBusy,
    VolumeError,
    VolumeNotFound,
    VolumePermissionDenied,
    VolumeTimeout,
    VolumeWrongZone,
)

__all__ = [
    "DEVICE_NAMES",
    "IAM_POLICY",
    "TAG_CLAIM",
    "TAG_CREATED_BY",
    "TAG_MOVED_BY",
    "TAG_MOVED_FROM",
    "TAG_MOVE_DONE",
    "TAG_MOVE_SNAPSHOT",
    "TAG_NEW",
    "TAG_PERIODIC",
    "Attachment",
    "Identity",
    "InstanceIdentity",
    "Timeouts",
    "VolumeInfo",
    "VolumeManager",
    "ec2_client",
    "parse_tags",
]

log = logging.getLogger("spotsafe.volume")

# --------------------------------------------------------------------------- tags

#: On a copy made by a zone move: the id of the volume it was copied from (retired after mount).
TAG_MOVED_FROM = "spotsafe-moved-from"
#: On a copy made by a zone move: the snapshot it was made from (deleted with the old volume).
TAG_MOVE_SNAPSHOT = "spotsafe-move-snapshot"
#: On a copy made by a zone move: the instance that made it.
TAG_MOVED_BY = "spotsafe-moved-by"
#: On a copy made by a zone move, once it is mounted: it is the run's volume now (its source is superseded).
TAG_MOVE_DONE = "spotsafe-move-done"
#: On a volume being moved: ``<instance id> <zone> <unix time>`` of the one mover.
TAG_CLAIM = "spotsafe-move-claim"
#: On periodic snapshots (``snapshot`` command): ``<volume id> <unix time>``.
TAG_PERIODIC = "spotsafe-periodic"
#: On a volume made by create-or-restore: ``<instance id> <unix time>`` of its creator.
TAG_CREATED_BY = "spotsafe-created-by"

#: Tags spotsafe manages; never copied from a volume to its copy or snapshot.
_OWN_TAGS = frozenset(
    {TAG_MOVED_FROM, TAG_MOVE_SNAPSHOT, TAG_MOVED_BY, TAG_MOVE_DONE, TAG_CLAIM, TAG_PERIODIC, TAG_CREATED_BY}
)

#: Device names tried, in order, when none is asked for (the EC2 recommended range for EBS).
DEVICE_NAMES = tuple(f"/dev/sd{c}" for c in "fghijklmnop")

#: The minimal IAM policy the instance role needs (``python -m spotsafe.volume iam-policy`` prints it).
#: Tested against moto with IAM enforcement: this exact document allows attach, move, retire,
#: detach, snapshot, create-or-restore and finish. Drop the second statement if you never
#: move (SPOTSAFE_MOVE=0), the third if you never snapshot or create
#: (SPOTSAFE_SNAPSHOT_EVERY=0, SPOTSAFE_CREATE_SIZE empty), the fourth if you never set
#: SPOTSAFE_SHUTDOWN_WHEN_DONE.
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
            "Sid": "SpotsafeSnapshotAndCreateOrRestore",
            "Effect": "Allow",
            "Action": [
                "ec2:CreateSnapshot",
                "ec2:DescribeSnapshots",
                "ec2:DeleteSnapshot",
                "ec2:CreateVolume",
                "ec2:DeleteVolume",
                "ec2:CreateTags",
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
_DEAD_VOLUME_STATES = frozenset({"deleting", "deleted", "error"})
_PERMISSION_CODES = frozenset({"UnauthorizedOperation", "AccessDenied", "AccessDeniedException", "UnauthorizedAccess"})


# --------------------------------------------------------------------------- data


class InstanceIdentity(Protocol):
    """Who and where this instance is: :class:`spotsafe.cloud.aws.metadata.AWSMetadata` and :class:`Identity` fit."""

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
    #: the volume leaving the old instance (including the force-detach); also how long a
    #: live mover's claim is waited for.
    detach: float = 600.0
    #: how long a gone instance gets to let go by itself before a force-detach.
    force_detach_after: float = 60.0
    #: the block device appearing after the attachment is "attached".
    device: float = 120.0
    #: snapshot completion and volume creation during a zone move.
    snapshot: float = 7200.0
    create: float = 600.0
    #: between writing a claim (or creating a volume) and reading it back: longer than
    #: EC2 takes to show a tag write to every reader (eventual consistency, usually < 1 s).
    settle: float = 5.0
    #: a claim older than this is stale even if its instance still runs (a mover that
    #: gave up without releasing it): longer than the longest move.
    claim_ttl: float = 3 * 3600.0


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
    snapshot_id: str | None = None  # the snapshot it was created from

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
            snapshot_id=v.get("SnapshotId") or None,
        )

    @property
    def moved_from(self) -> str | None:
        """The source volume when this is a zone-move copy whose source was not yet retired."""
        return self.tags.get(TAG_MOVED_FROM) or None

    @property
    def move_committed(self) -> bool:
        """True when this zone-move copy was mounted: it, not its source, is the run's volume."""
        return TAG_MOVE_DONE in self.tags

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
    created: bool = False  # create-or-restore made it now


@dataclass(frozen=True)
class Claim:
    """Who holds a move claim (:data:`TAG_CLAIM`) on a volume."""

    instance_id: str
    availability_zone: str
    since: float  # unix time

    @classmethod
    def parse(cls, value: str | None) -> Claim | None:
        parts = (value or "").split()
        if len(parts) != 3:
            return None
        try:
            return cls(parts[0], parts[1], float(parts[2]))
        except ValueError:
            return None

    def render(self) -> str:
        return f"{self.instance_id} {self.availability_zone} {self.since:.3f}"


@dataclass(frozen=True)
class _Resolved:
    """The run's volume as :meth:`VolumeManager.resolve` chose it, with the other half of a move in flight."""

    volume: VolumeInfo
    #: the volume the chosen one is (or was) a copy of, when a move is not committed yet.
    source: VolumeInfo | None = None
    #: uncommitted copies of the chosen volume (or of its source) that are *not* the chosen one.
    copies: tuple[VolumeInfo, ...] = field(default_factory=tuple)


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


def _user_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """The tags a copy or snapshot inherits: the user's, and spotsafe-new (a blank volume stays blank)."""
    return {k: v for k, v in tags.items() if not k.startswith("aws:") and k not in _OWN_TAGS}


def _creation_order(v: VolumeInfo) -> tuple[int, float, str]:
    """Sort key of create-or-restore's election: an existing volume first, then the oldest creation."""
    c = v.tags.get(TAG_CREATED_BY, "").split()
    if len(c) != 2:  # not made by create-or-restore
        return (0, 0.0, v.volume_id)
    try:
        return (1, float(c[1]), v.volume_id)
    except ValueError:
        return (1, 0.0, v.volume_id)


def _snapshot_order(s: Mapping[str, Any]) -> tuple[Any, float, str]:
    """Oldest first: EC2's start time, then the time in the periodic tag (finer than some APIs report)."""
    tags = {t["Key"]: t["Value"] for t in s.get("Tags", []) or []}
    parts = tags.get(TAG_PERIODIC, "").split()
    try:
        fine = float(parts[1]) if len(parts) == 2 else 0.0
    except ValueError:
        fine = 0.0
    return (s.get("StartTime"), fine, str(s["SnapshotId"]))


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
    """Finds, claims, moves, attaches and detaches the run's EBS volume for this instance.

    ``ec2`` is a boto3 EC2 client; ``identity`` anything with ``instance_id``,
    ``availability_zone`` and ``region`` (:class:`Identity`, :class:`spotsafe.cloud.aws.metadata.AWSMetadata`).
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
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ec2 = ec2
        self.identity = identity
        self.timeouts = timeouts or Timeouts()
        self.sys_root = sys_root
        self.dev_root = dev_root
        self._sleep = sleep
        self._clock = clock
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
            v = self.describe(volume_id)
        except VolumeNotFound:
            return None
        return None if v.state in _DEAD_VOLUME_STATES else v

    def _tagged(self, tags: Mapping[str, str], what: str) -> list[VolumeInfo]:
        filters = [{"Name": f"tag:{k}", "Values": [v]} for k, v in tags.items()]
        r = self._call("describe_volumes", f"find {what}", Filters=filters)
        vols = [VolumeInfo.from_api(v) for v in r.get("Volumes", [])]
        return [v for v in vols if v.state not in _DEAD_VOLUME_STATES]

    def find(self, volume_id: str | None = None, tags: Mapping[str, str] | None = None) -> VolumeInfo:
        """The run's volume, by id or by tags (see :meth:`resolve`)."""
        return self.resolve(volume_id, tags).volume

    def resolve(self, volume_id: str | None = None, tags: Mapping[str, str] | None = None) -> _Resolved:
        """The run's volume, by id or by tags, and the other half of a zone move still in flight.

        Among several volumes with the tags: the ones being deleted are ignored; so is
        a volume whose zone-move copy is committed (mounted once), and a copy whose
        source is gone counts as committed. A source and its uncommitted copies are
        one volume: the copy attached here wins, then a copy in this zone when the
        source is elsewhere, else the source. One attached to this instance wins;
        otherwise exactly one must remain, else :class:`VolumeAmbiguous` lists them.
        """
        if volume_id:
            return _Resolved(self.describe(volume_id))
        if not tags:
            raise VolumeError("find: give a volume id or at least one tag")
        what = _describe_selector(None, tags)
        vols = self._tagged(tags, what)
        if not vols:
            raise VolumeNotFound(f"no {what} in {self.identity.region}")
        ids = {v.volume_id: v for v in vols}

        def is_uncommitted_copy(v: VolumeInfo) -> bool:
            return v.moved_from is not None and not v.move_committed and v.moved_from in ids

        superseded = {v.moved_from for v in vols if v.moved_from and not is_uncommitted_copy(v)}
        roots = [v for v in vols if v.volume_id not in superseded and not is_uncommitted_copy(v)]
        copies: dict[str, list[VolumeInfo]] = {}
        for v in vols:
            if is_uncommitted_copy(v):
                copies.setdefault(v.moved_from or "", []).append(v)
        # Volumes made at once by create-or-restore: the oldest creation is the run's, the
        # others are being deleted by their creators.
        created = [v for v in roots if _creation_order(v)[0] == 1]
        if len(created) > 1:
            first = min(created, key=_creation_order)
            roots = [v for v in roots if v is first or v not in created]
        groups = [(root, copies.get(root.volume_id, [])) for root in roots]
        if not groups:  # only copies of superseded volumes: a chain; take the copies as roots
            groups = [(v, []) for v in vols if v.volume_id not in superseded]
        mine = [g for g in groups if any(x.instance_id == self.instance_id for x in (g[0], *g[1]))]
        if len(mine) == 1:
            return self._pick(*mine[0])
        if len(groups) == 1:
            return self._pick(*groups[0])
        listing = ", ".join(
            f"{v.volume_id} ({v.availability_zone}, {v.state}"
            + (f", attached to {v.instance_id}" if v.instance_id else "")
            + ")"
            for v in sorted((g[0] for g in groups), key=lambda v: v.volume_id)
        )
        raise VolumeAmbiguous(f"{len(groups)} volumes match {what}: {listing}; pass --volume-id")

    def _pick(self, root: VolumeInfo, copies: list[VolumeInfo]) -> _Resolved:
        if not copies:
            return _Resolved(root)
        here = self.availability_zone
        ordered = sorted(copies, key=lambda v: v.volume_id)
        pick = next((c for c in ordered if c.instance_id == self.instance_id), None)
        if pick is None and root.availability_zone != here:
            pick = next((c for c in ordered if c.availability_zone == here), None)
        if pick is None:
            return _Resolved(root, None, tuple(ordered))
        return _Resolved(pick, root, tuple(c for c in ordered if c is not pick))

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

    def _alive(self, instance_id: str) -> bool:
        state = self.instance_state(instance_id)
        return state is not None and state not in _GONE_STATES

    # ---------------------------------------------------------------- the move claim

    def claim_holder(self, volume: VolumeInfo) -> Claim | None:
        """The *other* live instance whose move claim on ``volume`` is current, or None.

        A claim by this instance, by a gone instance, or older than
        ``timeouts.claim_ttl`` does not count.
        """
        c = Claim.parse(volume.tags.get(TAG_CLAIM))
        if c is None or c.instance_id == self.instance_id:
            return None
        if self._clock() - c.since > self.timeouts.claim_ttl:
            return None
        return c if self._alive(c.instance_id) else None

    def claim(self, volume: VolumeInfo) -> VolumeInfo:
        """Become the one mover of ``volume``; returns it refreshed. Raises :class:`VolumeBusy`.

        Write the claim, wait ``timeouts.settle``, read it back: kept only if it is
        still ours. A writer whose check-to-write took longer than half the settle
        time could have overwritten a claim it did not see: it withdraws and retries.
        While another live instance holds a current claim, wait up to ``timeouts.detach``.
        """
        t = self.timeouts
        start = time.monotonic()
        while True:
            checked = time.monotonic()
            volume = self.describe(volume.volume_id)
            holder = self.claim_holder(volume)
            if holder is None:
                mine = Claim(self.instance_id, self.availability_zone, self._clock())
                self._tag(volume.volume_id, {TAG_CLAIM: mine.render()}, f"claim {volume.volume_id} for a move")
                if time.monotonic() - checked <= t.settle / 2:
                    self._sleep(t.settle)
                    volume = self.describe(volume.volume_id)
                    if volume.tags.get(TAG_CLAIM) == mine.render():
                        log.info("claimed %s for a move to %s", volume.volume_id, self.availability_zone)
                        return volume
                    holder = Claim.parse(volume.tags.get(TAG_CLAIM))
                    log.info("lost the claim on %s to %s", volume.volume_id, holder)
                else:
                    log.warning("claim write on %s was slow: withdrawing and retrying", volume.volume_id)
                    self.release_claim(volume.volume_id, mine)
            elif time.monotonic() - start < t.detach:
                log.info(
                    "volume %s is being moved to %s by %s (alive): waiting",
                    volume.volume_id,
                    holder.availability_zone,
                    holder.instance_id,
                )
            if time.monotonic() - start >= t.detach:
                who = f"{holder.instance_id} ({holder.availability_zone})" if holder else "another instance"
                raise VolumeBusy(
                    f"volume {volume.volume_id} is claimed by {who}, which is alive, after {t.detach:.0f} s: "
                    "another copy of this run is moving or using it"
                )
            self._sleep(t.poll)

    def verify_claim(self, volume_id: str, what: str) -> None:
        """Raise :class:`VolumeBusy` unless this instance still holds the move claim on ``volume_id``."""
        v = self.describe(volume_id)
        c = Claim.parse(v.tags.get(TAG_CLAIM))
        if c is None or c.instance_id != self.instance_id:
            raise VolumeBusy(f"lost the move claim on {volume_id} to {c.instance_id if c else 'nobody'} before {what}")

    def release_claim(self, volume_id: str, claim: Claim | None = None, *, stale_too: bool = False) -> None:
        """Remove this instance's claim from ``volume_id`` (a no-op when it is someone else's).

        With ``stale_too`` also a claim that no longer counts (its instance is gone, or
        it is older than ``timeouts.claim_ttl``). The delete names the value, which EC2
        honours only while the tag still has it: a claim written meanwhile stays.
        """
        try:
            v = self.describe(volume_id)
        except VolumeNotFound:
            return
        c = Claim.parse(v.tags.get(TAG_CLAIM))
        if c is None or (claim is not None and c != claim):
            return
        if c.instance_id != self.instance_id and not (stale_too and self.claim_holder(v) is None):
            return
        self._call(
            "delete_tags",
            f"release the claim on {volume_id}",
            Resources=[volume_id],
            Tags=[{"Key": TAG_CLAIM, "Value": c.render()}],
        )

    def _tag(self, volume_id: str, tags: Mapping[str, str], what: str) -> None:
        self._call("create_tags", what, Resources=[volume_id], Tags=_tag_list(tags))

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

    def move_to_az(self, volume: VolumeInfo, abandon: Iterable[VolumeInfo] = ()) -> VolumeInfo:
        """A copy of ``volume`` in this instance's zone, with the same tags; the one mover wins.

        Claims ``volume`` (:meth:`claim`), deletes the uncommitted copies of earlier,
        interrupted moves (``abandon``) and their snapshots, waits for the volume to
        leave its old instance, snapshots it, and creates the copy here (same type,
        size, IOPS, throughput, encryption and tags, ``spotsafe-new`` included) tagged
        ``spotsafe-moved-from``, ``spotsafe-move-snapshot`` and ``spotsafe-moved-by``.
        The claim is re-checked before the snapshot and before the copy. The source is
        kept until :meth:`retire_superseded` runs after the mount.
        """
        here = self.availability_zone
        volume = self.claim(volume)
        mine = Claim.parse(volume.tags.get(TAG_CLAIM))
        try:
            # A copy here that appeared while we waited for the claim: adopt it.
            for v in self._copies_of(volume.volume_id):
                if v.availability_zone == here and v.instance_id in (None, self.instance_id):
                    log.info("reusing %s, an earlier copy of %s in %s", v.volume_id, volume.volume_id, here)
                    return self._wait_available(v)
                if v.instance_id is not None and v.instance_id != self.instance_id and self._alive(v.instance_id):
                    raise VolumeBusy(
                        f"volume {volume.volume_id} was copied to {v.volume_id} in {v.availability_zone}, "
                        f"attached to {v.instance_id}, which is alive"
                    )
                self.abandon(v)
            for v in abandon:
                self.abandon(v)
            volume = self.wait_detached(volume)
            self.verify_claim(volume.volume_id, "the snapshot")
            log.info("moving %s from %s to %s: snapshot", volume.volume_id, volume.availability_zone, here)
            keep = _user_tags(volume.tags)
            t0 = time.monotonic()
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
            log.info("snapshot %s of %s completed in %.1f s", snap_id, volume.volume_id, time.monotonic() - t0)
            self.verify_claim(volume.volume_id, "creating the copy")
            # An instance in the volume's zone may have attached it after our claim (it checked
            # for a claim before we wrote ours): it is the run now, no copy.
            now = self.describe(volume.volume_id)
            if now.instance_id not in (None, self.instance_id) and self._alive(now.instance_id or ""):
                raise VolumeBusy(
                    f"volume {volume.volume_id} was attached to {now.instance_id} (alive) during the move: "
                    "that instance runs it; not copying"
                )
            new = self._create(
                volume,
                here,
                snapshot_id=snap_id,
                tags={
                    **keep,
                    TAG_MOVED_FROM: volume.volume_id,
                    TAG_MOVE_SNAPSHOT: snap_id,
                    TAG_MOVED_BY: self.instance_id,
                },
                what=f"create a copy of {volume.volume_id} in {here}",
            )
            log.info("created %s in %s from %s", new.volume_id, here, snap_id)
            return self._wait_available(new)
        except BaseException:
            # Leave no claim behind a failed move: the next instance need not wait for it.
            try:
                self.release_claim(volume.volume_id, mine)
            except VolumeError as e:
                log.warning("could not release the claim on %s: %s", volume.volume_id, e)
            raise

    def _create(
        self, like: VolumeInfo, zone: str, *, snapshot_id: str | None, tags: Mapping[str, str], what: str
    ) -> VolumeInfo:
        args: dict[str, Any] = {
            "AvailabilityZone": zone,
            "VolumeType": like.volume_type,
            "Size": like.size,
            "TagSpecifications": [{"ResourceType": "volume", "Tags": _tag_list(tags)}],
        }
        if snapshot_id:
            args["SnapshotId"] = snapshot_id
        if like.volume_type in ("io1", "io2", "gp3") and like.iops:
            args["Iops"] = like.iops
        if like.volume_type == "gp3" and like.throughput:
            args["Throughput"] = like.throughput
        if like.encrypted:
            args["Encrypted"] = True
            if like.kms_key_id:
                args["KmsKeyId"] = like.kms_key_id
        return VolumeInfo.from_api(self._call("create_volume", what, **args))

    def _copies_of(self, volume_id: str) -> list[VolumeInfo]:
        r = self._call(
            "describe_volumes",
            f"look for copies of {volume_id}",
            Filters=[{"Name": f"tag:{TAG_MOVED_FROM}", "Values": [volume_id]}],
        )
        vols = [VolumeInfo.from_api(v) for v in r.get("Volumes", [])]
        return sorted((v for v in vols if v.state not in _DEAD_VOLUME_STATES), key=lambda v: v.volume_id)

    def abandon(self, copy: VolumeInfo) -> list[str]:
        """Delete an uncommitted zone-move copy and its snapshot (its mover is gone); returns what was deleted.

        Never a committed copy, never one attached to a live instance (:class:`VolumeBusy`).
        """
        try:
            copy = self.describe(copy.volume_id)
        except VolumeNotFound:
            return []  # abandoned already (idempotent)
        if copy.move_committed or copy.moved_from is None:
            raise VolumeError(f"{copy.volume_id} is not an uncommitted move copy: not deleting it")
        if copy.instance_id == self.instance_id:
            self.detach(copy)
        else:
            copy = self.wait_detached(copy)
        log.info("abandoning %s, an interrupted move of %s", copy.volume_id, copy.moved_from)
        deleted = [copy.volume_id] if self._delete_volume(copy.volume_id) else []
        snap = copy.tags.get(TAG_MOVE_SNAPSHOT)
        if snap and self._delete_snapshot(snap):
            deleted.append(snap)
        return deleted

    def _delete_volume(self, volume_id: str) -> bool:
        try:
            self._call("delete_volume", f"delete {volume_id}", VolumeId=volume_id)
        except VolumeNotFound:
            return False
        return True

    def _delete_snapshot(self, snap_id: str) -> bool:
        try:
            self._call("delete_snapshot", f"delete snapshot {snap_id}", SnapshotId=snap_id)
        except VolumeAWSError as e:
            if "NotFound" not in str(e):
                raise
            return False
        return True

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

    def commit_move(self, volume: VolumeInfo) -> VolumeInfo:
        """Mark a mounted zone-move copy as the run's volume (:data:`TAG_MOVE_DONE`); idempotent.

        From here on its source is superseded. Raises when the tag cannot be written:
        training must not start on a copy another instance could still abandon.
        """
        if volume.moved_from is None or volume.move_committed:
            return volume
        self._tag(volume.volume_id, {TAG_MOVE_DONE: f"{self._clock():.0f}"}, f"commit the move to {volume.volume_id}")
        return self.describe(volume.volume_id)

    def retire_superseded(self, volume: VolumeInfo) -> list[str]:
        """After ``volume`` (a zone-move copy) is attached and mounted: delete the old one and the snapshots.

        Commits the move first (:meth:`commit_move`), then deletes the source, its
        other uncommitted copies and the snapshots, and finally the move tags. Returns
        what was deleted. Idempotent; a source attached somewhere is kept (logged) and
        tried again by the next mount.
        """
        old_id = volume.moved_from
        if not old_id:
            return []
        volume = self.commit_move(volume)
        deleted: list[str] = []
        for sibling in self._copies_of(old_id):
            if sibling.volume_id != volume.volume_id and not sibling.move_committed:
                deleted += self.abandon(sibling)
        old = self._exists(old_id)
        if old is not None:
            if old.instance_id is not None:
                log.warning("not retiring %s yet: it is attached to %s", old_id, old.instance_id)
                return deleted
            if self._delete_volume(old_id):
                deleted.append(old_id)
        snap = volume.tags.get(TAG_MOVE_SNAPSHOT)
        if snap and self._delete_snapshot(snap):
            deleted.append(snap)
        self._call(
            "delete_tags",
            f"untag {volume.volume_id}",
            Resources=[volume.volume_id],
            Tags=[{"Key": k} for k in (TAG_MOVED_FROM, TAG_MOVE_SNAPSHOT, TAG_MOVED_BY, TAG_MOVE_DONE)],
        )
        log.info("retired %s", ", ".join(deleted) or "nothing (already gone)")
        return deleted

    # ---------------------------------------------------------------- create or restore

    def create_or_restore(
        self, tags: Mapping[str, str], *, size: int, volume_type: str = "gp3", restore: bool = True
    ) -> VolumeInfo:
        """Make the run's volume here when none matches ``tags`` (opt-in: ``attach --create-size``).

        With ``restore`` and a completed periodic snapshot of the run (tagged with
        ``tags`` and :data:`TAG_PERIODIC`), the newest one is restored; otherwise a
        blank volume of ``size`` GiB is created and tagged ``spotsafe-new=true`` so the
        first mount may format it. Two instances doing this at once both create; after
        ``timeouts.settle`` each reads the run's volumes back, the oldest creation wins
        and the others delete their own. Returns the winner (maybe another zone's).
        """
        if not tags:
            raise VolumeError("create: the volume needs at least one tag to be found again")
        what = _describe_selector(None, tags)
        snap = self.latest_snapshot(tags) if restore else None
        created_by = f"{self.instance_id} {self._clock():.3f}"
        new_tags = {**dict(tags), TAG_CREATED_BY: created_by}
        if snap is None:
            new_tags[TAG_NEW] = "true"
            log.info("no %s and no snapshot of it: creating a blank %d GiB %s volume", what, size, volume_type)
        else:
            log.info("no %s: restoring it from its newest snapshot %s", what, snap["SnapshotId"])
        like = VolumeInfo(
            "", self.availability_zone, "", max(size, int(snap["VolumeSize"]) if snap else 0), volume_type, {}
        )
        mine = self._create(
            like,
            self.availability_zone,
            snapshot_id=snap["SnapshotId"] if snap else None,
            tags=new_tags,
            what=f"create {what} in {self.availability_zone}",
        )
        self._sleep(self.timeouts.settle)
        vols = self._tagged(tags, what)
        winner = min(vols, key=_creation_order) if vols else mine
        if winner.volume_id != mine.volume_id:
            log.info(
                "%s was created at the same time by another instance: deleting mine (%s)",
                winner.volume_id,
                mine.volume_id,
            )
            self._wait_available(mine)
            self._delete_volume(mine.volume_id)
            return winner
        return self._wait_available(mine)

    # ---------------------------------------------------------------- periodic snapshots

    def latest_snapshot(self, tags: Mapping[str, str]) -> dict[str, Any] | None:
        """The newest completed periodic snapshot tagged with ``tags``, or None."""
        snaps = self._periodic_snapshots(tags)
        done = [s for s in snaps if s.get("State") == "completed"]
        return done[-1] if done else None

    def _periodic_snapshots(self, tags: Mapping[str, str]) -> list[dict[str, Any]]:
        filters = [{"Name": f"tag:{k}", "Values": [v]} for k, v in tags.items()]
        filters.append({"Name": "tag-key", "Values": [TAG_PERIODIC]})
        r = self._call("describe_snapshots", "list periodic snapshots", OwnerIds=["self"], Filters=filters)
        snaps: list[dict[str, Any]] = list(r.get("Snapshots", []))
        return sorted(snaps, key=_snapshot_order)

    def snapshot(self, volume: VolumeInfo, *, keep: int = 2) -> str | None:
        """Start an incremental snapshot of ``volume`` and delete all but the newest ``keep`` completed ones.

        Returns the new snapshot's id, or None when one of this volume is still in
        progress (EBS snapshots are incremental: each stores only the blocks changed
        since the previous one, and a zone move's snapshot then copies only the last
        increment). Does not wait for completion.
        """
        if keep < 1:
            raise ValueError(f"keep must be at least 1, not {keep}")
        run_tags = _user_tags(volume.tags)
        run_tags.pop(TAG_NEW, None)
        snaps = self._periodic_snapshots(run_tags)
        if any(s.get("State") == "pending" and s.get("VolumeId") == volume.volume_id for s in snaps):
            log.info("a snapshot of %s is still in progress: not starting another", volume.volume_id)
            return None
        r = self._call(
            "create_snapshot",
            f"snapshot {volume.volume_id}",
            VolumeId=volume.volume_id,
            Description=f"spotsafe: periodic snapshot of {volume.volume_id}",
            TagSpecifications=[
                {
                    "ResourceType": "snapshot",
                    "Tags": _tag_list({**run_tags, TAG_PERIODIC: f"{volume.volume_id} {self._clock():.3f}"}),
                }
            ],
        )
        snap_id = str(r["SnapshotId"])
        done = [s for s in snaps if s.get("State") == "completed"]
        for s in done[: max(0, len(done) - keep)]:
            self._delete_snapshot(s["SnapshotId"])
            log.info("deleted old periodic snapshot %s", s["SnapshotId"])
        log.info("started snapshot %s of %s", snap_id, volume.volume_id)
        return snap_id

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

    def _resolve_unclaimed(self, volume_id: str | None, tags: Mapping[str, str] | None) -> _Resolved:
        """:meth:`resolve`, waiting while another live instance holds a move claim on the run's volume."""
        start = time.monotonic()
        while True:
            r = self.resolve(volume_id, tags)
            if r.volume.instance_id == self.instance_id:
                return r
            src = r.source or r.volume
            holder = self.claim_holder(src)
            if holder is None:
                return r
            if time.monotonic() - start >= self.timeouts.detach:
                raise VolumeBusy(
                    f"volume {src.volume_id} is being moved to {holder.availability_zone} by "
                    f"{holder.instance_id}, which is alive, after {self.timeouts.detach:.0f} s: another copy "
                    "of this run is moving or using it"
                )
            log.info("volume %s is being moved by %s (alive): waiting", src.volume_id, holder.instance_id)
            self._sleep(self.timeouts.poll)

    def attach(
        self,
        volume_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        *,
        device_name: str | None = None,
        move: bool = False,
        wait_device: bool = True,
        create_size: int | None = None,
        create_type: str = "gp3",
    ) -> Attachment:
        """Bring the run's volume to this instance and return its block device.

        Idempotent: a volume already attached here is only looked up. A volume in
        another zone raises :class:`VolumeWrongZone` unless ``move``. With
        ``create_size`` (GiB) and no volume matching ``tags``: :meth:`create_or_restore`.
        """
        created = False
        try:
            r = self._resolve_unclaimed(volume_id, tags)
        except VolumeNotFound:
            if create_size is None or volume_id:
                raise
            self.create_or_restore(tags or {}, size=create_size, volume_type=create_type)
            created = True
            r = self._resolve_unclaimed(volume_id, tags)
        volume = r.volume
        moved_from = r.source.volume_id if r.source is not None else None
        if volume.instance_id == self.instance_id and volume.attachment_state in ("attached", "attaching"):
            volume = self._wait_attached(volume)
            device = self.find_device(volume, wait=wait_device)
            log.info("volume %s already attached here as %s", volume.volume_id, device)
            return Attachment(volume, device, False, volume.moved_from, created)
        if volume.availability_zone != self.availability_zone:
            if not move:
                raise VolumeWrongZone(
                    f"volume {volume.volume_id} is in {volume.availability_zone}, this instance "
                    f"({self.instance_id}) in {self.availability_zone}: pass --move to copy it here "
                    "(snapshot + new volume), or launch in its zone"
                )
            moved_from = volume.volume_id
            volume = self.move_to_az(volume, r.copies)
            if volume.instance_id == self.instance_id:
                volume = self._wait_attached(volume)
                return Attachment(volume, self.find_device(volume, wait=wait_device), False, moved_from, created)
        elif r.source is None and r.copies:
            # The source is here and an earlier move never finished: it stays the run's volume.
            for c in r.copies:
                self.abandon(c)
        if volume.availability_zone == self.availability_zone and TAG_CLAIM in volume.tags:
            self.release_claim(volume.volume_id, stale_too=True)
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
        # A mover elsewhere may have claimed it after we looked (it checks for an attachment
        # after claiming, we check for a claim after attaching: one of us sees the other).
        holder = self.claim_holder(volume)
        if holder is not None:
            self.detach(volume)
            raise VolumeBusy(
                f"volume {volume.volume_id} is being moved to {holder.availability_zone} by {holder.instance_id} "
                "(alive), which claimed it while it was attached here: detached it again"
            )
        device = self.find_device(volume, wait=wait_device)
        log.info("volume %s attached as %s", volume.volume_id, device)
        return Attachment(volume, device, True, moved_from, created)

    def _wait_attached(self, volume: VolumeInfo) -> VolumeInfo:
        return self._wait(
            volume.volume_id,
            lambda v: v.instance_id == self.instance_id and v.attachment_state == "attached",
            self.timeouts.attach,
            f"volume {volume.volume_id} to attach to {self.instance_id}",
        )

    def find_device(self, volume: VolumeInfo, *, wait: bool = True) -> str:
        """The block device of an attached volume (see :func:`spotsafe.cloud.aws.volume.devices.find_device`)."""
        return find_device(
            volume.volume_id,
            volume.device_name,
            sys_root=self.sys_root,
            dev_root=self.dev_root,
            timeout=self.timeouts.device if wait else 0.0,
            poll=min(self.timeouts.poll, 0.5),
        )


@dataclass(frozen=True)
class Identity:
    """This instance's id, zone and region (read once from IMDS)."""

    instance_id: str
    availability_zone: str
    region: str

    @classmethod
    def from_metadata(cls, endpoint: str | None = None, *, timeout: float = 2.0, retry_for: float = 0.0) -> Identity:
        """Read it through :class:`spotsafe.cloud.aws.metadata.AWSMetadata`; raises MetadataError.

        ``retry_for``: keep trying this many seconds (IMDS can throttle, or lag early in a boot).
        """
        from spotsafe.cloud.aws.metadata import AWSMetadata

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
