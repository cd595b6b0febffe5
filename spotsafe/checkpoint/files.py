"""A checkpoint's files: hashing and writing one rank's files, reading and verifying them, the commit.

A save is three steps, kept apart so that a distributed caller can run the first
two on every rank and the third once, after a barrier:

1. :func:`spotsafe.checkpoint.staging.stage` copies the state to host memory.
2. :func:`write_rank_files` hashes those bytes (xxh3-128, overlapped with the write)
   and writes them as one data file (or segments) plus a JSON tree file under
   ``step-%012d-g%012d/`` (step and writer generation).
3. :func:`commit_manifest` publishes ``manifest.json`` last through
   ``Store.create_file`` (atomic and exclusive: it never replaces another writer's). A
   directory without it does not exist for a reader.

The readers here check what a manifest lists against what the store holds: sizes
(:func:`check_sizes`), checksums (:func:`check_checksum`), tree files
(:func:`decode_tree`, :func:`validate_trees`).
"""

from __future__ import annotations

import json
import threading
import time as _time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import torch
import xxhash

from spotsafe.checkpoint.lease import GENERATION_KEY, Lease, Look
from spotsafe.checkpoint.manifest import MANIFEST, FileEntry, Manifest
from spotsafe.checkpoint.staging import StagedState
from spotsafe.errors import CheckpointCorrupt, CheckpointNotFound, StoreError, WriterFenced
from spotsafe.state import Blob, blobs_from_description, unflatten
from spotsafe.storage.base import Store, anonymous_buffer, run_all

_HASH_CHUNK = 64 << 20


def checksum(buffer: memoryview | bytes) -> str:
    """xxh3-128 of ``buffer`` as hex (hashed in chunks; xxhash releases the GIL on large inputs)."""
    return _hash_parts([memoryview(buffer).cast("B")])


def _hash_parts(parts: Sequence[memoryview]) -> str:
    """xxh3-128 of the concatenation of byte views ``parts``, hashed chunk by chunk."""
    h = xxhash.xxh3_128()
    for part in parts:
        for i in range(0, len(part), _HASH_CHUNK):
            h.update(part[i : i + _HASH_CHUNK])
    return h.hexdigest()


class _Beside(threading.Thread):
    """A function run beside the data write, on its own (daemon) thread; :meth:`result` joins it."""

    def __init__(self, name: str, fn: Callable[[], Any]) -> None:
        super().__init__(name=name, daemon=True)
        self.fn = fn
        self.value: Any = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as e:  # noqa: BLE001 - handed to the writing thread
            self.error = e

    def result(self) -> Any:
        self.join()
        if self.error is not None:
            raise self.error
        return self.value


def _segments(parts: Sequence[memoryview], size: int) -> list[list[memoryview]]:
    """Cut the concatenation of ``parts`` into pieces of ``size`` bytes (the last may be shorter), without copying."""
    pieces: list[list[memoryview]] = []
    current: list[memoryview] = []
    room = size
    for part in parts:
        while len(part):
            take = part[:room]
            current.append(take)
            part = part[len(take) :]
            room -= len(take)
            if room == 0:
                pieces.append(current)
                current, room = [], size
    if current:
        pieces.append(current)
    return pieces


def write_rank_files(
    store: Store, directory: str, staged: StagedState, *, rank: int = 0, timings: dict[str, float] | None = None
) -> list[FileEntry]:
    """Step 2: write one rank's data and tree files under ``directory``; returns their entries.

    File names carry a random token, so re-saving a step that is already committed
    never touches the files its manifest names until the new manifest replaces it.
    ``timings`` (optional) receives where the time went: ``payload_s`` (the data
    file(s), written and fsynced), ``hash_wait_s`` (waiting for the checksums after
    that) and ``tree_s`` (waiting for the tree file after that: it is written beside the payload).
    """
    staged.wait()  # side-stream device-to-host copies: their bytes must be in host memory before any read
    token = uuid.uuid4().hex[:8]
    tree_name = f"rank{rank:05d}.{token}.json"
    segment = store.segment_size
    if segment and staged.nbytes > segment:
        # An object store: the payload as parallel single-PUT objects (format 2 segments).
        pieces = _segments(staged.parts, segment)
        names = [f"rank{rank:05d}.{token}.{k:05d}.bin" for k in range(len(pieces))]
    else:
        pieces = [list(staged.parts)]
        names = [f"rank{rank:05d}.{token}.bin"]
    tree = json.dumps(staged.description, separators=(",", ":"), allow_nan=False).encode()
    # Both beside the data write: xxh3 runs at memory speed with the GIL released, and the tree
    # file's write and fsync (a few ms) no longer follow the payload's.
    hasher = _Beside("spotsafe-checksum", lambda: [_hash_parts(parts) for parts in pieces])
    tree_writer = _Beside("spotsafe-tree", lambda: store.write_file(f"{directory}/{tree_name}", [tree]))
    t0 = _time.perf_counter()
    try:
        if len(pieces) == 1:
            store.write_file(f"{directory}/{names[0]}", pieces[0])
        else:
            store.write_files([(f"{directory}/{n}", p) for n, p in zip(names, pieces, strict=True)])
    except BaseException:
        hasher.join()
        tree_writer.join()  # nothing of this save may write after the caller's cleanup
        raise  # the payload's error, not the tree's (both fail alike on a full disk)
    t1 = _time.perf_counter()
    try:
        sums: list[str] = hasher.result()
    finally:
        t2 = _time.perf_counter()
        tree_writer.join()
    tree_writer.result()
    entries: list[FileEntry] = []
    offset = 0
    for n, piece, digest in zip(names, pieces, sums, strict=True):
        size = sum(len(v) for v in piece)
        entries.append(FileEntry(n, size, digest, "data", rank, offset if len(pieces) > 1 else None))
        offset += size
    if timings is not None:
        timings.update(payload_s=t1 - t0, hash_wait_s=t2 - t1, tree_s=_time.perf_counter() - t2)
    return [*entries, FileEntry(tree_name, len(tree), checksum(tree), "tree", rank)]


