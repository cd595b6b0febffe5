"""MirrorStore: local commit first, background upload, reads from both tiers."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from spotsafe.errors import CheckpointNotFound, StoreError
from spotsafe.storage.base import Buffer, Store
from spotsafe.storage.fsspec import FsspecStore
from spotsafe.storage.local import LocalStore
from spotsafe.storage.mirror import MirrorStore


class RecordingStore(FsspecStore):
    """A real in-memory store that logs its writes, can be held shut, and can fail on demand."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.ops: list[tuple[str, str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_next = 0
        self.fail_listing = False

    def _enter(self, op: str, path: str) -> None:
        assert self.gate.wait(30)
        if self.fail_next > 0:
            self.fail_next -= 1
            raise StoreError(f"{self.url}/{path}: injected failure of {op}")
        self.ops.append((op, path))

    def write_file(self, path: str, buffers: Sequence[Buffer]) -> None:
        self._enter("write", path)
        super().write_file(path, buffers)

    def commit_file(self, path: str, data: bytes) -> None:
        self._enter("commit", path)
        super().commit_file(path, data)

    def delete_dir(self, path: str) -> None:
        self._enter("delete", path)
        super().delete_dir(path)

    def listdir(self, path: str = "") -> list[str]:
        if self.fail_listing:
            raise StoreError(f"{self.url}: injected listing failure")
        return super().listdir(path)


@pytest.fixture
def remote() -> Iterator[RecordingStore]:
    store = RecordingStore(f"memory://spotsafe-mirror-test/{uuid.uuid4().hex}")
    yield store
    store.gate.set()


