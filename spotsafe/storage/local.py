"""A store in a local directory (typically on the persistent EBS volume).

Payload files are written under a temp name in their own directory, fsynced and
renamed; a commit (the manifest) is a temp file + fsync + ``os.replace`` +
fsync of the directory, so a reader sees all of it or nothing even across a
power cut. :meth:`LocalStore.read_file` maps a file privately (copy-on-write);
:meth:`LocalStore.read_file_through` streams one past the page cache, as a load reads a
checkpoint's data file (into live tensors or fresh memory: ``spotsafe.checkpoint.places``).

Large payload files are written with ``O_DIRECT`` (Linux), past the page cache: a
page-aligned source (the async save's snapshot buffer) goes from memory to the
disk with no copy, any other source (a sync save's tensors) through small reused aligned
bounce buffers, each copied while two writer threads write the previous ones to the disk, so
the copy costs no time beside the disk's and the disk always has the next piece queued.
A checkpoint then neither evicts the page cache the training reads its data from,
nor waits for a gigabyte of new cache pages to be allocated and written back (on
a VM whose idle memory the host reclaims, allocating those pages was most of a
buffered write's time). Filesystems that refuse ``O_DIRECT`` (tmpfs, some FUSE
mounts) get the page cache, as does everything under ``DIRECT_MIN`` bytes;
``SPOTSAFE_DIRECT_IO=0`` (or ``LocalStore(direct_io=False)``) turns it off.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import queue
import re
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from spotsafe.errors import CheckpointCorrupt, CheckpointNotFound, StoreError
from spotsafe.processes import pid_alive
from spotsafe.storage.base import DIRECT_ALIGN, Buffer, Store, anonymous_buffer

#: Largest single os.write: big enough to stream at disk speed, small enough to
#: stay well under the kernel's 2 GiB per-call cap.
WRITE_CHUNK = 32 << 20

#: Payload files at least this big are written with ``O_DIRECT``; smaller ones (trees,
#: manifests, leases) through the page cache, where a copy costs less than a disk wait.
DIRECT_MIN = 8 << 20
#: Size of each reused bounce buffer that stages unaligned sources for ``O_DIRECT``, and how
#: many one write uses: one is filled while the others are written (96 MiB per store, kept).
BOUNCE_SIZE = 16 << 20
BOUNCES = 6
#: Threads that write one file's ``O_DIRECT`` pieces, each at its own offset: while one waits for
#: its piece to reach the disk, the next are already queued there (one writer leaves the disk idle
#: between pieces: a piece is only a few requests). 16 MiB bounces with two writers took a sync
#: save from 0.83-0.90x a bare ``O_DIRECT`` write to 0.88-0.96x; four writers and six bounces
#: from 0.87-0.94x to 0.94-1.00x (the bounce path alone, two interleaved A/Bs: benchmarks/README.md).
WRITERS = 4
#: Sizes of a write's first staged pieces (then whole bounce buffers): each writer gets its first
#: piece after a short copy instead of one whole buffer's copy after another (with 16 MiB pieces
#: the fourth writer waited 7-14 ms for its first while the disk had one to three in flight).
RAMP: tuple[int, ...] = (1 << 20, 2 << 20, 4 << 20, 8 << 20)
#: Threads that read one streamed file's pieces (:meth:`LocalStore.read_file_through`), each into
#: one of the :data:`BOUNCES` reused bounce buffers, while the caller takes the pieces already in.
READERS = 2
_O_DIRECT: int = getattr(os, "O_DIRECT", 0)
#: madvise(2) for a file mapped to be read: huge pages first (Linux reads the file ahead into
#: 2 MiB page-cache folios and maps them whole: fewer faults), then sequential read-ahead of all
#: of it. Advice a platform lacks is skipped. (Its earlier figure, 0.12 s instead of 0.21 s for a
#: cold verified 1 GiB load, was measured with an eviction later found not to work; reading the
#: mapping in first with MADV_POPULATE_READ, or advising nothing, was tried on 2026-12-06 and
#: measured no better in the full bench: benchmarks/README.md.)
_READ_ADVICE: tuple[int, ...] = tuple(
    getattr(mmap, name) for name in ("MADV_HUGEPAGE", "MADV_SEQUENTIAL", "MADV_WILLNEED") if hasattr(mmap, name)
)

#: Temp files this process is writing right now, through any of its stores. Process-wide: two
#: stores on one directory (a Run's checkpointer and its event log) each clean up killed writers'
#: temp files, and one of this process that the *other* store was writing is not a killed writer's
#: (per store, and looked up before the walk, a retention after a save removed an event log's temp
#: file before its rename).
_ACTIVE: set[Path] = set()
_ACTIVE_LOCK = threading.Lock()

_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]+$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return f"mode {mode:o}"


def _direct_io_default() -> bool:
    value = os.environ.get("SPOTSAFE_DIRECT_IO", "1").strip().lower()
    if value in ("1", "true", "yes", "on", ""):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"SPOTSAFE_DIRECT_IO must be 1 or 0, not {value!r}")


def _address(view: memoryview) -> int | None:
    """Where a writable byte view's first byte lives; None for a read-only or empty one."""
    if view.readonly or not len(view):
        return None
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def _write_fully(fd: int, view: memoryview) -> None:
    pos, end = 0, len(view)
    while pos < end:
        pos += os.write(fd, view[pos : pos + WRITE_CHUNK])


