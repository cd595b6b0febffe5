"""The volume tool's vocabulary: its tags, IAM policy, timeouts, and what EC2 says about a volume.

Data only (no EC2 calls): :class:`VolumeInfo` (one volume as EC2 describes it),
:class:`Attachment`, :class:`Claim` (a move claim tag), :class:`Resolved` (the run's
volume with the other half of a move in flight), :class:`Identity` (this instance,
read once from IMDS), :class:`Timeouts`, the ``TAG_*`` names (the IAM policy: :mod:`spotsafe.cloud.aws.volume.policy`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from spotsafe.cloud.aws.metadata import AWSMetadata
from spotsafe.errors import MetadataError

__all__ = [
    "DEAD_VOLUME_STATES",
    "DEVICE_NAMES",
    "GONE_STATES",
    "OWN_TAGS",
    "TAG_CLAIM",
    "TAG_CREATED_BY",
    "TAG_MOVED_BY",
    "TAG_MOVED_FROM",
    "TAG_MOVE_DONE",
    "TAG_MOVE_SNAPSHOT",
    "TAG_NEW",
    "TAG_PERIODIC",
    "Attachment",
    "Claim",
    "Identity",
    "InstanceIdentity",
    "Resolved",
    "Timeouts",
    "VolumeInfo",
    "creation_order",
    "describe_selector",
    "parse_tags",
    "tag_list",
    "user_tags",
]

log = logging.getLogger("spotsafe.volume")

# --------------------------------------------------------------------------- tags

#: The tag that allows the first mount to format a blank volume (see :func:`spotsafe.cloud.aws.volume.filesystem.mount`).
TAG_NEW = "spotsafe-new"
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
OWN_TAGS = frozenset(
    {TAG_MOVED_FROM, TAG_MOVE_SNAPSHOT, TAG_MOVED_BY, TAG_MOVE_DONE, TAG_CLAIM, TAG_PERIODIC, TAG_CREATED_BY}
)

#: Device names tried, in order, when none is asked for (the EC2 recommended range for EBS).
DEVICE_NAMES = tuple(f"/dev/sd{c}" for c in "fghijklmnop")

#: Instance states in which an instance holds nothing any more.
GONE_STATES = frozenset({"terminated", "stopped"})
#: Volume states that no longer count as the run's volume.
DEAD_VOLUME_STATES = frozenset({"deleting", "deleted", "error"})


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
    """One EBS volume as EC2 describes it (a point in time: refresh with :meth:`spotsafe.cloud.aws.volume.manager.VolumeManager.describe`)."""

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
    """What :meth:`spotsafe.cloud.aws.volume.manager.VolumeManager.attach` did: the volume (after any move) and its block device."""

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
class Resolved:
    """The run's volume as :meth:`spotsafe.cloud.aws.volume.manager.VolumeManager.resolve` chose it, with the other half of a move in flight."""

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


def tag_list(tags: Mapping[str, str]) -> list[dict[str, str]]:
    """``{"k": "v"}`` -> EC2's ``[{"Key": "k", "Value": "v"}]``."""
    return [{"Key": k, "Value": v} for k, v in tags.items()]


def user_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """The tags a copy or snapshot inherits: the user's, and spotsafe-new (a blank volume stays blank)."""
    return {k: v for k, v in tags.items() if not k.startswith("aws:") and k not in OWN_TAGS}


def creation_order(v: VolumeInfo) -> tuple[int, float, str]:
    """Sort key of create-or-restore's election: an existing volume first, then the oldest creation."""
    c = v.tags.get(TAG_CREATED_BY, "").split()
    if len(c) != 2:  # not made by create-or-restore
        return (0, 0.0, v.volume_id)
    try:
        return (1, float(c[1]), v.volume_id)
    except ValueError:
        return (1, 0.0, v.volume_id)


def describe_selector(volume_id: str | None, tags: Mapping[str, str] | None) -> str:
    """How messages name the volume asked for: its id, or ``volume tagged k=v, ...``."""
    if volume_id:
        return volume_id
    return "volume tagged " + ", ".join(f"{k}={v}" for k, v in (tags or {}).items())


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