def check_sizes(store: Store, directory: str, files: Sequence[FileEntry]) -> None:
    """Raise :class:`CheckpointCorrupt` unless each of ``files`` exists with its manifest size."""
    base = f"{store.url.rstrip('/')}/{directory}"
    listed = store.file_sizes(directory)  # one listing, not a request per file
    for f in files:
        size = listed.get(f.path)
        if size is None:  # not listed (a file one level down, a mirror's other tier): ask
            size = store.file_size(f"{directory}/{f.path}")
        if size is None:
            raise CheckpointCorrupt(f"{base}/{f.path}: missing (the manifest lists it)")
        if size != f.size:
            raise CheckpointCorrupt(f"{base}/{f.path}: {size} bytes, the manifest says {f.size}")


def check_checksum(base: str, f: FileEntry, data: memoryview) -> None:
    """Raise :class:`CheckpointCorrupt` unless ``data`` (the file ``f`` under ``base``) has its manifest checksum."""
    if checksum(data) != f.checksum:
        raise CheckpointCorrupt(f"{base}/{f.path}: checksum mismatch (the file was modified or damaged)")


def read_back_to_back(store: Store, directory: str, files: Sequence[FileEntry], verify: bool) -> memoryview:
    """``files`` read in parallel into one private buffer, one after another (checksums checked when ``verify``)."""
    base = f"{store.url.rstrip('/')}/{directory}"
    total = sum(f.size for f in files)
    # Anonymous memory: writable (tensors are built on it without a copy) and zeroed lazily.
    data = anonymous_buffer(total, huge_pages=False)  # filled at once by the reads
    views: list[memoryview] = []
    pos = 0
    for f in files:
        views.append(data[pos : pos + f.size])
        pos += f.size
    items = [(f"{directory}/{f.path}", v) for f, v in zip(files, views, strict=True)]
    try:
        if verify and len(files) > 1 and store.segment_size:
            _read_and_check_each(store, base, files, items)
            return data
        store.read_files_into(items)
    except CheckpointNotFound as e:
        raise CheckpointCorrupt(f"{base}: a file the manifest lists is missing ({e})") from e
    if verify:
        for f, v in zip(files, views, strict=True):
            check_checksum(base, f, v)
    return data


def _read_and_check_each(
    store: Store, base: str, files: Sequence[FileEntry], items: Sequence[tuple[str, memoryview]]
) -> None:
    """Segments of an object store, each hashed by the thread that downloaded it, right after it.

    Hashing the whole payload after the last download left the network idle for as long as
    xxh3 took over it (a fifth of a 512 MiB load on two busy cores); this way the checks
    of the segments already in run beside the downloads still going. First failure: the
    segments not started are cancelled, those running finish (their calls are bounded),
    and it is raised.
    """
    workers = max(1, min(len(items), int(getattr(store, "max_concurrency", 0) or 8)))

    def one(k: int) -> None:
        store.read_files_into([items[k]])
        check_checksum(base, files[k], items[k][1])

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="spotsafe-load") as pool:
        run_all(pool, [partial(one, k) for k in range(len(items))])


def decode_tree(buf: memoryview | bytes, payload_size: int, where: str) -> tuple[dict[str, Any], list[Blob]]:
    """A tree file's description and its blob table, each blob checked to lie in the payload."""
    try:
        desc = json.loads(bytes(buf))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointCorrupt(f"{where}: malformed tree file ({e})") from e
    except RecursionError as e:
        raise CheckpointCorrupt(f"{where}: malformed tree file (nested too deeply)") from e
    if not isinstance(desc, dict):
        raise CheckpointCorrupt(f"{where}: malformed tree file (not an object)")
    return desc, blobs_from_description(desc, payload_size, where)


