"""A restore reads the saved bytes straight into the live objects' own tensors (local stores)."""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from pathlib import Path

import pytest
import torch

from spotsafe.checkpoint.manifest import MANIFEST, checkpoint_name
from spotsafe.checkpoint.places import Prefault, streamable
from spotsafe.checkpoint.writer import Checkpointer
from spotsafe.errors import CheckpointCorrupt, StateMismatch
from spotsafe.state import Blob
from spotsafe.storage.base import anonymous_buffer
from spotsafe.storage.local import BOUNCES, DIRECT_MIN, LocalStore


class WatchedStore(LocalStore):
    """A local store that remembers which files were read whole (memory-mapped) and which streamed."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.mapped: list[str] = []
        self.streamed: list[str] = []

    def read_file(self, path: str) -> memoryview:
        self.mapped.append(path.rsplit("/", 1)[-1])
        return super().read_file(path)

    def read_file_through(self, path: str, size: int, consume) -> None:  # type: ignore[no-untyped-def]
        self.streamed.append(path.rsplit("/", 1)[-1])
        super().read_file_through(path, size, consume)


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    # Over DIRECT_MIN bytes of parameters: the data file is read past the page cache.
    model = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 512))
    assert sum(p.numel() * 4 for p in model.parameters()) > DIRECT_MIN
    return model


def _trained(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = _model(seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(4, 1024)).sum().backward()
    opt.step()
    return model, opt


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_restore_reads_the_data_file_once_straight_into_the_models_tensors(tmp_path: Path) -> None:
    model, opt = _trained(0)
    with Checkpointer(tmp_path) as c:
        c.save(3, {"model": model, "optimizer": opt, "epoch": 2}, async_=False)
    live = _model(1)
    live_opt = torch.optim.Adam(live.parameters(), lr=0.5)
    where = {k: v.data_ptr() for k, v in live.state_dict().items()}
    store = WatchedStore(tmp_path)
    with Checkpointer(store) as c:
        state = c.load(into={"model": live, "optimizer": live_opt})
        assert len(store.streamed) == 1, f"streamed {store.streamed}, not the data file once"
        assert store.streamed[0].endswith(".bin"), f"streamed {store.streamed[0]}, not the data file"
        assert store.streamed[0] not in store.mapped, f"the data file was mapped too: {store.mapped}"
        for k, t in state["model"].items():
            assert t.data_ptr() == where[k], f"{k}: loaded into other memory than the live tensor's"
        assert _same(live, model), "the live model does not hold the saved parameters"
        rest = c.restore(None, {"model": live, "optimizer": live_opt})
    assert rest == {"epoch": 2}
    assert _same(live, model)
    assert {k: v.data_ptr() for k, v in live.state_dict().items()} == where, "the parameters were replaced"
    # The optimizer had no state to read into: its moments came from fresh memory, exact.
    for p, q in zip(model.parameters(), live.parameters(), strict=True):
        assert torch.equal(opt.state[p]["exp_avg_sq"], live_opt.state[q]["exp_avg_sq"])
    assert live_opt.param_groups[0]["lr"] == 0.01


class ReadCounting(LocalStore):
    """A wrapper of the kind users write: it counts the files read through read_file, and only that."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.read: list[str] = []

    def read_file(self, path: str) -> memoryview:
        self.read.append(path.rsplit("/", 1)[-1])
        return super().read_file(path)


@pytest.mark.parametrize("wrapped", ["subclass", "patched instance"])
def test_a_store_that_wraps_read_file_alone_still_sees_the_data_file(tmp_path: Path, wrapped: str) -> None:
    """Streaming a data file goes past read_file: a wrapper of read_file alone (counting, decrypting,
    caching reads) would silently miss it. Such a store is read through read_file as before."""
    model, _ = _trained(0)
    with Checkpointer(tmp_path) as c:
        c.save(1, {"model": model}, async_=False)
    if wrapped == "subclass":
        store: LocalStore = ReadCounting(tmp_path)
        seen = store.read  # type: ignore[attr-defined]
    else:
        store, seen = LocalStore(tmp_path), []
        inner = store.read_file
        setattr(store, "read_file", lambda path: seen.append(path.rsplit("/", 1)[-1]) or inner(path))  # noqa: B010
    assert not store.streams_reads, f"a {wrapped} wrapping read_file alone streams past it"
    live = _model(1)
    with Checkpointer(store) as c:
        c.restore(None, {"model": live})
    assert [n for n in seen if n.endswith(".bin")], f"the data file never went through read_file: {seen}"
    assert _same(live, model), "the restore through read_file gave other parameters"
    assert WatchedStore(tmp_path).streams_reads, "a store wrapping read_file_through too no longer streams"
    assert LocalStore(tmp_path).streams_reads, "a plain local store no longer streams"
    by_hand = LocalStore(tmp_path)
    by_hand.streams_reads = False
    assert not by_hand.streams_reads, "streaming cannot be turned off by hand"


