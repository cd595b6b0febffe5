"""LocalStore: the Store contract on a real directory, plus its failure modes (read-only, full disk)."""

from __future__ import annotations

import ctypes
import errno
import gc
import mmap
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from spotsafe.errors import CheckpointCorrupt, CheckpointNotFound, StoreError
from spotsafe.storage import local
from spotsafe.storage.base import DIRECT_ALIGN, Buffer
from spotsafe.storage.local import BOUNCE_SIZE, DIRECT_MIN, WRITERS, LocalStore
from spotsafe.storage.registry import open_store


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
    monkeypatch.setattr("spotsafe.storage.local.WRITE_CHUNK", 1000)
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
@pytest.mark.parametrize(
    ("tmpfs_size", "payload"),
    [
        pytest.param("1m", lambda: b"\0" * (2 << 20), id="through the page cache"),
        pytest.param(
            "16m",
            lambda: _aligned(20 << 20),
            id="O_DIRECT",
            marks=pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux's"),
        ),
    ],
)
def test_full_disk_fails_clearly_and_leaves_no_temp(
    mount_point: Path, tmpfs_size: str, payload: Callable[[], Buffer]
) -> None:
    _mount_tmpfs(mount_point, f"size={tmpfs_size}")
    store = LocalStore(mount_point)
    store.write_file("ok", [b"x" * 1000])
    with pytest.raises(StoreError) as e:
        store.write_file("step-1/big.bin", [payload()])
    assert e.value.errno == errno.ENOSPC, f"errno {e.value.errno}"
    assert str(mount_point / "step-1" / "big.bin") in str(e.value)
    assert "No space left on device" in str(e.value)
    assert os.listdir(mount_point / "step-1") == [], "a temp file is left"
    assert bytes(store.read_file("ok")) == b"x" * 1000, "an earlier file was lost"


# --------------------------------------------------------------------------- O_DIRECT payloads

needs_o_direct = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux's")


