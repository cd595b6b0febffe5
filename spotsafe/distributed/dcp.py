"""Sharded state through ``torch.distributed.checkpoint`` (DCP), under spotsafe's commit protocol.

Sharded (FSDP / DTensor) state goes into ``<step dir>/dcp/`` of any spotsafe store:
every rank's shards durable, then a ``monitored_barrier`` with a timeout (a missing rank
is named in a :class:`~spotsafe.errors.DistributedError`), then rank 0 commits the
manifest last. DCP is imported at the top of this module, which is itself imported only
when sharded state is saved or loaded (``spotsafe.distributed`` loads it on first use).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import pickle
import threading
import warnings
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemBase, FileSystemReader, _FileSystemWriter
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from spotsafe.checkpoint.files import checksum
from spotsafe.distributed.commit import FileRecord, commit_collectively
from spotsafe.distributed.context import DistContext
from spotsafe.errors import CheckpointCorrupt, DistributedError, UnsafeCheckpoint

if TYPE_CHECKING:
    from spotsafe.storage.base import Store

#: Directory, inside a checkpoint, that DCP writes sharded state into.
DCP_DIR = "dcp"


class _Stream(io.BytesIO):
    """A write buffer that hands its bytes to a callback when closed (DCP closes its streams itself)."""

    def __init__(self, on_close: Callable[[memoryview], None]) -> None:
        super().__init__()
        self._on_close = on_close
        self._aborted = False

    def abort(self) -> None:
        """The writer failed: closing must not publish a partial file."""
        self._aborted = True

    def close(self) -> None:
        if not self.closed and not self._aborted:
            self._aborted = True  # publish once
            with self.getbuffer() as view:
                self._on_close(view)
        super().close()


class StoreFileSystem(FileSystemBase):
    """DCP's file-system interface over a spotsafe :class:`~spotsafe.storage.base.Store`.

    Every file is written through ``store.write_file`` (durable on return, any
    backend: local EBS directory, S3, a mirror) and recorded with its size and
    checksum, so the manifest can list DCP's files like any other. DCP writes
    its ``.metadata`` to a temp name and renames it; a store has no rename, so
    the temp file is held in memory and written under its final name.
    """

    def __init__(self, store: Store, expected: Mapping[str, FileRecord] | None = None) -> None:
        self.store = store
        self.records: dict[str, FileRecord] = {}
        self.expected = expected
        self._held: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def _put(self, path: str, data: memoryview) -> None:
        if path.endswith(".tmp"):
            with self._lock:
                self._held[path] = bytes(data)
            return
        self.store.write_file(path, [data])
        rec = FileRecord(path=path, size=len(data), checksum=checksum(data))
        with self._lock:
            self.records[path] = rec

    @contextlib.contextmanager
    def create_stream(self, path: Any, mode: str) -> Generator[io.IOBase, None, None]:
        p = os.fspath(path)
        if "w" in mode:
            stream = _Stream(lambda buf: self._put(p, buf))
            try:
                yield stream
            except BaseException:
                stream.abort()
                raise
            finally:
                stream.close()
            return
        with self._lock:
            held = self._held.get(p)
        data = held if held is not None else self.store.read_file(p)
        self._verify(p, data)
        with io.BytesIO(data) as reader:
            yield reader

    def _verify(self, path: str, data: Any) -> None:
        if self.expected is None:
            return
        rec = self.expected.get(path)
        if rec is None:
            raise CheckpointCorrupt(f"{self.store.url}/{path}: DCP asked for a file the manifest does not list")
        size = len(data) if not isinstance(data, memoryview) else data.nbytes
        if size != rec.size or checksum(data) != rec.checksum:
            raise CheckpointCorrupt(
                f"{self.store.url}/{path}: size or checksum does not match the manifest "
                f"(expected {rec.size} bytes, xxh3_128 {rec.checksum})"
            )

    def concat_path(self, path: Any, suffix: str) -> str:
        base = os.fspath(path).rstrip("/")
        return f"{base}/{suffix}" if base else suffix

    def rename(self, path: Any, new_path: Any) -> None:
        old, new = os.fspath(path), os.fspath(new_path)
        with self._lock:
            data = self._held.pop(old, None)
        if data is None:
            data = bytes(self.store.read_file(old))
        self._put(new, memoryview(data))

    def init_path(self, path: Any) -> str:
        return str(os.fspath(path)).strip("/")

    def mkdir(self, path: Any) -> None:
        pass  # stores create parents on write

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True

    def exists(self, path: Any) -> bool:
        p = os.fspath(path)
        with self._lock:
            if p in self._held:
                return True
        return self.store.file_size(p) is not None

    def rm_file(self, path: Any) -> None:
        # Only reached for a stale .metadata before its rewrite; the write overwrites it.
        with self._lock:
            self._held.pop(os.fspath(path), None)

    def ls(self, path: Any) -> list[str]:
        p = os.fspath(path)
        return [self.concat_path(p, name) for name in self.store.listdir(p)]


_SAFE_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"LoadItemType", "WriteItemType"},
    "torch.serialization": {"_get_layout"},
    "collections": {"OrderedDict"},
    "pathlib": {"PosixPath", "PurePosixPath"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Reads DCP's ``.metadata`` (a pickle) admitting only DCP's own metadata types.

    DCP's reader calls ``pickle.load`` on it; a checkpoint from a shared bucket
    must not be able to run code, so anything else is refused.
    """

    def find_class(self, module: str, name: str) -> Any:

        if module == "torch":
            if name == "Size":
                return torch.Size
            obj = getattr(torch, name, None)
            if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        elif name in _SAFE_DCP_CLASSES.get(module, ()):
            return getattr(importlib.import_module(module), name)
        raise UnsafeCheckpoint(f"DCP metadata refers to {module}.{name}, which the safe loader does not admit")


