"""spotsafe.cloud.aws.volume against real components: moto's EC2 server, an IMDS on loopback, loop devices.

EC2 calls go to moto (``ThreadedMotoServer`` on 127.0.0.1); instance identity comes
from an IMDS served on 127.0.0.1; block devices are loop devices over files in
tmp_path, and the NVMe lookup reads a /sys tree built in tmp_path whose device
entry points at the loop device (the lookup logic is what is tested; the device is real).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from spotsafe.cloud.aws.volume.cli import ExitCode, exit_code, main
from spotsafe.cloud.aws.volume.devices import NITRO_BY_ID_PREFIX, find_device
from spotsafe.cloud.aws.volume.filesystem import (
    filesystem_type,
    is_blank,
    mount,
    mounted_at,
    mountpoints_of,
    partitions_of,
    probe,
    unmount,
)
from spotsafe.cloud.aws.volume.manager import VolumeManager
from spotsafe.cloud.aws.volume.model import (
    TAG_MOVE_DONE,
    TAG_MOVE_SNAPSHOT,
    TAG_MOVED_FROM,
    TAG_NEW,
    Identity,
    Timeouts,
)
from spotsafe.cloud.aws.volume.policy import IAM_POLICY, iam_policy
from spotsafe.cloud.aws.volume.scale_down import scale_to_zero
from spotsafe.errors import (
    VolumeAmbiguous,
    VolumeBusy,
    VolumeDeviceNotFound,
    VolumeMountError,
    VolumeNoFilesystem,
    VolumeNotBlank,
    VolumeNotFound,
    VolumePermissionDenied,
    VolumeWrongZone,
)
from tests.ec2server import AMI, IAMEnforcingServer, run_instance, unique_tag
from tests.helpers import wait_until
from tests.iampolicy import CallJudge, above_low, actions_only, lint
from tests.volumes import FAST, create_volume, fake_nvme, some_block_device

# --------------------------------------------------------------------------- helpers


def describe(ec2: Any, volume_id: str) -> dict[str, Any]:
    return ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]  # type: ignore[no-any-return]


@dataclass
class Scene:
    ec2: Any
    instance_id: str
    az: str
    tag: dict[str, str]
    volume_id: str
    manager: VolumeManager
    sys_root: str
    dev_root: str


@pytest.fixture
def scene(ec2: Any, tmp_path: Path) -> Scene:
    """An instance in us-east-1b, a tagged volume in the same zone, a /sys tree showing its device."""
    az = "us-east-1b"
    iid = run_instance(ec2, az)
    tag = {"spotsafe-run": unique_tag()}
    vid = create_volume(ec2, az, tag)
    sys_root, dev_root = fake_nvme(tmp_path, vid.replace("-", ""), some_block_device())
    mgr = VolumeManager(ec2, Identity(iid, az, "us-east-1"), timeouts=FAST, sys_root=sys_root, dev_root=dev_root)
    return Scene(ec2, iid, az, tag, vid, mgr, sys_root, dev_root)


# --------------------------------------------------------------------------- finding


def test_find_by_tag_and_by_id(scene: Scene) -> None:
    by_tag = scene.manager.find(tags=scene.tag)
    assert by_tag.volume_id == scene.volume_id
    assert by_tag.tags == scene.tag
    assert by_tag.availability_zone == scene.az
    assert scene.manager.find(scene.volume_id).volume_id == scene.volume_id


def test_find_missing_raises_not_found(scene: Scene) -> None:
    with pytest.raises(VolumeNotFound, match="spotsafe-run=nope"):
        scene.manager.find(tags={"spotsafe-run": "nope"})
    with pytest.raises(VolumeNotFound, match="vol-0000000000000dead"):
        scene.manager.find("vol-0000000000000dead")


def test_find_two_matching_is_ambiguous_unless_one_is_attached_here(scene: Scene) -> None:
    other = create_volume(scene.ec2, "us-east-1c", scene.tag)
    with pytest.raises(VolumeAmbiguous) as e:
        scene.manager.find(tags=scene.tag)
    assert scene.volume_id in str(e.value) and other in str(e.value)
    scene.ec2.attach_volume(VolumeId=scene.volume_id, InstanceId=scene.instance_id, Device="/dev/sdf")
    assert scene.manager.find(tags=scene.tag).volume_id == scene.volume_id


def test_find_skips_a_volume_superseded_by_a_committed_move_copy(scene: Scene) -> None:
    copy = create_volume(scene.ec2, "us-east-1c", {**scene.tag, TAG_MOVED_FROM: scene.volume_id, TAG_MOVE_DONE: "1"})
    assert scene.manager.find(tags=scene.tag).volume_id == copy


def test_an_uncommitted_copy_and_its_source_are_one_volume(scene: Scene) -> None:
    # The copy was never mounted: the source (here, in 1b) is the run's volume, the copy is to abandon.
    copy = create_volume(scene.ec2, "us-east-1c", {**scene.tag, TAG_MOVED_FROM: scene.volume_id})
    r = scene.manager.resolve(tags=scene.tag)
    assert r.volume.volume_id == scene.volume_id and r.source is None
    assert [c.volume_id for c in r.copies] == [copy]
    # Seen from the copy's zone, the copy is adopted (its mount will retire the source).
    there = VolumeManager(scene.ec2, Identity(run_instance(scene.ec2, "us-east-1c"), "us-east-1c", "us-east-1"))
    r = there.resolve(tags=scene.tag)
    assert r.volume.volume_id == copy and r.source is not None and r.source.volume_id == scene.volume_id


# --------------------------------------------------------------------------- attaching


def test_attach_finds_the_nvme_device_and_is_idempotent(scene: Scene) -> None:
    a = scene.manager.attach(tags=scene.tag)
    assert a.attached_now is True
    assert a.device == os.path.realpath(os.path.join(scene.dev_root, "nvme1n1"))
    v = describe(scene.ec2, scene.volume_id)
    assert v["Attachments"][0]["InstanceId"] == scene.instance_id
    assert v["Attachments"][0]["Device"] == "/dev/sdf"
    again = scene.manager.attach(tags=scene.tag)
    assert again.attached_now is False
    assert again.device == a.device
    assert len(describe(scene.ec2, scene.volume_id)["Attachments"]) == 1


def test_attach_picks_a_free_device_name(scene: Scene) -> None:
    first = create_volume(scene.ec2, scene.az, {"other": unique_tag()})
    scene.ec2.attach_volume(VolumeId=first, InstanceId=scene.instance_id, Device="/dev/sdf")
    a = scene.manager.attach(scene.volume_id)
    assert a.volume.device_name == "/dev/sdg"


def test_attach_waits_for_a_stopped_old_instance_to_let_go(scene: Scene) -> None:
    old = run_instance(scene.ec2, scene.az)
    scene.ec2.attach_volume(VolumeId=scene.volume_id, InstanceId=old, Device="/dev/sdf")
    scene.ec2.stop_instances(InstanceIds=[old])  # a spot "stop" interruption keeps the volume attached
    a = scene.manager.attach(tags=scene.tag)
    assert a.volume.instance_id == scene.instance_id
    assert describe(scene.ec2, scene.volume_id)["Attachments"][0]["InstanceId"] == scene.instance_id


def test_attach_refuses_a_volume_held_by_a_live_instance(scene: Scene) -> None:
    other = run_instance(scene.ec2, scene.az)
    scene.ec2.attach_volume(VolumeId=scene.volume_id, InstanceId=other, Device="/dev/sdf")
    mgr = VolumeManager(
        scene.ec2,
        scene.manager.identity,
        sys_root=scene.sys_root,
        dev_root=scene.dev_root,
        timeouts=Timeouts(poll=0.05, detach=0.4, force_detach_after=0.1),
    )
    t0 = time.monotonic()
    with pytest.raises(VolumeBusy, match=other):
        mgr.attach(tags=scene.tag)
    assert time.monotonic() - t0 < 5
    # A live instance's volume is never detached from under it.
    assert describe(scene.ec2, scene.volume_id)["Attachments"][0]["InstanceId"] == other


class StickyDetach:
    """The real client, except that a plain (non-forced) detach is ignored, as a wedged one is."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.detaches: list[bool] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def detach_volume(self, **kw: Any) -> Any:
        self.detaches.append(bool(kw.get("Force")))
        if not kw.get("Force"):
            return {"State": "detaching"}
        return self._client.detach_volume(**kw)


