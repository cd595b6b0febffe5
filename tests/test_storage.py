"""One conformance suite for every Store backend (the contract in spotsafe/storage/base.py).

Each backend gets a fixtures class providing ``store``; the test classes combine the
suite with a fixtures class, as fsspec's ``tests/abstract`` does. A backend that
passes here can carry checkpoints.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spotsafe.errors import StoreError
from spotsafe.storage.base import Store
from spotsafe.storage.registry import open_store
from spotsafe.testing import StoreConformance

MiB = 1024 * 1024


# --------------------------------------------------------------------------- fixtures classes


class LocalFixtures:
    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[Store]:
        from spotsafe.storage.local import LocalStore

        with LocalStore(tmp_path / "store") as s:
            yield s


class MemoryFixtures:
    @pytest.fixture
    def store(self) -> Iterator[Store]:
        from spotsafe.storage.fsspec import FsspecStore

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
        from spotsafe.storage.s3 import S3Store

        # Small parts so that the big-file cases really go multipart on moto.
        with S3Store(f"s3://{s3_bucket}/runs/a", {**s3_options, "part_size": 5 * MiB}) as s:
            yield s


class FsspecS3Fixtures:
    """The generic fsspec backend over s3fs: an object store through fsspec's own client."""

    @pytest.fixture
    def store(self, s3_bucket: str, s3_options: dict[str, Any]) -> Iterator[Store]:
        pytest.importorskip("s3fs")
        from spotsafe.storage.fsspec import FsspecStore

        options = {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": s3_options["endpoint_url"], "region_name": "us-east-1"},
            "skip_instance_cache": True,
        }
        with FsspecStore(f"s3://{s3_bucket}/fsspec", options) as s:
            yield s


class GCSFixtures:
    """fake-gcs-server, reached through STORAGE_EMULATOR_HOST."""

    @pytest.fixture
    def store(self, gcs_bucket: str) -> Iterator[Store]:
        from spotsafe.storage.gcs import GCSStore

        with GCSStore(f"gs://{gcs_bucket}/runs/a", {"part_size": 5 * MiB}) as s:
            yield s


class AzureFixtures:
    """azurite, reached through AZURE_STORAGE_CONNECTION_STRING."""

    @pytest.fixture
    def store(self, az_container: str) -> Iterator[Store]:
        from spotsafe.storage.azure import AzureBlobStore

        with AzureBlobStore(f"az://{az_container}/runs/a", {"part_size": 5 * MiB}) as s:
            yield s


class MirrorFixtures:
    @pytest.fixture
    def store(self, tmp_path: Path, s3_bucket: str, s3_options: dict[str, Any]) -> Iterator[Store]:
        from spotsafe.storage.local import LocalStore
        from spotsafe.storage.mirror import MirrorStore
        from spotsafe.storage.s3 import S3Store

        remote = S3Store(f"s3://{s3_bucket}/mirror", {**s3_options, "part_size": 5 * MiB})
        with MirrorStore(LocalStore(tmp_path / "local"), remote) as s:
            yield s


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


class TestGCSStore(StoreConformance, GCSFixtures):
    pass


class TestAzureBlobStore(StoreConformance, AzureFixtures):
    pass


# --------------------------------------------------------------------------- dispatch


def test_open_store_dispatches_by_scheme(tmp_path: Path, s3_bucket: str, s3_options: dict[str, Any]) -> None:
    from spotsafe.storage.fsspec import FsspecStore
    from spotsafe.storage.local import LocalStore
    from spotsafe.storage.mirror import MirrorStore
    from spotsafe.storage.s3 import S3Store

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


def test_register_store_adds_a_scheme(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from spotsafe.storage import registry
    from spotsafe.storage.local import LocalStore

    monkeypatch.setattr(registry, "BACKENDS", dict(registry.BACKENDS))  # this test's registrations end with it
    calls: list[tuple[str, Any]] = []

    def factory(url: str, storage_options: Any) -> Store:
        calls.append((url, storage_options))
        return LocalStore(tmp_path / url.split("://", 1)[1])

    registry.register_store("MyFS", factory)
    with open_store("myfs://runs/a", storage_options={"token": "t"}) as s:
        assert type(s) is LocalStore and s.root == tmp_path / "runs" / "a"
    assert calls == [("myfs://runs/a", {"token": "t"})]
    with open_store(local=tmp_path / "l", remote="myfs://runs/b") as s:  # a mirror's remote tier too
        assert [type(t) for t in s.tiers] == [LocalStore, LocalStore]
    assert calls[-1] == ("myfs://runs/b", None)
    with pytest.raises(ValueError, match="not a URL scheme"):
        registry.register_store("myfs://", factory)


def test_open_store_of_a_path_imports_no_optional_dependency(tmp_path: Path) -> None:
    code = (
        "import sys, spotsafe; spotsafe.open_store(sys.argv[1]).close(); "
        "print(sorted(m for m in ('boto3', 'botocore', 'fsspec', 's3fs') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s")], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_store_and_open_store_are_public_api() -> None:
    import spotsafe
    from spotsafe.storage import registry

    assert spotsafe.Store is Store
    assert spotsafe.open_store is registry.open_store
    assert {"Store", "open_store"} <= set(spotsafe.__all__)


def test_fsspec_unknown_protocol_is_a_clear_error() -> None:
    from spotsafe.storage.fsspec import FsspecStore

    with pytest.raises((StoreError, ImportError)) as info:
        FsspecStore("nosuchproto://bucket/run")
    assert "nosuchproto://bucket/run" in str(info.value)


def test_fsspec_file_url_round_trip(tmp_path: Path) -> None:
    from spotsafe.storage.fsspec import FsspecStore

    with FsspecStore(f"file://{tmp_path}/fs") as s:
        s.write_file("step-000000000001/a.bin", [b"12", b"34"])
        s.commit_file("step-000000000001/manifest.json", b"{}")
        assert s.listdir("") == ["step-000000000001"]
        assert bytes(s.read_file("step-000000000001/a.bin")) == b"1234"
    assert (tmp_path / "fs" / "step-000000000001" / "a.bin").read_bytes() == b"1234"
    assert sorted(os.listdir(tmp_path / "fs" / "step-000000000001")) == ["a.bin", "manifest.json"]


def test_fsspec_failed_write_leaves_no_file() -> None:
    from spotsafe.storage.fsspec import FsspecStore

    url = f"memory://spotsafe-test/{uuid.uuid4().hex}"
    with FsspecStore(url) as s:
        with pytest.raises(StoreError) as info:
            s.write_file("d/half.bin", [b"first part", object()])  # type: ignore[list-item]
        assert "d/half.bin" in str(info.value)
        assert s.file_size("d/half.bin") is None
