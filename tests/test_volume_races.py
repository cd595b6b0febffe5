"""spotsafe.cloud.aws.volume under races and interruptions, against moto EC2 made EC2-faithful (tests/ec2faithful.py).

Several "instances" (moto instances, each with its own identity and its own /sys and
/dev tree from the block store) run the real VolumeManager in threads at once. The
root-marked tests put real data on loop devices: a snapshot carries its volume's
bytes, a copy made from it carries the snapshot's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from spotsafe.cloud.aws.clients import ec2_client
from spotsafe.cloud.aws.volume.cli import main
from spotsafe.cloud.aws.volume.filesystem import mount, unmount
from spotsafe.cloud.aws.volume.manager import VolumeManager
from spotsafe.cloud.aws.volume.model import (
    TAG_CLAIM,
    TAG_MOVE_SNAPSHOT,
    TAG_MOVED_FROM,
    TAG_NEW,
    TAG_PERIODIC,
    Attachment,
    Claim,
    Identity,
    Timeouts,
    VolumeInfo,
)
from spotsafe.errors import VolumeBusy, VolumeNotFound, VolumeWrongZone
from tests.ec2faithful import BlockStore, activate
from tests.ec2server import REGION, run_instance, unique_tag
from tests.helpers import child, wait_until
from tests.volumes import create_volume, some_block_device

#: settle 0.6 s, as tests/volumes.py FAST says why
RACE = Timeouts(poll=0.05, attach=5, detach=4, force_detach_after=0.2, device=3, snapshot=10, create=10, settle=0.6)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[BlockStore]:
    """A data-less block store: attach shows an NVMe entry (pointing at some block device) per instance."""
    bs = BlockStore(tmp_path / "bs", real=False, fallback_device=some_block_device())
    activate(bs)
    try:
        yield bs
    finally:
        activate(None)
        bs.close()


@pytest.fixture
def real_store(tmp_path: Path) -> Iterator[BlockStore]:
    """A block store whose volumes and snapshots hold data (loop devices): for ``root``-marked tests."""
    bs = BlockStore(tmp_path / "bs", real=True, size_mb=32)
    activate(bs)
    try:
        yield bs
    finally:
        activate(None)
        bs.close()


def instance(
    ec2: Any, store: BlockStore, az: str, timeouts: Timeouts = RACE, *, client: Callable[[Any], Any] | None = None
) -> VolumeManager:
    """An instance in ``az`` and its VolumeManager (over ``client(ec2)`` when given: a fault injector)."""
    iid = run_instance(ec2, az)
    return VolumeManager(
        client(ec2) if client else ec2,
        Identity(iid, az, REGION),
        timeouts=timeouts,
        sys_root=store.sys_root(iid),
        dev_root=store.dev_root(iid),
    )


def copies_of(ec2: Any, volume_id: str) -> list[str]:
    r = ec2.describe_volumes(Filters=[{"Name": f"tag:{TAG_MOVED_FROM}", "Values": [volume_id]}])
    return sorted(v["VolumeId"] for v in r["Volumes"])


def move_snapshots(ec2: Any, volume_id: str) -> list[str]:
    r = ec2.describe_snapshots(OwnerIds=["self"], Filters=[{"Name": "tag:spotsafe-move-of", "Values": [volume_id]}])
    return sorted(s["SnapshotId"] for s in r["Snapshots"])


def tagged(ec2: Any, tag: dict[str, str]) -> list[str]:
    filters = [{"Name": f"tag:{k}", "Values": [v]} for k, v in tag.items()]
    return sorted(v["VolumeId"] for v in ec2.describe_volumes(Filters=filters)["Volumes"])


def reclaim(ec2: Any, mgr: VolumeManager) -> None:
    """The spot instance is taken away: terminated (EC2 detaches its volumes)."""
    ec2.terminate_instances(InstanceIds=[mgr.instance_id])


def race(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run the calls at once (a barrier), return each result or exception."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


# --------------------------------------------------------------------------- EC2-faithful layer


def test_the_layer_refuses_a_second_attach_and_a_zone_mismatch(ec2: Any, store: BlockStore) -> None:
    vid = create_volume(ec2, "us-east-1a", {"spotsafe-run": unique_tag()})
    a, b = run_instance(ec2, "us-east-1a"), run_instance(ec2, "us-east-1a")
    far = run_instance(ec2, "us-east-1b")
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError, match="ZoneMismatch"):
        ec2.attach_volume(VolumeId=vid, InstanceId=far, Device="/dev/sdf")
    ec2.attach_volume(VolumeId=vid, InstanceId=a, Device="/dev/sdf")
    with pytest.raises(ClientError, match="VolumeInUse"):
        ec2.attach_volume(VolumeId=vid, InstanceId=b, Device="/dev/sdf")
    assert ec2.describe_volumes(VolumeIds=[vid])["Volumes"][0]["Attachments"][0]["InstanceId"] == a


# --------------------------------------------------------------------------- case 2: one mover


def test_concurrent_moves_make_exactly_one_copy(ec2: Any, store: BlockStore) -> None:
    tag = {"spotsafe-run": unique_tag()}
    source = create_volume(ec2, "us-east-1a", tag)
    movers = [instance(ec2, store, az) for az in ("us-east-1b", "us-east-1c", "us-east-1b")]
    results = race([lambda m=m: m.attach(tags=tag, move=True) for m in movers])  # type: ignore[misc]  # default binds each
    won = [r for r in results if isinstance(r, Attachment)]
    lost = [r for r in results if isinstance(r, VolumeBusy)]
    assert len(won) == 1 and len(lost) == 2, f"{results}"
    copy = won[0].volume
    assert copies_of(ec2, source) == [copy.volume_id]
    assert len(move_snapshots(ec2, source)) == 1
    # Another boot anywhere sees one volume, held by the live winner: busy (exit 7), never exit 4.
    late = instance(ec2, store, "us-east-1a", Timeouts(poll=0.05, detach=0.5, settle=0.3))
    assert late.resolve(tags=tag).volume.volume_id == source
    with pytest.raises(VolumeBusy, match="alive"):
        late.attach(tags=tag, move=True)
    # The winner mounts (commits) and retires: one volume, no snapshot left.
    winner = next(m for m in movers if m.instance_id == copy.instance_id)
    assert winner.retire_superseded(winner.describe(copy.volume_id)) == [source, *move_snapshots_before(copy)]
    assert tagged(ec2, tag) == [copy.volume_id]
    assert move_snapshots(ec2, source) == []


def move_snapshots_before(copy: VolumeInfo) -> list[str]:
    return [copy.tags[TAG_MOVE_SNAPSHOT]]


def test_a_claim_by_a_gone_instance_is_taken_over(ec2: Any, store: BlockStore) -> None:
    tag = {"spotsafe-run": unique_tag()}
    source = create_volume(ec2, "us-east-1a", tag)
    dead = instance(ec2, store, "us-east-1c")
    claim = Claim(dead.instance_id, "us-east-1c", float(int(time.time())))
    ec2.create_tags(Resources=[source], Tags=[{"Key": TAG_CLAIM, "Value": claim.render()}])
    mover = instance(ec2, store, "us-east-1b")
    assert mover.claim_holder(mover.describe(source)) == claim  # alive: it counts
    reclaim(ec2, dead)
    assert mover.claim_holder(mover.describe(source)) is None
    a = mover.attach(tags=tag, move=True)
    assert a.moved_from == source and a.volume.availability_zone == "us-east-1b"


# --------------------------------------------------------------------------- case 3: interrupted moves converge


def interrupted_move(ec2: Any, store: BlockStore, tag: dict[str, str]) -> tuple[str, str, str]:
    """O in 1a; X in 1b copies it to C (attached, never mounted) and is reclaimed. Returns O, C, the snapshot."""
    source = create_volume(ec2, "us-east-1a", tag)
    x = instance(ec2, store, "us-east-1b")
    a = x.attach(tags=tag, move=True)
    reclaim(ec2, x)
    return source, a.volume.volume_id, a.volume.tags[TAG_MOVE_SNAPSHOT]


def test_interrupted_move_converges_on_the_source_in_its_zone(ec2: Any, store: BlockStore) -> None:
    tag = {"spotsafe-run": unique_tag()}
    source, copy, snap = interrupted_move(ec2, store, tag)
    y = instance(ec2, store, "us-east-1a")
    a = y.attach(tags=tag, move=True)
    # The source is the run's volume (the copy was never mounted: it holds nothing newer).
    assert a.volume.volume_id == source and a.moved_from is None
    assert tagged(ec2, tag) == [source]
    assert move_snapshots(ec2, source) == []
    with pytest.raises(VolumeNotFound):
        y.describe(copy)
    assert TAG_CLAIM not in y.describe(source).tags
    # The next instance, in a third zone, sees one volume (the issue's Z exited 4 here).
    z = instance(ec2, store, "us-east-1c")
    assert z.find(tags=tag).volume_id == source
    assert snap not in move_snapshots(ec2, source)


def test_interrupted_move_is_adopted_in_the_copy_zone(ec2: Any, store: BlockStore) -> None:
    tag = {"spotsafe-run": unique_tag()}
    source, copy, snap = interrupted_move(ec2, store, tag)
    y = instance(ec2, store, "us-east-1b")
    a = y.attach(tags=tag, move=True)
    assert a.volume.volume_id == copy and a.moved_from == source and a.attached_now
    assert len(copies_of(ec2, source)) == 1
    assert y.retire_superseded(y.describe(copy)) == [source, snap]
    assert tagged(ec2, tag) == [copy]
    assert move_snapshots(ec2, source) == []


def test_interrupted_move_is_redone_from_the_source_in_a_third_zone(ec2: Any, store: BlockStore) -> None:
    tag = {"spotsafe-run": unique_tag()}
    source, copy, snap = interrupted_move(ec2, store, tag)
    y = instance(ec2, store, "us-east-1c")
    a = y.attach(tags=tag, move=True)
    # From the source, not from the copy (a copy of a copy brought the original back).
    assert a.moved_from == source and a.volume.volume_id != copy
    assert copies_of(ec2, source) == [a.volume.volume_id]
    assert snap not in move_snapshots(ec2, source)
    y.retire_superseded(y.describe(a.volume.volume_id))
    assert tagged(ec2, tag) == [a.volume.volume_id]
    assert move_snapshots(ec2, source) == []


def test_without_move_an_uncommitted_copy_elsewhere_is_still_the_wrong_zone(ec2: Any, store: BlockStore) -> None:
    tag = {"spotsafe-run": unique_tag()}
    interrupted_move(ec2, store, tag)
    with pytest.raises(VolumeWrongZone):
        instance(ec2, store, "us-east-1c").attach(tags=tag)


# --------------------------------------------------------------------------- create or restore, snapshots


def test_create_or_restore_is_opt_in_and_one_creator_wins(ec2: Any, store: BlockStore) -> None:
    tag = {"spotsafe-run": unique_tag()}
    first = instance(ec2, store, "us-east-1b")
    with pytest.raises(VolumeNotFound):
        first.attach(tags=tag)
    others = [instance(ec2, store, "us-east-1b") for _ in range(2)]
    results = race([lambda m=m: m.attach(tags=tag, create_size=2) for m in (first, *others)])  # type: ignore[misc]  # default binds each
    won = [r for r in results if isinstance(r, Attachment)]
    assert len(won) == 1, f"{results}"
    assert all(isinstance(r, VolumeBusy) for r in results if r is not won[0]), f"{results}"
    assert tagged(ec2, tag) == [won[0].volume.volume_id]
    assert won[0].volume.tags[TAG_NEW] == "true" and won[0].volume.size == 2


def test_periodic_snapshots_keep_the_newest_and_restore_from_it(ec2: Any, store: BlockStore) -> None:
    tag = {"spotsafe-run": unique_tag()}
    m = instance(ec2, store, "us-east-1b")
    a = m.attach(tags=tag, create_size=1)
    # keep=1: the newest completed one is kept besides the one in progress.
    snaps = [m.snapshot(m.describe(a.volume.volume_id), keep=1) for _ in range(3)]
    assert all(snaps)
    left = ec2.describe_snapshots(
        OwnerIds=["self"], Filters=[{"Name": "tag:spotsafe-run", "Values": [tag["spotsafe-run"]]}]
    )
    assert sorted(s["SnapshotId"] for s in left["Snapshots"]) == sorted(snaps[1:])
    # The volume is lost (deleted by hand): an opt-in create restores the newest snapshot, not blank.
    m.detach(m.describe(a.volume.volume_id))
    ec2.delete_volume(VolumeId=a.volume.volume_id)
    b = instance(ec2, store, "us-east-1c").attach(tags=tag, create_size=1)
    assert b.volume.snapshot_id == snaps[-1] and TAG_NEW not in b.volume.tags and b.created


# --------------------------------------------------------------------------- with data (root)


def _mkfs_with(store: BlockStore, ec2: Any, volume_id: str, az: str, payload: bytes, tmp: Path) -> None:
    """An instance in ``az`` formats the volume, writes ``payload``, unmounts and is terminated."""
    iid = run_instance(ec2, az)
    ec2.attach_volume(VolumeId=volume_id, InstanceId=iid, Device="/dev/sdf")
    dev = store.device_of(volume_id)
    assert dev is not None
    mnt = tmp / f"mnt-{iid}"
    mount(dev, str(mnt), mkfs=True)
    (mnt / "ckpt.bin").write_bytes(payload)
    unmount(str(mnt))
    ec2.terminate_instances(InstanceIds=[iid])


class DeniesDeleteSnapshot:
    """The real client, except that IAM denies DeleteSnapshot (a tightened role)."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def delete_snapshot(self, **kw: Any) -> Any:
        from botocore.exceptions import ClientError

        raise ClientError(
            {"Error": {"Code": "UnauthorizedOperation", "Message": "not authorized: ec2:DeleteSnapshot"}},
            "DeleteSnapshot",
        )


