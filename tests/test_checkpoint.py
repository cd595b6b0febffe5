"""Checkpointer: save/load, async, atomic commit under SIGKILL, integrity, retention, errors."""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import timezone
from pathlib import Path
from typing import Any

import pytest
import torch

import spotsafe
from spotsafe.checkpoint.manifest import FORMAT_VERSION, MANIFEST, checkpoint_name
from spotsafe.checkpoint.writer import Checkpointer
from spotsafe.errors import (
    CheckpointCorrupt,
    CheckpointNotFound,
    FormatVersionError,
    StateMismatch,
    StoreError,
)
from spotsafe.state import RNGState
from spotsafe.storage.base import Buffer
from spotsafe.storage.local import LocalStore
from tests.helpers import stop_child

FIXTURES = Path(__file__).parent / "fixtures"


def state_for(step: int, n: int = 1000) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    w = torch.randn(n, generator=g)
    return {"w": w, "view": w[::2], "step": step, "name": f"s{step}"}


def assert_state(state: dict[str, Any], step: int, n: int = 1000) -> None:
    expected = state_for(step, n)
    assert state["step"] == step
    assert state["name"] == f"s{step}"
    assert torch.equal(state["w"], expected["w"])
    assert torch.equal(state["view"], expected["view"])
    assert state["view"].data_ptr() == state["w"].data_ptr()


@pytest.fixture
def ckpt(tmp_path: Path) -> Iterator[Checkpointer]:
    c = Checkpointer(tmp_path / "store")
    yield c
    c.close()


def data_files(root: Path, step: int) -> list[Path]:
    return sorted((root / checkpoint_name(step, 1)).glob("*.bin"))


# ----------------------------------------------------------------------------- basics


@pytest.mark.parametrize("async_", [True, False])
def test_save_list_load(tmp_path: Path, async_: bool) -> None:
    with Checkpointer(tmp_path, async_=async_) as c:
        assert c.list() == []
        assert c.latest() is None
        c.save(7, state_for(7), epoch=2, reason="notice", metadata={"loss": 0.5})
        c.save(9, state_for(9))
        assert c.wait() is True
        assert set(c.last_timings) == {"snapshot_s", "write_s", "commit_s", "retention_s"}
        assert c.last_saved is not None and c.last_saved.step == 9
        infos = c.list()
        assert [i.step for i in infos] == [7, 9]
        first = infos[0]
        assert first.name == "step-000000000007-g000000000001"
        assert first.url == f"{tmp_path}/step-000000000007-g000000000001"
        assert first.epoch == 2 and first.reason == "notice" and first.metadata == {"loss": 0.5}
        assert first.time.tzinfo is not None and first.time.utcoffset() == timezone.utc.utcoffset(None)
        assert first.world_size == 1
        assert first.size == sum(p.stat().st_size for p in (tmp_path / first.name).iterdir() if p.name != MANIFEST)
        assert c.latest() == infos[1]
        assert c.latest(verify=True) == infos[1]
        assert_state(c.load(), 9)
        assert_state(c.load(7), 7)
        assert_state(c.load(infos[0], verify=False), 7)
        assert c.last_loaded == infos[0]