def _resident_pages(path: Path) -> tuple[int, int]:
    """(pages of ``path`` in the page cache, pages in all), asked of the kernel with mincore(2)."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = path.stat().st_size
    page = mmap.PAGESIZE
    pages = (size + page - 1) // page
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)  # mapping alone faults nothing in
    try:
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        vec = (ctypes.c_ubyte * pages)()
        if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        return sum(v & 1 for v in vec), pages
    finally:
        m.close()


def _aligned(n: int) -> memoryview:
    view = memoryview(mmap.mmap(-1, n))  # anonymous maps start on a page
    view[:] = os.urandom(n)
    return view


@needs_o_direct
def test_a_large_payload_goes_past_the_page_cache(tmp_path: Path) -> None:
    """What a checkpoint must not do to a training job: push its dataset out of the page cache."""
    data = _aligned(16 << 20)
    direct, cached = LocalStore(tmp_path / "direct"), LocalStore(tmp_path / "cached", direct_io=False)
    direct.write_file("step-1/data.bin", [data])
    cached.write_file("step-1/data.bin", [data])
    assert direct.direct_bytes == 16 << 20, f"{direct.direct_bytes} bytes went with O_DIRECT"
    assert direct.bounced_bytes == 0, f"{direct.bounced_bytes} bytes of an aligned source were copied first"
    assert cached.direct_bytes == 0, f"{cached.direct_bytes} bytes went with O_DIRECT"
    resident, pages = _resident_pages(tmp_path / "direct" / "step-1" / "data.bin")
    assert resident == 0, f"{resident} of {pages} pages of the O_DIRECT file are in the page cache"
    # The control: the same write through the page cache leaves it there (so mincore sees pages).
    resident, pages = _resident_pages(tmp_path / "cached" / "step-1" / "data.bin")
    assert resident > pages // 2, f"only {resident} of {pages} pages of the buffered file are cached"
    for store in (direct, cached):
        assert bytes(store.read_file("step-1/data.bin")) == bytes(data), f"{store.url}: content differs"


@needs_o_direct
@pytest.mark.parametrize(
    "shape",
    [
        "aligned",
        "aligned with a tail",
        "unaligned",
        "mixed parts",
        "read-only bytes",
        "bounce-sized pieces",
        "ramp-sized pieces",
    ],
)
def test_o_direct_writes_any_buffers_byte_exact(tmp_path: Path, shape: str) -> None:
    big = _aligned(20 << 20)
    parts: list[Buffer] = {
        "aligned": [big],
        "aligned with a tail": [big[: (9 << 20) + 123]],
        "unaligned": [big[7 : (12 << 20) + 5]],
        "mixed parts": [big[: 3 * 4096], os.urandom(1000), big[4096 : 10 << 20], bytearray(os.urandom(5000))],
        "read-only bytes": [os.urandom(9 << 20) + b"x"],
        "bounce-sized pieces": [big[1 : BOUNCE_SIZE + 1], big[:BOUNCE_SIZE], big[5:4101]],
        "ramp-sized pieces": [big[3 : 3 + n] for n in (*local.RAMP, 4096, 1)],
    }[shape]
    store = LocalStore(tmp_path)
    store.write_file("f.bin", parts)
    want = b"".join(bytes(memoryview(p).cast("B")) for p in parts)
    got = (tmp_path / "f.bin").read_bytes()
    assert len(got) == len(want), f"{len(got)} bytes written, {len(want)} given"
    assert got == want, "the file's bytes differ from the buffers'"
    assert store.direct_bytes == len(want) // DIRECT_ALIGN * DIRECT_ALIGN, "not every whole block went direct"


@needs_o_direct
def test_an_unaligned_source_is_copied_while_the_disk_writes_the_previous_piece(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sync save writes from the tensors' own memory, never page-aligned: the bounce copies must
    overlap the disk writes (issue 30: the copy had run before each write, adding its whole time)."""
    real_pwrite = os.pwrite
    copying_while_writing = threading.Event()
    first_write_started = threading.Event()
    writers: set[str] = set()
    real_put = local._Pipe.put

    def pwrite(fd: int, data: Any, offset: int) -> int:
        writers.add(threading.current_thread().name)
        if not first_write_started.is_set():
            first_write_started.set()
            # Held until the caller has staged a second piece: only possible if it copies meanwhile.
            copying_while_writing.wait(timeout=60)
        return real_pwrite(fd, data, offset)

    staged = [0]

    def put(self: Any, view: memoryview, offset: int, bounce: memoryview | None = None) -> None:
        staged[0] += 1
        if staged[0] >= 2 and first_write_started.is_set():
            copying_while_writing.set()
        real_put(self, view, offset, bounce)

    monkeypatch.setattr(local.os, "pwrite", pwrite)
    monkeypatch.setattr(local._Pipe, "put", put)
    big = _aligned(4 * BOUNCE_SIZE + 4096)
    store = LocalStore(tmp_path)
    source = big[1 : 1 + 4 * BOUNCE_SIZE]  # one byte off the page: every byte goes through a bounce buffer
    store.write_file("f.bin", [source])
    assert copying_while_writing.is_set(), "the second piece was staged only after the first was written"
    threads = {f"spotsafe-direct-write-{k}" for k in range(WRITERS)}
    assert writers != set() and writers <= threads, f"written from {writers}, not the writer threads {threads}"
    assert (tmp_path / "f.bin").read_bytes() == bytes(source), "the file's bytes differ from the buffer's"
    assert store.bounced_bytes == len(source), f"{store.bounced_bytes} of {len(source)} bytes bounced"


