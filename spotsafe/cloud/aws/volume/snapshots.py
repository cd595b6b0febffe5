"""EBS snapshots of the run's volume: periodic incremental snapshots, and create-or-restore from the newest one."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from spotsafe.cloud.aws.volume.ec2 import VolumeEC2
from spotsafe.cloud.aws.volume.model import (
    TAG_CREATED_BY,
    TAG_NEW,
    TAG_PERIODIC,
    VolumeInfo,
    creation_order,
    describe_selector,
    tag_list,
    user_tags,
)
from spotsafe.errors import VolumeError

__all__ = ["Snapshots"]

log = logging.getLogger("spotsafe.volume")


def _snapshot_order(s: Mapping[str, Any]) -> tuple[Any, float, str]:
    """Oldest first: EC2's start time, then the time in the periodic tag (finer than some APIs report)."""
    tags = {t["Key"]: t["Value"] for t in s.get("Tags", []) or []}
    parts = tags.get(TAG_PERIODIC, "").split()
    try:
        fine = float(parts[1]) if len(parts) == 2 else 0.0
    except ValueError:
        fine = 0.0
    return (s.get("StartTime"), fine, str(s["SnapshotId"]))


class Snapshots(VolumeEC2):
    """Takes the run's periodic snapshots; creates its volume, or restores it from the newest snapshot, when none exists."""

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
        what = describe_selector(None, tags)
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
        winner = min(vols, key=creation_order) if vols else mine
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

    def latest_snapshot(self, tags: Mapping[str, str]) -> dict[str, Any] | None:
        """The newest completed periodic snapshot tagged with ``tags``, or None."""
        snaps = self._periodic_snapshots(tags)
        done = [s for s in snaps if s.get("State") == "completed"]
        return done[-1] if done else None

    def _periodic_snapshots(self, tags: Mapping[str, str]) -> list[dict[str, Any]]:
        filters = [{"Name": f"tag:{k}", "Values": [v]} for k, v in tags.items()]
        filters.append({"Name": "tag-key", "Values": [TAG_PERIODIC]})
        r = self.calls("describe_snapshots", "list periodic snapshots", OwnerIds=["self"], Filters=filters)
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
        run_tags = user_tags(volume.tags)
        run_tags.pop(TAG_NEW, None)
        snaps = self._periodic_snapshots(run_tags)
        if any(s.get("State") == "pending" and s.get("VolumeId") == volume.volume_id for s in snaps):
            log.info("a snapshot of %s is still in progress: not starting another", volume.volume_id)
            return None
        r = self.calls(
            "create_snapshot",
            f"snapshot {volume.volume_id}",
            VolumeId=volume.volume_id,
            Description=f"spotsafe: periodic snapshot of {volume.volume_id}",
            TagSpecifications=[
                {
                    "ResourceType": "snapshot",
                    "Tags": tag_list({**run_tags, TAG_PERIODIC: f"{volume.volume_id} {self._clock():.3f}"}),
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
