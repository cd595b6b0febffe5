"""The checkpoint engine: fast, atomic, verifiable checkpoints of a whole training state.

A save is three internal steps, kept apart so that a distributed caller can run
the first two on every rank and the third once, after a barrier:

1. :func:`snapshot` — flatten the state (:mod:`spotsafe.state`) and copy every
   tensor's bytes into one reusable CPU buffer (pinned when CUDA is present).
   This is the only part a training loop waits for.
2. :func:`write_rank_files` — hash the buffer (xxh3-128, overlapped with the
   write) and write it as one data file plus a JSON tree file under
   ``step-%012d/``.
3. :func:`commit_manifest` — publish ``manifest.json`` last through
   ``Store.commit_file`` (atomic). A directory without it does not exist for a reader.

See docs/checkpoint.md for the format and the guarantees.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import logging
import mmap
import re
import threading
import time as _time
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal, TypeGuard, TypeVar, get_args

import torch
import xxhash

from spotsafe.checkpoint.completion import COMPLETE, read_completion
from spotsafe.checkpoint.lease import GENERATION_KEY, Lease, is_ghost, takeovers
from spotsafe.errors import (
    CheckpointCorrupt,
    CheckpointNotFound,
    DistributedError,
    FormatVersionError,
    SpotsafeError,
    StateError,
    StateMismatch,
    StoreError,
    WriterFenced,
)
from spotsafe.state import Blob, FlatState, MapLocation, blob_from_buffer, blobs_from_description, flatten, unflatten
from spotsafe.storage.base import DIRECT_ALIGN, MAX_MANIFEST_BYTES, Store
from spotsafe.storage.registry import open_store
from spotsafe.version import __version__

if TYPE_CHECKING:
    from typing_extensions import Self

    from spotsafe.distributed.board import NoticeBoard
    from spotsafe.distributed.context import DistContext

log = logging.getLogger("spotsafe.checkpoint")

T = TypeVar("T")

#: The newest on-storage format this code writes; readers accept 1..FORMAT_VERSION.
#: Version 2 adds data segments (a rank's payload in several files, each with its
#: ``offset``); a checkpoint without segments is still written as version 1, so older
#: spotsafe releases keep reading it.
FORMAT_VERSION = 2
FORMAT = "spotsafe-checkpoint"
MANIFEST = "manifest.json"
CHECKSUM = "xxh3_128"
_HASH_CHUNK = 64 << 20
# ASCII digits only (``\\d`` also matches other scripts' digits) and exactly 12 of them.
_NAME = re.compile(r"step-([0-9]{12})")
#: The largest step a checkpoint directory name can hold (12 digits).
MAX_STEP = 10**12 - 1
MAX_WORLD_SIZE = 1 << 20
#: Limits on what a manifest may claim; anything beyond is a damaged or hostile file
#: (its size: ``spotsafe.storage.base.MAX_MANIFEST_BYTES``).
MAX_METADATA_DEPTH = 64
MAX_FILE_SIZE = 1 << 50

Reason = Literal["periodic", "notice", "final", "manual", "rebalance"]
REASONS: tuple[str, ...] = get_args(Reason)
FileRole = Literal["data", "tree", "dcp"]


def checkpoint_name(step: int) -> str:
    """The directory of the checkpoint at ``step``: zero-padded, so name order is step order."""
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
        raise ValueError(f"step must be an int within 0..{MAX_STEP}, not {step!r}")
    return f"step-{step:012d}"


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


def _utc(dt: datetime) -> datetime:
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


# ----------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint, relative to its directory."""

    path: str
    size: int
    checksum: str
    role: FileRole
    rank: int = 0
    #: Where a data segment starts in its rank's payload (format 2); None: the whole payload.
    offset: int | None = None


def format_version_for(files: Sequence[FileEntry]) -> int:
    """The lowest format version that describes a checkpoint made of ``files``."""
    return 2 if any(f.offset is not None for f in files) else 1


@dataclass(frozen=True)
class Manifest:
    """``manifest.json``: written last, it is the commit of a checkpoint."""

    format_version: int
    step: int
    epoch: int | None
    reason: Reason
    time: datetime  # UTC-aware
    world_size: int
    files: tuple[FileEntry, ...]
    checksum_algorithm: str = CHECKSUM
    torch_version: str = torch.__version__
    spotsafe_version: str = __version__
    metadata: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> bytes:
        d = asdict(self)
        d["time"] = _utc(self.time).isoformat()
        for f in d["files"]:
            if f["offset"] is None:
                del f["offset"]  # version 1 has no such field
        return json.dumps(d, indent=1, allow_nan=False).encode()

    @classmethod
    def from_json(cls, data: bytes | memoryview, where: str) -> Manifest:
        """Parse and check a manifest. ``where`` (its path or URL) is named in every error.

        Everything it claims is checked before anyone uses it (types, ranges, file
        names that stay in the checkpoint directory, nesting depth): a hostile or
        damaged manifest raises :class:`CheckpointCorrupt`, never another error.
        """
        if len(data) > MAX_MANIFEST_BYTES:
            raise CheckpointCorrupt(f"{where}: {len(data)} bytes, more than any manifest ({MAX_MANIFEST_BYTES})")
        try:
            d = json.loads(bytes(data))
        except (UnicodeDecodeError, ValueError) as e:
            raise CheckpointCorrupt(f"{where}: manifest is not valid JSON ({e})") from e
        except RecursionError as e:
            raise CheckpointCorrupt(f"{where}: manifest is nested too deeply to be one") from e
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise CheckpointCorrupt(f"{where}: not a spotsafe manifest")
        version = d.get("format_version")
        if not _is_int(version) or version < 1:
            raise CheckpointCorrupt(f"{where}: bad format_version {_short(version)}")
        if version > FORMAT_VERSION:
            raise FormatVersionError(
                f"{where}: checkpoint format version {version} is newer than this spotsafe "
                f"{__version__} reads (up to {FORMAT_VERSION}); upgrade spotsafe to load it"
            )
        known = {f.name for f in cls.__dataclass_fields__.values()}
        unknown = set(d) - known
        if unknown:
            raise CheckpointCorrupt(
                f"{where}: unknown manifest fields {_short(sorted(unknown))} for format version {version}"
            )
        missing = {"step", "epoch", "reason", "time", "world_size", "files"} - set(d)
        if missing:
            raise CheckpointCorrupt(f"{where}: malformed manifest (missing {sorted(missing)})")
        step, epoch, world_size = d["step"], d.get("epoch"), d["world_size"]
        if not _is_int(step) or not 0 <= step <= MAX_STEP:
            raise CheckpointCorrupt(f"{where}: bad step {_short(step)}")
        if epoch is not None and (not _is_int(epoch) or epoch < 0):
            raise CheckpointCorrupt(f"{where}: bad epoch {_short(epoch)}")
        if not _is_int(world_size) or not 1 <= world_size <= MAX_WORLD_SIZE:
            raise CheckpointCorrupt(f"{where}: bad world_size {_short(world_size)}")
        if d["reason"] not in REASONS:
            raise CheckpointCorrupt(f"{where}: unknown reason {_short(d['reason'])}")
        for key in ("checksum_algorithm", "torch_version", "spotsafe_version"):
            if not isinstance(d.get(key, ""), str):
                raise CheckpointCorrupt(f"{where}: {key} is not a string")
        if d.get("checksum_algorithm", CHECKSUM) != CHECKSUM:
            raise CheckpointCorrupt(f"{where}: unknown checksum algorithm {_short(d['checksum_algorithm'])}")
        metadata = d.get("metadata", {})
        if not isinstance(metadata, dict):
            raise CheckpointCorrupt(f"{where}: metadata is not an object")
        if _depth(metadata) > MAX_METADATA_DEPTH:
            raise CheckpointCorrupt(f"{where}: metadata nested deeper than {MAX_METADATA_DEPTH} levels")
        if not isinstance(d["time"], str):
            raise CheckpointCorrupt(f"{where}: bad time {_short(d['time'])}")
        try:
            t = _utc(datetime.fromisoformat(d["time"]))
        except (ValueError, OverflowError) as e:
            raise CheckpointCorrupt(f"{where}: bad time {d['time'][:64]!r} ({e})") from e
        files = _file_entries(d["files"], version, world_size, where)
        try:
            return cls(**{**d, "files": files, "time": t, "metadata": metadata})
        except TypeError as e:  # every field is checked above; this is the net under it
            raise CheckpointCorrupt(f"{where}: malformed manifest ({e})") from e