def _save(store: Store, name: str, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        store.write_file(f"{name}/{rel}", [data])
    store.commit_file(f"{name}/manifest.json", b'{"name": "%s"}' % name.encode())


FILES = {"model.bin": b"m" * 1000, "optim.bin": b"o" * 10, "shards/rank-1.bin": b"r1"}


def test_commit_is_local_first_then_uploaded_manifest_last(tmp_path: Path, remote: RecordingStore) -> None:
    remote.gate.clear()  # the network is slow today
    with MirrorStore(LocalStore(tmp_path / "local"), remote) as mirror:
        _save(mirror, "step-000000000001", FILES)
        # Durable locally the moment commit_file returns; nothing remote yet.
        assert (tmp_path / "local" / "step-000000000001" / "manifest.json").exists()
        assert remote.ops == []
        assert mirror.pending == ["step-000000000001/manifest.json"]
        assert mirror.flush(timeout=0.2) is False
        remote.gate.set()
        assert mirror.flush(timeout=30) is True
        assert mirror.pending == []
    ops = remote.ops
    assert ops[-1] == ("commit", "step-000000000001/manifest.json")
    assert sorted(p for op, p in ops[:-1]) == sorted(f"step-000000000001/{f}" for f in FILES)
    assert all(op == "write" for op, _ in ops[:-1])
    for rel, data in FILES.items():
        assert bytes(remote.read_file(f"step-000000000001/{rel}")) == data


def test_fresh_instance_with_empty_local_disk_reads_the_remote(tmp_path: Path, remote: RecordingStore) -> None:
    with MirrorStore(LocalStore(tmp_path / "old-disk"), remote) as mirror:
        _save(mirror, "step-000000000005", FILES)
        assert mirror.flush(timeout=30)
    with MirrorStore(LocalStore(tmp_path / "new-disk"), remote) as mirror:
        assert mirror.listdir("") == ["step-000000000005"]
        assert sorted(mirror.listdir("step-000000000005")) == ["manifest.json", "model.bin", "optim.bin", "shards"]
        assert mirror.file_size("step-000000000005/model.bin") == 1000
        assert bytes(mirror.read_file("step-000000000005/shards/rank-1.bin")) == b"r1"
        with pytest.raises(CheckpointNotFound):
            mirror.read_file("step-000000000005/nope.bin")


def test_failed_uploads_are_retried_and_the_local_copy_kept(tmp_path: Path, remote: RecordingStore) -> None:
    remote.fail_next = 3
    with MirrorStore(LocalStore(tmp_path / "local"), remote, retry_interval=0.01) as mirror:
        _save(mirror, "step-000000000002", FILES)
        assert mirror.flush(timeout=30) is True
        assert isinstance(mirror.last_error, StoreError)
        assert "injected failure" in str(mirror.last_error)
    assert remote.fail_next == 0
    assert remote.file_size("step-000000000002/manifest.json") is not None
    assert bytes(remote.read_file("step-000000000002/model.bin")) == FILES["model.bin"]
    # Files that made it before a failure are not sent twice within the same upload.
    writes = [p for op, p in remote.ops if op == "write"]
    assert sorted(writes) == sorted(f"step-000000000002/{f}" for f in FILES)
    assert (tmp_path / "local" / "step-000000000002" / "model.bin").read_bytes() == FILES["model.bin"]


def test_close_gives_up_on_a_dead_remote_but_keeps_the_local_copy(tmp_path: Path, remote: RecordingStore) -> None:
    remote.fail_next = 10**9
    mirror = MirrorStore(LocalStore(tmp_path / "local"), remote, retry_interval=0.01, close_timeout=5)
    _save(mirror, "step-000000000003", FILES)
    start = time.monotonic()
    mirror.close()
    assert time.monotonic() - start < 10
    assert (tmp_path / "local" / "step-000000000003" / "manifest.json").exists()
    assert remote.file_size("step-000000000003/manifest.json") is None
    with pytest.raises(StoreError):
        mirror.commit_file("x/manifest.json", b"{}")  # closed


def test_next_start_uploads_what_the_last_one_did_not(tmp_path: Path, remote: RecordingStore) -> None:
    local = LocalStore(tmp_path / "local")
    _save(local, "step-000000000007", FILES)  # committed locally, instance stopped before upload
    with MirrorStore(LocalStore(tmp_path / "local"), remote) as mirror:
        mirror.cleanup_incomplete()
        assert mirror.flush(timeout=30)
    assert remote.ops[-1] == ("commit", "step-000000000007/manifest.json")
    assert bytes(remote.read_file("step-000000000007/model.bin")) == FILES["model.bin"]


def test_delete_dir_deletes_on_both_tiers_and_hides_at_once(tmp_path: Path, remote: RecordingStore) -> None:
    with MirrorStore(LocalStore(tmp_path / "local"), remote) as mirror:
        _save(mirror, "step-000000000001", FILES)
        _save(mirror, "step-000000000002", FILES)
        assert mirror.flush(timeout=30)
        remote.gate.clear()
        mirror.delete_dir("step-000000000001")
        # The remote delete is still queued, yet the mirror no longer shows the checkpoint.
        assert mirror.listdir("") == ["step-000000000002"]
        assert mirror.file_size("step-000000000001/manifest.json") is None
        with pytest.raises(CheckpointNotFound):
            mirror.read_file("step-000000000001/model.bin")
        remote.gate.set()
        assert mirror.flush(timeout=30)
    assert remote.listdir("") == ["step-000000000002"]
    assert not (tmp_path / "local" / "step-000000000001").exists()


def test_delete_before_upload_skips_the_upload(tmp_path: Path, remote: RecordingStore) -> None:
    remote.gate.clear()
    with MirrorStore(LocalStore(tmp_path / "local"), remote) as mirror:
        _save(mirror, "step-000000000001", FILES)  # the uploader picks this one up and blocks
        _save(mirror, "step-000000000002", FILES)
        mirror.delete_dir("step-000000000002")  # retention, before its upload started
        remote.gate.set()
        assert mirror.flush(timeout=30)
    assert not any(p.startswith("step-000000000002/") and op != "delete" for op, p in remote.ops)
    assert remote.listdir("") == ["step-000000000001"]


def test_remote_listing_failure_falls_back_to_local(tmp_path: Path, remote: RecordingStore) -> None:
    with MirrorStore(LocalStore(tmp_path / "local"), remote) as mirror:
        _save(mirror, "step-000000000001", FILES)
        remote.fail_listing = True
        assert mirror.listdir("") == ["step-000000000001"]
        remote.fail_listing = False
        assert mirror.flush(timeout=30)


def test_top_level_files_are_mirrored(tmp_path: Path, remote: RecordingStore) -> None:
    with MirrorStore(LocalStore(tmp_path / "local"), remote) as mirror:
        mirror.commit_file("complete.json", b'{"step": 9}')
        assert mirror.flush(timeout=30)
    assert bytes(remote.read_file("complete.json")) == b'{"step": 9}'


# --------------------------------------------------------------------------- with the checkpointer, over S3


def test_checkpointer_mirror_restores_from_s3_onto_an_empty_disk(
    tmp_path: Path, s3_bucket: str, s3_options: dict[str, Any], s3_client: Any
) -> None:
    torch = pytest.importorskip("torch")
    from spotsafe.checkpoint.writer import Checkpointer

    model = torch.nn.Linear(16, 8)
    remote_url = f"s3://{s3_bucket}/runs/m"
    with Checkpointer(local=tmp_path / "ebs", remote=remote_url, storage_options=s3_options, keep_last=2) as ckpt:
        assert isinstance(ckpt.store, MirrorStore)
        for step in (1, 2, 3):
            with torch.no_grad():
                model.weight.fill_(float(step))
            ckpt.save(step, {"model": model, "epoch": step})
        ckpt.wait()
        assert ckpt.store.flush(timeout=60)
        ckpt.mark_complete(3)
    prefixes = s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="runs/m/", Delimiter="/")
    assert sorted(p["Prefix"] for p in prefixes.get("CommonPrefixes", [])) == [
        "runs/m/lease/",  # the writer lease lives on both tiers
        "runs/m/step-000000000002-g000000000001/",
        "runs/m/step-000000000003-g000000000001/",
    ]  # retention applied to the remote tier too

    fresh = torch.nn.Linear(16, 8)
    with Checkpointer(local=tmp_path / "new-ebs", remote=remote_url, storage_options=s3_options) as ckpt:
        info = ckpt.latest(verify=True)
        assert info is not None
        assert info.step == 3
        rest = ckpt.restore(info, {"model": fresh})
        assert ckpt.completion() is not None
    assert rest["epoch"] == 3
    assert torch.equal(fresh.weight.detach(), torch.full((8, 16), 3.0))


