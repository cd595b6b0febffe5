"""The persistent EBS volume: find it, bring it to this instance, mount it (formatting only when blank).

A spot run keeps its checkpoints, data and logs on one EBS volume that outlives
the instances it is attached to. On every boot, a replacement instance:

1. finds the volume by id or by tag (``spotsafe-run=mnist``), with its own
   instance id, zone and region taken from the instance metadata service
   (:class:`spotsafe.cloud.aws.metadata.AWSMetadata`); optionally creates it, or restores it from
   the run's newest periodic snapshot, when none exists;
2. waits for the volume to leave the old instance (a bounded force-detach only
   when the old instance is gone: terminated, stopped or unknown);
3. if the volume is in another availability zone and ``move`` is asked for,
   claims it (one mover at a time), snapshots it and creates a copy here with the
   same tags (the old one is retired only once the copy is attached *and* mounted);
4. attaches it and finds its block device (on Nitro by the NVMe serial number,
   which is the volume id without the dash; else the requested ``/dev/sdX`` or
   its ``/dev/xvdX`` twin);
5. mounts it, creating a filesystem only on a device that is blank (no
   signature, zeros at the start) *and* when asked (``--mkfs``, or the volume
   tagged ``spotsafe-new=true``). A device with data is never formatted.

Every step is idempotent: attach + mount twice is a no-op the second time.

The package, by concern: :mod:`~spotsafe.cloud.aws.volume.ec2` (EC2 lifecycle: find, claim,
move, attach, retire, snapshot), :mod:`~spotsafe.cloud.aws.volume.devices` (block-device
discovery), :mod:`~spotsafe.cloud.aws.volume.filesystem` (probe, mount, fstab),
:mod:`~spotsafe.cloud.aws.volume.finish` (Auto Scaling group / spot request) and
:mod:`~spotsafe.cloud.aws.volume.cli` (``python -m spotsafe.volume``, exit codes as :class:`ExitCode`).
"""

from __future__ import annotations

from spotsafe.cloud.aws.volume.cli import EXIT_CODES, ExitCode, exit_code, main
from spotsafe.cloud.aws.volume.devices import NITRO_BY_ID_PREFIX, find_device, is_block_device
from spotsafe.cloud.aws.volume.devices import _is_block_device as _is_block_device
from spotsafe.cloud.aws.volume.ec2 import (
    DEVICE_NAMES,
    IAM_POLICY,
    TAG_CLAIM,
    TAG_CREATED_BY,
    TAG_MOVE_DONE,
    TAG_MOVE_SNAPSHOT,
    TAG_MOVED_BY,
    TAG_MOVED_FROM,
    TAG_NEW,
    TAG_PERIODIC,
    Attachment,
    Claim,
    Identity,
    InstanceIdentity,
    Timeouts,
    VolumeInfo,
    VolumeManager,
    ec2_client,
    parse_tags,
)
from spotsafe.cloud.aws.volume.filesystem import (
    DEFAULT_FSTYPE,
    DEFAULT_MOUNTPOINT,
    MountResult,
    filesystem_device,
    filesystem_type,
    is_blank,
    mount,
    mounted_at,
    mountpoints_of,
    partitions_of,
    probe,
    unmount,
)
from spotsafe.cloud.aws.volume.filesystem import _majmin as _majmin
from spotsafe.cloud.aws.volume.finish import finish

# The exit statuses by their old names (scripts and tests use them).
EXIT_OK = ExitCode.OK
EXIT_FAILED = ExitCode.FAILED
EXIT_USAGE = ExitCode.USAGE
EXIT_NOT_FOUND = ExitCode.NOT_FOUND
EXIT_AMBIGUOUS = ExitCode.AMBIGUOUS
EXIT_PERMISSION = ExitCode.PERMISSION
EXIT_WRONG_ZONE = ExitCode.WRONG_ZONE
EXIT_BUSY = ExitCode.BUSY
EXIT_TIMEOUT = ExitCode.TIMEOUT
EXIT_NO_DEVICE = ExitCode.NO_DEVICE
EXIT_NO_FILESYSTEM = ExitCode.NO_FILESYSTEM
EXIT_NOT_BLANK = ExitCode.NOT_BLANK
EXIT_MOUNT = ExitCode.MOUNT
EXIT_METADATA = ExitCode.METADATA
EXIT_AWS = ExitCode.AWS
EXIT_MISSING_DEPENDENCY = ExitCode.MISSING_DEPENDENCY

__all__ = [
    "DEFAULT_FSTYPE",
    "DEFAULT_MOUNTPOINT",
    "DEVICE_NAMES",
    "EXIT_AMBIGUOUS",
    "EXIT_AWS",
    "EXIT_BUSY",
    "EXIT_CODES",
    "EXIT_FAILED",
    "EXIT_METADATA",
    "EXIT_MISSING_DEPENDENCY",
    "EXIT_MOUNT",
    "EXIT_NOT_BLANK",
    "EXIT_NOT_FOUND",
    "EXIT_NO_DEVICE",
    "EXIT_NO_FILESYSTEM",
    "EXIT_OK",
    "EXIT_PERMISSION",
    "EXIT_TIMEOUT",
    "EXIT_USAGE",
    "EXIT_WRONG_ZONE",
    "IAM_POLICY",
    "NITRO_BY_ID_PREFIX",
    "TAG_CLAIM",
    "TAG_CREATED_BY",
    "TAG_MOVED_BY",
    "TAG_MOVED_FROM",
    "TAG_MOVE_DONE",
    "TAG_MOVE_SNAPSHOT",
    "TAG_NEW",
    "TAG_PERIODIC",
    "Attachment",
    "Claim",
    "ExitCode",
    "Identity",
    "InstanceIdentity",
    "MountResult",
    "Timeouts",
    "VolumeInfo",
    "VolumeManager",
    "ec2_client",
    "exit_code",
    "filesystem_device",
    "filesystem_type",
    "find_device",
    "finish",
    "is_blank",
    "is_block_device",
    "main",
    "mount",
    "mounted_at",
    "mountpoints_of",
    "parse_tags",
    "partitions_of",
    "probe",
    "unmount",
]