def _short(x: object, n: int = 80) -> str:
    """``repr(x)`` cut to ``n`` characters: a hostile value must not become a megabyte log line."""
    try:
        text = repr(x)
    except ValueError:  # an int too long to print
        text = f"<{type(x).__name__} too long to print>"
    return text if len(text) <= n else text[: n - 3] + "..."


def _is_int(x: object) -> TypeGuard[int]:
    """A JSON integer (``true`` is not a step)."""
    return isinstance(x, int) and not isinstance(x, bool)


def _depth(value: Any) -> int:
    """How deeply ``value`` (parsed JSON) nests lists and objects; iterative, so any depth is safe to ask."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, level = stack.pop()
        if isinstance(v, dict):
            children: Any = v.values()
        elif isinstance(v, list):
            children = v
        else:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_METADATA_DEPTH:
            return deepest
        stack.extend((c, level + 1) for c in children)
    return deepest


_ENTRY_FIELDS = frozenset(FileEntry.__dataclass_fields__)
_HEX128 = re.compile(r"[0-9a-f]{32}")
_FILE_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def _file_entries(raw: object, version: int, world_size: int, where: str) -> tuple[FileEntry, ...]:
    """The manifest's ``files``, each checked: a name inside the checkpoint directory, sane numbers."""
    if not isinstance(raw, list):
        raise CheckpointCorrupt(f"{where}: files is not a list")
    out: list[FileEntry] = []
    seen: set[str] = set()
    for i, f in enumerate(raw):

        def bad(why: str, i: int = i) -> CheckpointCorrupt:
            return CheckpointCorrupt(f"{where}: bad file entry {i}: {why}")

        if not isinstance(f, dict):
            raise bad("not an object")
        if not {"path", "size", "checksum", "role"} <= set(f) <= _ENTRY_FIELDS:
            raise bad(f"fields {sorted(f)}")
        path, size, digest, role = f["path"], f["size"], f["checksum"], f["role"]
        rank, offset = f.get("rank", 0), f.get("offset")
        if role not in get_args(FileRole):
            raise bad(f"role {role!r}")
        if not isinstance(path, str) or len(path) > 255:
            raise bad(f"path {str(path)[:80]!r}")
        parts = path.split("/")
        # DCP's files (sharded FSDP state, spotsafe.distributed.dcp.save_sharded) live one level down.
        nested_ok = role == "dcp" and len(parts) == 2 and parts[0] == "dcp"
        name = parts[-1]
        hidden_ok = nested_ok and name == ".metadata"  # DCP's own metadata file; top-level dot names are temp files
        if (
            (len(parts) > 1 and not nested_ok)
            or not _FILE_NAME.fullmatch(name)
            or name in (".", "..")
            or (name.startswith(".") and not hidden_ok)
            or path == MANIFEST
        ):
            raise bad(f"path {path[:80]!r} (a plain file name inside the checkpoint directory)")
        if path in seen:
            raise bad(f"path {path!r} listed twice")
        seen.add(path)
        if not _is_int(size) or not 0 <= size <= MAX_FILE_SIZE:
            raise bad(f"size {size!r}")
        if not isinstance(digest, str) or not _HEX128.fullmatch(digest):
            raise bad(f"checksum {str(digest)[:80]!r}")
        if not _is_int(rank) or not 0 <= rank < world_size:
            raise bad(f"rank {rank!r} (world_size {world_size})")
        if offset is not None and (version < 2 or role != "data" or not _is_int(offset) or offset < 0):
            raise bad(f"offset {offset!r}")
        out.append(FileEntry(path, size, digest, role, rank, offset))
    # Every rank saved one tree file and its payload: as one data file, or as segments that tile it exactly.
    for rank in sorted({f.rank for f in out} | set(range(min(world_size, len(out) + 1)))):
        trees = [f for f in out if f.rank == rank and f.role == "tree"]
        datas = sorted((f for f in out if f.rank == rank and f.role == "data"), key=lambda f: f.offset or 0)
        if len(trees) != 1 or not datas:
            raise CheckpointCorrupt(f"{where}: no tree file and data for rank {rank} (world_size {world_size})")
        if len(datas) > 1 or datas[0].offset is not None:
            pos = 0
            for f in datas:
                if f.offset != pos:
                    raise CheckpointCorrupt(
                        f"{where}: data segment {f.path} at offset {f.offset}, expected {pos} (a gap or an overlap)"
                    )
                pos += f.size
    return tuple(out)


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint, as :meth:`Checkpointer.list` sees it."""

    step: int
    epoch: int | None
    reason: str
    time: datetime  # UTC-aware
    name: str  # "step-000000001200"
    url: str  # store url + "/" + name
    size: int  # total bytes of its files
    world_size: int
    metadata: dict[str, Any]
    #: The writer lease generation that committed it (None: written without a lease).
    generation: int | None = None

    @classmethod
    def from_manifest(cls, store: Store, name: str, m: Manifest) -> CheckpointInfo:
        metadata = dict(m.metadata)
        generation = metadata.pop(GENERATION_KEY, None)
        return cls(
            step=m.step,
            epoch=m.epoch,
            reason=m.reason,
            time=m.time,
            name=name,
            url=f"{store.url.rstrip('/')}/{name}",
            size=m.size,
            world_size=m.world_size,
            metadata=metadata,
            generation=generation if isinstance(generation, int) and not isinstance(generation, bool) else None,
        )


# ----------------------------------------------------------------------------- save steps


class SnapshotBuffer:
    """One reusable CPU byte buffer (pinned when CUDA is present), grown when a state outgrows it.

    It starts on a :data:`~spotsafe.storage.base.DIRECT_ALIGN` boundary (that much more is
    allocated): a local store writes such a buffer to disk with ``O_DIRECT``, without a copy.
    """

    def __init__(self, pin: bool | None = None) -> None:
        self.pin = torch.cuda.is_available() if pin is None else pin
        self._tensor: torch.Tensor | None = None
        self._view: memoryview | None = None

    @property
    def capacity(self) -> int:
        return 0 if self._tensor is None else self._tensor.numel()

    def get(self, nbytes: int) -> tuple[torch.Tensor, memoryview]:
        if self._tensor is None or self._tensor.numel() < nbytes:
            self._tensor = self._view = None  # free the old one before allocating
            n = max(nbytes, 1)
            whole = torch.empty(n + DIRECT_ALIGN, dtype=torch.uint8, pin_memory=self.pin)
            start = -whole.data_ptr() % DIRECT_ALIGN
            t = whole[start : start + n]  # the view keeps the allocation alive
            self._tensor, self._view = t, _memory(t)
        assert self._view is not None
        return self._tensor[:nbytes], self._view[:nbytes]

    def reserve(self, nbytes: int) -> bool:
        """Make room for ``nbytes`` now, every page faulted in; True when it had to allocate.

        The in-memory snapshots call it before timing a copy: allocating and faulting in
        1 GiB costs several times the copy itself, once; counted into the copy it would
        space the snapshots as if every copy were that slow.
        """
        if self._tensor is not None and self._tensor.numel() >= nbytes:
            return False
        t, _ = self.get(nbytes)
        t.zero_()
        return True

    def release(self) -> None:
        self._tensor = self._view = None


@dataclass
class Snapshot:
    """A state captured for writing: its description and the data file's bytes, in order.

    After an async snapshot the parts are views of the snapshot buffer (training
    may go on); after a zero-copy one they point at the live tensors' memory.
    """

    description: dict[str, Any]
    parts: list[memoryview]  # concatenated, they are the data file
    blobs: list[Blob]
    keepalive: list[Any] = field(repr=False)  # what the memory under ``parts`` belongs to
    #: CUDA events recorded after device-to-host copies issued on side streams (empty: the bytes are there).
    pending: list[Any] = field(default_factory=list, repr=False)
    #: (start, end) timing events of those copies, one pair per device, for the copy's device time.
    timing: list[tuple[Any, Any]] = field(default_factory=list, repr=False)

    @property
    def nbytes(self) -> int:
        return sum(len(p) for p in self.parts)

    @property
    def ready(self) -> bool:
        """True once every device-to-host copy has landed in host memory (always, without side streams)."""
        return all(e.query() for e in self.pending)

    def wait(self) -> None:
        """Block until the host memory under ``parts`` holds the copied bytes (side-stream copies done)."""
        for event in self.pending:
            event.synchronize()

    def device_seconds(self) -> float | None:
        """Seconds the side-stream copies took on the device (the longest device), once done; else None."""
        if not self.timing or not all(end.query() for _, end in self.timing):
            return None
        return float(max(start.elapsed_time(end) for start, end in self.timing)) / 1000.0


def _memory(t: torch.Tensor) -> memoryview:
    """A writable memoryview straight onto a contiguous CPU uint8 tensor's memory (no NumPy needed)."""
    n = t.numel()
    if n == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())).cast("B")


