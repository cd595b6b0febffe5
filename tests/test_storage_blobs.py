"""The GCS and Azure Blob stores: native exclusive create, the conditional-write probe, limits on every call.

Against fake-gcs-server and azurite (they honour ``ifGenerationMatch`` / ``If-None-Match``) and
gcp-storage-emulator (it ignores preconditions: the server that must be refused), all started by
fixtures (tests/plugins/servers.py) and reached only through the clouds' standard environment
(``STORAGE_EMULATOR_HOST``, ``AZURE_STORAGE_CONNECTION_STRING``). The conformance suite runs on
both in tests/test_storage.py, the lease's process tests in tests/test_lease.py.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import torch

from spotsafe.checkpoint.writer import Checkpointer
from spotsafe.errors import StoreError
from spotsafe.storage.registry import open_store
from tests.cloudservers import Azurite, FakeGCSServer
from tests.helpers import stop_child, wait_until
from tests.s3server import FaultProxy

# --------------------------------------------------------------------------- dispatch


def test_gs_and_az_urls_open_the_native_stores(gcs_bucket: str, az_container: str) -> None:
    from spotsafe.storage.azure import AzureBlobStore
    from spotsafe.storage.gcs import GCSStore

    for url in (f"gs://{gcs_bucket}/run", f"gcs://{gcs_bucket}/run"):
        with open_store(url) as s:
            assert type(s) is GCSStore
    for url in (f"az://{az_container}/run", f"abfs://{az_container}/run"):
        with open_store(url) as s:
            assert type(s) is AzureBlobStore


def test_a_missing_bucket_or_container_is_a_clear_error(gcs_env: str, az_env: str) -> None:
    with pytest.raises(StoreError) as gcs:
        open_store("gs://no-such-bucket-here/run")
    assert "gs://no-such-bucket-here/run" in str(gcs.value)
    assert "does not exist" in str(gcs.value)
    with pytest.raises(StoreError) as az:
        open_store("az://no-such-container/run")
    assert "az://no-such-container/run" in str(az.value)
    assert "does not exist" in str(az.value)


def test_bad_storage_options_name_the_store(gcs_bucket: str) -> None:
    with pytest.raises(ValueError, match=f"gs://{gcs_bucket}/run: unknown storage_options"):
        open_store(f"gs://{gcs_bucket}/run", storage_options={"endpoint": "x"})


# --------------------------------------------------------------------------- the conditional-write probe


def objects(store: Any, path: str = "") -> list[str]:
    """Every object under ``path`` of ``store`` (recursively), relative to the store."""
    found: list[str] = []
    for name in store.listdir(path):
        full = f"{path}/{name}" if path else name
        sub = store.listdir(full)
        found.extend(objects(store, full) if sub else [full])
    return sorted(found)


def test_a_gcs_server_that_ignores_preconditions_is_refused_and_left_clean(gcs_ignoring_bucket: str) -> None:
    url = f"gs://{gcs_ignoring_bucket}/runs/r"
    with (
        pytest.raises(StoreError, match="ignores conditional writes") as raised,
        Checkpointer(url, async_=False) as c,
    ):
        c.acquire(timeout=10)
    message = str(raised.value)
    assert url in message, f"{message}"  # the store, the cause, the way out
    assert "ifGenerationMatch=0" in message, f"{message}"
    assert "unsafe_no_conditional_writes" in message, f"{message}"
    with open_store(url, storage_options={"unsafe_no_conditional_writes": True}) as store:
        assert objects(store) == []  # no probe object, no lease file


def test_the_opt_out_saves_on_such_a_server_and_warns(
    gcs_ignoring_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"gs://{gcs_ignoring_bucket}/runs/r"
    options = {"unsafe_no_conditional_writes": True}
    with caplog.at_level(logging.WARNING), Checkpointer(url, storage_options=options, async_=False) as c:
        c.save(1, {"w": torch.ones(3)})
        assert float(c.load(1)["w"][0]) == 1.0
    warned = [r.getMessage() for r in caplog.records if "ignores conditional writes" in r.getMessage()]
    assert len(warned) == 1
    assert "best effort" in warned[0]
    with open_store(url, storage_options=options) as store:
        assert "lease/gen-000000000001.json" in objects(store)
        assert [o for o in objects(store) if ".probe-" in o] == []


@pytest.mark.parametrize("kind", ["gcs", "azure"])
def test_the_probe_runs_once_per_store_and_the_create_is_exclusive(
    kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, proxy = through_proxy(kind, request, monkeypatch)
    with open_store(url) as store:
        assert store.create_file("lease/a", b"1") is True
        assert store.create_file("lease/a", b"2") is False
        assert store.create_file("lease/b", b"3") is True
        assert bytes(store.read_file("lease/a")) == b"1"
        assert objects(store) == ["lease/a", "lease/b"]
    if kind == "gcs":  # an upload's object name travels in its body: the probe's shows in its DELETE only
        uploads = [r for r in proxy.requests if r.method == "POST" and "uploadType=" in r.path]
        assert len(uploads) == 5  # the probe's two, then three creates
        assert all("ifGenerationMatch=0" in r.path for r in uploads)
    else:
        uploads = [r for r in proxy.requests if r.method == "PUT"]
        assert [".probe-" in r.path for r in uploads] == [True, True, False, False, False]
        assert all(r.headers.get("If-None-Match") == "*" for r in uploads)
    assert [r.method for r in proxy.requests if r.method == "DELETE"] == ["DELETE"]  # the probe's object, once
    assert all(".probe-" in r.path for r in proxy.requests if r.method == "DELETE")


# --------------------------------------------------------------------------- limits and retries


@pytest.fixture
def proxies() -> Iterator[list[FaultProxy]]:
    started: list[FaultProxy] = []
    yield started
    for proxy in started:
        proxy.shutdown()


def through_proxy(kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> tuple[str, FaultProxy]:
    """A fresh bucket or container reached through a FaultProxy, the environment pointed at the proxy."""
    proxies: list[FaultProxy] = request.getfixturevalue("proxies")
    if kind == "gcs":
        server: FakeGCSServer = request.getfixturevalue("gcs_server")
        bucket = request.getfixturevalue("gcs_bucket")
        proxy = FaultProxy(server.endpoint).start()
        proxies.append(proxy)
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.endpoint)
        return f"gs://{bucket}/runs/r", proxy
    azurite: Azurite = request.getfixturevalue("azurite")
    container = request.getfixturevalue("az_container")
    proxy = FaultProxy(azurite.endpoint).start()
    proxies.append(proxy)
    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string.replace(azurite.endpoint, proxy.endpoint)
    )
    return f"az://{container}/runs/r", proxy


@pytest.mark.parametrize("kind", ["gcs", "azure"])
def test_throttling_and_server_errors_are_retried(
    kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, proxy = through_proxy(kind, request, monkeypatch)
    with open_store(url) as store:
        proxy.inject("503", count=2)
        store.commit_file("d/manifest.json", b"{}")
        assert proxy.count("POST" if kind == "gcs" else "PUT", "", fault=True) == 2
        assert bytes(store.read_file("d/manifest.json")) == b"{}"


@pytest.mark.parametrize("kind", ["gcs", "azure"])
def test_a_create_whose_answer_was_lost_is_still_the_creators(
    kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, proxy = through_proxy(kind, request, monkeypatch)
    with open_store(url) as store:
        store.create_file("lease/probe-done", b"x")  # the probe, out of the way
        proxy.inject("lost", count=1, match=lambda method, path: method in ("POST", "PUT"))
        assert store.create_file("lease/gen-000000000001.json", b'{"who": "a"}') is True  # retried: 412, but its own
        assert store.create_file("lease/gen-000000000001.json", b'{"who": "b"}') is False
        assert bytes(store.read_file("lease/gen-000000000001.json")) == b'{"who": "a"}'
    assert proxy.count("POST" if kind == "gcs" else "PUT", "", fault=True) == 1


@pytest.mark.parametrize("kind", ["gcs", "azure"])
def test_a_call_that_never_answers_is_cut_at_the_notice_deadline(
    kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, proxy = through_proxy(kind, request, monkeypatch)
    with open_store(url, storage_options={"read_timeout": 600}) as store:
        proxy.inject("hang", count=1)
        store.set_deadline(datetime.now(timezone.utc) + timedelta(seconds=2))
        with pytest.raises(StoreError) as raised:
            store.commit_file("d/manifest.json", b"{}")  # the socket read alone would wait 600 s
        message = str(raised.value)
        assert f"{url}/d/manifest.json" in message, f"{message}"
        assert "preemption notice's deadline" in message, f"{message}"
        proxy.stop_holding()
        store.set_deadline(None)
        store.commit_file("d/manifest.json", b"{}")  # the store is still usable
        assert bytes(store.read_file("d/manifest.json")) == b"{}"


# --------------------------------------------------------------------------- four writers at the same instant

#: A writer process: opens the store, says it is ready, waits for the start file (the barrier
#: all four are released by), then takes the lease with its one save and lets go.
RACER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import torch
    from spotsafe.checkpoint.writer import Checkpointer
    from spotsafe.storage.registry import open_store

    cfg = json.loads(sys.argv[1])
    marks, me = Path(cfg["marks"]), cfg["me"]
    ckpt = Checkpointer(open_store(cfg["store"], storage_options=cfg.get("options")), async_=False, keep_last=10)
    (marks / f"ready-{me}").write_text("")
    while not (marks / "go").exists():
        time.sleep(0.001)
    step = 100 + me
    ckpt.save(step, {"w": torch.full((100,), float(step))}, reason="notice")
    (marks / f"generation-{me}").write_text(json.dumps(ckpt.lease.generation))
    ckpt.close()
""")


