"""Helpers for the tests of the EBS volume tool (spotsafe.cloud.aws.volume).

- ``FAST``: timeouts short enough for moto and loop devices;
- :func:`fake_nvme`: a /sys and /dev tree where an NVMe disk with a given serial is a given device;
- :func:`some_block_device`: a real block device to point such a tree at;
- :func:`create_volume`: a tagged volume on the (moto) EC2 API.

The ``loopdev`` fixture is in tests/plugins/devices.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from spotsafe.cloud.aws.volume.devices import is_block_device
from spotsafe.cloud.aws.volume.model import Timeouts

#: settle 0.6 s: a claim whose check-to-write takes over half of it is withdrawn and retried, and an
#: in-process EC2 on a loaded 2-core machine can take 0.1-0.2 s for the describe and the tag write
FAST = Timeouts(poll=0.05, attach=5, detach=5, force_detach_after=0.3, device=3, snapshot=10, create=10, settle=0.6)


def fake_nvme(root: Path, serial: str, target: str, *, name: str = "nvme1n1", pad: bool = True) -> tuple[str, str]:
    """A /sys and /dev tree under ``root`` where NVMe disk ``name`` has ``serial`` and is ``target``."""
    sys_root, dev_root = root / "sys", root / "dev"
    ctrl = sys_root / "block" / name / "device"
    ctrl.mkdir(parents=True, exist_ok=True)
    dev_root.mkdir(parents=True, exist_ok=True)
    # The code under test may be polling this tree from another thread: swap the link first and
    # the serial last, each by rename, so a reader never pairs the new serial with the old target.
    tmp_link = dev_root / f".{name}.new"
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(target)
    os.replace(tmp_link, dev_root / name)
    # the kernel pads the 20-byte serial field with spaces
    tmp_serial = ctrl / ".serial.new"
    tmp_serial.write_text(serial.ljust(20) + "\n" if pad else serial + "\n")
    os.replace(tmp_serial, ctrl / "serial")
    return str(sys_root), str(dev_root)


def some_block_device() -> str:
    for cand in sorted(Path("/dev").glob("loop[0-9]*")):
        if is_block_device(str(cand)):
            return str(cand)
    pytest.skip("no block device to point the fake /sys tree at")


def create_volume(ec2: Any, az: str, tags: dict[str, str], size: int = 1) -> str:
    r = ec2.create_volume(
        AvailabilityZone=az,
        Size=size,
        VolumeType="gp3",
        TagSpecifications=[{"ResourceType": "volume", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}],
    )
    return str(r["VolumeId"])