@needs_o_direct
def test_every_writer_gets_its_first_piece_after_a_short_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first staged pieces are small (local.RAMP), then whole bounce buffers: with whole 16 MiB
    pieces from the start, the fourth writer waited for four copies (7-14 ms) before its first write."""
    pieces: list[tuple[int, int]] = []
    real_put = local._Pipe.put

    def put(self: Any, view: memoryview, offset: int, bounce: memoryview | None = None) -> None:
        pieces.append((offset, len(view)))
        real_put(self, view, offset, bounce)

    monkeypatch.setattr(local._Pipe, "put", put)
    big = _aligned(5 * BOUNCE_SIZE)
    source = big[100 : 100 + 3 * BOUNCE_SIZE + 5000]  # unaligned: every byte is staged
    store = LocalStore(tmp_path)
    store.write_file("f.bin", [source])
    sizes = [n for _, n in sorted(pieces)]
    ramp = list(local.RAMP)
    assert ramp and ramp == sorted(ramp) and all(n % DIRECT_ALIGN == 0 for n in ramp), f"RAMP is {ramp}"
    assert sizes[: len(ramp)] == ramp, f"the first pieces are {sizes[: len(ramp)]} bytes, not {ramp}"
    assert set(sizes[len(ramp) : -1]) == {BOUNCE_SIZE}, f"the middle pieces are {sizes[len(ramp) : -1]} bytes"
    ends = [o + n for o, n in sorted(pieces)]
    assert [o for o, _ in sorted(pieces)] == [0, *ends[:-1]], f"the pieces {sorted(pieces)} leave gaps"
    assert (tmp_path / "f.bin").read_bytes() == bytes(source), "the file's bytes differ from the buffer's"


class _InFlight:
    """``os.pwrite`` or ``os.preadv`` counting the calls in flight at once; the call at offset 0 waits
    (up to 10 s) for a second to start, which with one thread never would."""

    def __init__(self, real: Callable[[int, Any, int], int]) -> None:
        self.real = real
        self.lock = threading.Lock()
        self.in_flight = 0
        self.most = 0
        self.overlapped = threading.Event()

    def __call__(self, fd: int, data: Any, offset: int) -> int:
        with self.lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
            if self.in_flight >= 2:
                self.overlapped.set()
        try:
            if offset == 0:
                self.overlapped.wait(timeout=10)
            return self.real(fd, data, offset)
        finally:
            with self.lock:
                self.in_flight -= 1


@needs_o_direct
@pytest.mark.parametrize("source", ["aligned", "unaligned"])
def test_two_pieces_of_one_file_are_on_their_way_to_the_disk_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    """One writer left the disk idle between pieces (a piece is only a few requests deep): a sync
    save stayed at 0.83-0.90x a bare O_DIRECT write. The writers overlap, and the bytes stay exact."""
    pwrite = _InFlight(os.pwrite)
    monkeypatch.setattr(local.os, "pwrite", pwrite)
    big = _aligned(6 * BOUNCE_SIZE + 4096)
    data = big[: 6 * BOUNCE_SIZE] if source == "aligned" else big[3 : 3 + 6 * BOUNCE_SIZE - 100]
    store = LocalStore(tmp_path)
    store.write_file("f.bin", [data])
    assert pwrite.most >= 2, f"at most {pwrite.most} write in flight at once ({WRITERS} writers)"
    assert (tmp_path / "f.bin").read_bytes() == bytes(data), "the file's bytes differ from the buffer's"


@needs_o_direct
def test_a_filesystem_that_refuses_o_direct_is_written_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every filesystem here takes O_DIRECT (tmpfs too, since Linux 6.6): refusing it is simulated.
    real_open = os.open

    def refusing_open(path: Any, flags: int, *args: Any) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr("spotsafe.storage.local.os.open", refusing_open)
    data = _aligned(DIRECT_MIN)
    store = LocalStore(tmp_path)
    store.write_file("f.bin", [data])
    assert (tmp_path / "f.bin").read_bytes() == bytes(data), "the fallback's bytes differ"
    assert store.direct_io is False, "the store keeps trying O_DIRECT after a refusal"
    assert store.direct_bytes == 0, f"{store.direct_bytes} bytes claimed to be direct"


@needs_o_direct
def test_o_direct_refused_mid_file_starts_over_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spotsafe.storage import local

    def half_then_refuse(fd: int, buffers: Any, bounce: memoryview) -> int:
        os.write(fd, b"partial garbage")
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(local, "_write_direct", half_then_refuse)
    data = _aligned(DIRECT_MIN)
    store = LocalStore(tmp_path)
    store.write_file("f.bin", [data])
    assert (tmp_path / "f.bin").read_bytes() == bytes(data), "the restart kept bytes of the refused attempt"
    assert store.direct_io is False, "the store keeps trying O_DIRECT after a refusal"


def test_spotsafe_direct_io_turns_it_off_and_a_bad_value_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPOTSAFE_DIRECT_IO", "0")
    store = LocalStore(tmp_path)
    store.write_file("f.bin", [_aligned(DIRECT_MIN)])
    assert store.direct_bytes == 0, "SPOTSAFE_DIRECT_IO=0 still wrote with O_DIRECT"
    monkeypatch.setenv("SPOTSAFE_DIRECT_IO", "maybe")
    with pytest.raises(ValueError, match="SPOTSAFE_DIRECT_IO must be 1 or 0, not 'maybe'"):
        LocalStore(tmp_path)


def _smaps_kb(view: memoryview, field: str) -> int | None:
    """``field`` (Rss, FilePmdMapped...) of the mapping holding ``view``, from /proc/self/smaps; None where not reported."""
    addr = ctypes.addressof(ctypes.c_char.from_buffer(view))
    lines = Path("/proc/self/smaps").read_text().splitlines()
    inside = False
    for line in lines:
        head = line.split()[0]
        if "-" in head and len(head.split("-")) == 2 and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and line.startswith(f"{field}:"):
            return int(line.split()[1])
    return None


def _file_pmd_mapped_kb(view: memoryview) -> int | None:
    return _smaps_kb(view, "FilePmdMapped")


@needs_o_direct
def test_a_read_maps_the_file_in_huge_pages_where_the_kernel_can(tmp_path: Path) -> None:
    """A cold read (as on a new instance) maps 2 MiB page-cache folios whole, not 4 KiB pages."""
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("transparent huge pages are off on this kernel")
    store = LocalStore(tmp_path)
    store.write_file("data.bin", [_aligned(16 << 20)])  # O_DIRECT: nothing of it is cached yet
    view = store.read_file("data.bin")
    bytes(view)  # read every page
    pmd_kb = _file_pmd_mapped_kb(view)
    if pmd_kb is None:
        pytest.skip("this kernel does not report FilePmdMapped")
    assert pmd_kb >= 8 << 10, f"only {pmd_kb} KiB of 16 MiB mapped in huge pages"


def _thp_mode() -> str | None:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not path.exists():
        return None
    text = path.read_text()
    return text[text.index("[") + 1 : text.index("]")]


@pytest.mark.parametrize("who", ["anonymous_buffer", "staging", "bounce"])
def test_buffers_the_disk_is_written_from_sit_in_huge_pages(tmp_path: Path, who: str) -> None:
    """Staging snapshots, bounce buffers, read buffers: 2 MiB pages, so the disk gets large requests.

    On the development VM a 1 GiB O_DIRECT write took 0.48 s from huge pages, 0.61-0.75 s from
    4 KiB pages (``mmap.mmap(-1, n)`` maps shared memory, which never gets them).
    """
    from spotsafe.checkpoint.staging import StagingBuffer
    from spotsafe.storage.base import HUGE_PAGE, anonymous_buffer

    n = 8 * HUGE_PAGE
    if who == "anonymous_buffer":
        view = anonymous_buffer(n)
    elif who == "staging":
        _, view = StagingBuffer(pin=False).get(n)
    else:
        view = LocalStore(tmp_path)._bounce()
        n = len(view)
    assert not view.readonly, f"{who}: read-only"
    assert ctypes.addressof(ctypes.c_char.from_buffer(view)) % DIRECT_ALIGN == 0, f"{who}: not page-aligned"
    assert bytes(view[:16]) == bytes(16), f"{who}: not zeroed"
    view[:] = b"\x01" * n  # fault every page in
    if _thp_mode() not in ("always", "madvise"):
        pytest.skip(f"transparent huge pages are {_thp_mode()!r} on this kernel")
    huge = _smaps_kb(view, "AnonHugePages")
    assert huge is not None, "no AnonHugePages for the mapping in /proc/self/smaps"
    assert huge >= (n // 2) >> 10, f"{who}: only {huge} KiB of {n >> 10} KiB in huge pages"


# -- streamed reads (a load straight into live tensors) -------------------------------------------


@pytest.mark.parametrize("direct_io", [True, False])
@pytest.mark.parametrize(
    "size", [0, 1, 4095, 4096, DIRECT_MIN - 1, DIRECT_MIN + 1, 3 * BOUNCE_SIZE + 123, 6 * BOUNCE_SIZE]
)
def test_a_streamed_read_hands_every_byte_once_in_order(tmp_path: Path, size: int, direct_io: bool) -> None:
    data = os.urandom(size)
    (tmp_path / "f.bin").write_bytes(data)
    store = LocalStore(tmp_path, direct_io=direct_io)
    got = bytearray()
    offsets: list[int] = []

    def consume(offset: int, piece: memoryview) -> None:
        assert offset == len(got), f"piece at {offset} after {len(got)} bytes"
        offsets.append(offset)
        got.extend(piece)

    store.read_file_through("f.bin", size, consume)
    assert bytes(got) == data, f"{len(got)} bytes came, {size} in the file (or they differ)"
    assert len(offsets) == -(-size // BOUNCE_SIZE), f"{len(offsets)} pieces for {size} bytes"


@needs_o_direct
def test_two_pieces_of_a_streamed_read_are_on_their_way_from_the_disk_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One reader would leave the disk idle while the caller hashes and copies each piece."""
    preadv = _InFlight(os.preadv)
    data = os.urandom(4 * BOUNCE_SIZE + 5)
    (tmp_path / "f.bin").write_bytes(data)
    monkeypatch.setattr(local.os, "preadv", preadv)
    got = bytearray()
    LocalStore(tmp_path).read_file_through("f.bin", len(data), lambda _o, piece: got.extend(piece))
    assert preadv.most >= 2, f"at most {preadv.most} read in flight at once"
    assert bytes(got) == data, "the bytes handed on differ from the file's"