@pytest.fixture(params=["local", "s3", "gcs", "azure"])
def race_store(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if request.param == "local":
        return {"store": str(tmp_path / "store")}
    if request.param == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        return {"store": f"s3://{bucket}/runs/r", "options": request.getfixturevalue("s3_options")}
    if request.param == "gcs":
        return {"store": f"gs://{request.getfixturevalue('gcs_bucket')}/runs/r"}
    return {"store": f"az://{request.getfixturevalue('az_container')}/runs/r"}


def test_four_writers_racing_for_an_empty_store_each_get_their_own_generation(
    race_store: dict[str, Any], tmp_path: Path
) -> None:
    # The default lease period: each writer hands over by releasing; a short one would let a
    # holder starved of CPU (two cores, eight suites) be taken over, which is not this test's race.
    marks = tmp_path / "marks"
    marks.mkdir()
    script = tmp_path / "racer.py"
    script.write_text(RACER)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), json.dumps({**race_store, "marks": str(marks), "me": me})],
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ),
        )
        for me in range(4)
    ]
    try:

        def all_ready() -> bool:
            for p in procs:
                if p.poll() is not None:
                    raise AssertionError(f"a writer exited ({p.returncode}) before the start: {p.communicate()[1]}")
            return all((marks / f"ready-{me}").exists() for me in range(4))

        wait_until(all_ready, 600, what="four writers ready at the barrier")
        (marks / "go").write_text("")  # all four released at once
        for p in procs:
            _, err = p.communicate(timeout=600)
            assert p.returncode == 0, f"{err}"
    finally:
        for p in procs:
            stop_child(p)
    generations = sorted(json.loads((marks / f"generation-{me}").read_text()) for me in range(4))
    assert generations == [1, 2, 3, 4]  # never two holders of one generation, each told its save was durable
    with Checkpointer(race_store["store"], storage_options=race_store.get("options")) as reader:
        assert [i.step for i in reader.list()] == [100, 101, 102, 103]
        for step in (100, 101, 102, 103):
            assert float(reader.load(step)["w"][0]) == step
