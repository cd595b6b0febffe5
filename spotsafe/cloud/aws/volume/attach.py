"""Attaching the run's volume to this instance (after any wait, claim, move or creation) and finding its block device."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from spotsafe.cloud.aws.volume.devices import find_device
from spotsafe.cloud.aws.volume.model import DEVICE_NAMES, TAG_CLAIM, Attachment, VolumeInfo
from spotsafe.cloud.aws.volume.move import Moves
from spotsafe.cloud.aws.volume.snapshots import Snapshots
from spotsafe.errors import VolumeBusy, VolumeError, VolumeNotFound, VolumeWrongZone

__all__ = ["Attaching"]

log = logging.getLogger("spotsafe.volume")


class Attaching(Moves, Snapshots):
    """Brings the run's volume to this instance: resolve, wait, move or create when asked, attach, find the device."""

    def _free_device_name(self) -> str:
        r = self.calls("describe_instances", f"describe {self.instance_id}", InstanceIds=[self.instance_id])
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
        self.calls(
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
