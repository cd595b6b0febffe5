"""Block-device discovery: which ``/dev`` node is an attached EBS volume.

On Nitro instances every EBS volume is an NVMe disk whose controller serial number
is the volume id without the dash; the device name given to ``AttachVolume`` means
nothing there. On Xen instances the volume appears under the requested name
(``/dev/sdf``) or its ``/dev/xvdf`` twin, even when the instance also has NVMe
*instance-store* disks (i3, f1): those report the model "Amazon EC2 NVMe Instance
Storage" and are not EBS.
"""

from __future__ import annotations

import glob
import os
import stat
import time

from spotsafe.errors import VolumeDeviceNotFound

__all__ = ["NITRO_BY_ID_PREFIX", "find_device", "is_block_device"]

NITRO_BY_ID_PREFIX = "nvme-Amazon_Elastic_Block_Store_"
#: The model an instance-store NVMe disk reports (i3, f1, i3en...): never an EBS volume.
INSTANCE_STORE_MODEL = "Amazon EC2 NVMe Instance Storage"


def is_block_device(path: str) -> bool:
    """True when ``path`` (following links) is a block device."""
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def _nvme_serial_matches(sys_root: str, dev_root: str, serial: str) -> str | None:
    # udev's stable name first, then the serial number of every NVMe controller.
    by_id = os.path.join(dev_root, "disk", "by-id", NITRO_BY_ID_PREFIX + serial)
    if is_block_device(by_id):
        return os.path.realpath(by_id)
    for serial_file in sorted(glob.glob(os.path.join(sys_root, "block", "nvme*", "device", "serial"))):
        found = _read(serial_file)
        # Some instance types report the serial without the dash, some with.
        if found is not None and found.replace("-", "") == serial:
            name = os.path.basename(os.path.dirname(os.path.dirname(serial_file)))
            dev = os.path.join(dev_root, name)
            if is_block_device(dev):
                return os.path.realpath(dev)
    return None


def ebs_is_nvme(sys_root: str = "/sys") -> bool:
    """True on a Nitro instance: some NVMe disk is not instance storage (the root EBS volume is one).

    A Xen instance with NVMe instance-store disks (i3, f1) answers False: its EBS
    volumes are ``/dev/xvdX``. A disk whose model cannot be read counts as EBS, so a
    stale ``/dev/sdX`` name is never trusted where NVMe EBS may be.
    """
    for disk in glob.glob(os.path.join(sys_root, "block", "nvme*")):
        model = _read(os.path.join(disk, "device", "model"))
        if model is None or model != INSTANCE_STORE_MODEL:
            return True
    return False


def _named_candidates(dev_root: str, device_name: str) -> list[str]:
    base = os.path.basename(device_name)
    names = [base]
    if base.startswith("sd"):
        names.append("xvd" + base[2:])
    elif base.startswith("xvd"):
        names.append("sd" + base[3:])
    return [os.path.join(dev_root, n) for n in names]


def find_device(
    volume_id: str,
    device_name: str | None = None,
    *,
    sys_root: str = "/sys",
    dev_root: str = "/dev",
    timeout: float = 120.0,
    poll: float = 0.5,
) -> str:
    """The block device of an attached EBS volume, waiting up to ``timeout`` for it to appear.

    On Nitro instances (NVMe EBS) the device is the one whose controller serial
    number is the volume id without the dash (``/sys/block/nvme*/device/serial``,
    or udev's ``/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol…``); device
    names given to the API mean nothing there. Otherwise (Xen, with or without
    NVMe instance-store disks) it is the requested name or its ``xvd`` twin.
    Returns the resolved path; raises :class:`VolumeDeviceNotFound`.
    """
    serial = volume_id.replace("-", "")
    start = time.monotonic()
    while True:
        found = _nvme_serial_matches(sys_root, dev_root, serial)
        if found:
            return found
        # On Nitro the /dev/sdX name may be a udev symlink to *any* NVMe disk
        # only when ec2-utils made it for this volume; trust the serial there.
        nitro = ebs_is_nvme(sys_root)
        if device_name and not nitro:
            for cand in _named_candidates(dev_root, device_name):
                if is_block_device(cand):
                    return os.path.realpath(cand)
        if time.monotonic() - start >= timeout:
            looked = f"NVMe serial {serial} under {sys_root}/block"
            if device_name and not nitro:
                looked += f", {' or '.join(_named_candidates(dev_root, device_name))}"
            raise VolumeDeviceNotFound(
                f"volume {volume_id} is attached but no block device appeared after {timeout:.0f} s "
                f"(looked for {looked})"
            )
        time.sleep(poll)
