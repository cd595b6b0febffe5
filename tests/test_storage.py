"""One conformance suite for every Store backend (the contract in spotsafe/storage.py).

Each backend gets a fixtures class providing ``store``; the test classes combine the
suite with a fixtures class, as fsspec's ``tests/abstract`` does. A backend that
passes here can carry checkpoints.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from spotsafe.errors import CheckpointNotFound, StoreError
from spotsafe.storage import Store, open_store
from tests.s3server import *  # noqa: F403

MiB = 1024 * 1024


# --------------------------------------------------------------------------- fixtures classes


class LocalFixtures:
    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[Store]:
        from spotsafe.storages.local import LocalStore

        with LocalStore(tmp_path / "store") as s:
            yield s


class MemoryFixtures:
    @pytest.fixture
    def store(self) -> Iterator[Store]:
        from spotsafe.storages.fsspec import FsspecStore

        url = f"memory://spotsafe-test/{uuid.uuid4().hex}"
        with FsspecStore(url) as s:
            yield s
        import fsspec

        fs = fsspec.filesystem("memory")
        if fs.exists(url):
            fs.rm(url, recursive=True)


class S3Fixtures:
    @pytest.fixture
    def store(self, s3_bucket: str, s3_options: dict[str, Any]) -> Iterator[Store]:
        from spotsafe.storages.s3 import S3Store

        # Small parts so that the big-file cases really go multipart on moto.
        with S3Store(f"s3://{s3_bucket}/runs/a", {**s3_options, "part_size": 5 * MiB}) as s:
            yield s


class FsspecS3Fixtures:
    """The generic fsspec backend over s3fs: an object store through fsspec's own client."""

    @pytest.fixture
    def store(self, s3_bucket: str, s3_options: dict[str, Any]) -> Iterator[Store]:
        pytest.importorskip("s3fs")
        from spotsafe.storages.fsspec import FsspecStore

        options = {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": s3_options["endpoint_url"], "region_name": "us-east-1"},
            "skip_instance_cache": True,
        }
        with FsspecStore(f"s3://{s3_bucket}/fsspec", options) as s:
            yield s


class MirrorFixtures:
    @pytest.fixture
    def store(self, tmp_path: Path, s3_bucket: str, s3_options: dict[str, Any]) -> Iterator[Store]:
        from spotsafe.storages.local import LocalStore
        from spotsafe.storages.mirror import MirrorStore
        from spotsafe.storages.s3 import S3Store

        remote = S3Store(f"s3://{s3_bucket}/mirror", {**s3_options, "part_size": 5 * MiB})
        with MirrorStore(LocalStore(tmp_path / "local"), remote) as s:
            yield s


# --------------------------------------------------------------------------- the suite