def snapshot(
    state: Mapping[str, Any] | FlatState,
    buffer: SnapshotBuffer,
    *,
    copy: bool = True,
    streams: SideStreams | None = None,
) -> Snapshot:
    """Step 1: capture ``state`` for writing.

    With ``copy`` every tensor's bytes are copied into ``buffer`` (the async
    case: the caller may change its tensors as soon as this returns). Without,
    a state that is all on the CPU is written from the tensors' own memory (the
    sync case: the caller waits for the write); device tensors still go through
    the (pinned) buffer.

    Device tensors are copied with ``non_blocking=True``. Without ``streams`` the
    copies go on the current stream and ``torch.cuda.synchronize()`` waits for them.
    With ``streams`` (:class:`SideStreams`, the in-memory snapshots' path) each
    device's copies go on a dedicated side stream that first waits for the current
    (compute) stream, the compute stream then waits for the copies' event before
    its next kernels (so a later optimizer step cannot overwrite a tensor mid-copy),
    and this returns without blocking the host: :attr:`Snapshot.pending` holds the
    events, and :meth:`Snapshot.wait` (called by :func:`write_rank_files`) blocks
    until the bytes are in host memory.
    """
    flat = state if isinstance(state, FlatState) else flatten(state)
    if not copy and all(src.device.type == "cpu" for src in flat.sources):
        return _zero_copy(flat)
    dst, view = buffer.get(flat.nbytes)
    devices: set[torch.device] = set()
    pos = 0
    for blob, src in zip(flat.blobs, flat.sources, strict=True):
        if blob.offset > pos:
            dst[pos : blob.offset].zero_()  # alignment padding: keep files deterministic
        if blob.nbytes:
            out = dst[blob.offset : blob.offset + blob.nbytes]
            if src.is_cuda and streams is not None:
                stream = streams.begin(src.device)
                with torch.cuda.stream(stream):
                    out.copy_(src, non_blocking=True)
                src.record_stream(stream)  # its memory is not reused before the copy is done
                devices.add(src.device)
            else:
                if src.is_cuda:
                    devices.add(src.device)
                out.copy_(src, non_blocking=src.is_cuda)
        pos = blob.offset + blob.nbytes
    if pos < flat.nbytes:
        dst[pos:].zero_()
    snap = Snapshot(flat.description(), [view], list(flat.blobs), [dst, buffer])
    if devices and streams is None:
        torch.cuda.synchronize()
    elif devices and streams is not None:
        snap.pending, snap.timing = streams.end()
    return snap


class SideStreams:
    """One CUDA side stream per device for the in-memory snapshots' device-to-host copies.

    :meth:`begin` (per copy) makes the device's side stream wait for the compute
    stream's work so far (once per snapshot) and records a timing event;
    :meth:`end` records each device's completion event, makes the compute stream
    wait for it (nothing on the device can change a tensor before its copy is done;
    the host does not block) and returns ``(events, timing pairs)``.
    """

    def __init__(self) -> None:
        self._streams: dict[torch.device, Any] = {}
        self._open: dict[torch.device, Any] = {}  # device -> start event of the snapshot under way

    def begin(self, device: torch.device) -> Any:
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]  # torch leaves it untyped
        if device not in self._open:
            stream.wait_stream(torch.cuda.current_stream(device))
            start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]  # torch leaves it untyped
            start.record(stream)
            self._open[device] = start
        return stream

    def end(self) -> tuple[list[Any], list[tuple[Any, Any]]]:
        events: list[Any] = []
        timing: list[tuple[Any, Any]] = []
        for device, start in self._open.items():
            stream = self._streams[device]
            done = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]  # torch leaves it untyped
            done.record(stream)
            torch.cuda.current_stream(device).wait_event(done)
            events.append(done)
            timing.append((start, done))
        self._open.clear()
        return events, timing


def _zero_copy(flat: FlatState) -> Snapshot:
    parts: list[memoryview] = []
    keep: list[Any] = []
    pos = 0
    for blob, src in zip(flat.blobs, flat.sources, strict=True):
        if blob.offset > pos:
            parts.append(memoryview(bytes(blob.offset - pos)))
        if blob.nbytes:
            src = src.contiguous()
            keep.append(src)
            parts.append(_memory(src))
        pos = blob.offset + blob.nbytes
    if pos < flat.nbytes:
        parts.append(memoryview(bytes(flat.nbytes - pos)))
    return Snapshot(flat.description(), parts, list(flat.blobs), keep)


class _HashThread(threading.Thread):
    """Checksums of several files' contents (each a list of byte views), off the writing thread."""

    def __init__(self, files: list[list[memoryview]]) -> None:
        super().__init__(name="spotsafe-checksum", daemon=True)
        self.files = files
        self.result: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = [_hash_parts(parts) for parts in self.files]
        except BaseException as e:  # noqa: BLE001 - handed to the writer thread
            self.error = e

    def digests(self) -> list[str]:
        self.join()
        if self.error is not None:
            raise self.error
        return self.result


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
    store: Store, directory: str, snap: Snapshot, *, rank: int = 0, timings: dict[str, float] | None = None
) -> list[FileEntry]:
    """Step 2: write one rank's data and tree files under ``directory``; returns their entries.

    File names carry a random token, so re-saving a step that is already committed
    never touches the files its manifest names until the new manifest replaces it.
    ``timings`` (optional) receives where the time went: ``payload_s`` (the data
    file(s), written and fsynced), ``hash_wait_s`` (waiting for the checksums after
    that) and ``tree_s`` (the tree file).
    """
    snap.wait()  # side-stream device-to-host copies: their bytes must be in host memory before any read
    token = uuid.uuid4().hex[:8]
    tree_name = f"rank{rank:05d}.{token}.json"
    segment = store.segment_size
    if segment and snap.nbytes > segment:
        # An object store: the payload as parallel single-PUT objects (format 2 segments).
        pieces = _segments(snap.parts, segment)
        names = [f"rank{rank:05d}.{token}.{k:05d}.bin" for k in range(len(pieces))]
    else:
        pieces = [list(snap.parts)]
        names = [f"rank{rank:05d}.{token}.bin"]
    hasher = _HashThread(pieces)
    hasher.start()  # overlaps the write: xxh3 runs at memory speed with the GIL released
    t0 = _time.perf_counter()
    try:
        if len(pieces) == 1:
            store.write_file(f"{directory}/{names[0]}", pieces[0])
        else:
            store.write_files([(f"{directory}/{n}", p) for n, p in zip(names, pieces, strict=True)])
    finally:
        t1 = _time.perf_counter()
        sums = hasher.digests()
    t2 = _time.perf_counter()
    entries: list[FileEntry] = []
    offset = 0
    for n, piece, digest in zip(names, pieces, sums, strict=True):
        size = sum(len(v) for v in piece)
        entries.append(FileEntry(n, size, digest, "data", rank, offset if len(pieces) > 1 else None))
        offset += size
    tree = json.dumps(snap.description, separators=(",", ":"), allow_nan=False).encode()
    store.write_file(f"{directory}/{tree_name}", [tree])
    if timings is not None:
        timings.update(payload_s=t1 - t0, hash_wait_s=t2 - t1, tree_s=_time.perf_counter() - t2)
    return [*entries, FileEntry(tree_name, len(tree), checksum(tree), "tree", rank)]


def _check_sizes(store: Store, directory: str, files: Sequence[FileEntry]) -> None:
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


def _check_checksum(base: str, f: FileEntry, data: memoryview) -> None:
    if checksum(data) != f.checksum:
        raise CheckpointCorrupt(f"{base}/{f.path}: checksum mismatch (the file was modified or damaged)")