@pytest.mark.root
def test_cleanup_failure_after_a_good_mount_only_warns(
    ec2: Any,
    ec2_server: Any,
    real_store: BlockStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from spotsafe.rehearsal.simulators.aws import AWSSimulator

    tag = {"spotsafe-run": unique_tag()}
    source = create_volume(ec2, "us-east-1a", tag)
    _mkfs_with(real_store, ec2, source, "us-east-1a", b"step 40", tmp_path)
    iid = run_instance(ec2, "us-east-1b")
    sim = AWSSimulator(instance_id=iid, availability_zone="us-east-1b").start()
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", sim.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", ec2_server.endpoint)
    real_client = ec2_client
    monkeypatch.setattr(
        "spotsafe.cloud.aws.volume.cli.ec2_client", lambda *a, **kw: DeniesDeleteSnapshot(real_client(*a, **kw))
    )
    mnt = tmp_path / "mnt"
    common = [
        "--tag",
        f"spotsafe-run={tag['spotsafe-run']}",
        "--sys-root",
        real_store.sys_root(iid),
        "--dev-root",
        real_store.dev_root(iid),
        "--poll-interval",
        "0.05",
        "--claim-settle",
        "0.2",
        "--metadata-timeout",
        "10",
    ]
    try:
        assert main(["attach", "--move", *common]) == 0
        caplog.clear()
        assert main(["mount", "--mountpoint", str(mnt), *common]) == 0
        warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert any("could not retire" in w and "DeleteSnapshot" in w for w in warned), f"{warned}"
        # The data crossed zones through the snapshot; training may start.
        assert (mnt / "ckpt.bin").read_bytes() == b"step 40"
        copy = VolumeManager(ec2, Identity(iid, "us-east-1b", REGION)).find(tags=tag)
        assert copy.move_committed and copy.instance_id == iid
        with pytest.raises(VolumeNotFound):
            VolumeManager(ec2, Identity(iid, "us-east-1b", REGION)).describe(source)
        assert len(move_snapshots(ec2, source)) == 1  # left behind, not fatal
        # With the permission back, the next mount (a reboot) finishes the cleanup.
        monkeypatch.setattr("spotsafe.cloud.aws.volume.cli.ec2_client", real_client)
        assert main(["mount", "--mountpoint", str(mnt), *common]) == 0
        assert move_snapshots(ec2, source) == []
        assert tagged(ec2, tag) == [copy.volume_id]
    finally:
        unmount(str(mnt))
        sim.shutdown()


