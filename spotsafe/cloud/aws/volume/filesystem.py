"""The filesystem on the volume: probe, mount (formatting only a blank device, when allowed), unmount, fstab."""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from spotsafe.cloud.aws.volume.devices import is_block_device
from spotsafe.cloud.aws.volume.model import TAG_NEW
from spotsafe.errors import VolumeDeviceNotFound, VolumeMountError, VolumeNoFilesystem, VolumeNotBlank

__all__ = [
    "DEFAULT_FSTYPE",
    "DEFAULT_MOUNTPOINT",
    "MountResult",
    "filesystem_device",
    "filesystem_type",
    "is_blank",
    "majmin",
    "mount",
    "mounted_at",
    "mountpoints_of",
    "partitions_of",
    "probe",
    "unmount",
]

log = logging.getLogger("spotsafe.volume")

DEFAULT_MOUNTPOINT = "/mnt/spotsafe"
DEFAULT_FSTYPE = "ext4"
_BLANK_PROBE_BYTES = 1 << 20


@dataclass(frozen=True)
class MountResult:
    """What :func:`mount` did."""

    device: str
    mountpoint: str
    fstype: str
    uuid: str | None
    formatted: bool  # a filesystem was created now
    already_mounted: bool  # it was mounted there before this call
    fstab_added: bool = False


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


def majmin(device: str) -> str:
    """``MAJOR:MINOR`` of a device node (following links), as /proc/self/mountinfo names a mount's device."""
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


def partitions_of(device: str, sys_root: str = "/sys") -> list[str]:
    """The partitions of a whole-disk ``device`` (``/dev/nvme1n1p1``, …), from sysfs; [] when none."""
    name = os.path.basename(os.path.realpath(device))
    found: list[str] = []
    for part_file in sorted(glob.glob(os.path.join(sys_root, "class", "block", name, name + "*", "partition"))):
        part = os.path.join(os.path.dirname(os.path.realpath(device)), os.path.basename(os.path.dirname(part_file)))
        if is_block_device(part):
            found.append(part)
    return found


def mountpoints_of(device: str) -> list[str]:
    """Where ``device`` (or one of its partitions) is mounted now."""
    mms = {majmin(d) for d in (device, *partitions_of(device))}
    return [m.mountpoint for m in _mounts() if m.majmin in mms]


def filesystem_device(device: str) -> str:
    """The device holding the volume's filesystem: ``device`` itself, or its one partition with a filesystem.

    A partitioned volume (a partition table on the whole device, as some images and
    tools make) is mounted through its partition when exactly one partition has a
    filesystem; with several, :class:`VolumeNotBlank` names them (pass ``--device``).
    """
    info = probe(device)
    if info.get("TYPE") or not info.get("PTTYPE"):
        return device
    with_fs = [(p, t) for p in partitions_of(device) if (t := probe(p).get("TYPE"))]
    if len(with_fs) == 1:
        log.info("%s has a %s partition table: its filesystem is on %s", device, info["PTTYPE"], with_fs[0][0])
        return with_fs[0][0]
    if len(with_fs) > 1:
        listing = ", ".join(f"{p} ({t})" for p, t in with_fs)
        raise VolumeNotBlank(
            f"{device} has {len(with_fs)} partitions with a filesystem ({listing}): pass --device with the one to mount"
        )
    return device


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
    if not is_block_device(device):
        raise VolumeDeviceNotFound(f"{device} is not a block device")
    device = filesystem_device(device)
    mountpoint = os.path.abspath(mountpoint)
    current = mounted_at(mountpoint)
    formatted = False
    if current is not None:
        if current.majmin != majmin(device):
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
                    f"{device} has a {info['PTTYPE']} partition table and no partition with a filesystem "
                    "(nor one on the whole device): spotsafe never formats it"
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