def test_force_detach_only_after_the_grace_period_when_the_old_instance_is_gone(scene: Scene) -> None:
    old = run_instance(scene.ec2, scene.az)
    scene.ec2.attach_volume(VolumeId=scene.volume_id, InstanceId=old, Device="/dev/sdf")
    scene.ec2.stop_instances(InstanceIds=[old])
    sticky = StickyDetach(scene.ec2)
    mgr = VolumeManager(sticky, scene.manager.identity, timeouts=FAST, sys_root=scene.sys_root, dev_root=scene.dev_root)
    t0 = time.monotonic()
    a = mgr.attach(tags=scene.tag)
    assert sticky.detaches == [False, True]
    assert time.monotonic() - t0 >= FAST.force_detach_after
    assert a.volume.instance_id == scene.instance_id


def test_wrong_zone_without_move_is_refused(scene: Scene) -> None:
    far = create_volume(scene.ec2, "us-east-1a", {"spotsafe-run": unique_tag()})
    with pytest.raises(VolumeWrongZone, match="--move"):
        scene.manager.attach(far)
    assert describe(scene.ec2, far)["Attachments"] == []


def _serve_device_for_new_volume(ec2: Any, old_id: str, root: Path, target: str, stop: threading.Event) -> None:
    """Like the kernel: the device of the move copy appears once EC2 has attached it."""
    while not stop.wait(0.05):
        r = ec2.describe_volumes(Filters=[{"Name": f"tag:{TAG_MOVED_FROM}", "Values": [old_id]}])
        for v in r["Volumes"]:
            if v.get("Attachments"):
                # The copy is a second disk beside the one the scene already has, as on EC2.
                fake_nvme(root, v["VolumeId"].replace("-", ""), target, name="nvme2n1")
                return


