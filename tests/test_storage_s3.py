"""S3Store against a real S3 API on loopback (moto's server), faults through a real proxy."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from spotsafe.errors import StoreError
from spotsafe.storage import open_store
from spotsafe.storages.s3 import S3Store, parse_s3_url
from tests.s3server import *  # noqa: F403
from tests.s3server import FaultProxy

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent


def _random(n: int, seed: int = 1) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _uploads(client: Any, bucket: str, prefix: str = "") -> list[dict[str, Any]]:
    return client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])


def _is_part(method: str, path: str) -> bool:
    return method == "PUT" and "partNumber=" in path


# --------------------------------------------------------------------------- round trips


def test_open_store_round_trip_multipart(s3_bucket: str, s3_options: dict[str, Any], s3_client: Any) -> None:
    data = _random(12 * MiB + 3)
    with open_store(f"s3://{s3_bucket}/runs/r1", storage_options={**s3_options, "part_size": 5 * MiB}) as store:
        assert isinstance(store, S3Store)
        store.write_file("step-000000000100/model.bin", [memoryview(data)[:100], memoryview(data)[100:]])
        store.commit_file("step-000000000100/manifest.json", b"{}")
        assert bytes(store.read_file("step-000000000100/model.bin")) == data
    head = s3_client.head_object(Bucket=s3_bucket, Key="runs/r1/step-000000000100/model.bin")
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-3")  # three parts: 5 + 5 + 2 MiB
    assert _uploads(s3_client, s3_bucket) == []


def test_reads_are_parallel_ranged_gets_of_one_version(
    s3_bucket: str, s3_proxy: FaultProxy, s3_proxy_options: dict[str, Any]
) -> None:
    data = _random(16 * MiB)
    with S3Store(f"s3://{s3_bucket}/r", {**s3_proxy_options, "part_size": 5 * MiB}) as store:
        store.write_file("f.bin", [data])
        s3_proxy.requests.clear()
        assert bytes(store.read_file("f.bin")) == data
    gets = [r for r in s3_proxy.requests if r.method == "GET"]
    ranges = sorted(r.headers.get("Range", "") for r in gets)
    assert ranges == sorted(
        f"bytes={s}-{min(s + 5 * MiB, len(data)) - 1}" for s in range(0, len(data), 5 * MiB)
    )
    assert all(r.headers.get("If-Match") for r in gets)


def test_read_buffer_is_private_and_writable(s3_bucket: str, s3_options: dict[str, Any]) -> None:
    with S3Store(f"s3://{s3_bucket}/r", {**s3_options, "part_size": 5 * MiB}) as store:
        store.write_file("f.bin", [_random(6 * MiB)])
        first = store.read_file("f.bin")
        assert not first.readonly  # the loader builds tensors on it without a copy
        original = bytes(first)
        first[:4] = b"\0\0\0\0"
        assert bytes(store.read_file("f.bin")) == original


def test_botocore_checksums_can_be_turned_back_on(s3_bucket: str, s3_options: dict[str, Any]) -> None:
    data = _random(11 * MiB)
    options = {
        **s3_options,
        "part_size": 5 * MiB,
        "config_kwargs": {"request_checksum_calculation": "when_supported"},
    }
    with S3Store(f"s3://{s3_bucket}/r", options) as store:
        store.write_file("big.bin", [memoryview(data)[:7], memoryview(data)[7:]])
        store.write_file("small.bin", [b"abc", b"def"])
        assert bytes(store.read_file("big.bin")) == data
        assert bytes(store.read_file("small.bin")) == b"abcdef"


def test_part_bodies_are_views_of_the_caller_buffers() -> None:
    from spotsafe.storages.s3 import _as_bytes_views, _BuffersReader

    views, offsets, total = _as_bytes_views([b"abc", b"", bytearray(b"defg"), memoryview(b"hij")])
    assert (offsets, total) == ([0, 3, 7], 10)
    part = _BuffersReader(views, offsets, 2, 9)  # "cdefghi", across three buffers
    assert len(part) == 7
    assert bytes(part.read(1)) == b"c"
    assert bytes(part.read(3)) == b"def"  # inside one buffer: a view, no copy
    assert isinstance(_BuffersReader(views, offsets, 3, 7).read(4), memoryview)
    assert bytes(part.read()) == b"ghi"
    assert part.read() == b""
    assert part.seek(0) == 0
    assert bytes(part.read(100)) == b"cdefghi"
    part.seek(0, 2)
    assert part.tell() == 7


def test_endpoint_from_the_standard_environment_variable(
    s3_bucket: str, s3_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_options["endpoint_url"])  # botocore's own name
    with open_store(f"s3://{s3_bucket}/env") as store:
        store.commit_file("m.json", b"{}")
        assert store.listdir("") == ["m.json"]
        assert store.endpoint == s3_options["endpoint_url"]


def test_prefixless_bucket_root(s3_bucket: str, s3_options: dict[str, Any]) -> None:
    with S3Store(f"s3://{s3_bucket}", s3_options) as store:
        store.commit_file("step-000000000001/manifest.json", b"{}")
        assert store.listdir("") == ["step-000000000001"]
        store.delete_dir("step-000000000001")
        assert store.listdir("") == []


# --------------------------------------------------------------------------- faults and retries


@pytest.mark.parametrize("fault", ["503", "500", "drop", "reset"])
def test_transient_faults_are_retried(
    fault: str, s3_bucket: str, s3_proxy: FaultProxy, s3_proxy_options: dict[str, Any]
) -> None:
    data = _random(11 * MiB)
    with S3Store(f"s3://{s3_bucket}/r", {**s3_proxy_options, "part_size": 5 * MiB}) as store:
        s3_proxy.inject(fault, count=2, match=_is_part)  # two part uploads fail once each
        s3_proxy.inject(fault, count=1, match=lambda m, p: m == "PUT" and "manifest" in p)
        store.write_file("step-000000000001/big.bin", [data])
        store.commit_file("step-000000000001/manifest.json", b"{}")
        s3_proxy.inject(fault, count=2, match=lambda m, p: m == "GET" and "big.bin" in p)
        assert bytes(store.read_file("step-000000000001/big.bin")) == data
        assert s3_proxy.faults_left == 0
        assert s3_proxy.count("PUT", "partNumber=", fault=True) == 2
        assert bytes(store.read_file("step-000000000001/manifest.json")) == b"{}"


def test_persistent_part_failure_aborts_the_upload(
    s3_bucket: str, s3_proxy: FaultProxy, s3_proxy_options: dict[str, Any], s3_client: Any
) -> None:
    url = f"s3://{s3_bucket}/r"
    with S3Store(url, {**s3_proxy_options, "part_size": 5 * MiB, "max_attempts": 2}) as store:
        s3_proxy.inject("500", count=10_000, match=lambda m, p: _is_part(m, p) and "partNumber=2" in p)
        with pytest.raises(StoreError) as info:
            store.write_file("step-000000000001/big.bin", [_random(11 * MiB)])
        assert f"{url}/step-000000000001/big.bin" in str(info.value)
        assert "multipart upload" in str(info.value)
        assert store.file_size("step-000000000001/big.bin") is None
    assert _uploads(s3_client, s3_bucket) == []  # aborted, nothing billed, nothing dangling
    assert s3_proxy.count("DELETE", "uploadId=") == 1


def test_retries_stop_at_the_deadline(
    s3_bucket: str, s3_proxy: FaultProxy, s3_proxy_options: dict[str, Any]
) -> None:
    with S3Store(f"s3://{s3_bucket}/r", {**s3_proxy_options, "max_attempts": 1000}) as store:
        s3_proxy.inject("503", count=100_000)
        # 3 s leaves room for several backoff rounds (0.1 s doubling) even on a loaded machine.
        store.set_deadline(datetime.now(timezone.utc) + timedelta(seconds=3.0))
        start = time.monotonic()
        with pytest.raises(StoreError) as info:
            store.commit_file("step-000000000001/manifest.json", b"{}")
        elapsed = time.monotonic() - start
        assert "SlowDown" in str(info.value)
        assert elapsed < 6.0  # max_attempts=1000 would take minutes: the deadline stopped it
        assert s3_proxy.count("PUT", "manifest", fault=True) >= 3  # it did retry before giving up
        s3_proxy.clear()


def test_kill_9_mid_upload_leaves_nothing_after_cleanup(
    s3_bucket: str, s3_proxy: FaultProxy, s3_proxy_options: dict[str, Any], s3_client: Any
) -> None:
    url = f"s3://{s3_bucket}/run"
    script = textwrap.dedent(
        """
        import sys
        from spotsafe.storages.s3 import S3Store
        url, endpoint = sys.argv[1], sys.argv[2]
        store = S3Store(url, {"endpoint_url": endpoint, "part_size": 5 << 20, "max_concurrency": 2})
        store.cleanup_incomplete()
        store.write_file("step-000000000007/model.bin", [bytes(40 << 20)])
        store.commit_file("step-000000000007/manifest.json", b"{}")
        print("finished", flush=True)
        """
    )
    s3_proxy.delay = 0.4  # slow enough to be caught mid-upload
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, url, s3_proxy.endpoint], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while s3_proxy.count("PUT", "partNumber=") < 2:
            assert proc.poll() is None, f"{proc.communicate()}"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert b"finished" not in out
    s3_proxy.delay = 0.0
    assert len(_uploads(s3_client, s3_bucket, "run/")) == 1  # the dead writer's upload is there...
    with S3Store(url, {"endpoint_url": s3_proxy.endpoint}) as store:
        assert store.file_size("step-000000000007/manifest.json") is None
        assert store.file_size("step-000000000007/model.bin") is None
        store.cleanup_incomplete()
    assert _uploads(s3_client, s3_bucket, "run/") == []  # ...and the next start aborted it


def test_cleanup_aborts_stale_uploads_only_under_the_prefix_and_never_its_own(
    s3_bucket: str, s3_proxy: FaultProxy, s3_proxy_options: dict[str, Any], s3_client: Any
) -> None:
    stale = s3_client.create_multipart_upload(Bucket=s3_bucket, Key="run/step-1/a.bin")["UploadId"]
    other = s3_client.create_multipart_upload(Bucket=s3_bucket, Key="elsewhere/a.bin")["UploadId"]
    data = _random(11 * MiB)
    with S3Store(f"s3://{s3_bucket}/run", {**s3_proxy_options, "part_size": 5 * MiB}) as store:
        s3_proxy.delay = 0.3
        writer = threading.Thread(target=store.write_file, args=("step-2/b.bin", [data]))
        writer.start()
        while s3_proxy.count("PUT", "partNumber=") < 1:
            time.sleep(0.02)
        store.cleanup_incomplete()  # while its own upload is in flight
        writer.join()
        s3_proxy.delay = 0.0
        assert bytes(store.read_file("step-2/b.bin")) == data
    left = {u["UploadId"] for u in _uploads(s3_client, s3_bucket)}
    assert left == {other}
    assert stale not in left
    s3_client.abort_multipart_upload(Bucket=s3_bucket, Key="elsewhere/a.bin", UploadId=other)


# --------------------------------------------------------------------------- clear errors at construction


def test_missing_bucket(s3_options: dict[str, Any]) -> None:
    with pytest.raises(StoreError) as info:
        S3Store("s3://no-such-bucket-here/run", s3_options)
    assert "s3://no-such-bucket-here/run" in str(info.value)
    assert "does not exist" in str(info.value)


def test_no_credentials(s3_bucket: str, s3_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role here
    with pytest.raises(StoreError) as info:
        S3Store(f"s3://{s3_bucket}/run", s3_options)
    assert f"s3://{s3_bucket}/run" in str(info.value)
    assert "no AWS credentials" in str(info.value)


def test_explicit_credentials_are_used(s3_bucket: str, s3_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with S3Store(f"s3://{s3_bucket}/run", {**s3_options, "key": "AKIA", "secret": "s"}) as store:
        store.commit_file("x", b"1")
        assert bytes(store.read_file("x")) == b"1"


def test_access_denied(s3_bucket: str, s3_proxy: FaultProxy, s3_proxy_options: dict[str, Any]) -> None:
    s3_proxy.inject("403", count=10)
    with pytest.raises(StoreError) as info:
        S3Store(f"s3://{s3_bucket}/run", s3_proxy_options)
    assert f"s3://{s3_bucket}/run" in str(info.value)
    assert "access denied" in str(info.value)
    s3_proxy.clear()


def test_unreachable_endpoint_fails_fast() -> None:
    start = time.monotonic()
    with pytest.raises(StoreError) as info:
        S3Store("s3://bucket/run", {"endpoint_url": "http://127.0.0.1:9", "connect_timeout": 1})
    assert time.monotonic() - start < 10
    assert "s3://bucket/run" in str(info.value)
    assert "unreachable" in str(info.value)
    assert "127.0.0.1:9" in str(info.value)


def test_bad_urls_and_options(s3_options: dict[str, Any]) -> None:
    assert parse_s3_url("s3://b/x/y/") == ("b", "x/y")
    assert parse_s3_url("s3://b") == ("b", "")
    with pytest.raises(ValueError, match="no bucket"):
        parse_s3_url("s3:///run")
    with pytest.raises(ValueError, match="not an s3"):
        parse_s3_url("gs://b/run")
    with pytest.raises(ValueError, match="unknown storage_options.*'nope'"):
        S3Store("s3://b/run", {**s3_options, "nope": 1})
    with pytest.raises(ValueError, match="part_size"):
        S3Store("s3://b/run", {**s3_options, "part_size": 1024})


# --------------------------------------------------------------------------- with the checkpointer


def test_checkpointer_round_trip_over_s3(s3_bucket: str, s3_options: dict[str, Any], s3_client: Any) -> None:
    torch = pytest.importorskip("torch")
    from spotsafe.checkpoint import Checkpointer

    torch.manual_seed(0)
    model = torch.nn.Linear(64, 32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    url = f"s3://{s3_bucket}/runs/ck"
    with Checkpointer(url, storage_options=s3_options, keep_last=2) as ckpt:
        for step in (10, 20, 30):
            ckpt.save(step, {"model": model, "optimizer": opt, "epoch": step // 10})
            with torch.no_grad():
                model.weight.add_(1.0)
        ckpt.wait()
        assert [i.step for i in ckpt.list()] == [20, 30]  # retention on S3
        expected = {k: v.clone() for k, v in model.state_dict().items()}
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="runs/ck/")["Contents"]}
    assert not any(k.startswith("runs/ck/step-000000000010/") for k in keys)

    fresh = torch.nn.Linear(64, 32)
    with Checkpointer(url, storage_options=s3_options) as ckpt:
        info = ckpt.latest(verify=True)
        assert info is not None
        assert info.step == 30
        assert info.url == f"{url}/step-000000000030"
        rest = ckpt.restore(info, {"model": fresh})
    assert rest["epoch"] == 3
    assert torch.equal(fresh.weight.detach() + 1.0, expected["weight"])  # saved before the last add_
    assert torch.equal(fresh.bias.detach(), expected["bias"])