def test_a_streamed_read_of_a_file_of_another_size_or_kind_says_what_it_found(tmp_path: Path) -> None:
    (tmp_path / "f.bin").write_bytes(b"x" * 100)
    os.mkfifo(tmp_path / "fifo")
    store = LocalStore(tmp_path)
    seen: list[int] = []
    with pytest.raises(CheckpointCorrupt, match=r"f\.bin: 100 bytes, expected 101"):
        store.read_file_through("f.bin", 101, lambda o, _p: seen.append(o))
    with pytest.raises(CheckpointNotFound, match=r"nothing\.bin"):
        store.read_file_through("nothing.bin", 1, lambda o, _p: seen.append(o))
    with pytest.raises(CheckpointCorrupt, match="not a regular file"):
        store.read_file_through("fifo", 1, lambda o, _p: seen.append(o))
    assert seen == [], f"pieces handed on from files that were refused: {seen}"


def test_a_file_that_shrinks_while_streamed_is_refused(tmp_path: Path) -> None:
    data = os.urandom(6 * BOUNCE_SIZE)
    path = tmp_path / "f.bin"
    path.write_bytes(data)

    def consume(offset: int, _piece: memoryview) -> None:
        if offset == 0:
            # The pieces already asked for may have come whole; the fifth is asked for after this.
            os.truncate(path, 2 * BOUNCE_SIZE + 10)

    with pytest.raises(CheckpointCorrupt, match="shrank while read"):
        LocalStore(tmp_path).read_file_through("f.bin", len(data), consume)