def test_move_copies_into_this_zone_and_retires_the_old_one_after_mount(scene: Scene, tmp_path: Path) -> None:
    old_az = "us-east-1a"
    old_id = create_volume(scene.ec2, old_az, {**scene.tag, "team": "vision"}, size=3)
    scene.ec2.delete_volume(VolumeId=scene.volume_id)  # only the far volume carries the tag now
    stop = threading.Event()
    t = threading.Thread(
        target=_serve_device_for_new_volume, args=(scene.ec2, old_id, tmp_path, some_block_device(), stop), daemon=True
    )
    t.start()
    try:
        a = scene.manager.attach(tags=scene.tag, move=True)
    finally:
        stop.set()
        t.join()
    new = a.volume
    assert a.moved_from == old_id
    assert new.volume_id != old_id
    assert new.availability_zone == scene.az
    assert new.size == 3
    assert new.tags["spotsafe-run"] == scene.tag["spotsafe-run"] and new.tags["team"] == "vision"
    assert new.tags[TAG_MOVED_FROM] == old_id
    assert new.instance_id == scene.instance_id
    snap = new.tags[TAG_MOVE_SNAPSHOT]
    assert scene.ec2.describe_snapshots(SnapshotIds=[snap])["Snapshots"][0]["VolumeId"] == old_id
    # Until the mount succeeded the old volume is kept.
    assert describe(scene.ec2, old_id)["State"] == "available"
    # A re-run finds the copy (attached here), not the old one, and does not move again.
    again = scene.manager.attach(tags=scene.tag, move=True)
    assert again.volume.volume_id == new.volume_id and again.attached_now is False
    deleted = scene.manager.retire_superseded(scene.manager.describe(new.volume_id))
    assert deleted == [old_id, snap]
    with pytest.raises(VolumeNotFound):
        scene.manager.describe(old_id)
    assert TAG_MOVED_FROM not in scene.manager.describe(new.volume_id).tags
    assert scene.manager.retire_superseded(scene.manager.describe(new.volume_id)) == []


def test_detach_frees_the_volume_and_is_idempotent(scene: Scene) -> None:
    scene.manager.attach(tags=scene.tag)
    v = scene.manager.detach(scene.manager.find(tags=scene.tag))
    assert v.instance_id is None
    assert describe(scene.ec2, scene.volume_id)["State"] == "available"
    assert scene.manager.detach(v).instance_id is None


# --------------------------------------------------------------------------- device lookup


def test_find_device_by_nvme_serial_among_several(tmp_path: Path) -> None:
    target = some_block_device()
    fake_nvme(tmp_path, "vol0aaaaaaaaaaaaaaaa", "/dev/null", name="nvme0n1")
    sys_root, dev_root = fake_nvme(tmp_path, "vol0123456789abcdef0", target, name="nvme2n1", pad=False)
    assert find_device(
        "vol-0123456789abcdef0", "/dev/sdf", sys_root=sys_root, dev_root=dev_root, timeout=0
    ) == os.path.realpath(target)


def test_find_device_prefers_udev_by_id_link(tmp_path: Path) -> None:
    target = some_block_device()
    by_id = tmp_path / "dev" / "disk" / "by-id"
    by_id.mkdir(parents=True)
    (by_id / (NITRO_BY_ID_PREFIX + "vol0123456789abcdef0")).symlink_to(target)
    (tmp_path / "sys" / "block").mkdir(parents=True)
    assert find_device(
        "vol-0123456789abcdef0", None, sys_root=str(tmp_path / "sys"), dev_root=str(tmp_path / "dev"), timeout=0
    ) == os.path.realpath(target)


def test_find_device_xen_name_and_xvd_twin(tmp_path: Path) -> None:
    target = some_block_device()
    (tmp_path / "sys" / "block" / "xvda").mkdir(parents=True)
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "xvdf").symlink_to(target)
    assert find_device(
        "vol-0123", "/dev/sdf", sys_root=str(tmp_path / "sys"), dev_root=str(tmp_path / "dev"), timeout=0
    ) == os.path.realpath(target)


def test_find_device_on_xen_with_nvme_instance_storage_uses_the_xvd_name(tmp_path: Path) -> None:
    # i3 / f1: Xen, with local NVMe instance-store disks. EBS is /dev/xvdf there, not NVMe.
    for i, name in enumerate(("nvme0n1", "nvme1n1")):
        fake_nvme(tmp_path, f"AWS{i:017d}", "/dev/null", name=name)
        (tmp_path / "sys" / "block" / name / "device" / "model").write_text("Amazon EC2 NVMe Instance Storage\n")
    target = some_block_device()
    (tmp_path / "dev" / "xvdf").symlink_to(target)
    found = find_device(
        "vol-0123456789abcdef0", "/dev/sdf", sys_root=str(tmp_path / "sys"), dev_root=str(tmp_path / "dev"), timeout=0
    )
    assert found == os.path.realpath(target)
    # An EBS NVMe disk (the Nitro root volume) next to them: Nitro, the name is not trusted.
    fake_nvme(tmp_path, "vol0ffffffffffffffff", "/dev/null", name="nvme2n1")
    (tmp_path / "sys" / "block" / "nvme2n1" / "device" / "model").write_text("Amazon Elastic Block Store\n")
    with pytest.raises(VolumeDeviceNotFound):
        find_device(
            "vol-0123456789abcdef0",
            "/dev/sdf",
            sys_root=str(tmp_path / "sys"),
            dev_root=str(tmp_path / "dev"),
            timeout=0,
        )


