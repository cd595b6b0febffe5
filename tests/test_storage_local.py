"""LocalStore: the Store contract on a real directory, plus its failure modes (read-only, full disk)."""

from __future__ import annotations

import errno
import gc
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from spotsafe.errors import CheckpointNotFound, StoreError
from spotsafe.storage import open_store
from spotsafe.storages.local import LocalStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LocalStore]:
    s = LocalStore(tmp_path / "store")
    yield s
    s.close()


def test_open_store_dispatches_paths_and_file_urls(tmp_path: Path) -> None:
    assert isinstance(open_store(tmp_path), LocalStore)
    s = open_store(f"file://{tmp_path}/x")
    assert isinstance(s, LocalStore)
    assert s.url == f"{tmp_path}/x"


def test_missing_things(store: LocalStore) -> None:
    assert store.listdir() == []
    assert store.listdir("nope") == []
    assert store.file_size("nope/file") is None
    with pytest.raises(CheckpointNotFound) as e:
        store.read_file("nope/file")
    assert isinstance(e.value, FileNotFoundError)
    assert str(store.root / "nope" / "file") in str(e.value)
    store.delete_dir("nope")  # no error


def test_write_read_size_list(store: LocalStore) -> None:
    store.write_file("a/b/data.bin", [b"hello ", bytearray(b"big "), memoryview(b"world")])
    assert store.file_size("a/b/data.bin") == 15
    assert bytes(store.read_file("a/b/data.bin")) == b"hello big world"
    assert store.listdir() == ["a"]
    assert store.listdir("a") == ["b"]
    store.write_file("a/b/data.bin", [b"short"])  # overwrite
    assert bytes(store.read_file("a/b/data.bin")) == b"short"
    store.write_file("empty", [])
    assert store.file_size("empty") == 0
    assert store.file_size("a/b") is None  # a directory is not a file
    assert bytes(store.read_file("empty")) == b""


def test_large_write_spans_several_chunks(store: LocalStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("spotsafe.storages.local.WRITE_CHUNK", 1000)
    payload = os.urandom(10_500)
    store.write_file("big", [memoryview(payload)[:5000], memoryview(payload)[5000:]])
    assert bytes(store.read_file("big")) == payload


def test_read_file_is_private_copy_on_write(store: LocalStore) -> None:
    store.write_file("f", [b"abcdef"])
    view = store.read_file("f")
    view[0] = ord("X")  # a tensor built on it may be written to; the file must not change
    assert bytes(store.read_file("f")) == b"abcdef"


def test_commit_is_atomic_and_leaves_no_temp(store: LocalStore) -> None:
    store.commit_file("step-1/manifest.json", b'{"a": 1}')
    store.commit_file("step-1/manifest.json", b'{"a": 2}')
    assert bytes(store.read_file("step-1/manifest.json")) == b'{"a": 2}'
    assert os.listdir(store.root / "step-1") == ["manifest.json"]


def test_paths_cannot_leave_the_store(store: LocalStore) -> None:
    with pytest.raises(ValueError, match="leaves the store"):
        store.write_file("../escape", [b"x"])
    with pytest.raises(ValueError):
        store.delete_dir("")


def test_delete_dir_removes_manifest_first_and_everything(store: LocalStore) -> None:
    store.write_file("step-1/data", [b"x" * 100])
    store.commit_file("step-1/manifest.json", b"{}")
    store.delete_dir("step-1")
    assert not (store.root / "step-1").exists()
    assert store.listdir() == []


def test_cleanup_removes_dead_writers_temp_files_only(store: LocalStore) -> None:
    store.commit_file("step-1/manifest.json", b"{}")
    d = store.root / "step-1"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (d / f".data.bin.tmp-{dead_pid}-{uuid.uuid4().hex[:12]}").write_bytes(b"debris")
    live = d / f".data.bin.tmp-1-{uuid.uuid4().hex[:12]}"  # pid 1 is alive: another writer's file
    live.write_bytes(b"in progress")
    assert sorted(store.listdir("step-1")) == ["manifest.json"]  # temp files are never listed
    store.cleanup_incomplete()
    assert sorted(os.listdir(d)) == sorted(["manifest.json", live.name])


def test_store_under_a_regular_file_fails_clearly(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a dir")
    for path in (tmp_path / "file", tmp_path / "file" / "runs"):
        with pytest.raises(StoreError) as e:  # at once, not at the first save
            LocalStore(path)
        assert str(tmp_path / "file") in str(e.value)
        assert "not a directory" in str(e.value)
    # A path that becomes a file after the store was opened: the write names it.
    store = LocalStore(tmp_path / "later" / "runs")
    (tmp_path / "later").write_text("not a dir")
    with pytest.raises(StoreError) as e:
        store.write_file("step-1/data", [b"x"])
    assert str(tmp_path / "later") in str(e.value)
    assert "not a directory" in str(e.value)


@pytest.fixture
def mount_point(tmp_path: Path) -> Iterator[Path]:
    point = tmp_path / "mnt"
    point.mkdir()
    yield point
    gc.collect()  # drop memory maps of files on it
    if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def _mount_tmpfs(point: Path, options: str) -> None:
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")


@pytest.mark.root
def test_read_only_filesystem_fails_clearly(mount_point: Path) -> None:
    _mount_tmpfs(mount_point, "size=1m,ro")
    store = LocalStore(mount_point / "runs")
    with pytest.raises(StoreError) as e:
        store.write_file("step-1/data", [b"x"])
    assert e.value.errno == errno.EROFS
    assert str(mount_point / "runs") in str(e.value)
    assert "Read-only file system" in str(e.value)


@pytest.mark.root
def test_full_disk_fails_clearly_and_leaves_no_temp(mount_point: Path) -> None:
    _mount_tmpfs(mount_point, "size=1m")
    store = LocalStore(mount_point)
    store.write_file("ok", [b"x" * 1000])
    with pytest.raises(StoreError) as e:
        store.write_file("step-1/big.bin", [b"\0" * (2 << 20)])
    assert e.value.errno == errno.ENOSPC
    assert str(mount_point / "step-1" / "big.bin") in str(e.value)
    assert "No space left on device" in str(e.value)
    assert os.listdir(mount_point / "step-1") == []  # the temp file is gone
    assert bytes(store.read_file("ok")) == b"x" * 1000