def test_restore_loads_live_objects_and_returns_the_rest(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    with Checkpointer(tmp_path) as c:
        c.save(1, {"model": model, "optimizer": opt, "rng": RNGState(), "epoch": 4, "pos": {"batch": 17}})
        c.wait()
        expected_draw = torch.rand(3)
        model2 = torch.nn.Linear(3, 2)
        opt2 = torch.optim.Adam(model2.parameters(), lr=0.5)
        torch.manual_seed(123)
        rest = c.restore(None, {"model": model2, "optimizer": opt2, "rng": RNGState()})
        assert rest == {"epoch": 4, "pos": {"batch": 17}}
        assert torch.equal(torch.rand(3), expected_draw)
        assert torch.equal(model2.weight, model.weight)
        assert opt2.param_groups[0]["lr"] == 0.1
        assert torch.equal(opt2.state[model2.weight]["exp_avg"], opt.state[model.weight]["exp_avg"])
        with pytest.raises(StateMismatch, match="scheduler"):
            c.restore(1, {"scheduler": torch.optim.lr_scheduler.StepLR(opt2, 1)})
        with pytest.raises(TypeError, match="load_state_dict"):
            c.restore(1, {"epoch": 3})


def test_loaded_tensors_are_writable_and_do_not_touch_the_file(ckpt: Checkpointer) -> None:
    ckpt.save(1, state_for(1))
    ckpt.wait()
    s = ckpt.load()
    s["w"].add_(1.0)  # memory-mapped copy-on-write: the checkpoint stays as it was
    assert_state(ckpt.load(), 1)


def test_map_location(ckpt: Checkpointer) -> None:
    ckpt.save(1, {"t": torch.ones(3)})
    ckpt.wait()
    assert ckpt.load(map_location="cpu")["t"].device.type == "cpu"
    assert ckpt.load(map_location={"cpu": "cpu"})["t"].device.type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(spotsafe.SpotsafeError, match="CUDA is not available"):
            ckpt.load(map_location="cuda")


def test_resaving_a_committed_step_replaces_it_atomically(ckpt: Checkpointer) -> None:
    ckpt.save(5, state_for(1))
    ckpt.save(5, state_for(2), reason="final")
    ckpt.wait()
    infos = ckpt.list()
    assert [(i.step, i.reason) for i in infos] == [(5, "final")]
    assert_state(ckpt.load(5), 2)


class CountingStore(LocalStore):
    """A real local store that counts the files read, by path."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.reads: list[str] = []

    def read_file(self, path: str) -> memoryview:
        self.reads.append(path)
        return super().read_file(path)


def test_loading_a_given_step_reads_its_manifest_once(tmp_path: Path) -> None:
    """On an object store every manifest read is a round trip or two before the data."""
    store = CountingStore(tmp_path / "store")
    ckpt = Checkpointer(store)
    for step in (1, 2):
        ckpt.save(step, {"w": torch.full((4,), float(step))}, async_=False)
    ckpt.wait()  # the retention after a save reads manifests in the background
    store.reads.clear()
    state = ckpt.load(1)
    assert torch.equal(state["w"], torch.full((4,), 1.0)), f"step 1 loaded {state['w']}"
    manifests = [p for p in store.reads if p.endswith(MANIFEST)]
    assert len(manifests) == 1, f"the manifest was read {len(manifests)} times: {manifests}"
    ckpt.close()


class LookingStore(LocalStore):
    """A real local store that logs, in order, each look at a manifest and each data file written."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.log: list[tuple[str, str]] = []

    def file_size(self, path: str) -> int | None:
        self.log.append(("look", path))
        return super().file_size(path)

    def write_file(self, path: str, buffers: Sequence[Buffer]) -> None:
        if path.endswith(".bin"):
            self.log.append(("write", path))
        super().write_file(path, buffers)


def test_a_save_looks_at_the_other_checkpoints_only_after_its_commit(tmp_path: Path) -> None:
    """Removing what killed saves left looks at every checkpoint's manifest: a round trip each on
    an object store (40 kept checkpoints: 40 HEADs, 0.24 -> 0.47 s per save on moto), which stood
    before every save's write, the notice's included. Only the first save (and one after a
    failure, which may need the space) does it before writing; the rest after their commit."""
    path = tmp_path / "store"
    with Checkpointer(LocalStore(path), keep_last=3, keep_every=1) as c:
        c.save(1, state_for(1), async_=False)
    debris = path / checkpoint_name(2, 1)  # a save killed before its manifest
    debris.mkdir()
    (debris / "rank00000.deadbeef.bin").write_bytes(b"x" * 4096)
    store = LookingStore(path)
    with Checkpointer(store, keep_last=3, keep_every=1) as c:
        c.save(3, state_for(3), async_=False)
        c.wait()
        first_write = next(i for i, (k, _) in enumerate(store.log) if k == "write")
        assert ("look", f"{checkpoint_name(2, 1)}/{MANIFEST}") in store.log[:first_write], (
            f"the first save wrote before removing the killed save's files: {store.log}"
        )
        assert not debris.exists(), "the killed save's directory is still there"
        for step in range(4, 8):
            store.log.clear()
            c.save(step, state_for(step), async_=False)
            c.wait()  # the retention after it, in the background
            first_write = next(i for i, (k, _) in enumerate(store.log) if k == "write")
            before = [p for k, p in store.log[:first_write] if k == "look"]
            assert before == [], f"save {step} looked at {before} before writing"
            after = [p for k, p in store.log[first_write:] if k == "look"]
            assert len(after) >= step - 2, f"save {step}: the retention looked at only {after}"
        assert [i.step for i in c.list()] == [1, 3, 4, 5, 6, 7], f"kept {c.list()}"


def test_metadata_must_be_json(ckpt: Checkpointer) -> None:
    with pytest.raises(spotsafe.SpotsafeError, match="metadata"):
        ckpt.save(1, {}, metadata={"x": object()})
    with pytest.raises(ValueError, match="reason"):
        ckpt.save(1, {}, reason="whenever")
    with pytest.raises(ValueError, match="step"):
        ckpt.save(-1, {})


# ----------------------------------------------------------------------------- async


class GatedStore(LocalStore):
    """A real local store whose data writes wait for a gate (to hold a save in flight)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = threading.Event()
        self.entered = threading.Event()

    def write_file(self, path: str, buffers: Sequence[Buffer]) -> None:
        if path.endswith(".bin"):
            self.entered.set()
            assert self.gate.wait(30)
        super().write_file(path, buffers)


class FailingStore(LocalStore):
    """Fails the next ``failures`` data writes with ENOSPC, as a full disk would."""

    def __init__(self, path: Path, failures: int) -> None:
        super().__init__(path)
        self.failures = failures

    def write_file(self, path: str, buffers: Sequence[Buffer]) -> None:
        if path.endswith(".bin") and self.failures:
            self.failures -= 1
            super().write_file(path, [b"partial"])
            raise StoreError(errno.ENOSPC, f"cannot write {self.url}/{path}: No space left on device")
        super().write_file(path, buffers)


def test_async_save_returns_after_the_snapshot(tmp_path: Path) -> None:
    store = GatedStore(tmp_path)
    with Checkpointer(store) as c:
        s = state_for(3)
        c.save(3, s)
        assert store.entered.wait(10)
        s["w"].fill_(0.0)  # training goes on and changes the tensors: the snapshot must not see it
        assert c.wait(timeout=0.05) is False
        assert c.list() == []  # nothing committed while the write is in flight
        store.gate.set()
        assert c.wait(timeout=30) is True
        assert_state(c.load(3), 3)


def test_the_tree_file_is_written_while_the_data_file_is(tmp_path: Path) -> None:
    """The tree file's write and fsync run beside the payload's, not after it (issue 30: a few
    ms on the synchronous save, the path that races a notice's deadline)."""
    store = GatedStore(tmp_path)
    with Checkpointer(store) as c:
        t = threading.Thread(target=c.save, args=(4, state_for(4)), kwargs={"async_": False})
        t.start()
        try:
            assert store.entered.wait(10) is True, "the data write never started"
            step_dir = tmp_path / checkpoint_name(4, 1)
            deadline = time.monotonic() + 10
            while not list(step_dir.glob("rank00000.*.json")) and time.monotonic() < deadline:
                time.sleep(0.01)
            trees = list(step_dir.glob("rank00000.*.json"))
            assert len(trees) == 1, f"no tree file while the data file was being written: {sorted(step_dir.iterdir())}"
        finally:
            store.gate.set()
            t.join(30)
        assert c.list()[-1].step == 4, f"step 4 not committed: {c.list()}"
        assert_state(c.load(4), 4)


def test_a_second_save_waits_for_the_first(tmp_path: Path) -> None:
    store = GatedStore(tmp_path)
    with Checkpointer(store) as c:
        c.save(1, state_for(1))
        assert store.entered.wait(10)
        done = threading.Event()

        def second() -> None:
            c.save(2, state_for(2))
            done.set()

        t = threading.Thread(target=second)
        t.start()
        assert not done.wait(0.2)
        store.gate.set()
        assert done.wait(30)
        t.join()
        c.wait()
        assert [i.step for i in c.list()] == [1, 2]


def test_background_error_reraises_at_wait_then_save_works(tmp_path: Path) -> None:
    store = FailingStore(tmp_path, failures=1)
    with Checkpointer(store) as c:
        c.save(1, state_for(1))
        with pytest.raises(StoreError, match="No space left"):
            c.wait()
        assert c.wait() is True  # raised once
        assert not (tmp_path / checkpoint_name(1, 1)).exists()  # the partial dir is cleaned up at once
        c.save(2, state_for(2))
        c.wait()
        assert [i.step for i in c.list()] == [2]


def test_background_error_reraises_at_next_save(tmp_path: Path) -> None:
    store = FailingStore(tmp_path, failures=1)
    with Checkpointer(store) as c:
        c.save(1, state_for(1))
        with pytest.raises(StoreError):
            c.save(2, state_for(2))
        c.save(3, state_for(3))
        c.wait()
        assert [i.step for i in c.list()] == [3]


def test_pending_async_save_lands_at_interpreter_exit(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import torch
        from spotsafe.checkpoint.writer import Checkpointer
        c = Checkpointer({str(tmp_path)!r})
        c.save(11, {{"w": torch.arange(2_000_000, dtype=torch.float32)}}, reason="final")
        # no wait(): the atexit hook must let the background write finish
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    with Checkpointer(tmp_path) as c:
        info = c.latest(verify=True)
        assert info is not None and info.step == 11
        assert torch.equal(c.load()["w"], torch.arange(2_000_000, dtype=torch.float32))


# ----------------------------------------------------------------------------- integrity


def test_corruption_is_detected_and_falls_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with Checkpointer(tmp_path, keep_last=10) as c:
        for step in (1, 2, 3, 4, 5):
            c.save(step, state_for(step))
        c.wait()
        # 5: a flipped byte (sizes fine), 4: truncated, 3: a missing file, 2: garbage manifest
        f5 = data_files(tmp_path, 5)[0]
        raw = bytearray(f5.read_bytes())
        raw[100] ^= 0x40
        f5.write_bytes(bytes(raw))
        f4 = data_files(tmp_path, 4)[0]
        f4.write_bytes(f4.read_bytes()[:-10])
        data_files(tmp_path, 3)[0].unlink()
        (tmp_path / checkpoint_name(2, 1) / MANIFEST).write_text("{not json")

        assert [i.step for i in c.list()] == [1, 3, 4, 5]  # garbage manifest: not a checkpoint
        assert c.latest().step == 5  # type: ignore[union-attr]  # sizes look right
        assert c.latest(verify=True).step == 1  # type: ignore[union-attr]
        with caplog.at_level(logging.ERROR, logger="spotsafe.checkpoint.catalog"):
            assert_state(c.load(), 1)
        assert "step-000000000005" in caplog.text and "checksum mismatch" in caplog.text
        assert c.last_loaded is not None and c.last_loaded.step == 1
        with pytest.raises(CheckpointCorrupt, match=f"{f5}: checksum mismatch"):
            c.load(5)
        with pytest.raises(CheckpointCorrupt, match=f"{f4}: .* bytes, the manifest says"):
            c.load(4)
        with pytest.raises(CheckpointCorrupt, match="missing"):
            c.load(3)
        with pytest.raises(CheckpointCorrupt, match="not valid JSON"):
            c.load(2)
        rest = c.restore(None, {})
        assert rest["step"] == 1


def test_nothing_intact_says_so(tmp_path: Path) -> None:
    with Checkpointer(tmp_path) as c:
        with pytest.raises(CheckpointNotFound, match=f"{tmp_path}: no intact checkpoint"):
            c.load()
        c.save(1, state_for(1))
        c.wait()
        data_files(tmp_path, 1)[0].write_bytes(b"")
        with pytest.raises(CheckpointNotFound, match="damaged: step-000000000001"):
            c.restore(None, {})
        with pytest.raises(CheckpointNotFound, match=f"{tmp_path}: no committed checkpoint for step 99"):
            c.load(99)


def test_newer_format_version_is_refused_by_name(tmp_path: Path) -> None:
    with Checkpointer(tmp_path) as c:
        c.save(1, state_for(1))
        c.wait()
        path = tmp_path / checkpoint_name(1, 1) / MANIFEST
        doc = json.loads(path.read_text())
        doc["format_version"] = FORMAT_VERSION + 1
        path.write_text(json.dumps(doc))
        with pytest.raises(FormatVersionError, match=f"{path}: checkpoint format version {FORMAT_VERSION + 1}"):
            c.list()
        with pytest.raises(FormatVersionError):
            c.load(1)
        with pytest.raises(FormatVersionError):
            c.latest()


def test_unknown_manifest_field_is_not_dropped(tmp_path: Path) -> None:
    with Checkpointer(tmp_path) as c:
        c.save(1, state_for(1))
        c.wait()
        path = tmp_path / checkpoint_name(1, 1) / MANIFEST
        doc = json.loads(path.read_text())
        doc["surprise"] = 1
        path.write_text(json.dumps(doc))
        with pytest.raises(CheckpointCorrupt, match="unknown manifest fields"):
            c.load(1)


def test_format_v1_fixture_loads(tmp_path: Path) -> None:
    shutil.copytree(FIXTURES / "checkpoint-v1", tmp_path / "v1")
    with Checkpointer(tmp_path / "v1") as c:
        info = c.latest(verify=True)
        assert info is not None
        assert (info.step, info.epoch, info.reason, info.metadata) == (42, 3, "final", {"purpose": "format fixture"})
        s = c.load(info)
    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert torch.equal(s["model"]["weight"], w)
    assert torch.equal(s["model"]["weight_t"], w.t())
    assert s["model"]["weight_t"].data_ptr() == s["model"]["weight"].data_ptr()
    assert torch.equal(s["model"]["bias"], torch.tensor([0.5, -1.0, 2.0]))
    assert list(s["optimizer"]["state"]) == [0]
    assert torch.equal(s["optimizer"]["state"][0]["exp_avg"], torch.full((2,), 0.25))
    assert s["optimizer"]["param_groups"] == [{"lr": 0.001, "betas": (0.9, 0.999), "params": [0]}]
    assert s["half"].dtype == torch.bfloat16 and s["half"].tolist() == [1.5, -2.25]
    assert s["flags"].tolist() == [True, False]
    assert (s["epoch"], s["note"]) == (3, "written by spotsafe format 1")


class Boom:
    """Unpickling this writes a marker file: proof that pickle ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payloads_never_execute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "pwned"
    store = tmp_path / "store"
    with Checkpointer(store, async_=False) as c:
        c.save(1, {"w": torch.ones(4)})
    d = store / checkpoint_name(1, 1)
    manifest = json.loads((d / MANIFEST).read_text())
    payload = pickle.dumps(Boom(str(marker)))
    torch_payload = tmp_path / "evil.pt"
    torch.save({"x": Boom(str(marker))}, torch_payload)
    # An attacker who controls the bucket rewrites data, tree and manifest consistently.
    for data in (payload, torch_payload.read_bytes()):
        for f in manifest["files"]:
            if f["role"] == "data":
                (d / f["path"]).write_bytes(data)
                f["size"] = len(data)
                from spotsafe.checkpoint.files import checksum

                f["checksum"] = checksum(data)
        (d / MANIFEST).write_text(json.dumps(manifest))
        with Checkpointer(store) as c:
            try:
                c.load(1)
            except spotsafe.SpotsafeError:
                pass
        tree = next(f for f in manifest["files"] if f["role"] == "tree")
        for node in ({"T": "pickle", "v": payload.hex()}, {"T": "object", "v": "os.system"}):
            text = json.dumps({"tree": {"T": "dict", "v": {"x": node}}, "tensors": [], "blobs": [], "nbytes": 0})
            (d / tree["path"]).write_text(text)
            tree["size"] = len(text)
            tree["checksum"] = checksum(text.encode())
            (d / MANIFEST).write_text(json.dumps(manifest))
            with Checkpointer(store) as c, pytest.raises(CheckpointCorrupt, match="unknown node type"):
                c.load(1)
    assert not marker.exists()

    # And a normal load never reaches for pickle or torch.load at all.
    def forbidden(*a: Any, **k: Any) -> Any:
        raise AssertionError("the load path used pickle")

    with Checkpointer(tmp_path / "clean", async_=False) as c:
        c.save(1, {"model": torch.nn.Linear(2, 2), "rng": RNGState(), "x": (1, {2: 3})})
        monkeypatch.setattr(pickle, "loads", forbidden)
        monkeypatch.setattr(pickle, "load", forbidden)
        monkeypatch.setattr(pickle, "Unpickler", forbidden)
        monkeypatch.setattr(torch, "load", forbidden)
        assert c.load(1)["x"] == (1, {2: 3})


# ----------------------------------------------------------------------------- retention & cleanup


def test_keep_last_and_keep_every(tmp_path: Path) -> None:
    with Checkpointer(tmp_path, keep_last=2, keep_every=4) as c:
        for step in range(1, 11):
            c.save(step, state_for(step, 10))
        c.wait()
        assert [i.step for i in c.list()] == [4, 8, 9, 10]
    # Beside the checkpoints only the writer lease (spotsafe.checkpoint.lease) remains.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lease"] + [checkpoint_name(s, 1) for s in (4, 8, 9, 10)]


def test_retention_never_deletes_the_newest_intact(tmp_path: Path) -> None:
    with Checkpointer(tmp_path, keep_last=5, async_=False) as c:
        c.save(10, state_for(10, 10))
        c.save(20, state_for(20, 10))
    data_files(tmp_path, 20)[0].write_bytes(b"")  # 20 is damaged
    with Checkpointer(tmp_path, keep_last=1, async_=False) as c:
        c.save(5, state_for(5, 10))  # an older step (resumed from an old one): kept as just saved
        c.wait()  # a sync save prunes in the background, after its commit
        assert [i.step for i in c.list()] == [5, 10, 20]  # 10 is the newest intact: kept
        c.save(30, state_for(30, 10))
        c.wait()
        assert [i.step for i in c.list()] == [30]


def test_incomplete_checkpoints_are_invisible_and_cleaned(tmp_path: Path) -> None:
    (tmp_path / checkpoint_name(3, 1)).mkdir()
    (tmp_path / checkpoint_name(3, 1) / "rank00000.x.bin").write_bytes(b"partial")
    (tmp_path / checkpoint_name(4, 1)).mkdir()
    with Checkpointer(tmp_path) as c:
        assert c.list() == []
        assert c.latest() is None
        c.save(4, state_for(4))  # the step being written is never removed by cleanup
        c.wait()
        assert not (tmp_path / checkpoint_name(3, 1)).exists()
        assert [i.step for i in c.list()] == [4]


def test_mark_complete(ckpt: Checkpointer) -> None:
    assert ckpt.completion() is None
    ckpt.save(3, state_for(3))
    ckpt.mark_complete(3, {"accuracy": 0.99})
    done = ckpt.completion()
    assert done is not None
    assert (done["step"], done["metadata"]) == (3, {"accuracy": 0.99})
    assert [i.step for i in ckpt.list()] == [3]


# ----------------------------------------------------------------------------- errors


def test_unwritable_store_names_the_path(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    # A store under a regular file fails when it is opened, not at the first save.
    with pytest.raises(StoreError) as e:
        Checkpointer(tmp_path / "file" / "run", async_=False)
    assert str(tmp_path / "file") in str(e.value)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    point = tmp_path / "mnt"
    point.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(point)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield point
    gc.collect()  # drop memory maps of files on it
    if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.mark.root
@pytest.mark.parametrize("async_", [False, True])
def test_full_disk_mid_save(small_tmpfs: Path, async_: bool) -> None:
    n = 750_000  # 3 MB per checkpoint: the third does not fit in 8 MiB
    with Checkpointer(small_tmpfs, keep_last=5, async_=async_) as c:
        c.save(1, state_for(1, n))
        c.save(2, state_for(2, n))
        c.wait()
        with pytest.raises(StoreError) as e:
            c.save(3, state_for(3, n))
            c.wait()
        assert e.value.errno == errno.ENOSPC
        assert str(small_tmpfs / checkpoint_name(3, 1)) in str(e.value)
        assert "No space left on device" in str(e.value)
        assert not (small_tmpfs / checkpoint_name(3, 1)).exists()  # space given back
        assert [i.step for i in c.list()] == [1, 2]
        assert c.latest(verify=True).step == 2  # type: ignore[union-attr]
        assert_state(c.load(1), 1, n)
        assert_state(c.load(2), 2, n)


# ----------------------------------------------------------------------------- kill -9

ZYGOTE = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from spotsafe.checkpoint.writer import Checkpointer

    def state(step):
        g = torch.Generator().manual_seed(step)
        w = torch.randn(1_000_000, generator=g)
        return {"w": w, "view": w[::2], "step": step, "name": f"s{step}"}

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    for line in sys.stdin:
        start, async_ = (int(x) for x in line.split())
        pid = os.fork()
        if pid == 0:
            c = Checkpointer(sys.argv[1], keep_last=2, async_=bool(async_))
            step = start
            print(os.getpid(), flush=True)
            while True:
                c.save(step, state(step))
                step += 1
        """
)


@pytest.mark.slow
def test_sigkill_at_random_instants_never_breaks_the_store(tmp_path: Path) -> None:
    store = tmp_path / "store"
    # One warm interpreter forks each writer, so a kill costs milliseconds, not an import of torch.
    zygote = subprocess.Popen(
        [sys.executable, "-c", ZYGOTE, str(store)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    rnd = random.Random(1234)
    assert zygote.stdin is not None and zygote.stdout is not None
    debris_seen = 0
    steps_seen = []
    try:
        start = 0
        for kill in range(30):
            zygote.stdin.write(f"{start} {kill % 2}\n")
            zygote.stdin.flush()
            pid = int(zygote.stdout.readline())
            time.sleep(rnd.uniform(0.02, 0.35))
            os.kill(pid, signal.SIGKILL)
            for _ in range(200):  # until the kernel has torn it down
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.005)
            for d in store.iterdir() if store.exists() else []:
                if not (d / MANIFEST).exists() or any(p.name.startswith(".") for p in d.iterdir()):
                    debris_seen += 1
                    break
            with Checkpointer(store) as c:
                infos = c.list()
                for info in infos:
                    c.check(info, full=True)  # every visible checkpoint is intact
                latest = c.latest(verify=True)
                if latest is not None:
                    assert_state(c.load(latest), latest.step, 1_000_000)
                    start = latest.step + 1
                    steps_seen.append(latest.step)
    finally:
        stop_child(zygote)
    print(f"kills: 30, resumed steps: {steps_seen}, kills that left debris: {debris_seen}")
    assert len(steps_seen) >= 20  # most runs got at least one checkpoint committed
    assert debris_seen >= 3  # and kills really landed mid-save


def test_sync_save_is_durable_on_return_and_prunes_in_the_background(tmp_path: Path) -> None:
    with Checkpointer(tmp_path, keep_last=1, async_=False) as c:
        c.save(1, state_for(1))
        c.save(2, state_for(2))
        assert (tmp_path / checkpoint_name(2, 1) / MANIFEST).exists()  # committed before save() returned
        assert c.wait(timeout=30) is True
        assert [i.step for i in c.list()] == [2]
        assert c.last_timings["retention_s"] >= 0


def test_snapshot_buffer_is_reused_across_saves(ckpt: Checkpointer) -> None:
    ckpt.save(1, state_for(1))
    ckpt.wait()
    first = ckpt._buffer._tensor
    assert first is not None and first.numel() >= 4000
    ckpt.save(2, state_for(2))
    ckpt.save(3, state_for(3, 500))  # smaller: fits in the same buffer
    ckpt.wait()
    assert ckpt._buffer._tensor is first
    ckpt.save(4, state_for(4, 100_000))  # larger: grown once
    ckpt.wait()
    assert ckpt._buffer.capacity >= 400_000
    assert_state(ckpt.load(3), 3, 500)
    assert_state(ckpt.load(4), 4, 100_000)


# ----------------------------------------------------------------------------- data segments (format 2)


class SegmentingStore(LocalStore):
    """A local store that asks for small segments, as an object store does (with the generic batch calls)."""

    segment_size = 4096


def test_segments_cut_the_payload_without_copying() -> None:
    from spotsafe.checkpoint.files import _segments

    rng = random.Random(7)
    for _ in range(50):
        parts = [
            memoryview(bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300))))
            for _ in range(rng.randrange(1, 6))
        ]
        size = rng.randrange(1, 200)
        pieces = _segments(parts, size)
        joined = b"".join(bytes(v) for p in pieces for v in p)
        assert joined == b"".join(bytes(p) for p in parts)
        lengths = [sum(len(v) for v in p) for p in pieces]
        assert all(n == size for n in lengths[:-1]) and (not lengths or 0 < lengths[-1] <= size)