def test_find_device_on_nitro_ignores_a_stale_sdx_name(tmp_path: Path) -> None:
    # On NVMe instances /dev/sdf may be another disk's alias: only the serial counts.
    fake_nvme(tmp_path, "vol0ffffffffffffffff", some_block_device(), name="nvme0n1")
    (tmp_path / "dev" / "sdf").symlink_to(some_block_device())
    with pytest.raises(VolumeDeviceNotFound, match="vol0123456789abcdef0"):
        find_device(
            "vol-0123456789abcdef0",
            "/dev/sdf",
            sys_root=str(tmp_path / "sys"),
            dev_root=str(tmp_path / "dev"),
            timeout=0.2,
            poll=0.05,
        )


def test_find_device_waits_for_the_device_to_appear(tmp_path: Path) -> None:
    (tmp_path / "sys" / "block").mkdir(parents=True)
    target = some_block_device()
    timer = threading.Timer(0.3, fake_nvme, args=(tmp_path, "vol0123456789abcdef0", target))
    t0 = time.monotonic()  # before the timer starts: its 0.3 s count from here at the earliest
    timer.start()
    try:
        found = find_device(
            "vol-0123456789abcdef0",
            None,
            sys_root=str(tmp_path / "sys"),
            dev_root=str(tmp_path / "dev"),
            timeout=5,
            poll=0.05,
        )
    finally:
        timer.join()
    assert found == os.path.realpath(target)
    assert time.monotonic() - t0 >= 0.25


# --------------------------------------------------------------------------- filesystems (root, loop devices)


@pytest.mark.root
def test_blank_device_is_not_formatted_without_permission(loopdev: Callable[..., str], tmp_path: Path) -> None:
    dev = loopdev()
    with pytest.raises(VolumeNoFilesystem, match="--mkfs"):
        mount(dev, str(tmp_path / "mnt"))
    assert filesystem_type(dev) is None
    assert is_blank(dev)


@pytest.mark.root
def test_mkfs_on_blank_then_mount_is_idempotent_and_never_reformats(
    loopdev: Callable[..., str], tmp_path: Path
) -> None:
    dev = loopdev()
    mnt = tmp_path / "mnt"
    r = mount(dev, str(mnt), mkfs=True)
    assert r.formatted is True and r.already_mounted is False and r.fstype == "ext4"
    assert mounted_at(str(mnt)) is not None
    (mnt / "ckpt.bin").write_bytes(b"precious")
    again = mount(dev, str(mnt), mkfs=True)
    assert again.formatted is False and again.already_mounted is True and again.uuid == r.uuid
    assert unmount(str(mnt)) is True
    assert unmount(str(mnt)) is False
    third = mount(dev, str(mnt), mkfs=True)
    assert third.formatted is False and third.uuid == r.uuid
    assert (mnt / "ckpt.bin").read_bytes() == b"precious"
    unmount(str(mnt))


@pytest.mark.root
def test_data_without_a_filesystem_is_never_formatted(loopdev: Callable[..., str], tmp_path: Path) -> None:
    dev = loopdev()
    payload = os.urandom(4096)
    with open(dev, "r+b") as f:
        f.seek(8192)
        f.write(payload)
    with pytest.raises(VolumeNotBlank, match="not blank"):
        mount(dev, str(tmp_path / "mnt"), mkfs=True)
    with open(dev, "rb") as f:
        f.seek(8192)
        assert f.read(4096) == payload


@pytest.mark.root
def test_partitioned_device_is_never_formatted(loopdev: Callable[..., str], tmp_path: Path) -> None:
    dev = loopdev()
    # An MBR with one Linux partition from sector 2048: blkid reports PTTYPE=dos, no TYPE.
    entry = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", 2048, 16 * 2048 - 2048)
    with open(dev, "r+b") as f:
        f.seek(446)
        f.write(entry)
        f.seek(510)
        f.write(b"\x55\xaa")
    with pytest.raises(VolumeNotBlank, match="dos partition table"):
        mount(dev, str(tmp_path / "mnt"), mkfs=True)
    assert probe(dev).get("PTTYPE") == "dos"


