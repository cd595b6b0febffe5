"""The command line: ``python -m spotsafe.volume`` / ``spotsafe volume``, one exit status per failure kind.

::

    attach   --tag spotsafe-run=mnist [--move] [--device /dev/sdf] [--create-size GIB]   prints the block device
    mount    --tag spotsafe-run=mnist [--mountpoint /mnt/spotsafe] [--mkfs] [--owner ubuntu] [--fstab] [--keep-old]
    unmount  [--mountpoint /mnt/spotsafe]
    detach   --tag spotsafe-run=mnist [--force]
    status   [--tag spotsafe-run=mnist] [--json]
    snapshot --tag spotsafe-run=mnist [--keep 2] [--every SECONDS]   incremental snapshots while training
    finish   [--no-asg] [--no-spot]    tell the Auto Scaling group / spot request to stop replacing us
    iam-policy --tag spotsafe-run=mnist   the least IAM policy of the instance role, for that run
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import errno
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from spotsafe.cloud.aws.clients import ec2_client, truthy
from spotsafe.cloud.aws.volume.filesystem import (
    DEFAULT_FSTYPE,
    DEFAULT_MOUNTPOINT,
    mount,
    mounted_at,
    mountpoints_of,
    unmount,
)
from spotsafe.cloud.aws.volume.manager import VolumeManager
from spotsafe.cloud.aws.volume.model import TAG_NEW, Identity, Timeouts, VolumeInfo, parse_tags
from spotsafe.cloud.aws.volume.policy import iam_policy
from spotsafe.cloud.aws.volume.scale_down import scale_to_zero
from spotsafe.errors import (
    MetadataError,
    MissingDependency,
    VolumeAmbiguous,
    VolumeAWSError,
    VolumeBusy,
    VolumeDeviceNotFound,
    VolumeError,
    VolumeMountError,
    VolumeNoFilesystem,
    VolumeNotBlank,
    VolumeNotFound,
    VolumePermissionDenied,
    VolumeTimeout,
    VolumeWrongZone,
)

__all__ = ["EXIT_CODES", "ExitCode", "exit_code", "main"]

log = logging.getLogger("spotsafe.volume")


class ExitCode(enum.IntEnum):
    """The exit status of ``python -m spotsafe.volume``: one per failure kind (docs/volume.md)."""

    #: Done.
    OK = 0
    #: Any other volume failure.
    FAILED = 1
    #: Bad command line (argparse's own status).
    USAGE = 2
    #: No volume with that id or tag.
    NOT_FOUND = 3
    #: Several volumes match the tag and none is clearly the one.
    AMBIGUOUS = 4
    #: The instance role is not allowed to do an EC2 call (IAM).
    PERMISSION = 5
    #: The volume is in another availability zone and ``--move`` was not given.
    WRONG_ZONE = 6
    #: The volume is attached to, or being moved by, another instance that is alive, or never let go.
    BUSY = 7
    #: An EC2 state change (attach, snapshot, create) did not finish in time.
    TIMEOUT = 8
    #: The volume is attached but its block device never appeared.
    NO_DEVICE = 9
    #: The device has no filesystem and formatting was not allowed (``--mkfs`` / ``spotsafe-new=true``).
    NO_FILESYSTEM = 10
    #: The device holds data that is not a filesystem spotsafe can mount: never formatted.
    NOT_BLANK = 11
    #: mount / umount / mkfs failed, or the mount point holds another device.
    MOUNT = 12
    #: The instance metadata service (IMDS) could not be read: not on EC2?
    METADATA = 13
    #: Another EC2 API failure (network, throttling, credentials).
    AWS = 14
    #: boto3 is not installed (``pip install spotsafe[aws]``).
    MISSING_DEPENDENCY = 15


#: Exception class -> exit status. The most specific class wins (checked in this order).
EXIT_CODES: dict[type[BaseException], ExitCode] = {
    VolumeNotFound: ExitCode.NOT_FOUND,
    VolumeAmbiguous: ExitCode.AMBIGUOUS,
    VolumePermissionDenied: ExitCode.PERMISSION,
    VolumeWrongZone: ExitCode.WRONG_ZONE,
    VolumeBusy: ExitCode.BUSY,
    VolumeTimeout: ExitCode.TIMEOUT,
    VolumeDeviceNotFound: ExitCode.NO_DEVICE,
    VolumeNoFilesystem: ExitCode.NO_FILESYSTEM,
    VolumeNotBlank: ExitCode.NOT_BLANK,
    VolumeMountError: ExitCode.MOUNT,
    MetadataError: ExitCode.METADATA,
    VolumeAWSError: ExitCode.AWS,
    MissingDependency: ExitCode.MISSING_DEPENDENCY,
    VolumeError: ExitCode.FAILED,
}


def _identity(args: argparse.Namespace) -> Identity:
    return Identity.from_metadata(
        args.metadata_endpoint, timeout=args.metadata_timeout, retry_for=args.metadata_retry_for
    )


def _manager(args: argparse.Namespace) -> VolumeManager:
    identity = _identity(args)
    region = args.region or identity.region
    timeouts = Timeouts(
        poll=args.poll_interval,
        attach=args.attach_timeout,
        detach=args.detach_timeout,
        force_detach_after=args.force_detach_after,
        device=args.device_timeout,
        snapshot=args.snapshot_timeout,
        create=args.snapshot_timeout,
        settle=args.claim_settle,
    )
    return VolumeManager(
        ec2_client(region, endpoint_url=args.endpoint_url),
        identity,
        timeouts=timeouts,
        sys_root=args.sys_root,
        dev_root=args.dev_root,
    )


def _selector(args: argparse.Namespace) -> tuple[str | None, dict[str, str]]:
    tags = parse_tags(args.tag or [])
    return args.volume_id, tags


def _has_selector(args: argparse.Namespace) -> bool:
    return bool(args.volume_id or args.tag)


def _cmd_attach(args: argparse.Namespace) -> int:
    if not _has_selector(args):
        raise VolumeError("attach: give --volume-id or --tag KEY=VALUE")
    mgr = _manager(args)
    vid, tags = _selector(args)
    a = mgr.attach(
        vid,
        tags,
        device_name=args.device,
        move=args.move,
        create_size=args.create_size,
        create_type=args.create_type,
    )
    if args.json:
        print(
            json.dumps(
                {
                    "volume": a.volume.to_json(),
                    "device": a.device,
                    "attached_now": a.attached_now,
                    "moved_from": a.moved_from,
                    "created": a.created,
                }
            )
        )
    else:
        print(a.device)
    return ExitCode.OK


def _cmd_mount(args: argparse.Namespace) -> int:
    mgr: VolumeManager | None = None
    volume: VolumeInfo | None = None
    mkfs = args.mkfs
    device = args.device
    if _has_selector(args):
        mgr = _manager(args)
        vid, tags = _selector(args)
        volume = mgr.find(vid, tags)
        if volume.instance_id != mgr.instance_id:
            raise VolumeError(
                f"mount: volume {volume.volume_id} is not attached to this instance ({mgr.instance_id}); "
                "run `python -m spotsafe.volume attach` first"
            )
        mkfs = mkfs or truthy(volume.tags.get(TAG_NEW))
        if device is None:
            device = mgr.find_device(volume)
    if device is None:
        raise VolumeError("mount: give --device, or --volume-id / --tag to find it")
    result = mount(
        device,
        args.mountpoint,
        mkfs=mkfs,
        fstype=args.fstype,
        owner=args.owner,
        fstab=args.fstab,
        fstab_path=args.fstab_path,
        options=args.options,
    )
    if mgr is not None and volume is not None:
        try:
            # A mounted move copy is the run's volume from now on; if that cannot be
            # recorded, another instance could abandon it: never train on it then.
            volume = mgr.commit_move(volume)
        except VolumeError:
            if not result.already_mounted:
                unmount(result.mountpoint)
            raise
        # Cleanup after a good mount: a failure is logged, never a failed boot (the next mount retries).
        if TAG_NEW in volume.tags:
            # It has a filesystem now: the permission to format is spent.
            try:
                mgr.calls(
                    "delete_tags", f"untag {volume.volume_id}", Resources=[volume.volume_id], Tags=[{"Key": TAG_NEW}]
                )
            except VolumeError as e:
                log.warning("warning: could not remove the tag %s from %s: %s", TAG_NEW, volume.volume_id, e)
        if not args.keep_old:
            try:
                mgr.retire_superseded(volume)
            except VolumeError as e:
                log.warning(
                    "warning: mounted, but could not retire the volume or snapshot this one was moved from "
                    "(the next mount tries again): %s",
                    e,
                )
    if args.json:
        print(json.dumps(dataclasses.asdict(result)))
    else:
        print(result.mountpoint)
    return ExitCode.OK


def _cmd_unmount(args: argparse.Namespace) -> int:
    unmount(args.mountpoint)
    return ExitCode.OK


def _cmd_detach(args: argparse.Namespace) -> int:
    if not _has_selector(args):
        raise VolumeError("detach: give --volume-id or --tag KEY=VALUE")
    mgr = _manager(args)
    vid, tags = _selector(args)
    volume = mgr.find(vid, tags)
    if volume.instance_id == mgr.instance_id:
        # Never pull a mounted filesystem from under itself: unmount first.
        try:
            dev = mgr.find_device(volume, wait=False)
        except VolumeDeviceNotFound:
            dev = None
        if dev is not None:
            for mp in mountpoints_of(dev):
                unmount(mp)
    mgr.detach(volume, force=args.force)
    return ExitCode.OK


def _cmd_status(args: argparse.Namespace) -> int:
    out: dict[str, Any] = {"mountpoint": os.path.abspath(args.mountpoint)}
    m = mounted_at(args.mountpoint)
    out["mounted"] = None if m is None else {"source": m.source, "fstype": m.fstype}
    if _has_selector(args):
        mgr = _manager(args)
        vid, tags = _selector(args)
        out["instance_id"] = mgr.instance_id
        out["availability_zone"] = mgr.availability_zone
        volume = mgr.find(vid, tags)
        out["volume"] = volume.to_json()
        out["attached_here"] = volume.instance_id == mgr.instance_id
        out["device"] = None
        if out["attached_here"]:
            try:
                out["device"] = mgr.find_device(volume, wait=False)
            except VolumeDeviceNotFound:
                pass
    if args.json:
        print(json.dumps(out, default=str))
        return ExitCode.OK
    mounted = out["mounted"]
    print(
        f"mount point  {out['mountpoint']}: "
        + (f"{mounted['source']} ({mounted['fstype']})" if mounted else "nothing mounted")
    )
    if "volume" in out:
        v = out["volume"]
        where = f"attached to {v['instance_id']} ({v['attachment_state']})" if v["instance_id"] else v["state"]
        print(f"this instance {out['instance_id']} in {out['availability_zone']}")
        print(f"volume       {v['volume_id']} in {v['availability_zone']}, {v['size']} GiB {v['volume_type']}, {where}")
        print(f"device       {out['device'] or '-'}")
    return ExitCode.OK


def _cmd_snapshot(args: argparse.Namespace) -> int:
    if not _has_selector(args):
        raise VolumeError("snapshot: give --volume-id or --tag KEY=VALUE")
    if args.keep < 1:
        raise ValueError(f"--keep must be at least 1, not {args.keep}")
    mgr = _manager(args)
    vid, tags = _selector(args)
    stop = threading.Event()
    if args.every:

        def _stop(signum: int, frame: FrameType | None) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        # The first one after a full interval: the move (or creation) just made a fresh copy.
        if stop.wait(args.every):
            return ExitCode.OK
    while True:
        try:
            os.sync()  # the newest checkpoint's pages reach the volume before EBS takes the snapshot
            snap = mgr.snapshot(mgr.find(vid, tags), keep=args.keep)
            if snap:
                print(snap, flush=True)
        except VolumeError as e:
            if not args.every:
                raise
            # Periodic mode never stops training: it tries again next time.
            log.warning("warning: periodic snapshot failed (trying again in %.0f s): %s", args.every, e)
        if not args.every or stop.wait(args.every):
            return ExitCode.OK


def _cmd_finish(args: argparse.Namespace) -> int:
    identity = _identity(args)
    ec2 = ec2_client(args.region or identity.region, endpoint_url=args.endpoint_url)
    done = scale_to_zero(identity, ec2=ec2, asg=not args.no_asg, spot=not args.no_spot)
    for line in done:
        print(line)
    if not done:
        print(f"{identity.instance_id}: no auto scaling group or spot request to stop")
    return ExitCode.OK


def _add_common(p: argparse.ArgumentParser, *, selector: bool = True, aws: bool = True) -> None:
    if selector:
        p.add_argument("--volume-id", help="the volume's id (vol-…)")
        p.add_argument(
            "--tag",
            action="append",
            metavar="KEY=VALUE",
            help="find the volume by tag (repeatable), e.g. spotsafe-run=mnist",
        )
    if aws:
        p.add_argument("--region", help="EC2 region (default: this instance's, from IMDS)")
        p.add_argument("--endpoint-url", help="EC2 endpoint (default: botocore's; AWS_ENDPOINT_URL_EC2 works too)")
        p.add_argument(
            "--metadata-endpoint",
            default=None,
            help="IMDS base URL (default: AWS_EC2_METADATA_SERVICE_ENDPOINT or 169.254.169.254)",
        )
        p.add_argument("--metadata-timeout", type=float, default=2.0, help="seconds per IMDS request")
        p.add_argument(
            "--metadata-retry-for",
            type=float,
            default=30.0,
            help="keep retrying IMDS this many seconds before giving up (exit 13)",
        )
        p.add_argument("--sys-root", default="/sys", help=argparse.SUPPRESS)
        p.add_argument("--dev-root", default="/dev", help=argparse.SUPPRESS)
        d = Timeouts()
        p.add_argument("--poll-interval", type=float, default=d.poll, help="seconds between EC2 polls")
        p.add_argument("--attach-timeout", type=float, default=d.attach)
        p.add_argument(
            "--detach-timeout",
            type=float,
            default=d.detach,
            help="how long to wait for the volume to leave the old instance",
        )
        p.add_argument(
            "--force-detach-after",
            type=float,
            default=d.force_detach_after,
            help="force-detach from a terminated/stopped old instance after this many seconds",
        )
        p.add_argument("--device-timeout", type=float, default=d.device)
        p.add_argument("--snapshot-timeout", type=float, default=d.snapshot)
        p.add_argument(
            "--claim-settle",
            type=float,
            default=d.settle,
            help="seconds between writing a move claim and reading it back (EC2 tag propagation)",
        )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m spotsafe.volume",
        description="Attach and mount the persistent EBS volume of a spot training run.",
        epilog="exit status: "
        + ", ".join(f"{c.value} {c.name.lower().replace('_', '-')}" for c in ExitCode)
        + " (docs/volume.md)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("attach", help="find the volume and attach it here; prints the block device")
    _add_common(p)
    p.add_argument("--device", help="device name for attach_volume (default: first free of /dev/sdf..sdp)")
    p.add_argument(
        "--move", action="store_true", help="if the volume is in another zone: snapshot it and create a copy here"
    )
    p.add_argument(
        "--create-size",
        type=int,
        metavar="GIB",
        help="if no volume matches the tags: restore the newest periodic snapshot of the run, "
        "else create a blank volume of this size (tagged spotsafe-new=true)",
    )
    p.add_argument("--create-type", default="gp3", help="volume type for --create-size")
    p = sub.add_parser("mount", help="mount the attached volume (mkfs only if blank and allowed)")
    _add_common(p)
    p.add_argument("--device", help="the block device (default: found from the volume)")
    p.add_argument("--mountpoint", default=DEFAULT_MOUNTPOINT)
    p.add_argument("--mkfs", action="store_true", help="allow creating a filesystem on a BLANK device")
    p.add_argument("--fstype", default=DEFAULT_FSTYPE, help="filesystem for --mkfs (ext4, xfs)")
    p.add_argument("--options", help="mount options (-o)")
    p.add_argument("--owner", metavar="USER[:GROUP]", help="chown the mount point for the training user")
    p.add_argument("--fstab", action="store_true", help="add an fstab entry (UUID, nofail)")
    p.add_argument("--fstab-path", default="/etc/fstab", help=argparse.SUPPRESS)
    p.add_argument(
        "--keep-old",
        action="store_true",
        help="after a zone move, keep the old volume and snapshot instead of deleting them",
    )
    p = sub.add_parser("unmount", help="unmount the volume (no-op when not mounted)")
    _add_common(p, selector=False, aws=False)
    p.add_argument("--mountpoint", default=DEFAULT_MOUNTPOINT)
    p = sub.add_parser("detach", help="unmount and detach the volume from this instance")
    _add_common(p)
    p.add_argument("--force", action="store_true", help="force-detach (can lose unflushed writes)")
    p = sub.add_parser("status", help="what is attached and mounted")
    _add_common(p)
    p.add_argument("--mountpoint", default=DEFAULT_MOUNTPOINT)
    p = sub.add_parser("snapshot", help="start an incremental snapshot of the volume, keep the newest --keep")
    _add_common(p)
    p.add_argument("--keep", type=int, default=2, help="completed periodic snapshots to keep")
    p.add_argument(
        "--every", type=float, default=0.0, metavar="SECONDS", help="repeat every SECONDS until SIGTERM (0: once)"
    )
    p = sub.add_parser("finish", help="stop the auto scaling group / spot request from replacing this instance")
    _add_common(p, selector=False)
    p.add_argument("--no-asg", action="store_true", help="leave the auto scaling group alone")
    p.add_argument("--no-spot", action="store_true", help="leave the spot request alone")
    p = sub.add_parser("iam-policy", help="print the least IAM policy of the instance role, for the run's tag")
    p.add_argument("--tag", required=True, metavar="KEY=VALUE", help="the run's tag, e.g. spotsafe-run=mnist")
    p.add_argument("--group", help="the run's Auto Scaling group (default: any group with the run's tag)")
    p.add_argument("--no-move", action="store_true", help="no zone moves (SPOTSAFE_MOVE=0)")
    p.add_argument("--no-snapshots", action="store_true", help="no periodic snapshots nor create-or-restore")
    p.add_argument("--no-finish", action="store_true", help="never scale the group to zero (finish)")
    return parser


def _cmd_iam_policy(args: argparse.Namespace) -> int:
    policy = iam_policy(
        args.tag, move=not args.no_move, snapshots=not args.no_snapshots, finish=not args.no_finish, group=args.group
    )
    print(json.dumps(policy, indent=2))
    return ExitCode.OK


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "attach": _cmd_attach,
    "mount": _cmd_mount,
    "unmount": _cmd_unmount,
    "detach": _cmd_detach,
    "status": _cmd_status,
    "finish": _cmd_finish,
    "snapshot": _cmd_snapshot,
    "iam-policy": _cmd_iam_policy,
}


def exit_code(e: BaseException) -> ExitCode:
    """The documented exit status for an exception (:data:`EXIT_CODES`)."""
    for cls, code in EXIT_CODES.items():
        if isinstance(e, cls):
            return code
    return ExitCode.FAILED


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Progress to stderr (the boot log), stdout keeps the result for scripts; only
    # spotsafe's own messages: botocore's INFO chatter stays out.
    pkg = logging.getLogger("spotsafe")
    if not pkg.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("spotsafe.volume: %(message)s"))
        pkg.addHandler(handler)
        pkg.setLevel(logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    try:
        return _COMMANDS[args.command](args)
    except (VolumeError, MetadataError, MissingDependency) as e:
        print(f"spotsafe.volume {args.command}: error: {e}", file=sys.stderr)
        return exit_code(e)
    except ValueError as e:  # bad --tag
        print(f"spotsafe.volume {args.command}: error: {e}", file=sys.stderr)
        return ExitCode.USAGE
    except PermissionError as e:
        print(f"spotsafe.volume {args.command}: error: {e} (run as root)", file=sys.stderr)
        return ExitCode.MOUNT if e.errno in (errno.EPERM, errno.EACCES) else ExitCode.FAILED