def test_segmented_checkpoint_round_trips_through_the_generic_store_calls(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(30, 40))
    model[1].weight = torch.nn.Parameter(model[0].weight.t())  # a view: shared storage across segments
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 40)).sum().backward()
    opt.step()
    with Checkpointer(SegmentingStore(tmp_path)) as c:
        c.save(5, {"model": model, "opt": opt, "rng": RNGState(), "epoch": 2}, async_=False)
        doc = json.loads((tmp_path / checkpoint_name(5, 1) / MANIFEST).read_text())
        data = [f for f in doc["files"] if f["role"] == "data"]
        assert doc["format_version"] == 2 and len(data) > 3
        assert [f["offset"] for f in data] == [i * 4096 for i in range(len(data))]
        assert c.latest(verify=True) is not None
    fresh = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(30, 40))
    fresh[1].weight = torch.nn.Parameter(fresh[0].weight.t())
    fresh_opt = torch.optim.Adam(fresh.parameters())
    with Checkpointer(tmp_path) as c:  # a plain local store reads it too
        rest = c.restore(5, {"model": fresh, "opt": fresh_opt})
    assert rest["epoch"] == 2
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert fresh[1].weight.data_ptr() == fresh[0].weight.data_ptr()  # still tied
    assert fresh_opt.state_dict()["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])


def test_plain_local_checkpoints_stay_format_1(tmp_path: Path) -> None:
    with Checkpointer(tmp_path) as c:
        c.save(1, state_for(1), async_=False)
    doc = json.loads((tmp_path / checkpoint_name(1, 1) / MANIFEST).read_text())
    assert doc["format_version"] == 1  # older spotsafe releases keep reading it
    assert all("offset" not in f for f in doc["files"])


@pytest.mark.parametrize("damage", ["gap", "overlap", "offset_in_v1", "offset_on_tree"])
def test_bad_segment_tables_are_corrupt(tmp_path: Path, damage: str) -> None:
    with Checkpointer(SegmentingStore(tmp_path)) as c:
        c.save(1, state_for(1, n=5000), async_=False)
        c.wait()  # retention reads the manifest (memory-mapped) in the background: let it finish first
        path = tmp_path / checkpoint_name(1, 1) / MANIFEST
        doc = json.loads(path.read_text())
        data = [f for f in doc["files"] if f["role"] == "data"]
        if damage == "gap":
            data[1]["offset"] += 8
        elif damage == "overlap":
            data[2]["offset"] -= 8
        elif damage == "offset_in_v1":
            doc["format_version"] = 1
        else:
            next(f for f in doc["files"] if f["role"] == "tree")["offset"] = 0
        path.write_text(json.dumps(doc))
        with pytest.raises(CheckpointCorrupt, match=str(tmp_path / checkpoint_name(1, 1))):
            c.load(1)


def test_a_manifest_lying_about_segment_sizes_is_refused_before_any_allocation(tmp_path: Path) -> None:
    with Checkpointer(SegmentingStore(tmp_path)) as c:
        c.save(1, state_for(1, n=5000), async_=False)
        c.wait()  # as above: the manifest is rewritten in place below
        path = tmp_path / checkpoint_name(1, 1) / MANIFEST
        doc = json.loads(path.read_text())
        data = [f for f in doc["files"] if f["role"] == "data"]
        data[-1]["size"] = 1 << 50  # a petabyte: must not be allocated, nor read
        path.write_text(json.dumps(doc))
        with pytest.raises(CheckpointCorrupt, match=f"{data[-1]['path']}: .* the manifest says {1 << 50}"):
            c.load(1, verify=False)


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux's")
def test_an_async_save_writes_its_snapshot_buffer_to_disk_without_a_copy(tmp_path: Path) -> None:
    """The async save's buffer starts on a page, so its data file goes past the page cache straight
    from it (no bounce copy); a sync save's zero-copy tensors are staged, and still go direct."""
    from spotsafe.checkpoint.staging import StagingBuffer
    from spotsafe.storage.base import DIRECT_ALIGN
    from spotsafe.storage.local import _address

    buf = StagingBuffer(pin=False)
    for n in (1, 4095, 10 << 20):
        _, view = buf.get(n)
        addr = _address(view)
        assert addr is not None, f"a {n}-byte snapshot buffer is not writable"
        assert addr % DIRECT_ALIGN == 0, f"a {n}-byte snapshot buffer starts at {addr:#x}, not on a page"
    state = {"w": torch.randn(4 << 20), "b": torch.randn(1000)}  # 16 MiB + a tail
    ckpt = Checkpointer(tmp_path, keep_last=2)
    try:
        store = ckpt.store
        assert isinstance(store, LocalStore)
        ckpt.save(1, state)
        ckpt.wait()
        assert store.direct_bytes >= 16 << 20, f"only {store.direct_bytes} bytes went with O_DIRECT"
        assert store.bounced_bytes == 0, f"{store.bounced_bytes} bytes of the snapshot buffer were copied again"
        before = store.direct_bytes
        ckpt.save(2, state, async_=False)
        assert store.direct_bytes - before >= 16 << 20, "the sync save went through the page cache"
        for step in (1, 2):
            out = ckpt.load(step)
            for key in state:
                assert torch.equal(out[key], state[key]), f"step {step}: {key} differs"
    finally:
        ckpt.close()