def read_listed_file(store: Store, directory: str, f: FileEntry) -> memoryview:
    """The whole of ``f``, a file the manifest lists, after its size is checked against the listing.

    The size is asked first (a stat; a HEAD on an object store) and must be the one the
    manifest gives: a file planted bigger than its entry (a hostile store) is refused
    before a byte of it is read into memory.
    """
    where = f"{store.url.rstrip('/')}/{directory}/{f.path}"
    path = f"{directory}/{f.path}"
    try:
        size = store.file_size(path)
        if size is None:
            raise CheckpointNotFound(where)
        if size != f.size:
            raise CheckpointCorrupt(f"{where}: {size} bytes, the manifest says {f.size}")
        buf = store.read_file(path)
    except CheckpointNotFound as e:
        raise CheckpointCorrupt(f"{where}: missing (the manifest lists it)") from e
    if len(buf) != f.size:
        raise CheckpointCorrupt(f"{where}: {len(buf)} bytes, the manifest says {f.size}")
    return buf


def validate_trees(store: Store, directory: str, files: Sequence[FileEntry]) -> None:
    """Decode every rank's tree file and check all it claims against its payload, building nothing.

    What :meth:`spotsafe.checkpoint.catalog.Catalog.load` checks before it builds a tensor, so a checkpoint
    ``verify`` calls intact is one ``load`` can build.
    """
    base = f"{store.url.rstrip('/')}/{directory}"
    for tree in (f for f in files if f.role == "tree"):
        payload = sum(f.size for f in files if f.role == "data" and f.rank == tree.rank)
        where = f"{base}/{tree.path}"
        desc, blobs = decode_tree(read_listed_file(store, directory, tree), payload, where)

        def meta_blob(i: int, blobs: list[Blob] = blobs, where: str = where) -> torch.Tensor:
            if not 0 <= i < len(blobs):
                raise CheckpointCorrupt(f"{where}: blob {i} out of range")
            return torch.empty(blobs[i].nbytes, dtype=torch.uint8, device="meta")

        if not isinstance(unflatten(desc, meta_blob, where=where, validate_only=True), dict):
            raise CheckpointCorrupt(f"{where}: the saved state is not a mapping")


def commit_manifest(
    store: Store,
    directory: str,
    manifest: Manifest,
    lease: Lease | None = None,
    *,
    replace: bool = False,
    look: Look | None = None,
    own_files: bool = False,
) -> None:
    """Step 3: publish the manifest, atomically and durably: the checkpoint now exists.

    It checks before it speaks: every file the manifest names must exist with its
    recorded size (else :class:`~spotsafe.errors.StoreError`), and with a ``lease``
    the writer must still hold the store, before and after the commit (else
    :class:`~spotsafe.errors.WriterFenced`: a manifest a superseded writer managed to
    publish records its generation, and readers skip it by the ghost rule). The look
    before is ``look`` when the caller started one earlier (hidden behind its writes),
    else one made here at the same time as the size listing. ``own_files``: every file
    was written by this process in this save; on a store whose returned writes are whole
    (``Store.confirms_writes``: object stores) the size listing is then skipped, so a
    save on S3 waits for one round trip besides its writes and the create: the look after.

    The manifest is *created* (``Store.create_file``: it never replaces anything) unless
    ``replace``, which only the writer that committed ``directory`` before may pass (a step
    saved again by the same writer). Found there already, it must be this very manifest
    (a retried create whose first answer was lost); anything else means a second writer
    holds this generation: :class:`~spotsafe.errors.WriterFenced`.
    """
    if lease is not None:
        if manifest.metadata.get(GENERATION_KEY) != lease.generation:
            raise ValueError(f"the manifest of {directory} does not carry the lease generation {lease.generation}")
        if look is None:
            look = Look(lease)  # the lease's listing and the size listing at once: one round trip, not two
    try:
        if not (own_files and store.confirms_writes):
            check_sizes(store, directory, manifest.files)
    except Exception as e:
        if look is not None:
            look.result()  # a fenced writer's files may have been cleaned up by its successor: fenced wins
        if isinstance(e, CheckpointCorrupt):
            raise StoreError(f"not committing {store.url.rstrip('/')}/{directory}: {e}") from e
        raise
    if look is not None:
        look.result()
    data = manifest.to_json()
    path = f"{directory}/{MANIFEST}"
    if replace:
        store.commit_file(path, data)
    elif not store.create_file(path, data):
        try:
            found = bytes(store.read_file(path))
        except CheckpointNotFound:
            found = None
        if found != data:
            raise WriterFenced(
                f"{store.url.rstrip('/')}/{path}: another writer committed this checkpoint first, under the same "
                f"writer generation {manifest.metadata.get(GENERATION_KEY)}: two writers hold one generation "
                "(does the store really refuse a second exclusive create? see docs/storage.md)"
            )
    if lease is not None:
        lease.check()