@pytest.mark.root
def test_a_partitioned_volume_mounts_its_one_filesystem(tmp_path: Path) -> None:
    img = tmp_path / "parted.img"
    with open(img, "wb") as f:
        f.truncate(32 << 20)
    # An MBR with one Linux partition from sector 2048 to the end.
    entry = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", 2048, (32 << 11) - 2048)
    with open(img, "r+b") as f:
        f.seek(446)
        f.write(entry)
        f.seek(510)
        f.write(b"\x55\xaa")
    # -P: the kernel scans the partition table, as it does for an EBS disk.
    dev = subprocess.run(
        ["losetup", "--find", "--show", "-P", str(img)], capture_output=True, text=True, check=True
    ).stdout.strip()
    mnt = tmp_path / "mnt"
    try:
        if not partitions_of(dev):  # some kernels leave the scan of a loop device to partx
            subprocess.run(["partx", "-a", dev], capture_output=True, check=False)
        parts = wait_until(lambda: partitions_of(dev), 10, what=f"the partitions of {dev}")
        assert parts == [f"{dev}p1"]
        subprocess.run(["mkfs.ext4", "-q", parts[0]], check=True)
        r = mount(dev, str(mnt), mkfs=True)
        assert r.device == parts[0] and r.formatted is False and r.fstype == "ext4"
        assert mountpoints_of(dev) == [str(mnt)]
        assert mount(dev, str(mnt)).already_mounted is True  # idempotent through the whole disk
        assert probe(dev).get("PTTYPE") == "dos"  # the table was not touched
    finally:
        unmount(str(mnt))
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.mark.root
def test_mountpoint_holding_another_device_is_an_error(loopdev: Callable[..., str], tmp_path: Path) -> None:
    a, b = loopdev(name="a"), loopdev(name="b")
    mnt = tmp_path / "mnt"
    mount(a, str(mnt), mkfs=True)
    try:
        with pytest.raises(VolumeMountError, match="already has"):
            mount(b, str(mnt), mkfs=True)
        assert filesystem_type(b) is None  # the refused device was not touched
    finally:
        unmount(str(mnt))


@pytest.mark.root
def test_fstab_entry_uses_uuid_and_nofail_once(loopdev: Callable[..., str], tmp_path: Path) -> None:
    dev = loopdev()
    fstab = tmp_path / "fstab"
    fstab.write_text("LABEL=root / ext4 defaults 0 1")  # no trailing newline
    mnt = str(tmp_path / "mnt")
    r = mount(dev, mnt, mkfs=True, fstab=True, fstab_path=str(fstab), owner="nobody")
    try:
        assert r.fstab_added is True
        lines = fstab.read_text().splitlines()
        assert lines == ["LABEL=root / ext4 defaults 0 1", f"UUID={r.uuid} {mnt} ext4 defaults,nofail 0 2"]
        import pwd

        assert os.stat(mnt).st_uid == pwd.getpwnam("nobody").pw_uid
        assert mount(dev, mnt, fstab=True, fstab_path=str(fstab)).fstab_added is False
        assert len(fstab.read_text().splitlines()) == 2
    finally:
        unmount(mnt)


# --------------------------------------------------------------------------- command line


class LocalIMDS:
    """The AWS simulator when spotsafe.rehearsal.simulators is there; its identity document is all we need."""

    def __init__(self, instance_id: str, az: str) -> None:
        from spotsafe.rehearsal.simulators.aws import AWSSimulator

        self._sim = AWSSimulator(instance_id=instance_id, availability_zone=az).start()
        self.endpoint = self._sim.endpoint

    def shutdown(self) -> None:
        self._sim.shutdown()


@pytest.fixture
def cli_env(scene: Scene, ec2_server: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Scene]:
    try:
        imds = LocalIMDS(scene.instance_id, scene.az)
    except ImportError:
        pytest.skip("spotsafe.rehearsal.simulators is not there yet")
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", ec2_server.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", ec2_server.endpoint)  # any other service: moto, never AWS
    try:
        yield scene
    finally:
        imds.shutdown()


def _cli(scene: Scene, *args: str) -> list[str]:
    # A loaded CI machine can make the in-process IMDS slow: generous per-request timeout.
    return [
        *args,
        "--sys-root",
        scene.sys_root,
        "--dev-root",
        scene.dev_root,
        "--poll-interval",
        "0.05",
        "--metadata-timeout",
        "10",
        "--detach-timeout",
        "1",
        "--force-detach-after",
        "0.2",
        "--device-timeout",
        "1",
        "--claim-settle",
        "0.2",
        "-q",
    ]


def test_cli_attach_prints_the_device_then_status(cli_env: Scene, capsys: pytest.CaptureFixture[str]) -> None:
    s = cli_env
    tag = "spotsafe-run=" + s.tag["spotsafe-run"]
    assert main(_cli(s, "attach", "--tag", tag)) == 0
    device = capsys.readouterr().out.strip()
    assert device == os.path.realpath(os.path.join(s.dev_root, "nvme1n1"))
    assert main(_cli(s, "attach", "--tag", tag)) == 0
    assert capsys.readouterr().out.strip() == device
    assert main(_cli(s, "status", "--tag", tag, "--json")) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["attached_here"] is True and st["device"] == device
    assert st["volume"]["volume_id"] == s.volume_id and st["instance_id"] == s.instance_id