def _read_back_to_back(store: Store, directory: str, files: Sequence[FileEntry], verify: bool) -> memoryview:
    """``files`` read in parallel into one private buffer, one after another (checksums checked when ``verify``)."""
    base = f"{store.url.rstrip('/')}/{directory}"
    total = sum(f.size for f in files)
    # Anonymous memory: writable (tensors are built on it without a copy) and zeroed lazily.
    data = memoryview(mmap.mmap(-1, total)) if total else memoryview(bytearray())
    views: list[memoryview] = []
    pos = 0
    for f in files:
        views.append(data[pos : pos + f.size])
        pos += f.size
    try:
        store.read_files_into([(f"{directory}/{f.path}", v) for f, v in zip(files, views, strict=True)])
    except CheckpointNotFound as e:
        raise CheckpointCorrupt(f"{base}: a file the manifest lists is missing ({e})") from e
    if verify:
        for f, v in zip(files, views, strict=True):
            _check_checksum(base, f, v)
    return data


def _decode_tree(buf: memoryview | bytes, payload_size: int, where: str) -> tuple[dict[str, Any], list[Blob]]:
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


def _read_listed_file(store: Store, directory: str, f: FileEntry) -> memoryview:
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


def _validate_trees(store: Store, directory: str, files: Sequence[FileEntry]) -> None:
    """Decode every rank's tree file and check all it claims against its payload, building nothing.

    What :meth:`Checkpointer.load` checks before it builds a tensor, so a checkpoint
    ``verify`` calls intact is one ``load`` can build.
    """
    base = f"{store.url.rstrip('/')}/{directory}"
    for tree in (f for f in files if f.role == "tree"):
        payload = sum(f.size for f in files if f.role == "data" and f.rank == tree.rank)
        where = f"{base}/{tree.path}"
        desc, blobs = _decode_tree(_read_listed_file(store, directory, tree), payload, where)

        def meta_blob(i: int, blobs: list[Blob] = blobs, where: str = where) -> torch.Tensor:
            if not 0 <= i < len(blobs):
                raise CheckpointCorrupt(f"{where}: blob {i} out of range")
            return torch.empty(blobs[i].nbytes, dtype=torch.uint8, device="meta")

        if not isinstance(unflatten(desc, meta_blob, where=where, validate_only=True), dict):
            raise CheckpointCorrupt(f"{where}: the saved state is not a mapping")


def commit_manifest(store: Store, directory: str, manifest: Manifest, lease: Lease | None = None) -> None:
    """Step 3: publish the manifest, atomically and durably: the checkpoint now exists.

    It checks before it speaks: every file the manifest names must exist with its
    recorded size (else :class:`~spotsafe.errors.StoreError`), and with a ``lease``
    the writer must still hold the store, before and after the commit (else
    :class:`~spotsafe.errors.WriterFenced`: a manifest a superseded writer managed to
    publish records its generation, and readers skip it by the ghost rule).
    """
    if lease is not None:
        lease.check()  # first: a superseded writer's files may have been cleaned up by its successor
        if manifest.metadata.get(GENERATION_KEY) != lease.generation:
            raise ValueError(f"the manifest of {directory} does not carry the lease generation {lease.generation}")
    try:
        _check_sizes(store, directory, manifest.files)
    except CheckpointCorrupt as e:
        raise StoreError(f"not committing {store.url.rstrip('/')}/{directory}: {e}") from e
    store.commit_file(f"{directory}/{MANIFEST}", manifest.to_json())
    if lease is not None:
        lease.check()


def _plain_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    if metadata is None:
        return {}
    out = dict(metadata)
    if GENERATION_KEY in out:
        raise ValueError(f"checkpoint metadata key {GENERATION_KEY!r} is reserved by spotsafe (the writer generation)")
    try:
        plain: dict[str, Any] = json.loads(json.dumps(out, allow_nan=False))
        return plain
    except (TypeError, ValueError) as e:
        raise StateError(f"checkpoint metadata must be plain JSON (str keys, no NaN): {e}") from e


# ----------------------------------------------------------------------------- Checkpointer

_live: weakref.WeakSet[Checkpointer] = weakref.WeakSet()


@atexit.register
def _finish_pending_saves() -> None:
    # A daemon thread dies with the interpreter: let an in-flight save (often the final one) land first.
    for ckpt in list(_live):
        try:
            ckpt.wait()
        except Exception:
            log.exception("spotsafe: a background checkpoint save failed")