def test_a_damaged_checkpoint_read_in_place_falls_back_to_the_previous_one_whole(tmp_path: Path) -> None:
    older, _ = _trained(0)
    newer, _ = _trained(7)
    with Checkpointer(tmp_path, keep_last=5) as c:
        c.save(1, {"model": older}, async_=False)
        c.save(2, {"model": newer}, async_=False)
    (data,) = (tmp_path / checkpoint_name(2, 1)).glob("rank*.bin")
    raw = bytearray(data.read_bytes())
    raw[len(raw) - 4096] ^= 0xFF  # in the last parameters read: all before it already went in
    data.write_bytes(bytes(raw))
    live = _model(3)
    with Checkpointer(tmp_path) as c:
        with pytest.raises(CheckpointCorrupt, match="checksum mismatch"):
            c.restore(2, {"model": live})
        assert not _same(live, newer) and not _same(live, _model(3)), "nothing of step 2 reached the live model"
        c.restore(None, {"model": live})
        assert c.last_loaded is not None and c.last_loaded.step == 1
    assert _same(live, older), "after the fallback the live model is not the intact checkpoint's, whole"
    assert (tmp_path / checkpoint_name(2, 1) / MANIFEST).exists(), "the damaged checkpoint was not left for a look"


def test_only_tensors_that_match_in_every_way_are_read_into(tmp_path: Path) -> None:
    saved = {
        "w": torch.randn(512, 1024),  # 2 MiB
        "other_shape": torch.randn(1024, 512),
        "other_dtype": torch.randn(1024, 512),
        "foreign": torch.randn(1024, 512),
        "a": torch.randn(1024, 1024),
        "b": torch.randn(1024, 1024),  # saved apart; tied in the live state
        "big": torch.randn(8 << 20 >> 2),
    }
    with Checkpointer(tmp_path) as c:
        c.save(1, {"state": saved}, async_=False)
    shared = torch.zeros(1024, 1024)
    foreign_bytes = bytearray(1024 * 512 * 4)
    live = {
        "w": torch.zeros(512, 1024),
        "other_shape": torch.zeros(512, 1024),
        "other_dtype": torch.zeros(1024, 512, dtype=torch.float64),
        "foreign": torch.frombuffer(foreign_bytes, dtype=torch.float32).view(1024, 512),  # not torch's memory
        "a": shared,
        "b": shared,
        "big": torch.zeros(8 << 20 >> 2),
    }
    with Checkpointer(tmp_path) as c:
        state = c.load(into={"state": live})["state"]
    for k, t in saved.items():
        assert torch.equal(state[k], t), f"{k}: loaded wrong"
    for k in ("w", "big"):
        assert state[k].data_ptr() == live[k].data_ptr() and torch.equal(live[k], saved[k]), f"{k}: not read in place"
    for k in ("other_shape", "other_dtype", "a", "b"):
        assert state[k].data_ptr() != live[k].data_ptr(), f"{k}: read into a live tensor that does not match"
        assert not live[k].any(), f"{k}: a live tensor that does not match was written"
    assert not any(foreign_bytes), "memory torch did not allocate was written"


def test_a_model_saved_on_another_device_or_loaded_elsewhere_is_not_read_in_place(tmp_path: Path) -> None:
    model, _ = _trained(0)
    with Checkpointer(tmp_path) as c:
        c.save(1, {"model": model}, async_=False)
    live = _model(2)
    before = {k: v.clone() for k, v in live.state_dict().items()}
    with Checkpointer(tmp_path) as c:
        state = c.load(into={"model": live}, map_location="meta")
    assert all(t.device.type == "meta" for t in state["model"].values())
    assert all(torch.equal(live.state_dict()[k], v) for k, v in before.items()), "a live tensor was written"


class NotReadyYet:
    """A wrapper whose state_dict() works only once set up (as a trainer's before its optimizer exists)."""

    def __init__(self) -> None:
        self.inner: torch.nn.Module | None = None
        self.loaded: dict[str, torch.Tensor] | None = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        assert self.inner is not None, "not set up yet"
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.loaded = dict(state)


def test_an_object_that_cannot_give_its_state_before_the_restore_costs_only_its_own_place(tmp_path: Path) -> None:
    model, _ = _trained(0)
    with Checkpointer(tmp_path) as c:
        c.save(1, {"model": model, "wrapper": {"x": torch.arange(5.0)}}, async_=False)
    live, wrapper = _model(4), NotReadyYet()
    where = {k: v.data_ptr() for k, v in live.state_dict().items()}
    store = WatchedStore(tmp_path)
    with Checkpointer(store) as c:
        rest = c.restore(None, {"model": live, "wrapper": wrapper})
    assert len(store.streamed) == 1, f"the model was not read in place: streamed {store.streamed}"
    assert rest == {}
    assert wrapper.loaded is not None and torch.equal(wrapper.loaded["x"], torch.arange(5.0))
    assert _same(live, model)
    assert {k: v.data_ptr() for k, v in live.state_dict().items()} == where