def test_cli_exit_codes_name_each_failure(cli_env: Scene, capsys: pytest.CaptureFixture[str]) -> None:
    s = cli_env
    assert main(_cli(s, "attach", "--tag", "spotsafe-run=absent")) == ExitCode.NOT_FOUND
    assert "spotsafe-run=absent" in capsys.readouterr().err
    far = create_volume(s.ec2, "us-east-1a", {"spotsafe-run": unique_tag()})
    assert main(_cli(s, "attach", "--volume-id", far)) == ExitCode.WRONG_ZONE
    err = capsys.readouterr().err
    assert far in err and "us-east-1a" in err and "--move" in err
    s.ec2.attach_volume(VolumeId=far, InstanceId=run_instance(s.ec2, "us-east-1a"), Device="/dev/sdf")
    other = run_instance(s.ec2, s.az)
    busy = create_volume(s.ec2, s.az, {"spotsafe-run": unique_tag()})
    s.ec2.attach_volume(VolumeId=busy, InstanceId=other, Device="/dev/sdg")
    assert main(_cli(s, "attach", "--volume-id", busy)) == ExitCode.BUSY
    assert main(_cli(s, "attach", "--tag", "bad-tag")) == ExitCode.USAGE


def test_cli_without_imds_is_a_metadata_error(capsys: pytest.CaptureFixture[str]) -> None:
    # conftest points IMDS at a closed loopback port: like running off EC2.
    t0 = time.monotonic()
    assert (
        main(["attach", "--tag", "spotsafe-run=x", "--metadata-timeout", "0.5", "--metadata-retry-for", "2.5", "-q"])
        == ExitCode.METADATA
    )
    assert 1.5 <= time.monotonic() - t0 < 10  # retried, bounded
    assert "127.0.0.1:9" in capsys.readouterr().err