def test_a_failing_consumer_stops_the_read_and_hands_the_buffers_back(tmp_path: Path) -> None:
    data = os.urandom(5 * BOUNCE_SIZE)
    (tmp_path / "f.bin").write_bytes(data)
    store = LocalStore(tmp_path)

    def consume(offset: int, _piece: memoryview) -> None:
        if offset == BOUNCE_SIZE:
            raise RuntimeError("the hash thread died")

    with pytest.raises(RuntimeError, match="hash thread"):
        store.read_file_through("f.bin", len(data), consume)
    assert len(store._bounces) >= 4, f"{len(store._bounces)} buffers back in the pool"
    got = bytearray()
    store.read_file_through("f.bin", len(data), lambda _o, piece: got.extend(piece))
    assert bytes(got) == data, "the next read of the same store came out different"


class _HeldIO:
    """``os.pwrite`` or ``os.preadv`` counting the calls in flight; the first at or past ``hold_from``
    waits for :attr:`release` (up to 10 s) after setting :attr:`held`."""

    def __init__(self, real: Callable[[int, Any, int], int], hold_from: int) -> None:
        self.real, self.hold_from = real, hold_from
        self.lock = threading.Lock()
        self.in_flight = 0
        self.held, self.release = threading.Event(), threading.Event()

    def __call__(self, fd: int, data: Any, offset: int) -> int:
        with self.lock:
            self.in_flight += 1
            hold = offset >= self.hold_from and not self.held.is_set()
            if hold:
                self.held.set()
        try:
            if hold:
                self.release.wait(timeout=10)
            return self.real(fd, data, offset)
        finally:
            with self.lock:
                self.in_flight -= 1


