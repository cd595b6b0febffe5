"""The Store conformance suite, for your own :class:`~spotsafe.storage.base.Store` backend.

spotsafe runs it against every backend it ships (tests/test_storage.py). A backend that
passes it can carry checkpoints. Use it as fsspec's abstract tests are used: a test
class that combines the suite with a ``store`` fixture yielding a fresh, empty store::

    import pytest
    from spotsafe.testing import StoreConformance

    class TestMyStore(StoreConformance):
        @pytest.fixture
        def store(self, tmp_path):
            with MyStore(tmp_path / "store") as s:
                yield s

It needs pytest (``pip install pytest``); nothing else beyond spotsafe itself.
"""

from __future__ import annotations

import array
import itertools
import random

import pytest

from spotsafe.errors import CheckpointNotFound
from spotsafe.storage.base import Store

__all__ = ["StoreConformance"]

MiB = 1024 * 1024


def _random(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


class StoreConformance:
    """What every backend must do. ``store`` comes from a fixtures class (a pytest fixture)."""

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
        floats = array.array("f", range(1000))
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