@pytest.mark.root
def test_a_move_measured_on_the_fakes_carries_the_data(ec2: Any, real_store: BlockStore, tmp_path: Path) -> None:
    tag = {"spotsafe-run": unique_tag()}
    source = create_volume(ec2, "us-east-1a", tag)
    payload = os.urandom(1 << 20)
    _mkfs_with(real_store, ec2, source, "us-east-1a", payload, tmp_path)
    m = instance(ec2, real_store, "us-east-1c", Timeouts(poll=0.05, settle=0.3, detach=5, device=5))
    t0 = time.monotonic()
    a = m.attach(tags=tag, move=True)
    moved = time.monotonic() - t0
    mnt = tmp_path / "mnt"
    try:
        r = mount(a.device, str(mnt))
        assert r.formatted is False
        assert (mnt / "ckpt.bin").read_bytes() == payload
        m.retire_superseded(m.describe(a.volume.volume_id))
    finally:
        unmount(str(mnt))
    print(f"move on the fakes (claim settle 0.3 s, 32 MiB volume): {moved:.2f} s")
    subprocess.run(["sync"], check=False)
    assert tagged(ec2, tag) == [a.volume.volume_id]


def test_cli_snapshot_every_repeats_until_sigterm(ec2: Any, ec2_server: Any, store: BlockStore, tmp_path: Path) -> None:
    from spotsafe.rehearsal.simulators.aws import AWSSimulator

    tag = {"spotsafe-run": unique_tag()}
    m = instance(ec2, store, "us-east-1b")
    a = m.attach(tags=tag, create_size=1)
    sim = AWSSimulator(instance_id=m.instance_id, availability_zone="us-east-1b").start()
    env = {
        **os.environ,
        "AWS_EC2_METADATA_SERVICE_ENDPOINT": sim.endpoint,
        "AWS_ENDPOINT_URL_EC2": ec2_server.endpoint,
        "AWS_ENDPOINT_URL": ec2_server.endpoint,
    }
    cmd = [sys.executable, "-m", "spotsafe.volume", "snapshot", "--tag", f"spotsafe-run={tag['spotsafe-run']}"]
    cmd += ["--every", "0.3", "--keep", "1", "--metadata-timeout", "10", "-q"]

    def periodic() -> list[dict[str, Any]]:
        r = ec2.describe_snapshots(OwnerIds=["self"], Filters=[{"Name": "tag-key", "Values": [TAG_PERIODIC]}])
        return [s for s in r["Snapshots"] if s["VolumeId"] == a.volume.volume_id]

    try:
        with child(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:

            def two() -> bool:
                assert proc.poll() is None, "the snapshot loop died"
                return len(periodic()) >= 2

            wait_until(two, 60, interval=0.1, what="two periodic snapshots")
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=60)
    finally:
        sim.shutdown()
    assert proc.returncode == 0, f"{err}"
    assert len(out.split()) >= 2 and all(s.startswith("snap-") for s in out.split())
    # Each round ends with keep=1 completed snapshot besides the newest: the older ones are gone.
    assert len(periodic()) == 2