def _interrupt_twice(io: _HeldIO, sent: list[int]) -> threading.Thread:
    """Ctrl-C once the held call waits, again while the caller waits for it, then let it go on."""
    main = threading.main_thread().ident
    assert main is not None and threading.current_thread() is threading.main_thread(), "not the main thread"

    def waiting_inside() -> bool:  # the main thread waits for its I/O threads, inside the store's call
        frame = sys._current_frames().get(main)
        names = []
        while frame is not None:
            names.append(frame.f_code.co_name)
            frame = frame.f_back
        waiting = names[:1] in (["wait"], ["join"], ["_wait_for_tstate_lock"]) or "_wait_out" in names
        return waiting and ("read_file_through" in names or "write_file" in names)

    def interrupter() -> None:
        try:
            if not io.held.wait(timeout=10):
                return
            time.sleep(0.1)
            signal.pthread_kill(main, signal.SIGINT)
            sent.append(1)
            time.sleep(0.1)
            deadline = time.monotonic() + 10
            while not waiting_inside() and time.monotonic() < deadline:
                time.sleep(0.01)
            if waiting_inside():  # never once the call is over: it would hit the test itself
                signal.pthread_kill(main, signal.SIGINT)
                sent.append(2)
                time.sleep(0.3)
        finally:
            io.release.set()

    thread = threading.Thread(target=interrupter, daemon=True)
    thread.start()
    return thread