def _resident(address: int, length: int) -> int:
    """How many pages of ``length`` bytes at ``address`` are in memory (mincore(2))."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    pages = -(-length // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    assert libc.mincore(address, length, vec) == 0, f"mincore: {os.strerror(ctypes.get_errno())}"
    return sum(v & 1 for v in vec)


@pytest.mark.skipif(sys.platform != "linux", reason="MADV_POPULATE_WRITE is Linux's")
def test_the_fresh_memory_a_load_copies_into_is_faulted_in_by_another_thread(tmp_path: Path) -> None:
    """A page's first touch cost this VM more than the disk's read of it: not on the copying thread."""
    size = 32 << 20
    buf = anonymous_buffer(2 * size, huge_pages=False)
    at = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert _resident(at, 2 * size) == 0
    Prefault(at, [(100, size)]).join()  # it ends by itself when it reaches the end
    pages = size // mmap.PAGESIZE
    got = _resident(at, size + mmap.PAGESIZE)
    assert got >= pages, f"{got} of {pages} pages faulted in"
    assert _resident(at + size + mmap.PAGESIZE, size - mmap.PAGESIZE) == 0, "pages past the range were faulted in"


def test_bytes_of_a_live_buffer_that_no_restored_tensor_owns_are_never_written(tmp_path: Path) -> None:
    """Views of one larger buffer: the saved blob spans the gap between them, the live gap keeps its bytes."""
    source = torch.arange(3 << 20, dtype=torch.float32)  # 12 MiB: over DIRECT_MIN
    with Checkpointer(tmp_path) as c:
        c.save(1, {"a": source[: 1 << 20], "b": source[2 << 20 :], "c": torch.ones(7)[1:]}, async_=False)
    buffer = torch.full((3 << 20,), 7.0)
    odd = torch.full((7,), 5.0)
    live = {"a": buffer[: 1 << 20], "b": buffer[2 << 20 :], "c": odd[1:]}  # "c" starts 4 bytes in
    with Checkpointer(tmp_path) as c:
        state = c.load(into=live)
    assert torch.equal(state["a"], source[: 1 << 20]) and torch.equal(state["b"], source[2 << 20 :])
    assert torch.equal(state["c"], torch.ones(6))
    assert bool((buffer[1 << 20 : 2 << 20] == 7.0).all()), "the gap between the live views was overwritten"
    assert odd[0].item() == 5.0, "the element before a view at an unaligned offset was overwritten"


class Lenient:
    """An object whose load_state_dict takes whatever keys it is given (as many user objects do)."""

    def __init__(self, **tensors: torch.Tensor) -> None:
        self.tensors = tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key, value in state.items():
            self.tensors[key].copy_(value)


def test_a_fallback_that_cannot_overwrite_what_a_damaged_read_wrote_says_so(tmp_path: Path) -> None:
    """Step 2 has a tensor step 1 lacks; step 2 is damaged: its bytes must not stay behind silently."""
    big = torch.randn(4 << 20)  # 16 MiB: the damage lands after "extra" was written
    with Checkpointer(tmp_path, keep_last=5) as c:
        c.save(1, {"x": {"a": torch.ones(8)}, "big": {"t": big}}, async_=False)
        c.save(2, {"x": {"a": torch.full((8,), 2.0), "extra": torch.full((8,), 3.0)}, "big": {"t": big}}, async_=False)
    (data,) = (tmp_path / checkpoint_name(2, 1)).glob("rank*.bin")
    raw = bytearray(data.read_bytes())
    raw[-4096] ^= 0xFF
    data.write_bytes(bytes(raw))
    live = Lenient(a=torch.zeros(8), extra=torch.zeros(8))
    with Checkpointer(tmp_path) as c, pytest.raises(StateMismatch, match=r"checksum failed.*nothing for 1 of"):
        c.restore(None, {"x": live, "big": Lenient(t=torch.zeros(4 << 20))})
    # The same fallback where the older checkpoint has every tensor the damaged read wrote: fine.
    live = Lenient(a=torch.zeros(8))
    with Checkpointer(tmp_path) as c:
        c.restore(None, {"x": live, "big": Lenient(t=torch.zeros(4 << 20))})
        assert c.last_loaded is not None and c.last_loaded.step == 1
    assert torch.equal(live.tensors["a"], torch.ones(8))


def test_overlapping_blobs_or_a_gpu_bound_load_are_not_streamed(tmp_path: Path) -> None:
    desc = {"tensors": [{"device": "cpu"}, {"device": "cpu"}]}
    assert streamable(desc, [Blob(0, 64), Blob(64, 64)], None)
    assert not streamable(desc, [Blob(0, 128), Blob(64, 64)], None), "nested ranges: one pass per piece"
    assert not streamable(desc, [Blob(0, 64)], "meta"), "another device: the mapped load"
    assert not streamable({"tensors": [{"device": "no such device"}]}, [], None)
    model, _ = _trained(0)
    with Checkpointer(tmp_path) as c:
        c.save(1, {"model": model}, async_=False)
    store = WatchedStore(tmp_path)
    with Checkpointer(store) as c:
        c.load(map_location="meta")
        assert store.streamed == [], "a load onto another device streamed into host memory"
        c.load()
        assert len(store.streamed) == 1
    assert len(store._bounces) <= BOUNCES, f"{len(store._bounces)} idle buffers kept after a load"