@pytest.mark.root
def test_cli_mount_needs_mkfs_or_the_new_tag_then_clears_it(
    cli_env: Scene, loopdev: Callable[..., str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s = cli_env
    dev = loopdev()
    fake_nvme(tmp_path, s.volume_id.replace("-", ""), dev)
    tag = "spotsafe-run=" + s.tag["spotsafe-run"]
    mnt = str(tmp_path / "mnt")
    assert main(_cli(s, "attach", "--tag", tag)) == 0
    assert main(_cli(s, "mount", "--tag", tag, "--mountpoint", mnt)) == ExitCode.NO_FILESYSTEM
    assert filesystem_type(dev) is None
    s.ec2.create_tags(Resources=[s.volume_id], Tags=[{"Key": TAG_NEW, "Value": "true"}])
    try:
        capsys.readouterr()
        assert main(_cli(s, "mount", "--tag", tag, "--mountpoint", mnt)) == 0
        assert capsys.readouterr().out.strip() == mnt
        assert filesystem_type(dev) == "ext4"
        tags = {t["Key"] for t in describe(s.ec2, s.volume_id).get("Tags", [])}
        assert TAG_NEW not in tags
        assert main(_cli(s, "mount", "--tag", tag, "--mountpoint", mnt)) == 0  # idempotent
        assert main(_cli(s, "detach", "--tag", tag)) == 0
        assert mounted_at(mnt) is None
        assert describe(s.ec2, s.volume_id)["State"] == "available"
    finally:
        unmount(mnt)


def test_cli_subprocess_status_without_volume(tmp_path: Path) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "spotsafe.volume", "status", "--mountpoint", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, f"{p.stderr}"
    assert json.loads(p.stdout) == {"mountpoint": str(tmp_path), "mounted": None}


# --------------------------------------------------------------------------- IAM


def test_iam_denial_is_a_permission_error_naming_the_call(iam_server: IAMEnforcingServer, tmp_path: Path) -> None:
    admin = iam_server.client("ec2", iam_server.admin)
    iid = run_instance(admin, "us-east-1b")
    tag = {"spotsafe-run": unique_tag()}
    vid = create_volume(admin, "us-east-1b", tag)
    sys_root, dev_root = fake_nvme(tmp_path, vid.replace("-", ""), some_block_device())
    policy = actions_only(iam_policy(f"spotsafe-run={tag['spotsafe-run']}"))
    for st in policy["Statement"]:
        actions = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
        st["Action"] = [a for a in actions if a != "ec2:AttachVolume"]
    policy["Statement"] = [st for st in policy["Statement"] if st["Action"]]
    weak = iam_server.client("ec2", iam_server.keys_for(policy))
    mgr = VolumeManager(
        weak, Identity(iid, "us-east-1b", "us-east-1"), timeouts=FAST, sys_root=sys_root, dev_root=dev_root
    )
    with pytest.raises(VolumePermissionDenied, match="attach_volume") as e:
        mgr.attach(tags=tag)
    assert exit_code(e.value) == ExitCode.PERMISSION


def test_the_iam_policy_allows_the_whole_flow_on_the_runs_resources_only(
    iam_server: IAMEnforcingServer, tmp_path: Path
) -> None:
    """Attach with a zone move, retire, snapshot, create-or-restore, detach, finish: every call the tool
    makes is allowed by ``iam-policy --tag``'s document, its resources and conditions included (moto's
    enforcement judges the actions, tests/iampolicy.py's judge the resources, tags and request keys)."""
    admin = iam_server.client("ec2", iam_server.admin)
    asg_admin = iam_server.client("autoscaling", iam_server.admin)
    iid = run_instance(admin, "us-east-1b")
    tag = {"spotsafe-run": unique_tag()}
    admin.create_tags(Resources=[iid], Tags=[{"Key": "spotsafe-run", "Value": tag["spotsafe-run"]}])
    old_id = create_volume(admin, "us-east-1a", tag)
    policy = iam_policy(f"spotsafe-run={tag['spotsafe-run']}")
    keys = iam_server.keys_for(actions_only(policy))
    judge = CallJudge(policy, admin, asg_admin)
    ec2, asg = iam_server.client("ec2", keys), iam_server.client("autoscaling", keys)
    for client in (ec2, asg):
        client.meta.events.register("before-parameter-build", judge.hook)
    stop = threading.Event()
    t = threading.Thread(
        target=_serve_device_for_new_volume, args=(admin, old_id, tmp_path, some_block_device(), stop), daemon=True
    )
    t.start()
    try:
        mgr = VolumeManager(
            ec2,
            Identity(iid, "us-east-1b", "us-east-1"),
            # The judge looks tags up inside each call: give the claim's check-to-write its room under load.
            timeouts=dataclasses.replace(FAST, settle=2.0, detach=60),
            sys_root=str(tmp_path / "sys"),
            dev_root=str(tmp_path / "dev"),
        )
        a = mgr.attach(tags=tag, move=True)
    finally:
        stop.set()
        t.join()
    assert mgr.retire_superseded(a.volume)[0] == old_id
    # Periodic snapshots and create-or-restore under the same document.
    assert mgr.snapshot(mgr.describe(a.volume.volume_id), keep=1)
    assert mgr.latest_snapshot(tag) is not None
    assert mgr.detach(mgr.describe(a.volume.volume_id)).instance_id is None
    made = mgr.create_or_restore(tag, size=1)
    assert made.tags["spotsafe-run"] == tag["spotsafe-run"]
    assert scale_to_zero(mgr.identity, ec2=ec2, autoscaling=asg) == []
    made_calls = judge.actions
    assert {"ec2:AttachVolume", "ec2:CreateSnapshot", "ec2:CreateVolume", "ec2:CreateTags"} <= made_calls
    assert {"ec2:DeleteTags", "ec2:DeleteVolume", "ec2:DetachVolume"} <= made_calls, f"{sorted(made_calls)}"
    assert judge.denials == []
    # Another run's volume is not this role's, nor creating one for another run.
    other = create_volume(admin, "us-east-1b", {"spotsafe-run": unique_tag()})
    for op, params in (
        ("AttachVolume", {"VolumeId": other, "InstanceId": iid}),
        ("CreateSnapshot", {"VolumeId": other, "TagSpecifications": _spec("snapshot", tag)}),
        ("DeleteVolume", {"VolumeId": other}),
        ("CreateVolume", {"AvailabilityZone": "us-east-1b", "TagSpecifications": _spec("volume", {"a": "b"})}),
        ("CreateTags", {"Resources": [other], "Tags": [{"Key": "spotsafe-move-claim", "Value": "x"}]}),
        ("CreateTags", {"Resources": [a.volume.volume_id], "Tags": [{"Key": "spotsafe-run", "Value": "theirs"}]}),
    ):
        assert any(judge.denied(r) for r in judge.requests("ec2", op, params)), f"{op}"


def _spec(kind: str, tags: dict[str, str]) -> list[dict[str, Any]]:
    return [{"ResourceType": kind, "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}]


@pytest.mark.parametrize("features", [{}, {"move": False}, {"move": False, "snapshots": False}, {"finish": False}])
def test_the_iam_policy_passes_the_linter(features: dict[str, bool]) -> None:
    """parliament (IAM policy linter) finds nothing above low in any of iam-policy's documents.

    One finding is AWS's own pattern, not a fault: a new snapshot is tagged by a statement on
    snapshot/* alone (aws:RequestTag), its source volume by another (aws:ResourceTag); parliament
    wants each statement naming CreateSnapshot to name volumes too, which would let the role
    snapshot any volume by tagging the snapshot as the run's.
    """
    policy = iam_policy("spotsafe-run=mnist", **features)
    findings = above_low(lint(policy))
    accepted = (
        "MEDIUM",
        "RESOURCE_MISMATCH",
        "[{'action': 'ec2:CreateSnapshot', 'required_format': 'arn:*:ec2:*:*:volume/*'}]",
    )
    assert [f for f in findings if f != accepted] == []
    assert len(findings) <= 1


def test_iam_policy_cli_needs_the_runs_tag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["iam-policy"])
    assert "--tag" in capsys.readouterr().err
    assert main(["iam-policy", "--tag", "spotsafe-run=mnist"]) == 0
    assert json.loads(capsys.readouterr().out) == IAM_POLICY
    assert main(["iam-policy", "--tag", "nokey"]) == ExitCode.USAGE


def test_docs_carry_the_tested_iam_policy() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "volume.md").read_text()
    assert json.dumps(IAM_POLICY, indent=2) in doc


# --------------------------------------------------------------------------- finish


def test_finish_scales_the_group_to_zero(ec2_server: Any, ec2: Any) -> None:
    asg = ec2_server.client("autoscaling")
    name = unique_tag()
    ec2.create_launch_template(LaunchTemplateName=name, LaunchTemplateData={"ImageId": AMI})
    asg.create_auto_scaling_group(
        AutoScalingGroupName=name,
        LaunchTemplate={"LaunchTemplateName": name},
        MinSize=1,
        MaxSize=2,
        DesiredCapacity=1,
        AvailabilityZones=["us-east-1b"],
    )
    iid = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]["Instances"][0][
        "InstanceId"
    ]
    done = scale_to_zero(Identity(iid, "us-east-1b", "us-east-1"), ec2=ec2, autoscaling=asg)
    assert done == [f"auto scaling group {name}: desired capacity 0"]
    g = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]
    assert (g["MinSize"], g["DesiredCapacity"]) == (0, 0)