@needs_o_direct
@pytest.mark.parametrize("direction", ["streamed read", "O_DIRECT write"])
def test_ctrl_c_lets_go_of_no_buffer_or_descriptor_an_io_thread_still_uses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direction: str
) -> None:
    """A Ctrl-C during a load or a save: its reader or writer threads may still fill the store's
    buffers (the next write's bounce buffers) or use its descriptor (once closed, its number is the
    next open's: a late pwrite lands in another file). They are waited for before the
    KeyboardInterrupt goes up, even when a second Ctrl-C comes while waiting."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("a KeyboardInterrupt reaches only the main thread")
    store = LocalStore(tmp_path)
    data = _aligned(5 * BOUNCE_SIZE)
    (tmp_path / "f.bin").write_bytes(data)
    io = _HeldIO(os.preadv if direction == "streamed read" else os.pwrite, 2 * BOUNCE_SIZE)
    monkeypatch.setattr(local.os, "preadv" if direction == "streamed read" else "pwrite", io)
    in_flight: list[int] = []
    sent: list[int] = []
    interrupter = _interrupt_twice(io, sent)
    with pytest.raises(KeyboardInterrupt):
        try:
            if direction == "streamed read":
                store.read_file_through("f.bin", len(data), lambda _o, _p: None)
            else:
                store.write_file("g.bin", [data[1:]])  # unaligned: through the bounce buffers
        finally:
            in_flight.append(io.in_flight)
    interrupter.join()
    assert io.held.is_set(), "no call was held: the test did not test anything"
    assert sent == [1, 2], f"Ctrl-C sent {len(sent)} time(s), not twice (the second while the store waited)"
    assert in_flight == [0], f"{in_flight[0]} {direction} call(s) still running when the KeyboardInterrupt came out"
    monkeypatch.undo()
    assert not (tmp_path / "g.bin").exists(), "an interrupted write left its file"
    got = bytearray()
    store.read_file_through("f.bin", len(data), lambda _o, piece: got.extend(piece))
    assert bytes(got) == bytes(data), "the store's next read came out different"


class _WriteHeldAtRename:
    """``store.write_file(path, [data])`` on its own thread, held at its rename (its temp file
    written) until :meth:`finish`; what it raised is kept in :attr:`errors`."""

    def __init__(self, store: LocalStore, path: str, data: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
        real_replace = os.replace
        self.renaming, self.go_on = threading.Event(), threading.Event()
        self.errors: list[BaseException] = []

        def replace(src: Any, dst: Any) -> None:
            if str(dst).endswith(path.rsplit("/", 1)[-1]):
                self.renaming.set()
                self.go_on.wait(timeout=10)  # the other store cleans up meanwhile
            real_replace(src, dst)

        def write() -> None:
            try:
                store.write_file(path, [data])
            except BaseException as e:  # reported by the test
                self.errors.append(e)

        monkeypatch.setattr(local.os, "replace", replace)
        self.thread = threading.Thread(target=write)

    def start(self) -> None:
        self.thread.start()
        assert self.renaming.wait(timeout=10), "the write never reached its rename"

    def finish(self) -> None:
        self.go_on.set()
        self.thread.join(timeout=10)


def test_a_temp_file_another_store_of_this_process_is_writing_is_not_cleaned_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Run's checkpointer and its event log are two stores on one directory: the checkpointer's
    retention (after every save, in the background) removed the event log's temp file before its
    rename, and the flush failed with ENOENT (CI caught it: an event lost, a fenced run restarted)."""
    writer, cleaner = LocalStore(tmp_path), LocalStore(tmp_path)
    held = _WriteHeldAtRename(writer, "events/events.json", b"{}", monkeypatch)
    held.start()
    cleaner.cleanup_incomplete()
    held.finish()
    assert not held.errors, f"the write failed after the other store's cleanup: {held.errors[0]!r}"
    assert (tmp_path / "events" / "events.json").read_bytes() == b"{}"


def test_a_temp_file_created_while_the_cleanup_walks_is_not_cleaned_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cleanup once took its list of this process's temp files before walking the store: one
    created during the walk looked like a dead writer's."""
    writer, cleaner = LocalStore(tmp_path), LocalStore(tmp_path)
    held = _WriteHeldAtRename(writer, "events/late.json", b"[]", monkeypatch)
    real_walk = os.walk

    def walk(top: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        held.start()  # the temp file appears after the cleanup began, before it looks
        yield from real_walk(top, *args, **kwargs)

    monkeypatch.setattr(local.os, "walk", walk)
    cleaner.cleanup_incomplete()
    held.finish()
    assert not held.errors, f"the write failed after the cleanup: {held.errors[0]!r}"
    assert (tmp_path / "events" / "late.json").read_bytes() == b"[]"