class StoreWriter(_FileSystemWriter):
    """DCP storage writer into a spotsafe store; barrier after this rank's shards are durable."""

    def __init__(
        self,
        store: Store,
        path: str,
        ctx: DistContext | None,
        barrier_timeout: float | None,
        what: str,
    ) -> None:
        # sync_files=False: store.write_file is durable on return already.
        super().__init__(path, single_file_per_rank=True, sync_files=False, overwrite=True)
        self.store_fs = StoreFileSystem(store)
        self.fs = self.store_fs  # type: ignore[assignment]  # DCP types it as its local FileSystem; same interface
        self.path = self.fs.init_path(path)
        self.ctx = ctx
        self.barrier_timeout = barrier_timeout
        self.what = what
        self.barrier_error: DistributedError | None = None

    def write_data(self, plan: Any, planner: Any) -> Any:
        fut = super().write_data(plan, planner)
        fut.wait()  # this rank's shards are durable in the store
        if self.ctx is not None and self.ctx.world_size > 1:
            try:
                self.ctx.barrier(self.barrier_timeout, what=self.what)
            except DistributedError as e:
                self.barrier_error = e
                raise
        return fut


class StoreReader(FileSystemReader):
    """DCP storage reader from a spotsafe store: checks each file against the manifest, no free unpickling."""

    def __init__(self, store: Store, path: str, expected: Mapping[str, FileRecord] | None) -> None:
        super().__init__(path)
        self.fs = StoreFileSystem(store, expected)  # type: ignore[assignment]  # as in StoreWriter
        self.path = self.fs.init_path(path)
        #: a refusal (corrupt file, unsafe metadata) DCP would otherwise bury in its own errors
        self.refused: Exception | None = None

    def read_data(self, plan: Any, planner: Any) -> Any:
        try:
            return super().read_data(plan, planner)
        except (CheckpointCorrupt, UnsafeCheckpoint) as e:
            self.refused = self.refused or e
            raise

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:

        if self.refused is not None:  # DCP falls back to per-rank metadata: refuse again
            raise self.refused
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        try:
            with self.fs.create_stream(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (CheckpointCorrupt, UnsafeCheckpoint) as e:
            self.refused = e
            raise
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, but non-tensor values load with ``weights_only=True``."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def save_sharded(
    state: Mapping[str, Any],
    store: Store,
    directory: str,
    *,
    ctx: DistContext | None = None,
    commit: Callable[[list[FileRecord]], None] | None = None,
    timeout: float | None = None,
) -> list[FileRecord]:
    """Save a (sharded) state dict with DCP into ``<directory>/dcp/`` of ``store``; commit last.

    Every rank must call it. Protocol: each rank writes its shards through
    ``store.write_file`` (durable) → ``monitored_barrier`` with ``timeout`` →
    DCP's coordinator writes ``.metadata`` → the file lists (sizes, checksums)
    are gathered on rank 0 → rank 0 calls ``commit(files)`` (writes the
    manifest) → rank 0's outcome is broadcast, so every rank returns or raises
    together. A rank that dies before the barrier makes the others raise
    :class:`DistributedError` naming it, and ``commit`` is never called.

    Returns every rank's files (on every rank), paths relative to ``directory``.
    For FSDP state use ``torch.distributed.checkpoint.state_dict.get_state_dict``
    to build ``state``.
    """

    directory = directory.strip("/")
    what = f"checkpoint {store.url}/{directory}"
    writer = StoreWriter(store, f"{directory}/{DCP_DIR}", ctx, timeout, what)
    multi = ctx is not None and ctx.world_size > 1
    try:
        with warnings.catch_warnings():
            # one process on purpose: DCP's "assuming the intent is to save in a single process" is noise
            warnings.filterwarnings("ignore", message=".*single process.*", category=UserWarning)
            dcp_save(
                dict(state),
                storage_writer=writer,
                process_group=ctx.group if ctx is not None and multi else None,
                no_dist=not multi,
            )
    except CheckpointException as e:
        if writer.barrier_error is not None:
            raise writer.barrier_error from e
        failures = getattr(e, "failures", {})
        for err in failures.values():
            inner = _unwrap(err)
            if isinstance(inner, DistributedError):
                raise inner from e
        raise DistributedError(f"{what}: sharded save failed: {e}") from e
    except RuntimeError as e:
        if writer.barrier_error is not None:
            raise writer.barrier_error from e
        raise DistributedError(f"{what}: sharded save failed on rank {ctx.rank if ctx else 0}: {e}") from e

    prefix = f"{directory}/"
    mine = [
        FileRecord(path=r.path[len(prefix) :], size=r.size, checksum=r.checksum)
        for r in sorted(writer.store_fs.records.values(), key=lambda r: r.path)
    ]
    return commit_collectively(ctx, mine, commit, what)


