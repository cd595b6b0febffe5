"""What moto's EC2 leaves out and the volume tool's races depend on, added to moto's backend in this process.

moto (5.x) lets a volume be attached to two instances at once (the second attach
overwrites the first), across zones, and its snapshots and volumes hold no data.
:func:`install` patches moto's EBS backend, in this process only (the
``ThreadedMotoServer`` of tests/ec2server.py runs here), so that as on EC2:

- ``AttachVolume`` is atomic (one lock) and refused with ``VolumeInUse`` when the
  volume is attached or not ``available``, ``InvalidVolume.ZoneMismatch`` when the
  instance is in another availability zone;
- with a :class:`BlockStore` active, every volume has a backing file; a snapshot is
  a copy of its volume's file at ``CreateSnapshot`` (regional), a volume created from
  a snapshot a copy of the snapshot's file in its own zone; attaching shows the file
  as a loop device with the volume's NVMe serial in that instance's own ``/sys`` and
  ``/dev`` tree (``--sys-root`` / ``--dev-root``), detaching removes it. Without root
  (``real=False``) the NVMe entry points at an existing block device and no data moves.

Everything else is moto's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["BlockStore", "install"]

_LOCK = threading.RLock()
_installed = False
#: The active block store (one at a time), or None.
STORE: BlockStore | None = None


class BlockStore:
    """Backing files for moto's volumes and snapshots, and per-instance device trees."""

    def __init__(self, root: Path, *, real: bool = True, size_mb: int = 64, fallback_device: str = "") -> None:
        self.root = root
        self.real = real
        self.size_mb = size_mb
        self.fallback_device = fallback_device
        (root / "data").mkdir(parents=True, exist_ok=True)
        self._loops: dict[str, str] = {}  # volume id -> /dev/loopN
        self._names: dict[str, tuple[str, str]] = {}  # volume id -> (instance id, nvme name)
        self.events: list[tuple[str, str]] = []

    # -- paths

    def instance_root(self, instance_id: str) -> Path:
        return self.root / "instances" / instance_id

    def sys_root(self, instance_id: str) -> str:
        return str(self.instance_root(instance_id) / "sys")

    def dev_root(self, instance_id: str) -> str:
        return str(self.instance_root(instance_id) / "dev")

    def _file(self, resource_id: str) -> Path:
        return self.root / "data" / f"{resource_id}.img"

    def device_of(self, volume_id: str) -> str | None:
        """The loop device a volume is attached as, or None."""
        return self._loops.get(volume_id)

    # -- backend hooks

    def on_create_volume(self, volume_id: str, snapshot_id: str | None) -> None:
        self.events.append(("create_volume", volume_id))
        if not self.real:
            return
        if snapshot_id and self._file(snapshot_id).exists():
            _cp(self._file(snapshot_id), self._file(volume_id))
        # else: a blank volume, its file made on first attach

    def on_create_snapshot(self, volume_id: str, snapshot_id: str) -> None:
        self.events.append(("create_snapshot", snapshot_id))
        if self.real and self._file(volume_id).exists():
            _cp(self._file(volume_id), self._file(snapshot_id))

    def on_delete(self, resource_id: str) -> None:
        self.events.append(("delete", resource_id))
        self._file(resource_id).unlink(missing_ok=True)

    def on_attach(self, volume_id: str, instance_id: str) -> None:
        self.events.append(("attach", volume_id))
        target = self.fallback_device
        if self.real:
            if not self._file(volume_id).exists():
                with open(self._file(volume_id), "wb") as f:
                    f.truncate(self.size_mb << 20)
            p = subprocess.run(
                ["losetup", "--find", "--show", str(self._file(volume_id))], capture_output=True, text=True, check=True
            )
            target = p.stdout.strip()
            self._loops[volume_id] = target
        sys_block = Path(self.sys_root(instance_id)) / "block"
        sys_block.mkdir(parents=True, exist_ok=True)
        used = {p.name for p in sys_block.glob("nvme*")}
        name = next(f"nvme{i}n1" for i in range(1, 64) if f"nvme{i}n1" not in used)
        ctrl = sys_block / name / "device"
        ctrl.mkdir(parents=True)
        (ctrl / "model").write_text("Amazon Elastic Block Store\n")
        # The device node before the serial that names it: a poller never finds a serial whose
        # node is missing or stale.
        dev = Path(self.dev_root(instance_id))
        dev.mkdir(parents=True, exist_ok=True)
        (dev / name).unlink(missing_ok=True)
        (dev / name).symlink_to(target)
        (ctrl / ".serial.new").write_text(volume_id.replace("-", "").ljust(20) + "\n")
        (ctrl / ".serial.new").replace(ctrl / "serial")
        self._names[volume_id] = (instance_id, name)

    def on_detach(self, volume_id: str) -> None:
        self.events.append(("detach", volume_id))
        where = self._names.pop(volume_id, None)
        if where is not None:
            instance_id, name = where
            shutil.rmtree(Path(self.sys_root(instance_id)) / "block" / name, ignore_errors=True)
            (Path(self.dev_root(instance_id)) / name).unlink(missing_ok=True)
        loop = self._loops.pop(volume_id, None)
        if loop is not None:
            _release_loop(loop)

    def close(self) -> None:
        for vid in list(self._names):
            self.on_detach(vid)
        shutil.rmtree(self.root / "data", ignore_errors=True)


