"""Moving the volume between availability zones: snapshot, copy here, and retire the source once mounted.

A run's volume normally lives in one availability zone; an instance in another zone
can *move* it: claim it (:mod:`~spotsafe.cloud.aws.volume.claim`: one mover), snapshot
it, create a copy in its own zone with the same tags, mount it, and only then delete
the original and the snapshot. Two more promises hold under races and interruptions:

- **One volume.** A copy is *committed* (:data:`~spotsafe.cloud.aws.volume.model.TAG_MOVE_DONE`)
  once mounted; only then is its source superseded. An uncommitted copy (its mover was
  reclaimed before mounting) holds nothing newer than its source: an instance in the
  source's zone deletes it and its snapshot and uses the source, one in the copy's zone
  adopts it, one elsewhere moves the source again.
- **Cleanup never blocks training.** Deleting the old volume or the snapshot after a
  good mount only warns when it fails; the next mount tries again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from spotsafe.cloud.aws.volume.claim import Claims
from spotsafe.cloud.aws.volume.detach import Detaching
from spotsafe.cloud.aws.volume.model import (
    DEAD_VOLUME_STATES,
    TAG_CLAIM,
    TAG_MOVE_DONE,
    TAG_MOVE_SNAPSHOT,
    TAG_MOVED_BY,
    TAG_MOVED_FROM,
    Claim,
    VolumeInfo,
    tag_list,
    user_tags,
)
from spotsafe.errors import VolumeBusy, VolumeError, VolumeNotFound, VolumeTimeout

__all__ = ["Moves"]

log = logging.getLogger("spotsafe.volume")


class Moves(Claims, Detaching):
    """Copies the volume into this zone (the one mover), abandons interrupted copies, retires superseded sources."""

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
            keep = user_tags(volume.tags)
            t0 = time.monotonic()
            snap = self.calls(
                "create_snapshot",
                f"snapshot {volume.volume_id}",
                VolumeId=volume.volume_id,
                Description=f"spotsafe: move of {volume.volume_id} to {here}",
                TagSpecifications=[
                    {"ResourceType": "snapshot", "Tags": tag_list({**keep, "spotsafe-move-of": volume.volume_id})}
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

    def _copies_of(self, volume_id: str) -> list[VolumeInfo]:
        r = self.calls(
            "describe_volumes",
            f"look for copies of {volume_id}",
            Filters=[{"Name": f"tag:{TAG_MOVED_FROM}", "Values": [volume_id]}],
        )
        vols = [VolumeInfo.from_api(v) for v in r.get("Volumes", [])]
        return sorted((v for v in vols if v.state not in DEAD_VOLUME_STATES), key=lambda v: v.volume_id)

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

    def _wait_snapshot(self, snap_id: str) -> None:
        start = time.monotonic()
        while True:
            r = self.calls("describe_snapshots", f"describe {snap_id}", SnapshotIds=[snap_id])
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
        self.calls(
            "delete_tags",
            f"untag {volume.volume_id}",
            Resources=[volume.volume_id],
            Tags=[{"Key": k} for k in (TAG_MOVED_FROM, TAG_MOVE_SNAPSHOT, TAG_MOVED_BY, TAG_MOVE_DONE)],
        )
        log.info("retired %s", ", ".join(deleted) or "nothing (already gone)")
        return deleted
