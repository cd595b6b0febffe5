"""The storage interface every backend honours (it imports nothing of spotsafe but its errors).

A store is a flat namespace of files under one root, addressed by relative
``/``-separated paths (``step-000000001200/manifest.json``). The checkpointer
decides the layout; a store only moves bytes, durably. The interface is kept to
what *every* backend (a local directory, S3, any fsspec filesystem, a mirror of
two) can really do: nothing here may raise NotImplementedError.

Backends live beside this module; :mod:`spotsafe.storage.registry` picks one for a URL.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Executor, Future, wait
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spotsafe.errors import CheckpointCorrupt

if TYPE_CHECKING:
    from typing_extensions import Self


log = logging.getLogger(__name__)

#: The alignment of memory address, file offset and length that ``O_DIRECT`` wants: 4096 suits
#: every logical block size in use (512 and 4096 bytes). Staging buffers start on it so that a
#: local store can write them past the page cache without a copy.
DIRECT_ALIGN = 4096

Buffer = bytes | bytearray | memoryview

#: Transparent huge pages: the size of one, and the alignment :func:`anonymous_buffer` gives.
HUGE_PAGE = 2 << 20


def anonymous_buffer(nbytes: int, *, huge_pages: bool = True) -> memoryview:
    """``nbytes`` of private anonymous memory, zeroed lazily, writable, page-aligned (``DIRECT_ALIGN``).

    ``huge_pages``: a buffer of ``HUGE_PAGE`` or more starts on a huge-page boundary and is
    advised ``MADV_HUGEPAGE``. For buffers allocated once and reused (staging, snapshots,
    bounce buffers), which the disk is written from: physically contiguous 2 MiB pages let
    the kernel send it large requests (a request holds a limited number of segments); on the
    development VM a 1 GiB ``O_DIRECT`` write from such a buffer took 0.48 s against 0.61-0.75 s
    from 4 KiB pages. Not for a buffer allocated per load and filled at once (downloads):
    there, finding free 2 MiB pages in a busy machine's memory cost more than it saved (a
    512 MiB S3 load at 0.46-0.57x the server's egress with them, 0.88x without).
    Private either way: ``mmap.mmap(-1, n)`` alone maps *shared* memory, slower to fault in
    (0.73 s against 0.51 s for 512 MiB filled by 8 threads) and never in huge pages.
    """
    if nbytes <= 0:
        return memoryview(bytearray())
    if nbytes < HUGE_PAGE or not huge_pages:
        return memoryview(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))
    mm = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    first = ctypes.c_char.from_buffer(mm)
    start = -ctypes.addressof(first) % HUGE_PAGE
    del first
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        try:
            mm.madvise(advice, start, nbytes - nbytes % HUGE_PAGE)
        except (OSError, ValueError):
            pass  # advice only: 4 KiB pages, as before
    return memoryview(mm)[start : start + nbytes]  # the view keeps the mapping alive


def run_all(pool: Executor, tasks: Sequence[Callable[[], Any]]) -> list[Any]:
    """Run ``tasks`` on ``pool``; their results in order. At the first failure the tasks not
    started are cancelled, those running finish (their calls are bounded), and it is raised."""
    futures: list[Future[Any]] = [pool.submit(fn) for fn in tasks]
    try:
        _, pending = wait(futures, return_when=FIRST_EXCEPTION)
        if pending:
            for f in pending:
                f.cancel()
            wait(pending)
        for f in futures:
            if f.done() and not f.cancelled() and f.exception() is not None:
                raise f.exception()  # type: ignore[misc]
        return [f.result() for f in futures]
    except BaseException:
        for f in futures:
            f.cancel()
        raise


class Store(ABC):
    """Where checkpoints live. Paths are relative to the store's root."""

    #: The root, as the user would write it (a path or a URL); used in every error message.
    url: str

    #: Payloads larger than this are better written as several files of at most this
    #: size (an object store: one PUT each, in parallel, with no multipart assembly at
    #: the end). None: one file, whatever its size (a local disk gains nothing).
    segment_size: int | None = None

    #: A directory on this machine that holds the store (a local store), or None.
    local_dir: Path | None = None

    #: True when the backend itself verifies, once per store, that its server refuses a second
    #: exclusive create (S3's conditional-write probe); otherwise the writer lease checks it
    #: through :meth:`create_file` before its first takeover (``spotsafe.checkpoint.lease``).
    verifies_exclusive_create: bool = False

    #: True when a :meth:`write_file` that returned means the object exists, whole, with its size
    #: (an object store's PUT or multipart completion is atomic): the commit then need not list
    #: the files this process just wrote (``spotsafe.checkpoint.files.commit_manifest``). False
    #: for local directories (their listing costs microseconds) and generic fsspec stores.
    confirms_writes: bool = False

    @property
    def tiers(self) -> tuple[Store, ...]:
        """The stores a commit lands in, in commit order: ``(self,)``; a mirror's local then remote tier.

        Readers fall back along them; the writer lease keeps a generation on each.
        """
        return (self,)

    def set_fence(self, check: Callable[[], None]) -> None:  # noqa: B027 - optional: only background committers call it
        """Have the store call ``check`` before it publishes a manifest on a tier of its own accord.

        ``check`` raises :class:`spotsafe.errors.WriterFenced` when a newer writer owns the store.
        Only a store that commits in the background (a mirror's upload) needs it; the default
        does nothing.
        """

    @abstractmethod
    def listdir(self, path: str = "") -> list[str]:
        """Names directly under ``path`` (files and directories), in no particular order.

        A missing ``path`` gives an empty list. Does I/O.
        """

    @abstractmethod
    def write_file(self, path: str, buffers: Sequence[Buffer]) -> None:
        """Write the concatenation of ``buffers`` as ``path``, durable when this returns.

        Parent directories are created. The file is payload: it means nothing to a
        reader until a manifest naming it is committed, so it need not appear
        atomically; but a failure must not leave a half-written object that a later
        ``file_size`` reports as complete (local: temp name + rename; object stores:
        abort the multipart upload). Overwrites an existing file.
        """

    def write_files(self, items: Sequence[tuple[str, Sequence[Buffer]]]) -> None:
        """:meth:`write_file` for each ``(path, buffers)``; stores that can, write them in parallel.

        All are durable when this returns; on a failure some may have been written.
        """
        for path, buffers in items:
            self.write_file(path, buffers)

    @abstractmethod
    def commit_file(self, path: str, data: bytes) -> None:
        """Publish a small file atomically and durably: readers see all of it or nothing.

        This is the commit point of a checkpoint (its manifest). Local: temp name in
        the same directory, fsync, ``os.replace``, fsync the directory. Object stores:
        one PUT.
        """

    def create_file(self, path: str, data: bytes) -> bool:
        """Publish a small file atomically *only if* nothing exists at ``path``; False when something does.

        The writer lease's takeover (:mod:`spotsafe.checkpoint.lease`) rests on it: of several
        writers creating the same generation, exactly one wins. Local: temp file +
        ``link`` (fails with EEXIST); S3: a PUT with ``If-None-Match: *``. This
        default, for filesystems that offer neither, is best effort: look, write,
        read back (the loser of a race usually sees the winner's bytes); it warns
        once, loudly.
        """
        _warn_best_effort(self)
        if self.file_size(path) is not None:
            return False
        self.commit_file(path, data)
        try:
            return bytes(self.read_file(path)) == bytes(data)
        except FileNotFoundError:  # spotsafe's CheckpointNotFound is one
            return False

    @abstractmethod
    def read_file(self, path: str) -> memoryview:
        """The whole content of ``path`` as a read-only buffer (may be memory-mapped).

        Raises :class:`spotsafe.errors.CheckpointNotFound` (a FileNotFoundError) when
        the file does not exist, and :class:`spotsafe.errors.CheckpointCorrupt` when it
        is not a regular file inside the store (a FIFO, a device, a directory, a link
        leading out): it is refused without blocking and without reading outside.
        """

    def read_files_into(self, items: Sequence[tuple[str, memoryview]]) -> None:
        """Fill each writable byte view ``dest`` with the whole content of ``path``.

        Stores that can read them in parallel, straight into ``dest``. Raises
        :class:`~spotsafe.errors.CheckpointNotFound` when a file does not exist and
        :class:`~spotsafe.errors.CheckpointCorrupt` when its size is not ``len(dest)``.
        """
        for path, dest in items:
            data = self.read_file(path)
            if len(data) != len(dest):
                raise CheckpointCorrupt(f"{self.url.rstrip('/')}/{path}: {len(data)} bytes, expected {len(dest)}")
            dest[:] = data

    #: True when :meth:`read_file_through` streams the file from the disk in pieces (a local store,
    #: past the page cache): a load that has somewhere to put the bytes (a live model's own
    #: tensors) then reads them straight there. False: the default below reads the whole file
    #: first, so a load gains nothing by it and builds its tensors on :meth:`read_file` instead.
    streams_reads: bool = False

    def read_file_through(self, path: str, size: int, consume: Callable[[int, memoryview], None]) -> None:
        """Hand the ``size`` bytes of ``path`` to ``consume(offset, piece)``, in file order.

        A piece is valid only during its call (its memory is reused for the next). Raises
        :class:`~spotsafe.errors.CheckpointNotFound` when the file does not exist and
        :class:`~spotsafe.errors.CheckpointCorrupt` when it does not hold ``size`` bytes.
        """
        data = self.read_file(path)
        if len(data) != size:
            raise CheckpointCorrupt(f"{self.url.rstrip('/')}/{path}: {len(data)} bytes, expected {size}")
        step = 64 << 20
        for offset in range(0, size, step):
            consume(offset, data[offset : offset + step])

    @abstractmethod
    def file_size(self, path: str) -> int | None:
        """Size in bytes of ``path``, or None when it does not exist."""

    def file_sizes(self, path: str) -> dict[str, int]:
        """Sizes of the files directly under ``path`` by name (directories left out).

        Object stores answer from one listing instead of a request per file.
        """
        sizes: dict[str, int] = {}
        for name in self.listdir(path):
            size = self.file_size(f"{path}/{name}" if path else name)
            if size is not None:
                sizes[name] = size
        return sizes

    @abstractmethod
    def delete_dir(self, path: str) -> None:
        """Remove ``path`` and everything under it; no error when it is already gone.

        Backends delete the manifest first, so a half-deleted checkpoint is never
        mistaken for a complete one.
        """

    def cleanup_incomplete(self) -> None:  # noqa: B027 - optional hook; nothing to clean by default
        """Remove debris of writes that were killed mid-way (temp files, multipart uploads).

        Called by the checkpointer before its first save; never touches committed files.
        """

    def set_deadline(self, deadline: datetime | None) -> None:  # noqa: B027 - optional hook
        """Bound retries and waits by ``deadline`` (UTC), e.g. a preemption notice's."""

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for background replication (a mirror's upload). True when nothing is pending."""
        return True

    def close(self) -> None:  # noqa: B027 - optional hook; nothing to release by default
        """Release threads and connections. The store is unusable afterwards."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


#: The most bytes a checkpoint's manifest may hold; a larger one is damaged or hostile.
#: Here, not in :mod:`spotsafe.checkpoint.manifest`, so a store that reads over the network
#: (S3) can refuse one from its size before downloading any of it.
MAX_MANIFEST_BYTES = 64 << 20


_warned: set[str] = set()


def _warn_best_effort(store: Store) -> None:
    if store.url in _warned:
        return
    _warned.add(store.url)
    log.warning(
        "%s: creating the writer lease here is NOT atomic (this backend offers no exclusive create: "
        "spotsafe looks, writes, then reads back), so writer fencing is best effort: two instances "
        "starting within the same second could both take the lease and both save. "
        "Use a local path (EBS, EFS/NFS), s3:// on a server that honours If-None-Match, or a mirror "
        "for strict fencing (docs/storage.md, writer fencing).",
        store.url,
    )