def _cp(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)


def _release_loop(loop: str) -> None:
    # A filesystem still mounted from it (a "dead" instance never unmounted) goes lazily first.
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        majmin = _majmin(loop)
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[2] == majmin:
                subprocess.run(["umount", "-l", fields[4]], check=False)
    subprocess.run(["losetup", "-d", loop], check=False)


def _majmin(dev: str) -> str:
    st = os.stat(dev)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def activate(store: BlockStore | None) -> None:
    """Make ``store`` the block store the patched backend feeds (None: data-less, as moto is)."""
    global STORE
    STORE = store


def _error(code: str, message: str) -> Exception:
    from moto.ec2.exceptions import EC2ClientError

    return EC2ClientError(code, message)


def install() -> None:
    """Patch moto's EBS backend (idempotent, process-wide: the behaviour is EC2's)."""
    global _installed
    with _LOCK:
        if _installed:
            return
        from moto.ec2.models.elastic_block_store import EBSBackend

        orig_attach: Callable[..., Any] = EBSBackend.attach_volume
        orig_detach: Callable[..., Any] = EBSBackend.detach_volume
        orig_create: Callable[..., Any] = EBSBackend.create_volume
        orig_snapshot: Callable[..., Any] = EBSBackend.create_snapshot
        orig_delete: Callable[..., Any] = EBSBackend.delete_volume
        orig_delete_snap: Callable[..., Any] = EBSBackend.delete_snapshot

        def attach_volume(self: Any, volume_id: str, instance_id: str, device_path: str, *a: Any, **kw: Any) -> Any:
            with _LOCK:
                volume = self.get_volume(volume_id)
                instance = self.get_instance(instance_id)
                if volume.attachment is not None:
                    raise _error("VolumeInUse", f"vol '{volume_id}' is already attached to an instance")
                zone = getattr(getattr(instance, "_placement", None), "zone", None)
                if zone and volume.zone.name != zone:
                    raise _error(
                        "InvalidVolume.ZoneMismatch",
                        f"The volume '{volume_id}' is not in the same availability zone as instance '{instance_id}'",
                    )
                result = orig_attach(self, volume_id, instance_id, device_path, *a, **kw)
                root_volume = bool(a[0] if a else kw.get("delete_on_termination"))  # run_instances' own
                if STORE is not None and not root_volume:
                    STORE.on_attach(volume_id, instance_id)
                return result

        def detach_volume(self: Any, volume_id: str, *a: Any, **kw: Any) -> Any:
            with _LOCK:
                result = orig_detach(self, volume_id, *a, **kw)
                if STORE is not None and volume_id in STORE._names:
                    STORE.on_detach(volume_id)
                return result

        def create_volume(self: Any, *a: Any, **kw: Any) -> Any:
            with _LOCK:
                volume = orig_create(self, *a, **kw)
                if STORE is not None:
                    STORE.on_create_volume(volume.id, kw.get("snapshot_id"))
                return volume

        def create_snapshot(self: Any, volume_id: str, *a: Any, **kw: Any) -> Any:
            with _LOCK:
                snap = orig_snapshot(self, volume_id, *a, **kw)
                if STORE is not None:
                    STORE.on_create_snapshot(volume_id, snap.id)
                return snap

        def delete_volume(self: Any, volume_id: str) -> Any:
            with _LOCK:
                result = orig_delete(self, volume_id)
                if STORE is not None:
                    STORE.on_delete(volume_id)
                return result

        def delete_snapshot(self: Any, snapshot_id: str) -> Any:
            with _LOCK:
                result = orig_delete_snap(self, snapshot_id)
                if STORE is not None:
                    STORE.on_delete(snapshot_id)
                return result

        EBSBackend.attach_volume = attach_volume  # type: ignore[method-assign]  # the EC2-faithful layer
        EBSBackend.detach_volume = detach_volume  # type: ignore[method-assign]  # the EC2-faithful layer
        EBSBackend.create_volume = create_volume  # type: ignore[method-assign]  # the EC2-faithful layer
        EBSBackend.create_snapshot = create_snapshot  # type: ignore[method-assign]  # the EC2-faithful layer
        EBSBackend.delete_volume = delete_volume  # type: ignore[method-assign]  # the EC2-faithful layer
        EBSBackend.delete_snapshot = delete_snapshot  # type: ignore[method-assign]  # the EC2-faithful layer
        _installed = True