def _clear_direct(fd: int) -> None:
    """Take ``O_DIRECT`` off an open file: what follows goes through the page cache."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)


def _write_buffered(fd: int, buffers: Sequence[Buffer]) -> None:
    for buf in buffers:
        _write_fully(fd, memoryview(buf).cast("B"))


def _pwrite_fully(fd: int, view: memoryview, offset: int) -> None:
    pos, end = 0, len(view)
    while pos < end:
        pos += os.pwrite(fd, view[pos : pos + WRITE_CHUNK], offset + pos)


class _Pipe:
    """Threads that write queued views at their file offsets (:data:`WRITERS` of them).

    While they write pieces to the disk, the caller copies the next into a free bounce
    buffer: an unaligned source costs the copy *beside* the disk's time, not on top of it.
    Pieces never overlap, so the order in which the writers finish them does not matter.
    """

    def __init__(self, fd: int, bounces: Sequence[memoryview], writers: int = WRITERS) -> None:
        self.fd = fd
        self.free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        for b in bounces:
            self.free.put(b)
        self.todo: queue.SimpleQueue[tuple[memoryview, int, memoryview | None] | None] = queue.SimpleQueue()
        self.error: BaseException | None = None
        # Set by each writer as it exits; waited for instead of Thread.join, which Python 3.11 lets
        # return early once a KeyboardInterrupt has broken into it (the thread is marked stopped).
        self.exited = [threading.Event() for _ in range(writers)]
        self.closing = False
        for k in range(writers):
            threading.Thread(target=self._run, args=(k,), name=f"spotsafe-direct-write-{k}", daemon=True).start()

    def _run(self, k: int) -> None:
        try:
            while True:
                item = self.todo.get()
                if item is None:
                    return
                view, offset, bounce = item
                if self.error is None:
                    try:
                        _pwrite_fully(self.fd, view, offset)
                    except BaseException as e:  # noqa: BLE001 - raised in the caller's thread by finish()
                        if self.error is None:
                            self.error = e
                if bounce is not None:
                    self.free.put(bounce)  # always handed back: the caller may be waiting for it
        finally:
            self.exited[k].set()

    def put(self, view: memoryview, offset: int, bounce: memoryview | None = None) -> None:
        if self.error is not None:
            raise self.error
        self.todo.put((view, offset, bounce))

    def finish(self) -> None:
        """Wait for every queued write; raise the first error."""
        _wait_out(self._join)
        if self.error is not None:
            raise self.error

    def _join(self) -> None:
        if not self.closing:  # once, and inside the wait: a second Ctrl-C here must not skip it
            self.closing = True
            for _ in self.exited:
                self.todo.put(None)
        for exited in self.exited:
            exited.wait()


def _wait_out(wait: Callable[[], None]) -> None:
    """Run ``wait`` (a join of I/O threads) to its end even through a ``KeyboardInterrupt``, then raise it.

    Until those threads are done they may still read into buffers the store is about to hand to
    the next write, or use a descriptor about to be closed (its number reused by the next open:
    a late ``pwrite`` would land in another file).
    """
    caught: BaseException | None = None
    while True:
        try:
            wait()
        except Exception:
            raise  # a failing wait is not retried (it would spin); only what a signal raises is
        except BaseException as e:  # noqa: BLE001 - KeyboardInterrupt, SystemExit: raised once the threads are done
            caught = caught or e
            continue
        break
    if caught is not None:
        raise caught


def _pread_upto(fd: int, view: memoryview, offset: int, n: int) -> int:
    """Read up to ``n`` bytes at ``offset`` into ``view`` (which may be longer: ``O_DIRECT`` reads whole
    blocks, the last one past the end of the file); how many of the ``n`` came (fewer: the file ended)."""
    got = 0
    while got < n:
        k = os.preadv(fd, [view[got:]], offset + got)
        if k == 0:
            break
        got += k
    return min(got, n)


def _threads_gone(prefix: str) -> None:
    """Wait until no thread named ``prefix...`` is started or running (``threading.enumerate`` lists
    both; ``Thread.join`` is no use here: Python 3.11 lets it return early after a
    ``KeyboardInterrupt`` broke into it, marking a running thread stopped)."""
    while any(t.name.startswith(prefix) for t in threading.enumerate()):
        time.sleep(0.001)


def _read_pieces(
    fd: int,
    done: list[int],
    size: int,
    buffers: Sequence[memoryview],
    consume: Callable[[int, memoryview], None],
    where: Path,
) -> None:
    """Bytes ``done[0]`` to ``size`` of ``fd`` to ``consume``, piece by piece in file order.

    :data:`READERS` threads read the next pieces into the free ``buffers`` while ``consume``
    takes the one in order (a piece's buffer is read into again once ``consume`` returned).
    ``done[0]`` follows what ``consume`` has taken: after a failure, where to go on from.
    """
    pending: collections.deque[tuple[int, int, memoryview, Future[int]]] = collections.deque()
    prefix = f"spotsafe-direct-read-{uuid.uuid4().hex[:8]}"  # this read's threads, to wait for by name
    pool = ThreadPoolExecutor(max_workers=READERS, thread_name_prefix=prefix)
    ahead = done[0]

    def submit(buf: memoryview) -> None:
        nonlocal ahead
        n = min(len(buf), size - ahead)
        pending.append((ahead, n, buf, pool.submit(_pread_upto, fd, buf, ahead, n)))
        ahead += n

    try:
        for buf in buffers:
            if ahead < size:
                submit(buf)
        while pending:
            offset, n, buf, future = pending.popleft()
            got = future.result()
            if got != n:
                raise CheckpointCorrupt(f"{where}: ends at byte {offset + got}, {size} expected (it shrank while read)")
            consume(offset, buf[:n])
            done[0] = offset + n
            if ahead < size:
                submit(buf)
    finally:
        # No read lands in a buffer after it is handed back: the reads not started are dropped, and
        # every thread of this read is waited for, even a read whose future a Ctrl-C inside submit()
        # kept from being returned (and through a second Ctrl-C).
        _wait_out(lambda: _stop_reading(pool, prefix))


def _stop_reading(pool: ThreadPoolExecutor, prefix: str) -> None:
    pool.shutdown(wait=False, cancel_futures=True)
    _threads_gone(prefix)


def _write_direct(fd: int, buffers: Sequence[Buffer], bounces: Sequence[memoryview]) -> int:
    """Write the concatenation of ``buffers`` from offset 0 of ``fd``, opened with ``O_DIRECT``.

    Page-aligned runs of a writable source go straight from memory; the rest is staged
    in the ``bounces`` (page-aligned, each a multiple of :data:`DIRECT_ALIGN`), filled
    while writer threads (:class:`_Pipe`) write the previous ones. Every piece written
    with ``O_DIRECT`` starts and ends on a block boundary of the file. The last partial
    block is written through the page cache (``O_DIRECT`` cleared) after all the rest.
    Returns how many of the bytes written with ``O_DIRECT`` were staged in a bounce buffer.
    """
    pipe = _Pipe(fd, bounces)
    fill = staged = offset = pieces = 0
    bounce: memoryview | None = None
    limit = 0  # where the piece being staged in ``bounce`` is cut off (see RAMP)
    try:
        for buf in buffers:
            view = memoryview(buf).cast("B")
            addr = _address(view)
            pos, end = 0, len(view)
            while pos < end:
                if fill == 0 and addr is not None and (addr + pos) % DIRECT_ALIGN == 0 and end - pos >= DIRECT_ALIGN:
                    n = min(WRITE_CHUNK, (end - pos) // DIRECT_ALIGN * DIRECT_ALIGN)
                    pipe.put(view[pos : pos + n], offset)
                    offset += n
                    pos += n
                    continue
                if bounce is None:
                    bounce = pipe.free.get()
                    limit = min(RAMP[pieces], len(bounce)) if pieces < len(RAMP) else len(bounce)
                take = min(limit - fill, end - pos)
                dest = _address(bounce)
                if addr is not None and dest is not None:
                    # ctypes calls release the GIL (a slice assignment holds it for the whole copy:
                    # the writer threads could not queue their next piece meanwhile, and the disk
                    # idled a few ms per piece).
                    ctypes.memmove(dest + fill, addr + pos, take)
                else:
                    bounce[fill : fill + take] = view[pos : pos + take]
                fill += take
                pos += take
                if fill == limit:
                    pipe.put(bounce[:fill], offset, bounce)
                    offset += fill
                    staged += fill
                    pieces += 1
                    fill, bounce = 0, None
        whole = fill // DIRECT_ALIGN * DIRECT_ALIGN
        if bounce is not None and whole:
            pipe.put(bounce[:whole], offset)
            offset += whole
            staged += whole
    finally:
        pipe.finish()
    if bounce is not None and fill > whole:
        _clear_direct(fd)
        _pwrite_fully(fd, bounce[whole:fill], offset)
    return staged


class LocalStore(Store):
    """A directory as a store. ``path`` need not exist yet; it is created on the first write."""

    def __init__(self, path: str | os.PathLike[str], *, direct_io: bool | None = None) -> None:
        """``direct_io``: write payload files of :data:`DIRECT_MIN` bytes or more with ``O_DIRECT``
        (default: on unless ``SPOTSAFE_DIRECT_IO=0``; a filesystem that refuses it is written
        through the page cache)."""
        text = os.fspath(path)
        if not text.strip():
            raise ValueError("the store path is empty (give a directory, e.g. /mnt/spotsafe/runs/exp1)")
        self.root = Path(os.path.abspath(os.path.expanduser(text)))
        self.url = str(self.root)
        self.local_dir = self.root
        # A path that is (or lies under) a regular file can never hold checkpoints: say so
        # now, not at the first save minutes into training.
        d = self.root
        while not os.path.lexists(d) and d.parent != d:
            d = d.parent
        if os.path.exists(d) and not os.path.isdir(d):
            raise StoreError(errno.ENOTDIR, f"{self.url}: cannot be a store: {d} is not a directory", str(d))
        self._lock = threading.Lock()
        self.direct_io = (_direct_io_default() if direct_io is None else direct_io) and bool(_O_DIRECT)
        self._bounces: list[memoryview] = []  # idle bounce buffers, reused (fresh pages cost a fault each)
        self._streams: bool | None = None  # streams_reads set by hand
        #: Bytes written past the page cache so far, and how many of them were first staged in a
        #: bounce buffer (the rest went from the caller's memory to the disk without a copy).
        self.direct_bytes = 0
        self.bounced_bytes = 0

    # -- helpers ----------------------------------------------------------------
    def _full(self, path: str) -> Path:
        parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
        if any(p == ".." for p in parts):
            raise ValueError(f"{self.url}: path {path!r} leaves the store")
        return self.root.joinpath(*parts)

    def _error(self, action: str, path: Path, e: OSError) -> StoreError:
        cause = os.strerror(e.errno) if e.errno else str(e)
        err = StoreError(e.errno or errno.EIO, f"cannot {action} {path}: {cause}")
        err.filename = str(path)
        return err

    def _makedirs(self, directory: Path) -> None:
        """Create ``directory`` and its missing parents durably (each new entry's parent fsynced)."""
        missing: list[Path] = []
        d = directory
        while not d.exists():
            missing.append(d)
            if d.parent == d:
                break
            d = d.parent
        if d.exists() and not d.is_dir():
            raise StoreError(errno.ENOTDIR, f"cannot create the store directory {directory}: {d} is not a directory")
        for d in reversed(missing):
            try:
                d.mkdir(exist_ok=True)
            except OSError as e:
                raise self._error("create the store directory", d, e) from e
            _fsync_dir(d.parent)

    @contextlib.contextmanager
    def _temp(self, target: Path) -> Iterator[Path]:
        """A temp name beside ``target``, listed in :data:`_ACTIVE` while the block runs (so that no
        cleanup by this process's stores takes it for a killed writer's), and removed after it
        (gone already where the block renamed it into place)."""
        temp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}")
        with _ACTIVE_LOCK:
            _ACTIVE.add(temp)
        try:
            yield temp
        finally:
            with contextlib.suppress(OSError):
                temp.unlink()
            with _ACTIVE_LOCK:
                _ACTIVE.discard(temp)

    def _bounce(self) -> memoryview:
        with self._lock:
            if self._bounces:
                return self._bounces.pop()
        return anonymous_buffer(BOUNCE_SIZE)  # page-aligned, huge pages where the kernel gives them

    def _give_back(self, buffers: Sequence[memoryview]) -> None:
        """Keep at most :data:`BOUNCES` idle buffers (what one write uses): a load's extra one, or a
        write's beside a read, is let go rather than held for the rest of the run."""
        with self._lock:
            self._bounces.extend(buffers)
            del self._bounces[BOUNCES:]

    def _open_payload(self, temp: Path, direct: bool) -> tuple[int, bool]:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        if direct:
            try:
                return os.open(temp, flags | _O_DIRECT, 0o644), True
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.direct_io = False  # tmpfs, some FUSE mounts: the page cache from now on
        return os.open(temp, flags, 0o644), False

    def _write_payload(self, fd: int, buffers: Sequence[Buffer], direct: bool) -> None:
        """Write ``buffers`` to the new file ``fd``, with ``O_DIRECT`` when ``direct``."""
        if not direct:
            _write_buffered(fd, buffers)
            return
        bounces = [self._bounce() for _ in range(BOUNCES)]
        try:
            staged = _write_direct(fd, buffers, bounces)
            size = sum(memoryview(b).nbytes for b in buffers)
            with self._lock:
                self.direct_bytes += size // DIRECT_ALIGN * DIRECT_ALIGN
                self.bounced_bytes += staged
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            # Opened, but the filesystem (or a block size over DIRECT_ALIGN) refuses the writes:
            # start over through the page cache, and stop trying on this store.
            self.direct_io = False
            _clear_direct(fd)
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            _write_buffered(fd, buffers)
        finally:
            self._give_back(bounces)

    def _write_durably(self, target: Path, buffers: Sequence[Buffer], *, sync_dir: bool) -> None:
        self._makedirs(target.parent)
        with self._temp(target) as temp:
            size = sum(memoryview(b).nbytes for b in buffers)
            try:
                fd, direct = self._open_payload(temp, self.direct_io and size >= DIRECT_MIN)
            except OSError as e:
                raise self._error("write", target, e) from e
            try:
                self._write_payload(fd, buffers, direct)
                os.fsync(fd)
            except OSError as e:
                raise self._error("write", target, e) from e
            finally:
                os.close(fd)
            try:
                os.replace(temp, target)
                if sync_dir:
                    _fsync_dir(target.parent)
            except OSError as e:
                raise self._error("write", target, e) from e

    # -- Store --------------------------------------------------------------------
    def listdir(self, path: str = "") -> list[str]:
        try:
            return [n for n in os.listdir(self._full(path)) if not _TEMP.match(n)]
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as e:
            raise self._error("list", self._full(path), e) from e

    def write_file(self, path: str, buffers: Sequence[Buffer]) -> None:
        # Payload: the manifest's commit fsyncs the checkpoint directory, which makes a rename
        # there durable too; a file one level deeper (DCP shards under step-N/dcp/) needs its
        # own directory fsynced, or the manifest could outlive it after a power cut.
        nested = path.strip("/").count("/") > 1
        self._write_durably(self._full(path), buffers, sync_dir=nested)

    def commit_file(self, path: str, data: bytes) -> None:
        self._write_durably(self._full(path), [data], sync_dir=True)

    def create_file(self, path: str, data: bytes) -> bool:
        # Whole content under a temp name first, then link(): atomic and exclusive (EEXIST),
        # also on NFS/EFS, so no reader ever sees a half-written lease.
        target = self._full(path)
        self._makedirs(target.parent)
        with self._temp(target) as temp:
            try:
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                try:
                    _write_fully(fd, memoryview(data).cast("B"))
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.link(temp, target)
            except FileExistsError:
                return False
            except OSError as e:
                raise self._error("create", target, e) from e
            _fsync_dir(target.parent)
            return True

    def _inside(self, full: Path) -> Path:
        """``full`` with every symbolic link resolved; CheckpointCorrupt when that leaves the store."""
        real = Path(os.path.realpath(full))
        root = Path(os.path.realpath(self.root))
        if real != root and root not in real.parents:
            raise CheckpointCorrupt(f"{full}: a symbolic link leads out of the store (to {real}); not read")
        return real

    def _open_regular(self, path: str) -> tuple[int, Path]:
        """Open ``path`` for reading: a regular file inside the store, never blocking.

        A FIFO, a device, a directory or a symbolic link leading out of the store is
        refused (CheckpointCorrupt) before anything could block or read outside.
        """
        full = self._full(path)
        real = self._inside(full)
        try:
            st = os.lstat(real)
        except (FileNotFoundError, NotADirectoryError) as e:
            raise CheckpointNotFound(errno.ENOENT, f"{full} does not exist", str(full)) from e
        except OSError as e:
            raise self._error("read", full, e) from e
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointCorrupt(f"{full}: not a regular file ({_kind(st.st_mode)}); not read")
        try:
            # O_NONBLOCK and O_NOFOLLOW: a file swapped for a FIFO or a link after the check still cannot hang or escape.
            fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW)
        except FileNotFoundError as e:
            raise CheckpointNotFound(errno.ENOENT, f"{full} does not exist", str(full)) from e
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise CheckpointCorrupt(f"{full}: became a symbolic link while being opened; not read") from e
            raise self._error("read", full, e) from e
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise CheckpointCorrupt(f"{full}: not a regular file ({_kind(mode)}); not read")
        return fd, full

    def read_file(self, path: str) -> memoryview:
        fd, full = self._open_regular(path)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                return memoryview(b"")
            # Private, copy-on-write: tensors built on it are writable, and a write never reaches the file.
            mm = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            raise self._error("read", full, e) from e
        finally:
            os.close(fd)
        for advice in _READ_ADVICE:
            try:
                mm.madvise(advice)
            except OSError:
                pass
        return memoryview(mm)

    @property
    def streams_reads(self) -> bool:
        # Where read_file alone is overridden or patched (to count, wrap or change reads), that one
        # keeps seeing the data files: they are streamed only if read_file_through is wrapped too.
        if self._streams is not None:
            return self._streams
        own_read = getattr(self.read_file, "__func__", None) is LocalStore.read_file
        own_stream = getattr(self.read_file_through, "__func__", None) is LocalStore.read_file_through
        return own_read or not own_stream

    @streams_reads.setter
    def streams_reads(self, value: bool) -> None:  # a caller may still turn streaming off (or on) by hand
        self._streams = bool(value)

    def read_file_through(self, path: str, size: int, consume: Callable[[int, memoryview], None]) -> None:
        """:meth:`Store.read_file_through` with reader threads, past the page cache (``O_DIRECT``).

        A load that writes what it reads into memory it already has (a live model's tensors)
        then costs the disk's read and a copy beside it, and neither fills the page cache
        nor faults in a gigabyte of fresh pages to put the file in (which cost this VM more
        than the read itself: benchmarks/README.md). Small files and filesystems that refuse
        ``O_DIRECT`` are read through the page cache, the same way.
        """
        fd, full = self._open_regular(path)
        try:
            actual = os.fstat(fd).st_size
            if actual != size:
                raise CheckpointCorrupt(f"{full}: {actual} bytes, expected {size}")
            if self.direct_io and size >= DIRECT_MIN:
                try:
                    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | _O_DIRECT)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise self._error("read", full, e) from e
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            buffers = [self._bounce() for _ in range(min(BOUNCES, -(-size // BOUNCE_SIZE)))]
            done = [0]
            try:
                _read_pieces(fd, done, size, buffers, consume, full)
            except OSError as e:
                if e.errno != errno.EINVAL or not fcntl.fcntl(fd, fcntl.F_GETFL) & _O_DIRECT:
                    raise self._error("read", full, e) from e
                # Opened, but the filesystem refuses the reads themselves: the rest through the page cache.
                _clear_direct(fd)
                try:
                    _read_pieces(fd, done, size, buffers, consume, full)
                except OSError as again:
                    raise self._error("read", full, again) from again
            finally:
                self._give_back(buffers)
        finally:
            os.close(fd)

    def file_size(self, path: str) -> int | None:
        full = self._full(path)
        try:
            st = os.lstat(self._inside(full))
        except CheckpointCorrupt:
            return None  # outside the store: not a file of this store
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise self._error("stat", full, e) from e
        return st.st_size if stat.S_ISREG(st.st_mode) else None  # a directory, FIFO or device is not a file

    def delete_dir(self, path: str) -> None:
        full = self._full(path)
        if full == self.root:
            raise ValueError(f"{self.url}: refusing to delete the store root")
        if full.is_symlink():
            # A link planted in the store: remove the link, never what it points at.
            try:
                full.unlink()
            except FileNotFoundError:
                return
            except OSError as e:
                raise self._error("delete", full, e) from e
            return
        manifest = full / "manifest.json"
        try:
            manifest.unlink()  # first: a half-deleted checkpoint must not look complete
            _fsync_dir(full)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            pass  # nothing to unlink first (a "manifest" that is a directory goes with the rest)
        except OSError as e:
            raise self._error("delete", manifest, e) from e
        try:
            shutil.rmtree(full)
        except FileNotFoundError:
            return
        except OSError as e:
            raise self._error("delete", full, e) from e
        try:
            _fsync_dir(full.parent)
        except OSError:
            pass

    def cleanup_incomplete(self) -> None:
        """Remove temp files left by killed writers (never one a live process is writing)."""
        if not self.root.is_dir():
            return
        me = os.getpid()
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                m = _TEMP.match(name)
                if not m:
                    continue
                full = Path(dirpath) / name
                pid = int(m.group("pid"))
                if pid != me and pid_alive(pid):
                    continue
                # Looked up at the unlink, under the lock (a writer registers its temp file before
                # creating it): a snapshot taken before the walk missed temp files created during it.
                with _ACTIVE_LOCK:
                    if full in _ACTIVE:
                        continue
                    try:
                        full.unlink()
                    except OSError:
                        pass
