"""The checkpoint manifest: ``manifest.json``, its file entries, their validation, and step names.

A checkpoint directory (``step-%012d-g%012d/``: the step and the writer generation that
wrote it, :func:`checkpoint_name`) exists for a reader once its manifest is committed; :meth:`Manifest.from_json` checks everything a
manifest claims before anyone uses it. See docs/checkpoint.md for the format.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal, TypeGuard, get_args

import torch

from spotsafe.checkpoint.lease import GENERATION_KEY
from spotsafe.errors import CheckpointCorrupt, FormatVersionError, StateError
from spotsafe.storage.base import MAX_MANIFEST_BYTES, Store
from spotsafe.version import __version__

#: The newest on-storage format this code writes; readers accept 1..FORMAT_VERSION.
#: Version 2 adds data segments (a rank's payload in several files, each with its
#: ``offset``); a checkpoint without segments is still written as version 1, so older
#: spotsafe releases keep reading it.
FORMAT_VERSION = 2
FORMAT = "spotsafe-checkpoint"
MANIFEST = "manifest.json"
CHECKSUM = "xxh3_128"
#: A checkpoint directory's name: the step, then the writer generation that wrote it (absent in
#: checkpoints written before generations named directories). ASCII digits only (``\\d`` also
#: matches other scripts' digits), exactly 12 of each: name order is (step, generation) order.
STEP_DIR = re.compile(r"step-([0-9]{12})(?:-g([0-9]{12}))?")
#: The largest writer generation a directory name can hold (12 digits, as the lease files).
MAX_GENERATION = 10**12 - 1
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


def checkpoint_name(step: int, generation: int | None = None) -> str:
    """The directory of the checkpoint at ``step`` written by writer ``generation``.

    Zero-padded, so name order is (step, generation) order. Each generation writes only
    directories named by its own number: no object of one writer can replace or be
    replaced by another's (docs/design.md, "The commit protocol"). ``generation`` None is
    the name checkpoints had before generations named directories (read, never written).
    """
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
        raise ValueError(f"step must be an int within 0..{MAX_STEP}, not {step!r}")
    if generation is None:
        return f"step-{step:012d}"
    if isinstance(generation, bool) or not isinstance(generation, int) or not 1 <= generation <= MAX_GENERATION:
        raise ValueError(f"generation must be an int within 1..{MAX_GENERATION}, not {generation!r}")
    return f"step-{step:012d}-g{generation:012d}"


def parse_checkpoint_name(name: str) -> tuple[int, int | None] | None:
    """``(step, generation)`` of a checkpoint directory's name (generation None: an older name), or None."""
    m = STEP_DIR.fullmatch(name)
    if m is None:
        return None
    generation = int(m.group(2)) if m.group(2) is not None else None
    if generation == 0:
        return None  # generations start at 1: not a name spotsafe writes
    return int(m.group(1)), generation


def _utc(dt: datetime) -> datetime:
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


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
    name: str  # "step-000000001200-g000000000002"
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


def plain_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """``metadata`` as plain JSON for a manifest or completion record (the generation key is spotsafe's)."""
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
