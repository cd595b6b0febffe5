"""Letting go: wait for the volume to leave the old instance (force-detaching a gone one), detach it from this one."""

from __future__ import annotations

import logging
import time

from spotsafe.cloud.aws.volume.ec2 import VolumeEC2
from spotsafe.cloud.aws.volume.model import GONE_STATES, VolumeInfo
from spotsafe.errors import VolumeBusy

__all__ = ["Detaching"]

log = logging.getLogger("spotsafe.volume")


class Detaching(VolumeEC2):
    """Waits for the volume to be free of other instances; detaches it from this one."""

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
            if state is None or state in GONE_STATES:
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
                        if state is None or state in GONE_STATES
                        else "; that instance is alive: is another copy of this run using it?"
                    )
                )
            self._sleep(t.poll)

    def _detach_call(self, volume_id: str, instance_id: str, *, force: bool) -> None:
        try:
            self.calls(
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
