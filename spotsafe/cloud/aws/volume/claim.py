"""Finding the run's volume (by id or tag, through moves in flight) and the one-mover claim on it.

**One mover.** Before snapshotting, the mover *claims* the source volume with a
tag (:data:`~spotsafe.cloud.aws.volume.model.TAG_CLAIM`) and keeps the claim only if,
after a settle time longer than EC2's tag propagation, the tag still holds its own value
(a write then a read back: when several write at once, the last write is what all of
them read, so exactly one wins). A claim by a live instance blocks every other mover and
attacher; a claim by a gone instance (terminated, stopped, unknown) or older than
:attr:`~spotsafe.cloud.aws.volume.model.Timeouts.claim_ttl` is taken over.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from spotsafe.cloud.aws.volume.ec2 import VolumeEC2
from spotsafe.cloud.aws.volume.model import (
    TAG_CLAIM,
    Claim,
    Resolved,
    VolumeInfo,
    creation_order,
    describe_selector,
)
from spotsafe.errors import VolumeAmbiguous, VolumeBusy, VolumeError, VolumeNotFound

__all__ = ["Claims"]

log = logging.getLogger("spotsafe.volume")


class Claims(VolumeEC2):
    """Resolves the run's volume among those tagged for it, and claims it for a move (one mover at a time)."""

    def find(self, volume_id: str | None = None, tags: Mapping[str, str] | None = None) -> VolumeInfo:
        """The run's volume, by id or by tags (see :meth:`resolve`)."""
        return self.resolve(volume_id, tags).volume

    def resolve(self, volume_id: str | None = None, tags: Mapping[str, str] | None = None) -> Resolved:
        """The run's volume, by id or by tags, and the other half of a zone move still in flight.

        Among several volumes with the tags: the ones being deleted are ignored; so is
        a volume whose zone-move copy is committed (mounted once), and a copy whose
        source is gone counts as committed. A source and its uncommitted copies are
        one volume: the copy attached here wins, then a copy in this zone when the
        source is elsewhere, else the source. One attached to this instance wins;
        otherwise exactly one must remain, else :class:`VolumeAmbiguous` lists them.
        """
        if volume_id:
            return Resolved(self.describe(volume_id))
        if not tags:
            raise VolumeError("find: give a volume id or at least one tag")
        what = describe_selector(None, tags)
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
        created = [v for v in roots if creation_order(v)[0] == 1]
        if len(created) > 1:
            first = min(created, key=creation_order)
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

    def _pick(self, root: VolumeInfo, copies: list[VolumeInfo]) -> Resolved:
        if not copies:
            return Resolved(root)
        here = self.availability_zone
        ordered = sorted(copies, key=lambda v: v.volume_id)
        pick = next((c for c in ordered if c.instance_id == self.instance_id), None)
        if pick is None and root.availability_zone != here:
            pick = next((c for c in ordered if c.availability_zone == here), None)
        if pick is None:
            return Resolved(root, None, tuple(ordered))
        return Resolved(pick, root, tuple(c for c in ordered if c is not pick))

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
        self.calls(
            "delete_tags",
            f"release the claim on {volume_id}",
            Resources=[volume_id],
            Tags=[{"Key": TAG_CLAIM, "Value": c.render()}],
        )

    def _resolve_unclaimed(self, volume_id: str | None, tags: Mapping[str, str] | None) -> Resolved:
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
