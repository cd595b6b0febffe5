"""The EC2 calls on one volume that every concern builds on: describe, tag, create, delete, wait.

:class:`VolumeEC2` holds the client, this instance's identity and the timeouts; the
concerns add to it, one mixin a module: :mod:`~spotsafe.cloud.aws.volume.claim` (find
the run's volume, the move claim), :mod:`~spotsafe.cloud.aws.volume.detach` (let the old
instance go), :mod:`~spotsafe.cloud.aws.volume.move` (zone moves, retiring the source),
:mod:`~spotsafe.cloud.aws.volume.snapshots` (periodic snapshots, create-or-restore) and
:mod:`~spotsafe.cloud.aws.volume.attach` (attach, device lookup), all in
:class:`spotsafe.cloud.aws.volume.manager.VolumeManager`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from spotsafe.cloud.aws.clients import Calls, aws_error, is_botocore_error
from spotsafe.cloud.aws.volume.model import (
    DEAD_VOLUME_STATES,
    GONE_STATES,
    InstanceIdentity,
    Timeouts,
    VolumeInfo,
    tag_list,
)
from spotsafe.errors import VolumeAWSError, VolumeBusy, VolumeError, VolumeNotFound, VolumeTimeout

__all__ = ["VolumeEC2"]

log = logging.getLogger("spotsafe.volume")


class VolumeEC2:
    """The EC2 client, this instance's identity and timeouts, and the calls every concern shares.

    ``ec2`` is a boto3 EC2 client; ``identity`` anything with ``instance_id``,
    ``availability_zone`` and ``region`` (:class:`~spotsafe.cloud.aws.volume.model.Identity`,
    :class:`spotsafe.cloud.aws.metadata.AWSMetadata`).
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
        #: every EC2 call goes through this: a botocore error comes out as the VolumeError naming the call.
        self.calls = Calls(ec2)

    @property
    def instance_id(self) -> str:
        return self.identity.instance_id

    @property
    def availability_zone(self) -> str:
        return self.identity.availability_zone

    # ---------------------------------------------------------------- finding

    def describe(self, volume_id: str) -> VolumeInfo:
        """The volume as EC2 sees it now; :class:`VolumeNotFound` when it does not exist."""
        r = self.calls("describe_volumes", f"describe {volume_id}", VolumeIds=[volume_id])
        vols = r.get("Volumes", [])
        if not vols:
            raise VolumeNotFound(f"no volume {volume_id} in {self.identity.region}")
        return VolumeInfo.from_api(vols[0])

    def _exists(self, volume_id: str) -> VolumeInfo | None:
        try:
            v = self.describe(volume_id)
        except VolumeNotFound:
            return None
        return None if v.state in DEAD_VOLUME_STATES else v

    def _tagged(self, tags: Mapping[str, str], what: str) -> list[VolumeInfo]:
        filters = [{"Name": f"tag:{k}", "Values": [v]} for k, v in tags.items()]
        r = self.calls("describe_volumes", f"find {what}", Filters=filters)
        vols = [VolumeInfo.from_api(v) for v in r.get("Volumes", [])]
        return [v for v in vols if v.state not in DEAD_VOLUME_STATES]

    def instance_state(self, instance_id: str) -> str | None:
        """EC2 state name of an instance, or None when EC2 no longer knows it."""
        try:
            r = self.ec2.describe_instances(InstanceIds=[instance_id])
        except Exception as e:
            if not is_botocore_error(e):
                raise
            code = (getattr(e, "response", None) or {}).get("Error", {}).get("Code", "")
            if code.startswith("InvalidInstanceID"):
                return None
            raise aws_error(e, f"describe instance {instance_id}") from e
        for res in r.get("Reservations", []):
            for inst in res.get("Instances", []):
                if inst.get("InstanceId") == instance_id:
                    return str(inst.get("State", {}).get("Name", "unknown"))
        return None

    def _alive(self, instance_id: str) -> bool:
        state = self.instance_state(instance_id)
        return state is not None and state not in GONE_STATES

    def _tag(self, volume_id: str, tags: Mapping[str, str], what: str) -> None:
        self.calls("create_tags", what, Resources=[volume_id], Tags=tag_list(tags))

    def _create(
        self, like: VolumeInfo, zone: str, *, snapshot_id: str | None, tags: Mapping[str, str], what: str
    ) -> VolumeInfo:
        args: dict[str, Any] = {
            "AvailabilityZone": zone,
            "VolumeType": like.volume_type,
            "Size": like.size,
            "TagSpecifications": [{"ResourceType": "volume", "Tags": tag_list(tags)}],
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
        return VolumeInfo.from_api(self.calls("create_volume", what, **args))

    def _delete_volume(self, volume_id: str) -> bool:
        try:
            self.calls("delete_volume", f"delete {volume_id}", VolumeId=volume_id)
        except VolumeNotFound:
            return False
        return True

    def _delete_snapshot(self, snap_id: str) -> bool:
        try:
            self.calls("delete_snapshot", f"delete snapshot {snap_id}", SnapshotId=snap_id)
        except VolumeAWSError as e:
            if "NotFound" not in str(e):
                raise
            return False
        return True

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