def _save_steps_1_and_2(store: MirrorStore, model: Any) -> None:
    """Steps 1 and 2 (the model's bias filled with the step), on both tiers when this returns."""
    import torch

    from spotsafe.checkpoint.writer import Checkpointer

    with Checkpointer(store, async_=False) as ckpt:
        for step in (1, 2):
            with torch.no_grad():
                model.bias.fill_(float(step))
            ckpt.save(step, {"model": model})
        assert ckpt.store.flush(timeout=30)


def test_latest_sees_a_newer_checkpoint_that_only_the_remote_holds(tmp_path: Path, remote: RecordingStore) -> None:
    torch = pytest.importorskip("torch")
    import shutil

    from spotsafe.checkpoint.writer import Checkpointer

    model = torch.nn.Linear(4, 2)
    _save_steps_1_and_2(MirrorStore(LocalStore(tmp_path / "a"), remote), model)
    # An older copy of the volume (step 1 only) on the next instance; S3 has steps 1 and 2.
    (tmp_path / "b").mkdir()
    shutil.copytree(
        tmp_path / "a" / "step-000000000001-g000000000001", tmp_path / "b" / "step-000000000001-g000000000001"
    )
    with Checkpointer(MirrorStore(LocalStore(tmp_path / "b"), remote)) as ckpt:
        info = ckpt.latest(verify=True)
        assert info is not None
        assert info.step == 2
        ckpt.restore(info, {"model": model})
    assert torch.equal(model.bias.detach(), torch.full((2,), 2.0))


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_a_damaged_local_copy_is_read_from_the_remote_not_skipped(
    tmp_path: Path, remote: RecordingStore, damage: str
) -> None:
    torch = pytest.importorskip("torch")
    from spotsafe.checkpoint.writer import Checkpointer

    model = torch.nn.Linear(64, 32)
    _save_steps_1_and_2(MirrorStore(LocalStore(tmp_path / "ebs"), remote), model)
    # The volume's copy of the newest checkpoint is damaged; S3's is intact.
    data = next((tmp_path / "ebs" / "step-000000000002-g000000000001").glob("*.bin"))
    raw = bytearray(data.read_bytes())
    if damage == "flipped":
        raw[100] ^= 0xFF
        data.write_bytes(bytes(raw))
    else:
        data.write_bytes(bytes(raw[:-4]))
    with Checkpointer(MirrorStore(LocalStore(tmp_path / "ebs"), remote)) as ckpt:
        info = ckpt.latest(verify=True)
        assert info is not None and info.step == 2  # not step 1: no work lost
        state = ckpt.load()
        assert ckpt.last_loaded is not None and ckpt.last_loaded.step == 2
        assert torch.equal(state["model"]["bias"], torch.full((32,), 2.0))
    # Damaged on both tiers: the error names both, and load falls back to step 1.
    remote_bin = f"step-000000000002-g000000000001/{data.name}"
    remote.write_file(remote_bin, [b"x" * len(raw)])
    with Checkpointer(MirrorStore(LocalStore(tmp_path / "ebs"), remote)) as ckpt:
        from spotsafe.errors import CheckpointCorrupt

        with pytest.raises(CheckpointCorrupt, match="the remote copy too") as info_err:
            ckpt.load(2)
        assert data.name in str(info_err.value)
        assert ckpt.load()["model"]["bias"].eq(1.0).all()


def test_a_damaged_local_manifest_is_read_from_the_remote(tmp_path: Path, remote: RecordingStore) -> None:
    torch = pytest.importorskip("torch")
    from spotsafe.checkpoint.writer import Checkpointer

    model = torch.nn.Linear(4, 2)
    _save_steps_1_and_2(MirrorStore(LocalStore(tmp_path / "ebs"), remote), model)
    (tmp_path / "ebs" / "step-000000000002-g000000000001" / "manifest.json").write_text(
        '{"format": "spotsafe-chec'
    )  # torn
    with Checkpointer(MirrorStore(LocalStore(tmp_path / "ebs"), remote)) as ckpt:
        assert [i.step for i in ckpt.list()] == [1, 2]
        info = ckpt.latest(verify=True)
        assert info is not None and info.step == 2
        assert ckpt.load()["model"]["bias"].eq(2.0).all()