def _unwrap(err: Any) -> Any:
    # DCP wraps exceptions as (exception, traceback) tuples.
    if isinstance(err, tuple) and err and isinstance(err[0], BaseException):
        return err[0]
    return err


def load_sharded(
    state: dict[str, Any],
    store: Store,
    directory: str,
    *,
    ctx: DistContext | None = None,
    files: Sequence[FileRecord] | None = None,
) -> None:
    """Load ``<directory>/dcp/`` into ``state`` in place (DCP reshards to the current world size).

    ``files`` (from the manifest, paths relative to ``directory``) makes every
    file checked against its size and checksum before DCP reads it. Non-tensor
    values and DCP's metadata load without free unpickling.
    """

    directory = directory.strip("/")
    expected = None
    if files is not None:
        expected = {f"{directory}/{f.path}": f for f in files}
    reader = StoreReader(store, f"{directory}/{DCP_DIR}", expected)
    multi = ctx is not None and ctx.world_size > 1
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*single process.*", category=UserWarning)
            dcp_load(
                state,
                storage_reader=reader,
                planner=SafeLoadPlanner(),
                process_group=ctx.group if ctx is not None and multi else None,
                no_dist=not multi,
            )
    except CheckpointException as e:
        if reader.refused is not None:
            raise reader.refused from e
        for err in getattr(e, "failures", {}).values():
            inner = _unwrap(err)
            if isinstance(inner, (CheckpointCorrupt, UnsafeCheckpoint)):
                raise inner from e
        raise DistributedError(f"{store.url}/{directory}: sharded load failed: {e}") from e