class Checkpointer:
    """Saves, lists, verifies, loads and prunes checkpoints in one store.

    ``store``/``local``/``remote``/``storage_options`` go to
    :func:`spotsafe.storage.registry.open_store`: a path on the persistent volume, an
    ``s3://`` URL, or ``local=`` and ``remote=`` for a mirror.

    Under ``torchrun`` pass ``dist`` (a :class:`spotsafe.distributed.context.DistContext`,
    or ``"auto"`` to detect it; built on every rank, it is a collective) and call
    every method on every rank: :meth:`save` is then collective (rank 0 writes the
    replicated state, every rank the keys in ``per_rank`` and its shards of any
    :class:`~spotsafe.distributed.sharded.ShardedState`; rank 0 holds the writer lease and
    commits the manifest once every rank's files are durable), and
    :meth:`load`/:meth:`restore` pick the same step on every rank, falling back
    together past a checkpoint damaged for any rank.
    """

    def __init__(
        self,
        store: Any = None,
        *,
        local: Any = None,
        remote: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        keep_last: int = 3,
        keep_every: int | None = None,
        async_: bool = True,
        dist: DistContext | Literal["auto"] | None = None,
        per_rank: Sequence[str] = (),
    ) -> None:
        if not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last must be an int >= 1, not {keep_last!r}")
        if keep_every is not None and (not isinstance(keep_every, int) or keep_every < 1):
            raise ValueError(f"keep_every must be None or an int >= 1, not {keep_every!r}")
        self.store: Store = open_store(store, local=local, remote=remote, storage_options=storage_options)
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.async_ = async_
        self.last_loaded: CheckpointInfo | None = None
        self.last_saved: CheckpointInfo | None = None
        #: Seconds spent in each step of the last completed save: snapshot_s (the training stall),
        #: write_s (data + tree files, fsynced), commit_s (manifest), retention_s (pruning old ones);
        #: ``last_write_parts`` splits write_s (one process): payload_s, hash_wait_s, tree_s (write_rank_files).
        self.last_timings: dict[str, float] = {}
        self.last_write_parts: dict[str, float] = {}
        self._buffer = SnapshotBuffer()
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._retention: threading.Thread | None = None
        self._error: BaseException | None = None
        self._closed = False
        #: The writer lease, taken by the first save (or :meth:`acquire`); readers never take it.
        self.lease: Lease | None = None
        if dist == "auto":
            from spotsafe.distributed.context import DistContext

            dist = DistContext.detect()
        #: The process-group context of a multi-rank run (None: this process alone).
        self.dist: DistContext | None = dist
        #: Keys of a saved state that differ per rank (written by every rank; the rest by rank 0).
        self.per_rank = tuple(per_rank)
        #: Seconds a collective save waits at its barrier for a missing rank (None: the group's
        #: timeout); spotsafe.Run sets it to the time left before a notice's deadline.
        self.barrier_timeout: float | None = None
        #: Step directories a snapshot persist is writing outside the save lock: cleanup leaves them alone.
        self._protected: set[str] = set()
        self._lock_protected = threading.Lock()
        _live.add(self)

    def __repr__(self) -> str:
        return f"Checkpointer({self.store!r}, keep_last={self.keep_last}, keep_every={self.keep_every})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the writer lease ---------------------------------------------------------
    def acquire(self, timeout: float | None = None) -> int:
        """Take this store's writer lease (waiting while a live writer holds it); the generation.

        :meth:`save` does it on its first call; :class:`spotsafe.Run` does it before it
        restores, so it resumes from everything the previous writer committed. Raises
        :class:`~spotsafe.errors.LeaseTimeout` after ``timeout`` seconds (None: wait as
        long as the holder stays alive), :class:`~spotsafe.errors.WriterFenced` when this
        Checkpointer's lease was superseded (it never takes the store back).
        """
        if self._closed:
            raise SpotsafeError(f"{self.store.url}: this Checkpointer is closed")
        generation = self._acquire(timeout) if self._coordinator else None
        if self.dist is not None and self.dist.world_size > 1:  # every rank leaves together, holder known
            generation = self.dist.broadcast_object(generation)
        assert generation is not None
        return int(generation)

    @property
    def _coordinator(self) -> bool:
        return self.dist is None or self.dist.is_coordinator

    def _acquire(self, timeout: float | None = None) -> int:
        if self.lease is None:
            self.lease = Lease(self.store)
        if self.lease.generation is None and self.lease.record is not None:
            raise WriterFenced(f"{self.store.url}: this Checkpointer released its writer lease")
        return self.lease.acquire(self._newest_step, timeout=timeout)

    def _newest_step(self) -> int | None:
        infos = self._scan(strict=False)
        return infos[-1].step if infos else None

    def _generation_meta(self, meta: dict[str, Any]) -> dict[str, Any]:
        assert self.lease is not None and self.lease.generation is not None
        return {**meta, GENERATION_KEY: self.lease.generation}

    # -- saving -----------------------------------------------------------------
    def save(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        epoch: int | None = None,
        reason: Reason = "periodic",
        async_: bool | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Checkpoint ``state`` as ``step``.

        ``state`` maps names to live objects with ``state_dict()`` (model,
        optimizer, scheduler, scaler, :class:`spotsafe.RNGState`) or to plain
        values and tensors. Waits for a save still in flight (re-raising its
        error), then copies the state to CPU memory; when async, returns right
        after that copy and writes in a background thread.
        """
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
            raise ValueError(f"step must be an int within 0..{MAX_STEP} (12 digits), not {step!r}")
        if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0):
            raise ValueError(f"epoch must be None or an int >= 0, not {epoch!r}")
        if reason not in REASONS:
            raise ValueError(f"reason must be one of {REASONS}, not {reason!r}")
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping of names to objects, not {type(state).__name__}")
        if self._closed:
            raise SpotsafeError(f"{self.store.url}: this Checkpointer is closed")
        meta = _plain_metadata(metadata)
        with self._lock:
            self.wait()  # one save at a time: a collective save's barriers must not interleave
            if self._coordinator:
                if self.lease is None or not self.lease.held:
                    self._acquire()  # the first save waits for the store (raises when superseded)
                meta = self._generation_meta(meta)
            when = datetime.now(timezone.utc)
            run_async = self.async_ if async_ is None else async_
            t0 = _time.perf_counter()
            dcp_files: list[FileEntry] = []
            ctx = self.dist
            if ctx is not None:
                state, dcp_files = self._save_sharded(step, state)
                state = state if ctx.is_coordinator else {k: v for k, v in state.items() if k in self.per_rank}
            # A sync save writes straight from the tensors: the caller is blocked, they cannot change.
            snap = snapshot(state, self._buffer, copy=run_async)
            timings = {"snapshot_s": _time.perf_counter() - t0}

            def persist() -> None:
                if ctx is None:
                    self._persist(step, epoch, reason, when, meta, snap, timings, background_retention=not run_async)
                else:
                    self._persist_ranks(ctx, step, epoch, reason, when, meta, snap, dcp_files, timings)

            if not run_async:
                persist()  # durable when this returns; pruning old checkpoints goes on in the background
                return
            thread = threading.Thread(target=self._run, args=(persist,), name=f"spotsafe-save-{step}", daemon=True)
            self._thread = thread
            thread.start()

    def persist_snapshot(
        self,
        step: int,
        snap: Snapshot,
        *,
        epoch: int | None,
        reason: Reason,
        when: datetime,
        metadata: Mapping[str, Any],
        stall_s: float = 0.0,
        retain: bool = True,
    ) -> None:
        """Write and commit a snapshot taken earlier (:mod:`spotsafe.checkpoint.snapshots`) as ``step``, in the background.

        The same write and fenced manifest-last commit as :meth:`save`, and its retention
        unless ``retain`` is False (the deadline path leaves pruning to the next save, so
        :meth:`wait` returns at the commit); ``snap``'s memory must stay unchanged until
        :meth:`wait` returns. A failed earlier save is logged, not raised: this path runs on
        a notice, when a checkpoint matters most. Single process only (a multi-rank
        snapshot needs every rank's files).
        """
        if self.dist is not None:
            raise SpotsafeError(f"{self.store.url}: persist_snapshot is for a single process, not {self.dist!r}")
        if self._closed:
            raise SpotsafeError(f"{self.store.url}: this Checkpointer is closed")
        meta = _plain_metadata(metadata)
        with self._lock:
            try:
                self.wait()
            except WriterFenced:
                raise
            except Exception as e:  # noqa: BLE001 - logged; persisting this snapshot matters more now
                log.error("spotsafe: an earlier background save failed (%s); persisting step %d anyway", e, step)
            if self.lease is None or not self.lease.held:
                self._acquire()
            meta = self._generation_meta(meta)
            timings = {"snapshot_s": stall_s}

            def persist() -> None:
                self._persist(step, epoch, reason, when, meta, snap, timings, retain=retain)

            thread = threading.Thread(target=self._run, args=(persist,), name=f"spotsafe-snapshot-{step}", daemon=True)
            self._thread = thread
            thread.start()

    def persist_snapshot_ranks(
        self,
        step: int,
        snap: Snapshot,
        board: NoticeBoard,
        *,
        epoch: int | None,
        reason: Reason,
        when: datetime,
        metadata: Mapping[str, Any],
        timeout: float,
        stall_s: float = 0.0,
    ) -> bool:
        """Every rank's part of a snapshot taken at ``step`` is written, then rank 0 commits it; returns on commit.

        The multi-rank counterpart of :meth:`persist_snapshot`, run by every rank's
        snapshot guard in its own thread (all of them for the same ``step``) while the
        training threads may be inside a step or in a collective save. So it takes no
        process-group collective and not the save lock: each rank writes its files
        (durable on return), posts their entries on ``board``; rank 0 waits for every
        rank's entries, commits the manifest (fenced, sizes checked, manifest last) and
        posts the outcome. A rank that fails or never posts within ``timeout`` seconds
        leaves nothing committed. True when committed (on every rank: rank 0's outcome).
        """
        ctx = self.dist
        if ctx is None:
            raise SpotsafeError(f"{self.store.url}: persist_snapshot_ranks needs a multi-rank Checkpointer")
        if self._closed:
            raise SpotsafeError(f"{self.store.url}: this Checkpointer is closed")
        meta = _plain_metadata(metadata)
        name = checkpoint_name(step)
        end = _time.monotonic() + timeout
        key = f"snapshot-{step:012d}"
        with self._lock_protected:
            self._protected.add(name)
        try:
            t0 = _time.perf_counter()
            try:
                mine: Any = [asdict(f) for f in write_rank_files(self.store, name, snap, rank=ctx.rank)]
            except Exception as e:  # posted for rank 0 (nothing is committed), then re-raised
                board.post(f"{key}/files/{ctx.rank}", {"error": f"{type(e).__name__}: {e}"})
                raise
            written = _time.perf_counter()
            if not ctx.is_coordinator:
                board.post(f"{key}/files/{ctx.rank}", mine)
                outcome = board.wait([f"{key}/outcome"], end - _time.monotonic())[0]
                if outcome != "ok":
                    raise DistributedError(f"checkpoint {self.store.url}/{name}: rank 0 did not commit: {outcome}")
                return True
            parts = board.wait([f"{key}/files/{r}" for r in range(1, ctx.world_size)], end - _time.monotonic())
            try:
                failed = {r + 1: p["error"] for r, p in enumerate(parts) if isinstance(p, dict)}
                if failed:
                    who = "; ".join(f"rank {r}: {why}" for r, why in sorted(failed.items()))
                    raise DistributedError(f"checkpoint {self.store.url}/{name}: not committed: {who}")
                files = [FileEntry(**f) for p in [mine, *parts] for f in p]
                if self.lease is None or not self.lease.held:
                    self._acquire(timeout=max(end - _time.monotonic(), 0.0))
                manifest = Manifest(
                    format_version=format_version_for(files),
                    step=step,
                    epoch=epoch,
                    reason=reason,
                    time=when,
                    world_size=ctx.world_size,
                    files=tuple(files),
                    metadata=self._generation_meta(meta),
                )
                commit_manifest(self.store, name, manifest, self.lease)
            except BaseException as e:
                board.post(f"{key}/outcome", f"{type(e).__name__}: {e}")
                self._raise_fenced(e)
                raise
            board.post(f"{key}/outcome", "ok")
            done = _time.perf_counter()
            self.last_saved = CheckpointInfo.from_manifest(self.store, name, manifest)
            log.info("spotsafe: saved %s (%s snapshot of %d ranks)", self.last_saved.url, reason, ctx.world_size)
            timings = {"snapshot_s": stall_s, "write_s": written - t0, "commit_s": done - written}
            self.last_timings = timings
            self._retain_timed(step, timings)
            return True
        finally:
            with self._lock_protected:
                self._protected.discard(name)

    def _raise_fenced(self, error: BaseException) -> None:
        """Raise WriterFenced (from ``error``) when a save failed because another writer took over.

        The successor removes a superseded writer's unfinished files, so the old writer's
        save often fails on a missing file first: it must still stop as fenced, not crash.
        """
        if isinstance(error, WriterFenced):
            raise error
        if self.lease is None or self.lease.generation is None or not isinstance(error, Exception):
            return
        try:
            self.lease.check()
        except WriterFenced as fenced:
            raise fenced from error
        except Exception:  # noqa: BLE001, S110 - cannot tell: the save's own error is the one to raise
            pass

    def _save_sharded(self, step: int, state: Mapping[str, Any]) -> tuple[Mapping[str, Any], list[FileEntry]]:
        """Every rank writes its shards of any ShardedState through DCP (collective); the rest of ``state``."""
        from spotsafe.distributed.sharded import ShardedState

        sharded = {k: v.state_dict() for k, v in state.items() if isinstance(v, ShardedState)}
        if not sharded:
            return state, []
        from spotsafe.distributed.dcp import save_sharded

        records = save_sharded(sharded, self.store, checkpoint_name(step), ctx=self.dist, timeout=self.barrier_timeout)
        rest = {k: v for k, v in state.items() if not isinstance(v, ShardedState)}
        return rest, [FileEntry(r.path, r.size, r.checksum, "dcp", 0) for r in records]

    def _persist_ranks(
        self,
        ctx: DistContext,
        step: int,
        epoch: int | None,
        reason: str,
        when: datetime,
        meta: dict[str, Any],
        snap: Snapshot,
        dcp_files: Sequence[FileEntry],
        timings: dict[str, float],
    ) -> None:
        """The collective save: every rank's files durable → barrier → rank 0 commits (fenced) → outcome shared."""
        from spotsafe.distributed.commit import persist_rank_files

        name = checkpoint_name(step)
        t0 = _time.perf_counter()

        def write() -> list[FileEntry]:
            if ctx.is_coordinator:  # a failure here is voted on like a failed write: nobody waits
                self._cleanup(skip=name)
            return write_rank_files(self.store, name, snap, rank=ctx.rank)

        def commit(files: list[FileEntry]) -> None:
            all_files = (*files, *dcp_files)
            manifest = Manifest(
                format_version=format_version_for(all_files),
                step=step,
                epoch=epoch,
                reason=reason,  # type: ignore[arg-type]
                time=when,
                world_size=ctx.world_size,
                files=tuple(all_files),
                metadata=meta,
            )
            commit_manifest(self.store, name, manifest, self.lease)
            self.last_saved = CheckpointInfo.from_manifest(self.store, name, manifest)

        what = f"checkpoint {self.store.url.rstrip('/')}/{name}"
        try:
            persist_rank_files(ctx, write, commit, timeout=self.barrier_timeout, what=what)
        except BaseException as e:
            if ctx.is_coordinator:
                self._raise_fenced(e)
            raise
        timings["write_s"] = _time.perf_counter() - t0
        self.last_timings = timings
        if ctx.is_coordinator:
            self._retain_timed(step, timings)

    def _run(self, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as e:  # noqa: BLE001 - kept and re-raised by wait()/save()
            log.error("spotsafe: background checkpoint save failed: %s", e)
            self._error = e

    def _persist(
        self,
        step: int,
        epoch: int | None,
        reason: Reason,
        when: datetime,
        meta: dict[str, Any],
        snap: Snapshot,
        timings: dict[str, float],
        *,
        background_retention: bool = False,
        retain: bool = True,
    ) -> None:
        name = checkpoint_name(step)
        # Off the training thread: on an object store, listing costs round trips.
        self._cleanup(skip=name)
        t0 = _time.perf_counter()
        parts: dict[str, float] = {}
        try:
            files = write_rank_files(self.store, name, snap, rank=0, timings=parts)
            t1 = _time.perf_counter()
            manifest = Manifest(
                format_version=format_version_for(files),
                step=step,
                epoch=epoch,
                reason=reason,
                time=when,
                world_size=1,
                files=tuple(files),
                metadata=meta,
            )
            commit_manifest(self.store, name, manifest, self.lease)
            t2 = _time.perf_counter()
        except BaseException as e:
            self._raise_fenced(e)
            # Free the space now (a full disk is the usual cause); never touch a committed step,
            # and a superseded writer touches nothing: the new one may be writing this very step.
            if self.lease is not None and self.lease.held:
                try:
                    if self.store.file_size(f"{name}/{MANIFEST}") is None:
                        self.store.delete_dir(name)
                except Exception:  # noqa: BLE001, S110 - the original error matters more
                    pass
            raise
        self.last_saved = CheckpointInfo.from_manifest(self.store, name, manifest)
        log.info("spotsafe: saved %s (%s, %d bytes)", self.last_saved.url, reason, manifest.size)
        timings.update(write_s=t1 - t0, commit_s=t2 - t1)
        self.last_timings = timings
        self.last_write_parts = parts
        if not retain:
            return
        if background_retention:
            thread = threading.Thread(
                target=self._retain_timed, args=(step, timings), name=f"spotsafe-retention-{step}", daemon=True
            )
            self._thread = thread  # wait(), the next save() and exit wait for it
            self._retention = thread  # ...but it is no save in flight (see save_in_flight)
            thread.start()
        else:
            self._retain_timed(step, timings)

    def _retain_timed(self, step: int, timings: dict[str, float]) -> None:
        t0 = _time.perf_counter()
        try:
            self._retain(step)
        except Exception as e:  # noqa: BLE001 - the checkpoint is committed: a failed prune must not say otherwise
            log.warning("spotsafe: pruning old checkpoints after %s failed: %s", checkpoint_name(step), e)
        timings["retention_s"] = _time.perf_counter() - t0

    @property
    def save_in_flight(self) -> bool:
        """True while a background save is writing (a retention pass after a sync save does not count)."""
        thread = self._thread
        return thread is not None and thread.is_alive() and thread is not self._retention

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the save in flight. True when none is left; re-raises its error once."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                return False
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error
        return True

    def _cleanup(self, skip: str) -> None:
        """Remove what killed saves left: temp files, and step dirs that never got a manifest.

        Only the lease holder cleans, and only what is provably dead: a directory without
        a manifest was left by an earlier generation (fenced: it can never commit) or by a
        failed save of this one; ``skip`` is the save in hand (every rank's files of it).
        """
        if self.lease is None or self.lease.generation is None:
            raise WriterFenced(f"{self.store.url}: cleaning up needs the writer lease (Checkpointer.acquire)")
        self.lease.check()
        self.store.cleanup_incomplete()
        for name in self.store.listdir(""):
            with self._lock_protected:
                protected = name in self._protected
            if protected:
                continue  # a snapshot persist is writing it right now (persist_snapshot_ranks)
            if _NAME.fullmatch(name) and name != skip and self.store.file_size(f"{name}/{MANIFEST}") is None:
                log.info("spotsafe: removing incomplete checkpoint %s/%s", self.store.url, name)
                self.store.delete_dir(name)

    def _retain(self, just_saved: int) -> None:
        if self.lease is not None:
            self.lease.check()  # a superseded writer must not prune the new writer's checkpoints
        scanned, ghosts = self._scan_all(strict=True)
        for ghost in ghosts:  # committed by a superseded writer after the takeover: provably dead
            if ghost.step != just_saved:
                log.warning("spotsafe: removing %s, committed by a superseded writer", ghost.url)
                self.store.delete_dir(ghost.name)
        infos = [info for info, _ in scanned]
        if len(infos) <= self.keep_last:
            return
        keep = {i.step for i in infos[-self.keep_last :]}
        keep.add(just_saved)
        if self.keep_every:
            keep.update(i.step for i in infos if i.step % self.keep_every == 0)
        newest_intact = next((i for i, m in reversed(scanned) if self._sizes_ok(i.name, m)), None)
        if newest_intact is not None:
            keep.add(newest_intact.step)
        for info in infos:
            if info.step not in keep:
                log.info("spotsafe: retention removes %s", info.url)
                self.store.delete_dir(info.name)

    # -- listing ----------------------------------------------------------------
    def _tiers(self) -> list[Store]:
        """Where a checkpoint can be read from: the store, then a mirror's remote copy."""
        return [self.store, *self.store.tiers[1:]]

    def _manifest(self, name: str, store: Store | None = None) -> Manifest:
        store = store or self.store
        where = f"{store.url.rstrip('/')}/{name}/{MANIFEST}"
        try:
            data = store.read_file(f"{name}/{MANIFEST}")
        except CheckpointNotFound as e:
            raise CheckpointNotFound(f"{where} does not exist") from e
        m = Manifest.from_json(data, where)
        named = _NAME.fullmatch(name)
        if named is not None and int(named.group(1)) != m.step:
            raise CheckpointCorrupt(f"{where}: a manifest for step {m.step} in the directory of step {named.group(1)}")
        return m

    def scan(self) -> Iterator[tuple[str, Manifest | SpotsafeError]]:
        """Every step directory, oldest first, with its manifest or why it has none usable."""
        names = sorted(n for n in self.store.listdir("") if _NAME.fullmatch(n))
        for name in names:
            try:
                # A mirror whose local manifest is damaged reads the remote one.
                yield name, self._with_fallback(name, lambda store: self._manifest(name, store))  # noqa: B023 - called at once
            except (CheckpointNotFound, CheckpointCorrupt, FormatVersionError) as e:
                yield name, e

    def _scan(self, strict: bool = True) -> list[CheckpointInfo]:
        return [info for info, _ in self._scan_manifests(strict)]

    def _scan_manifests(self, strict: bool = True) -> list[tuple[CheckpointInfo, Manifest]]:
        """As :meth:`_scan`, with each manifest, so callers need not read it again."""
        return self._scan_all(strict)[0]

    def _scan_all(self, strict: bool = True) -> tuple[list[tuple[CheckpointInfo, Manifest]], list[CheckpointInfo]]:
        """Committed checkpoints with their manifests, and the ghosts left out of them.

        A ghost is a checkpoint a superseded writer committed after a newer generation
        took the store over (spotsafe.checkpoint.lease): it is not part of the run's history.
        """
        out = []
        for name, m in self.scan():
            if isinstance(m, Manifest):
                out.append((CheckpointInfo.from_manifest(self.store, name, m), m))
            elif isinstance(m, FormatVersionError) and strict:
                raise m
            elif isinstance(m, CheckpointCorrupt):
                log.warning("spotsafe: ignoring %s: %s", name, m)
        fenced = [i.generation for i, _ in out if i.generation is not None]
        if not fenced:
            return out, []
        try:
            later = takeovers(self.store, min(fenced))
        except SpotsafeError as e:
            log.warning("spotsafe: cannot read the writer leases of %s: %s", self.store.url, e)
            return out, []
        kept, ghosts = [], []
        for info, m in out:
            if is_ghost(info.generation, info.step, later):
                log.warning(
                    "spotsafe: ignoring %s: committed by writer generation %s after a newer one took the store over",
                    info.url,
                    info.generation,
                )
                ghosts.append(info)
            else:
                kept.append((info, m))
        return kept, ghosts

    def list(self) -> list[CheckpointInfo]:
        """Committed checkpoints (their manifest parses), oldest first.

        Raises :class:`FormatVersionError` when one was written by a newer spotsafe,
        rather than silently resuming from an older one.
        """
        return self._scan(strict=True)

    def _sizes_ok(self, name: str, manifest: Manifest | None = None) -> bool:
        try:
            self.check(name, manifest, full=False)
        except (CheckpointCorrupt, CheckpointNotFound, FormatVersionError):
            return False
        return True

    def check(self, info: CheckpointInfo | str, manifest: Manifest | None = None, *, full: bool = True) -> Manifest:
        """Raise :class:`CheckpointCorrupt` unless every file exists with its size (and checksum when ``full``).

        With a mirror, a checkpoint whose local copy is damaged passes when its remote
        copy is intact (that is the one :meth:`load` then reads).
        """
        name = info.name if isinstance(info, CheckpointInfo) else info
        m = manifest or self._manifest(name)
        return self._with_fallback(name, lambda store: self._check_on(store, name, m, full))

    def _with_fallback(self, name: str, fn: Callable[[Store], T]) -> T:
        """``fn(store)``; when that finds the checkpoint damaged, ``fn`` on a mirror's remote copy."""
        tiers = self._tiers()
        try:
            return fn(tiers[0])
        except CheckpointCorrupt as first:
            if len(tiers) == 1:
                raise
            remote = tiers[1]
            try:
                held = remote.file_size(f"{name}/{MANIFEST}") is not None
            except SpotsafeError as e:
                log.warning("spotsafe: cannot look for a remote copy of %s: %s", name, e)
                held = False
            if not held:
                raise
            log.warning("spotsafe: %s; trying the remote copy at %s/%s", first, remote.url.rstrip("/"), name)
            try:
                return fn(remote)
            except (CheckpointCorrupt, CheckpointNotFound) as second:
                raise CheckpointCorrupt(f"{first}; the remote copy too: {second}") from second

    def _check_on(self, store: Store, name: str, m: Manifest, full: bool) -> Manifest:
        _check_sizes(store, name, m.files)
        if full:
            self._verify_files(store, name, list(m.files))
            _validate_trees(store, name, m.files)
        return m

    def _verify_files(self, store: Store, name: str, files: Sequence[FileEntry], batch: int = 1 << 30) -> None:
        """Read ``files`` (in batches of about ``batch`` bytes, each read in parallel) and check their checksums."""
        i = 0
        while i < len(files):
            group = [files[i]]
            total = files[i].size
            i += 1
            while i < len(files) and total + files[i].size <= batch:
                group.append(files[i])
                total += files[i].size
                i += 1
            _read_back_to_back(store, name, group, verify=True)

    def latest(self, verify: bool = False) -> CheckpointInfo | None:
        """The newest committed checkpoint whose files exist with the right sizes (and checksums when ``verify``)."""
        for info, m in reversed(self._scan_manifests(strict=True)):
            try:
                self.check(info.name, m, full=verify)
            except (CheckpointCorrupt, CheckpointNotFound) as e:
                log.warning("spotsafe: skipping damaged checkpoint: %s", e)
                continue
            return info
        return None

    # -- loading ----------------------------------------------------------------
    def _resolve(self, info: CheckpointInfo | int) -> CheckpointInfo:
        if isinstance(info, CheckpointInfo):
            return info
        if isinstance(info, bool) or not isinstance(info, int):
            raise TypeError(f"info must be a CheckpointInfo, a step or None, not {type(info).__name__}")
        name = checkpoint_name(info)
        try:
            m = self._manifest(name)
        except CheckpointNotFound as e:
            raise CheckpointNotFound(
                f"{self.store.url.rstrip('/')}/{name}: no committed checkpoint for step {info}"
            ) from e
        return CheckpointInfo.from_manifest(self.store, name, m)

    def _load_one(self, info: CheckpointInfo, map_location: MapLocation, verify: bool, rank: int = 0) -> dict[str, Any]:
        """One rank's state from ``info``; a mirror whose local copy is damaged reads the remote one."""
        return self._with_fallback(info.name, lambda store: self._load_from(store, info, map_location, verify, rank))

    def _load_from(
        self, store: Store, info: CheckpointInfo, map_location: MapLocation, verify: bool, rank: int
    ) -> dict[str, Any]:
        name = info.name
        base = f"{store.url.rstrip('/')}/{name}"
        m = self._manifest(name, store)
        trees = [f for f in m.files if f.rank == rank and f.role == "tree"]
        datas = [f for f in m.files if f.rank == rank and f.role == "data"]
        if len(trees) != 1 or not datas:
            raise CheckpointCorrupt(f"{base}/{MANIFEST}: no data/tree files for rank {rank}")
        tree_buf = self._read_one(store, name, trees[0], verify)
        if len(datas) == 1 and datas[0].offset is None:
            data = self._read_one(store, name, datas[0], verify)
            data_where = f"{base}/{datas[0].path}"
        else:
            data = self._read_segments(store, name, datas, verify)
            data_where = f"{base}/{datas[0].path} (+{len(datas) - 1} segments)"
        where = f"{base}/{trees[0].path}"
        desc, blobs = _decode_tree(tree_buf, len(data), where)

        def blob(i: int) -> torch.Tensor:
            if not 0 <= i < len(blobs):
                raise CheckpointCorrupt(f"{where}: blob {i} out of range")
            return blob_from_buffer(data, blobs[i], data_where)

        state = unflatten(desc, blob, map_location=map_location, where=where)
        if not isinstance(state, dict):
            raise CheckpointCorrupt(f"{where}: the saved state is not a mapping")
        return state

    def _read_one(self, store: Store, name: str, f: FileEntry, verify: bool) -> memoryview:
        base = f"{store.url.rstrip('/')}/{name}"
        buf = _read_listed_file(store, name, f)
        if verify:
            _check_checksum(base, f, buf)
        return buf

    def _read_segments(self, store: Store, name: str, segments: Sequence[FileEntry], verify: bool) -> memoryview:
        """One rank's payload from its segments, read in parallel into one private buffer.

        The manifest's parser (:func:`_file_entries`) has checked that the segments tile
        the payload exactly, with no gap and no overlap.
        """
        ordered = sorted(segments, key=lambda f: -1 if f.offset is None else f.offset)
        # Sizes first (one listing): a manifest that lies about them gets a clear error,
        # not a buffer of whatever size it claims.
        _check_sizes(store, name, ordered)
        return _read_back_to_back(store, name, ordered, verify)

    def load(
        self, info: CheckpointInfo | int | None = None, *, map_location: MapLocation = None, verify: bool = True
    ) -> dict[str, Any]:
        """The saved state as a plain tree of tensors and values.

        ``info`` None means the newest intact checkpoint: damaged ones are
        logged and skipped. A given ``info`` (or step) that is damaged raises
        :class:`CheckpointCorrupt`. ``verify`` checks every file's checksum first.
        With ``dist`` (several ranks), every rank gets the same step: rank 0's state
        with this rank's own ``per_rank`` keys.
        """
        if self.dist is not None and self.dist.world_size > 1:
            return self._restore_ranks(self.dist, info, {}, map_location)
        if info is not None:
            resolved = self._resolve(info)
            state = self._load_one(resolved, map_location, verify)
            self.last_loaded = resolved
            return state
        infos = self.list()
        damaged: list[str] = []
        for candidate in reversed(infos):
            try:
                state = self._load_one(candidate, map_location, verify)
            except (CheckpointCorrupt, CheckpointNotFound) as e:
                log.error("spotsafe: checkpoint %s is damaged, falling back to the previous one: %s", candidate.url, e)
                damaged.append(f"{candidate.name} ({e})")
                continue
            self.last_loaded = candidate
            return state
        detail = f"; damaged: {', '.join(damaged)}" if damaged else ""
        raise CheckpointNotFound(f"{self.store.url}: no intact checkpoint{detail}")

    def restore(
        self, info: CheckpointInfo | int | None, objects: Mapping[str, Any], *, map_location: MapLocation = None
    ) -> dict[str, Any]:
        """Load a checkpoint into live objects; return the values no object took, as a plain dict.

        ``objects`` maps the names used at save time to objects with
        ``load_state_dict`` (model, optimizer, scheduler, scaler, RNGState).
        ``info`` None restores the newest intact checkpoint (see :meth:`load`);
        :attr:`last_loaded` tells which one it was.
        """
        for key, obj in objects.items():
            if not callable(getattr(obj, "load_state_dict", None)):
                raise TypeError(f"objects[{key!r}] ({type(obj).__name__}) has no load_state_dict()")
        if self.dist is not None:
            return self._restore_ranks(self.dist, info, objects, map_location)
        state = self.load(info, map_location=map_location)
        assert self.last_loaded is not None
        missing = [k for k in objects if k not in state]
        if missing:
            raise StateMismatch(
                f"{self.last_loaded.url}: holds no state for {missing} (it holds {sorted(map(str, state))})"
            )
        rest = dict(state)
        for key, obj in objects.items():
            obj.load_state_dict(rest.pop(key))
        return rest

    def _restore_ranks(
        self,
        ctx: DistContext,
        info: CheckpointInfo | int | None,
        objects: Mapping[str, Any],
        map_location: MapLocation,
    ) -> dict[str, Any]:
        """:meth:`restore` on every rank: the same step everywhere, damaged-for-anyone skipped by all."""
        from spotsafe.distributed.commit import failed_ranks, merge_rank_state
        from spotsafe.distributed.sharded import ShardedState
        from spotsafe.errors import DistributedError

        # Every rank walks rank 0's list, newest first.
        if info is not None:
            steps = [info.step if isinstance(info, CheckpointInfo) else int(info)]
        else:
            steps = ctx.broadcast_object([i.step for i in self.list()] if ctx.is_coordinator else None)
        sharded = {k: o for k, o in objects.items() if isinstance(o, ShardedState)}
        plain = {k: o for k, o in objects.items() if k not in sharded}
        damaged: list[str] = []
        for step in reversed(steps):
            error: Exception | None = None
            state: dict[str, Any] = {}
            try:
                resolved = self._resolve(int(step))
                state = merge_rank_state(
                    lambda r: self._load_one(resolved, map_location, True, rank=r),  # noqa: B023 - called at once
                    ctx.rank,
                    resolved.world_size,
                    self.per_rank,
                )
            except (CheckpointCorrupt, CheckpointNotFound) as e:
                error = e
            failed = failed_ranks(ctx, error is not None)
            if not failed and sharded:
                from spotsafe.distributed.dcp import load_sharded

                dcp = [f for f in self._manifest(resolved.name).files if f.role == "dcp"]
                target = {k: o.state_dict() for k, o in sharded.items()}
                try:
                    if not dcp:
                        raise CheckpointCorrupt(f"{resolved.url}: holds no sharded (DCP) state for {sorted(sharded)}")
                    load_sharded(target, self.store, resolved.name, ctx=ctx, files=dcp)  # type: ignore[arg-type]  # FileEntry has the path/size/checksum load_sharded reads
                except (CheckpointCorrupt, DistributedError) as e:
                    error = e
                failed = failed_ranks(ctx, error is not None)
                if not failed:
                    for k, o in sharded.items():
                        o.load_state_dict(target[k])
            if failed:
                if info is not None:
                    raise CheckpointCorrupt(f"checkpoint step {step} is damaged for rank(s) {failed}: {error}")
                log.error(
                    "checkpoint step %s is damaged for rank(s) %s; every rank falls back to the previous one: %s",
                    step,
                    failed,
                    error,
                )
                damaged.append(f"step {step} (ranks {failed})")
                continue
            missing = [k for k in plain if k not in state]
            if missing:
                raise StateMismatch(
                    f"{resolved.url}: holds no state for {missing} (it holds {sorted(map(str, state))})"
                )
            for key, obj in plain.items():
                obj.load_state_dict(state.pop(key))
            self.last_loaded = resolved
            return state
        detail = f"; damaged: {', '.join(damaged)}" if damaged else ""
        raise CheckpointNotFound(f"{self.store.url}: no intact checkpoint{detail}")

    # -- completion -------------------------------------------------------------
    def mark_complete(self, step: int, metadata: Mapping[str, Any] | None = None) -> None:
        """Record that the run finished at ``step`` (a small committed file at the store root)."""
        self.wait()
        if self.lease is not None:
            self.lease.check()
        doc = {
            "format": "spotsafe-complete",
            "format_version": 1,
            "step": int(step),
            "time": datetime.now(timezone.utc).isoformat(),
            "metadata": _plain_metadata(metadata),
        }
        self.store.commit_file(COMPLETE, json.dumps(doc, indent=1).encode())

    def completion(self) -> dict[str, Any] | None:
        """What :meth:`mark_complete` wrote, or None when the run has not finished."""
        return read_completion(self.store)

    def close(self) -> None:
        """Wait for the save in flight (re-raising its error), then close the store."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self._buffer.release()
            _live.discard(self)
            try:
                if self.lease is not None:
                    self.lease.release()
            finally:
                self.store.close()


def format_age(t: datetime, now: float | None = None) -> str:
    """How long ago ``t`` was, for people: ``42s``, ``3.5m``, ``1.2h``, ``2.0d``."""
    seconds = (now or _time.time()) - t.timestamp()
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n:
            return f"{seconds / n:.1f}{unit}"
    return f"{max(seconds, 0):.0f}s"