class Interleave:
    """The real client; ``before(op)`` runs just before the named call (another instance acting then)."""

    def __init__(self, client: Any, op: str, before: Callable[[], None]) -> None:
        self._client, self._op, self._before = client, op, before

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name != self._op:
            return attr

        def call(**kw: Any) -> Any:
            self._before()
            return attr(**kw)

        return call


def test_a_mover_yields_to_an_attach_in_the_source_zone_that_came_after_its_claim(ec2: Any, store: BlockStore) -> None:
    tag = {"spotsafe-run": unique_tag()}
    source = create_volume(ec2, "us-east-1a", tag)
    local = run_instance(ec2, "us-east-1a")  # checked for a claim before the mover wrote one
    m = instance(
        ec2,
        store,
        "us-east-1b",
        client=lambda c: Interleave(
            c, "create_snapshot", lambda: c.attach_volume(VolumeId=source, InstanceId=local, Device="/dev/sdf")
        ),
    )
    with pytest.raises(VolumeBusy, match="during the move"):
        m.attach(tags=tag, move=True)
    assert copies_of(ec2, source) == []  # no second run's volume
    assert TAG_CLAIM not in m.describe(source).tags  # the failed move let go of its claim


def test_an_attach_yields_to_a_claim_written_while_it_attached(ec2: Any, store: BlockStore) -> None:
    tag = {"spotsafe-run": unique_tag()}
    source = create_volume(ec2, "us-east-1a", tag)
    mover = run_instance(ec2, "us-east-1b")
    claim = Claim(mover, "us-east-1b", float(int(time.time())))
    z = instance(
        ec2,
        store,
        "us-east-1a",
        client=lambda c: Interleave(
            c,
            "attach_volume",
            lambda: c.create_tags(Resources=[source], Tags=[{"Key": TAG_CLAIM, "Value": claim.render()}]),
        ),
    )
    with pytest.raises(VolumeBusy, match="being moved"):
        z.attach(tags=tag)
    assert ec2.describe_volumes(VolumeIds=[source])["Volumes"][0]["Attachments"] == []


def test_a_slow_claim_write_is_withdrawn_and_retried(
    ec2: Any, store: BlockStore, caplog: pytest.LogCaptureFixture
) -> None:
    tag = {"spotsafe-run": unique_tag()}
    source = create_volume(ec2, "us-east-1a", tag)
    slow = [True]

    def stall() -> None:  # the first claim write lands after more than half the settle time
        if slow:
            slow.clear()
            time.sleep(RACE.settle)

    m = instance(ec2, store, "us-east-1b", client=lambda c: Interleave(c, "create_tags", stall))
    a = m.attach(tags=tag, move=True)
    assert a.moved_from == source and not slow
    assert any("was slow: withdrawing" in r.getMessage() for r in caplog.records)
    assert copies_of(ec2, source) == [a.volume.volume_id]