def _random(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


class StoreConformance:
    """What every backend must do. ``store`` comes from a fixtures class."""

    def test_fresh_store_lists_nothing(self, store: Store) -> None:
        assert store.listdir("") == []
        assert store.listdir("no-such-dir") == []

    def test_write_then_read_back(self, store: Store) -> None:
        store.write_file("step-000000000001/model.bin", [b"abc", bytearray(b"def"), memoryview(b"ghi")])
        data = store.read_file("step-000000000001/model.bin")
        assert isinstance(data, memoryview)
        assert bytes(data) == b"abcdefghi"
        assert store.file_size("step-000000000001/model.bin") == 9

    def test_typed_buffers_are_written_as_raw_bytes(self, store: Store) -> None:
        floats = np.arange(1000, dtype=np.float32)
        store.write_file("d/floats.bin", [memoryview(floats)])
        assert bytes(store.read_file("d/floats.bin")) == floats.tobytes()
        assert store.file_size("d/floats.bin") == 4000

    def test_empty_file(self, store: Store) -> None:
        store.write_file("d/empty.bin", [])
        assert store.file_size("d/empty.bin") == 0
        assert bytes(store.read_file("d/empty.bin")) == b""

    def test_large_file_across_parts_and_buffers(self, store: Store) -> None:
        data = _random(11 * MiB + 12345)
        cuts = [0, 7, 3 * MiB, 3 * MiB + 1, 9 * MiB, len(data)]
        buffers = [memoryview(data)[a:b] for a, b in itertools.pairwise(cuts)]
        store.write_file("step-000000000002/big.bin", buffers)
        assert store.file_size("step-000000000002/big.bin") == len(data)
        assert bytes(store.read_file("step-000000000002/big.bin")) == data

    def test_overwrite_replaces(self, store: Store) -> None:
        store.write_file("d/f", [b"first version, longer"])
        store.write_file("d/f", [b"second"])
        assert bytes(store.read_file("d/f")) == b"second"
        store.commit_file("d/manifest.json", b'{"v": 1}')
        store.commit_file("d/manifest.json", b'{"v": 2}')
        assert bytes(store.read_file("d/manifest.json")) == b'{"v": 2}'

    def test_commit_file(self, store: Store) -> None:
        store.commit_file("step-000000000003/manifest.json", b'{"step": 3}')
        assert bytes(store.read_file("step-000000000003/manifest.json")) == b'{"step": 3}'
        assert store.file_size("step-000000000003/manifest.json") == 11

    def test_top_level_file(self, store: Store) -> None:
        store.commit_file("complete.json", b"{}")
        assert store.listdir("") == ["complete.json"]
        assert bytes(store.read_file("complete.json")) == b"{}"

    def test_listdir_names_directories_and_files(self, store: Store) -> None:
        for step in (1, 10, 200):
            name = f"step-{step:012d}"
            store.write_file(f"{name}/data.bin", [b"x" * step])
            store.commit_file(f"{name}/manifest.json", b"{}")
        store.write_file("step-000000000010/sub/deeper.bin", [b"y"])
        assert sorted(store.listdir("")) == [
            "step-000000000001",
            "step-000000000010",
            "step-000000000200",
        ]
        assert sorted(store.listdir("step-000000000010")) == ["data.bin", "manifest.json", "sub"]
        assert sorted(store.listdir("step-000000000010/")) == ["data.bin", "manifest.json", "sub"]
        assert store.listdir("step-000000000010/sub") == ["deeper.bin"]

    def test_missing_file(self, store: Store) -> None:
        assert store.file_size("nope/manifest.json") is None
        with pytest.raises(CheckpointNotFound) as info:
            store.read_file("nope/manifest.json")
        assert isinstance(info.value, FileNotFoundError)
        assert "nope/manifest.json" in str(info.value)

    def test_a_directory_is_not_a_file(self, store: Store) -> None:
        store.write_file("d/inner.bin", [b"1"])
        assert store.file_size("d") is None

    def test_delete_dir(self, store: Store) -> None:
        store.write_file("step-000000000001/a.bin", [b"a"])
        store.write_file("step-000000000001/sub/b.bin", [b"b"])
        store.commit_file("step-000000000001/manifest.json", b"{}")
        # A sibling whose name starts with the deleted one's must survive.
        store.write_file("step-0000000000010/keep.bin", [b"k"])
        store.commit_file("step-0000000000010/manifest.json", b"{}")
        store.delete_dir("step-000000000001")
        assert store.listdir("") == ["step-0000000000010"]
        assert store.listdir("step-000000000001") == []
        assert store.file_size("step-000000000001/manifest.json") is None
        assert store.file_size("step-000000000001/a.bin") is None
        with pytest.raises(CheckpointNotFound):
            store.read_file("step-000000000001/a.bin")
        assert bytes(store.read_file("step-0000000000010/keep.bin")) == b"k"
        store.delete_dir("step-000000000001")  # already gone: no error
        store.delete_dir("never-existed")

    def test_create_file_is_exclusive(self, store: Store) -> None:
        # The writer lease's takeover: of two creators of one path, exactly one wins.
        assert store.create_file("lease/gen-000000000001.json", b'{"who": "a"}') is True
        assert store.create_file("lease/gen-000000000001.json", b'{"who": "b"}') is False
        assert bytes(store.read_file("lease/gen-000000000001.json")) == b'{"who": "a"}'
        assert store.create_file("lease/gen-000000000002.json", b'{"who": "b"}') is True
        assert sorted(store.listdir("lease")) == ["gen-000000000001.json", "gen-000000000002.json"]

    def test_cleanup_incomplete_keeps_committed_files(self, store: Store) -> None:
        store.write_file("step-000000000005/a.bin", [b"payload"])
        store.commit_file("step-000000000005/manifest.json", b"{}")
        store.cleanup_incomplete()
        assert sorted(store.listdir("step-000000000005")) == ["a.bin", "manifest.json"]
        assert bytes(store.read_file("step-000000000005/a.bin")) == b"payload"

    def test_set_deadline_and_flush(self, store: Store) -> None:
        from datetime import datetime, timedelta, timezone

        store.set_deadline(datetime.now(timezone.utc) + timedelta(seconds=60))
        store.write_file("d/x", [b"x"])
        store.commit_file("d/manifest.json", b"{}")
        store.set_deadline(None)
        assert store.flush(timeout=30) is True
        assert bytes(store.read_file("d/x")) == b"x"

    def test_repr_names_the_url(self, store: Store) -> None:
        assert store.url
        assert type(store).__name__ in repr(store)


class TestLocalStore(StoreConformance, LocalFixtures):
    pass


class TestFsspecMemoryStore(StoreConformance, MemoryFixtures):
    pass


class TestFsspecS3Store(StoreConformance, FsspecS3Fixtures):
    pass


class TestS3Store(StoreConformance, S3Fixtures):
    pass


class TestMirrorStore(StoreConformance, MirrorFixtures):
    pass


# --------------------------------------------------------------------------- dispatch


def test_open_store_dispatches_by_scheme(tmp_path: Path, s3_bucket: str, s3_options: dict[str, Any]) -> None:
    from spotsafe.storages.fsspec import FsspecStore
    from spotsafe.storages.local import LocalStore
    from spotsafe.storages.mirror import MirrorStore
    from spotsafe.storages.s3 import S3Store

    with open_store(tmp_path / "a") as s:
        assert type(s) is LocalStore
    with open_store(f"file://{tmp_path}/b") as s:
        assert type(s) is LocalStore
    with open_store(f"memory://spotsafe-test/{uuid.uuid4().hex}") as s:
        assert type(s) is FsspecStore
    with open_store(f"s3://{s3_bucket}/run", storage_options=s3_options) as s:
        assert type(s) is S3Store
        s.commit_file("x/manifest.json", b"{}")
    with open_store(local=tmp_path / "c", remote=f"s3://{s3_bucket}/run", storage_options=s3_options) as s:
        assert type(s) is MirrorStore
        assert s.listdir("") == ["x"]  # the remote tier is visible through the mirror


def test_fsspec_unknown_protocol_is_a_clear_error() -> None:
    from spotsafe.storages.fsspec import FsspecStore

    with pytest.raises((StoreError, ImportError)) as info:
        FsspecStore("nosuchproto://bucket/run")
    assert "nosuchproto://bucket/run" in str(info.value)


def test_fsspec_file_url_round_trip(tmp_path: Path) -> None:
    from spotsafe.storages.fsspec import FsspecStore

    with FsspecStore(f"file://{tmp_path}/fs") as s:
        s.write_file("step-000000000001/a.bin", [b"12", b"34"])
        s.commit_file("step-000000000001/manifest.json", b"{}")
        assert s.listdir("") == ["step-000000000001"]
        assert bytes(s.read_file("step-000000000001/a.bin")) == b"1234"
    assert (tmp_path / "fs" / "step-000000000001" / "a.bin").read_bytes() == b"1234"
    assert sorted(os.listdir(tmp_path / "fs" / "step-000000000001")) == ["a.bin", "manifest.json"]


def test_fsspec_failed_write_leaves_no_file() -> None:
    from spotsafe.storages.fsspec import FsspecStore

    url = f"memory://spotsafe-test/{uuid.uuid4().hex}"
    with FsspecStore(url) as s:
        with pytest.raises(StoreError) as info:
            s.write_file("d/half.bin", [b"first part", object()])  # type: ignore[list-item]
        assert "d/half.bin" in str(info.value)
        assert s.file_size("d/half.bin") is None