def test_finish_cancels_a_persistent_spot_request(ec2_server: Any, ec2: Any) -> None:
    r = ec2.request_spot_instances(
        InstanceCount=1, Type="persistent", LaunchSpecification={"ImageId": AMI, "InstanceType": "g5.xlarge"}
    )
    rid = r["SpotInstanceRequests"][0]["SpotInstanceRequestId"]
    iid = ec2.describe_spot_instance_requests(SpotInstanceRequestIds=[rid])["SpotInstanceRequests"][0]["InstanceId"]
    done = scale_to_zero(
        Identity(iid, "us-east-1b", "us-east-1"), ec2=ec2, autoscaling=ec2_server.client("autoscaling")
    )
    assert done == [f"spot request {rid}: cancelled"]
    left = ec2.describe_spot_instance_requests(Filters=[{"Name": "instance-id", "Values": [iid]}])
    assert [q["State"] for q in left["SpotInstanceRequests"] if q["State"] in ("open", "active")] == []


@pytest.mark.root
def test_cli_first_use_in_another_zone_moves_formats_mounts_and_retires(
    cli_env: Scene, loopdev: Callable[..., str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s = cli_env
    run = unique_tag()
    old_id = create_volume(s.ec2, "us-east-1a", {"spotsafe-run": run, TAG_NEW: "true"})
    dev = loopdev()
    stop = threading.Event()
    t = threading.Thread(target=_serve_device_for_new_volume, args=(s.ec2, old_id, tmp_path, dev, stop), daemon=True)
    t.start()
    try:
        assert main(_cli(s, "attach", "--tag", f"spotsafe-run={run}", "--move")) == 0
    finally:
        stop.set()
        t.join()
    assert capsys.readouterr().out.strip() == os.path.realpath(dev)
    assert describe(s.ec2, old_id)["State"] == "available"  # kept until the copy is mounted
    mnt = str(tmp_path / "mnt")
    try:
        # Case 1: the docs' first-use recipe with the first instance in another zone. The copy
        # of a never-formatted volume keeps spotsafe-new, so the first mount may format it.
        assert main(_cli(s, "mount", "--tag", f"spotsafe-run={run}", "--mountpoint", mnt)) == 0
        assert filesystem_type(dev) == "ext4"
        with pytest.raises(VolumeNotFound):
            s.manager.describe(old_id)
        new = s.manager.find(tags={"spotsafe-run": run})
        assert new.availability_zone == s.az and new.instance_id == s.instance_id
        assert TAG_MOVED_FROM not in new.tags and TAG_NEW not in new.tags
    finally:
        unmount(mnt)


class ForgetsInstance:
    """The real client, except that EC2 no longer knows ``instance_id`` (long-terminated instances vanish)."""

    def __init__(self, client: Any, instance_id: str) -> None:
        self._client = client
        self._gone = instance_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def describe_instances(self, **kw: Any) -> Any:
        from botocore.exceptions import ClientError

        if self._gone in kw.get("InstanceIds", []):
            raise ClientError(
                {
                    "Error": {
                        "Code": "InvalidInstanceID.NotFound",
                        "Message": f"The instance ID '{self._gone}' does not exist",
                    }
                },
                "DescribeInstances",
            )
        return self._client.describe_instances(**kw)


def test_a_volume_held_by_an_instance_ec2_forgot_is_detached(scene: Scene) -> None:
    old = run_instance(scene.ec2, scene.az)
    scene.ec2.attach_volume(VolumeId=scene.volume_id, InstanceId=old, Device="/dev/sdf")
    mgr = VolumeManager(
        ForgetsInstance(scene.ec2, old),
        scene.manager.identity,
        timeouts=FAST,
        sys_root=scene.sys_root,
        dev_root=scene.dev_root,
    )
    assert mgr.instance_state(old) is None
    a = mgr.attach(tags=scene.tag)
    assert a.volume.instance_id == scene.instance_id
