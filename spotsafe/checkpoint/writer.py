"""The checkpoint writer: :class:`Checkpointer`, the public ``spotsafe.Checkpointer``.

It saves (stage → write → commit, :mod:`spotsafe.checkpoint.staging` and
:mod:`spotsafe.checkpoint.files`) under the writer lease
(:mod:`spotsafe.checkpoint.lease`), prunes (:mod:`spotsafe.checkpoint.retention`),
and reads through a :class:`~spotsafe.checkpoint.catalog.Catalog`. A reader that
only lists, checks or loads should use the catalog alone.

See docs/checkpoint.md for the format and the guarantees.
"""

from __future__ import annotations

import atexit
import json
import logging
import threading
import time as _time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

from spotsafe.checkpoint.catalog import Catalog
from spotsafe.checkpoint.completion import COMPLETE, read_completion
from spotsafe.checkpoint.files import commit_manifest, write_rank_files
from spotsafe.checkpoint.lease import GENERATION_KEY, Lease, Look
from spotsafe.checkpoint.manifest import (
    MANIFEST,
    MAX_STEP,
    REASONS,
    CheckpointInfo,
    FileEntry,
    Manifest,
    Reason,
    checkpoint_name,
    format_version_for,
    plain_metadata,
)
from spotsafe.checkpoint.places import flatten_live
from spotsafe.checkpoint.retention import prune, remove_incomplete
from spotsafe.checkpoint.staging import StagedState, StagingBuffer, stage
from spotsafe.distributed.commit import failed_ranks, merge_rank_state, persist_rank_files
from spotsafe.distributed.context import DistContext
from spotsafe.distributed.sharded import ShardedState
from spotsafe.errors import (
    CheckpointCorrupt,
    CheckpointNotFound,
    DistributedError,
    SpotsafeError,
    StateMismatch,
    WriterFenced,
)
from spotsafe.state import MapLocation
from spotsafe.storage.base import Store
from spotsafe.storage.registry import open_store

if TYPE_CHECKING:
    from typing_extensions import Self

    from spotsafe.distributed.board import NoticeBoard

log = logging.getLogger(__name__)

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
        self._buffer = StagingBuffer()
        #: The read side: listing, checking and loading go through it.
        self.catalog = Catalog(self.store)
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._retention: threading.Thread | None = None
        self._error: BaseException | None = None
        self._closed = False
        #: The writer lease, taken by the first save (or :meth:`acquire`); readers never take it.
        self.lease: Lease | None = None
        #: The generation of that lease on every rank (None until :meth:`acquire`).
        self.generation: int | None = None
        #: Checkpoint directories this writer committed (a re-save of a step replaces only its own manifest).
        self._committed: set[str] = set()
        if dist == "auto":
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
        #: Whether the next one-process save removes what killed saves left *before* it writes (the
        #: first save, and the one after a failure: a full disk may need that space). Every other
        #: does it after its commit, with the retention: it costs a look at every checkpoint's
        #: manifest (a round trip each on an object store), which must not stand before a notice's
        #: write. (A multi-rank save's coordinator cleans before every write: see _persist_ranks.)
        self._clean_first = True
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
        if self.dist is not None and self.dist.world_size > 1:  # every rank leaves together, holder known
            mine: int | SpotsafeError | None = None
            if self._coordinator:
                try:
                    mine = self._acquire(timeout)
                except SpotsafeError as e:  # told to every rank, so that none waits in the broadcast below
                    mine = e
            told = self.dist.broadcast_object(mine if isinstance(mine, int) else str(mine))
            if isinstance(mine, SpotsafeError):
                raise mine
            if not isinstance(told, int):
                raise WriterFenced(f"{self.store.url}: rank 0 could not take the writer lease: {told}")
            generation = told
        else:
            generation = self._acquire(timeout)
        #: The writer generation, known on every rank: it names every directory this writer writes.
        self.generation = int(generation)
        return self.generation

    @property
    def _coordinator(self) -> bool:
        return self.dist is None or self.dist.is_coordinator

    def _acquire(self, timeout: float | None = None) -> int:
        if self.lease is None:
            self.lease = Lease(self.store)
        if self.lease.generation is None and self.lease.record is not None:
            raise WriterFenced(f"{self.store.url}: this Checkpointer released its writer lease")
        return self.lease.acquire(self._newest_step, timeout=timeout)

    def _ensure_lease(self) -> None:
        """Take the lease when this writer has none yet; raise WriterFenced when it lost it."""
        if self.dist is not None and self.dist.world_size > 1:
            if self.generation is None:  # the same on every rank: set together by acquire()
                self.acquire()
            return
        if self.lease is None or not self.lease.held or self.generation is None:
            self.acquire()

    def _name(self, step: int) -> str:
        """This writer's directory for ``step``: named by its generation, so no other writer shares it."""
        if self.generation is None:
            raise WriterFenced(f"{self.store.url}: this writer holds no lease (Checkpointer.acquire)")
        return checkpoint_name(step, self.generation)

    def _commit(self, name: str, manifest: Manifest, look: Look | None = None, *, own_files: bool = False) -> None:
        """Commit ``manifest`` as ``name`` (rank 0): created exclusively, or replacing this writer's own."""
        replace = name in self._committed
        commit_manifest(self.store, name, manifest, self.lease, replace=replace, look=look, own_files=own_files)
        self._committed.add(name)

    def _newest_step(self) -> int | None:
        committed = self.catalog.committed(strict=False)
        return committed[-1][0].step if committed else None

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
        meta = plain_metadata(metadata)
        with self._lock:
            self.wait()  # one save at a time: a collective save's barriers must not interleave
            self._ensure_lease()  # the first save waits for the store (raises when superseded)
            if self._coordinator:
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
            snap = stage(state, self._buffer, copy=run_async)
            timings = {"snapshot_s": _time.perf_counter() - t0}

            def persist() -> None:
                if ctx is None:
                    self._persist(step, epoch, reason, when, meta, snap, timings, background_retention=not run_async)
                else:
                    self._persist_ranks(ctx, step, epoch, reason, when, meta, snap, dcp_files, timings)

            if not run_async:
                persist()  # durable when this returns; pruning old checkpoints goes on in the background
                return
            self._start(persist, f"spotsafe-save-{step}")

    def _start(self, persist: Callable[[], None], name: str) -> None:
        """Run ``persist`` in the background (a named daemon thread); ``wait()`` joins it and re-raises."""
        thread = threading.Thread(target=self._run, args=(persist,), name=name, daemon=True)
        self._thread = thread
        thread.start()

    def persist_snapshot(
        self,
        step: int,
        snap: StagedState,
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
        meta = plain_metadata(metadata)
        with self._lock:
            try:
                self.wait()
            except WriterFenced:
                raise
            except Exception as e:  # noqa: BLE001 - logged; persisting this snapshot matters more now
                log.error("spotsafe: an earlier background save failed (%s); persisting step %d anyway", e, step)
            self._ensure_lease()
            meta = self._generation_meta(meta)
            timings = {"snapshot_s": stall_s}

            def persist() -> None:
                self._persist(step, epoch, reason, when, meta, snap, timings, retain=retain)

            self._start(persist, f"spotsafe-snapshot-{step}")

    def persist_snapshot_ranks(
        self,
        step: int,
        snap: StagedState,
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
        meta = plain_metadata(metadata)
        name = self._name(step)
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
                    raise WriterFenced(f"{self.store.url}: this writer lost its lease; not committing {name}")
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
                self._commit(name, manifest)
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
            self._retain_timed(name, timings)
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
        sharded = {k: v.state_dict() for k, v in state.items() if isinstance(v, ShardedState)}
        if not sharded:
            return state, []
        from spotsafe.distributed.dcp import save_sharded

        records = save_sharded(sharded, self.store, self._name(step), ctx=self.dist, timeout=self.barrier_timeout)
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
        snap: StagedState,
        dcp_files: Sequence[FileEntry],
        timings: dict[str, float],
    ) -> None:
        """The collective save: every rank's files durable → barrier → rank 0 commits (fenced) → outcome shared."""
        name = self._name(step)
        t0 = _time.perf_counter()

        def write() -> list[FileEntry]:
            # Before every write: the other ranks do not wait for the coordinator's retention, so a
            # cleanup after the commit could remove the next step's directory while they write it.
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
            self._commit(name, manifest)
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
            self._retain_timed(name, timings)

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
        snap: StagedState,
        timings: dict[str, float],
        *,
        background_retention: bool = False,
        retain: bool = True,
    ) -> None:
        name = self._name(step)
        if self._clean_first:
            self._cleanup(skip=name)
        t0 = _time.perf_counter()
        parts: dict[str, float] = {}
        # The look before the commit, made while the files are written (its round trip hidden).
        look = Look(self.lease) if self.lease is not None and self.lease.generation is not None else None
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
            self._commit(name, manifest, look, own_files=True)
            t2 = _time.perf_counter()
        except BaseException as e:
            self._clean_first = True  # the next save frees what is left before it writes
            self._raise_fenced(e)
            # Free the space now (a full disk is the usual cause); never touch a committed step.
            # The directory is this generation's own: no other writer writes there.
            if self.lease is not None and self.lease.held and name not in self._committed:
                try:
                    if self.store.file_size(f"{name}/{MANIFEST}") is None:
                        self.store.delete_dir(name)
                except Exception:  # noqa: BLE001, S110 - the original error matters more
                    pass
            raise
        self._clean_first = False
        self.last_saved = CheckpointInfo.from_manifest(self.store, name, manifest)
        log.info("spotsafe: saved %s (%s, %d bytes)", self.last_saved.url, reason, manifest.size)
        timings.update(write_s=t1 - t0, commit_s=t2 - t1)
        self.last_timings = timings
        self.last_write_parts = parts
        if not retain:
            return
        if background_retention:
            thread = threading.Thread(
                target=self._retain_timed, args=(name, timings), name=f"spotsafe-retention-{step}", daemon=True
            )
            self._thread = thread  # wait(), the next save() and exit wait for it
            self._retention = thread  # ...but it is no save in flight (see save_in_flight)
            thread.start()
        else:
            self._retain_timed(name, timings)

    def _retain_timed(self, name: str, timings: dict[str, float]) -> None:
        t0 = _time.perf_counter()
        try:
            if self.dist is None:  # one process: its next save waits for this, nothing of it is being written
                self._cleanup(skip=name)  # (a multi-rank coordinator cleans before each write instead)
            self._retain(name)
        except Exception as e:  # noqa: BLE001 - the checkpoint is committed: a failed prune must not say otherwise
            log.warning("spotsafe: pruning old checkpoints after %s failed: %s", name, e)
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
        """Remove what killed saves left (see :func:`spotsafe.checkpoint.retention.remove_incomplete`)."""
        remove_incomplete(self.store, self.lease, skip, self._is_protected)

    def _is_protected(self, name: str) -> bool:
        with self._lock_protected:
            return name in self._protected

    def _retain(self, just_saved: str) -> None:
        prune(self.catalog, self.lease, just_saved, self.keep_last, self.keep_every)

    # -- reading (through the catalog) -------------------------------------------
    def scan(self) -> Iterator[tuple[str, Manifest | SpotsafeError]]:
        """Every step directory, oldest first, with its manifest or why it has none usable."""
        return self.catalog.scan()

    def list(self) -> list[CheckpointInfo]:
        """Committed checkpoints (their manifest parses), oldest first.

        Raises :class:`FormatVersionError` when one was written by a newer spotsafe,
        rather than silently resuming from an older one.
        """
        return self.catalog.list()

    def check(self, info: CheckpointInfo | str, manifest: Manifest | None = None, *, full: bool = True) -> Manifest:
        """Raise :class:`CheckpointCorrupt` unless every file exists with its size (and checksum when ``full``).

        With a mirror, a checkpoint whose local copy is damaged passes when its remote
        copy is intact (that is the one :meth:`load` then reads).
        """
        return self.catalog.check(info, manifest, full=full)

    def latest(self, verify: bool = False) -> CheckpointInfo | None:
        """The newest committed checkpoint whose files exist with the right sizes (and checksums when ``verify``)."""
        return self.catalog.latest(verify)

    # -- loading ----------------------------------------------------------------
    def load(
        self,
        info: CheckpointInfo | int | None = None,
        *,
        map_location: MapLocation = None,
        verify: bool = True,
        into: Any = None,
    ) -> dict[str, Any]:
        """The saved state as a plain tree of tensors and values.

        ``info`` None means the newest intact checkpoint: damaged ones are
        logged and skipped. A given ``info`` (or step) that is damaged raises
        :class:`CheckpointCorrupt`. ``verify`` checks every file's checksum first.
        With ``dist`` (several ranks), every rank gets the same step: rank 0's state
        with this rank's own ``per_rank`` keys. ``into``: live state laid out as the saved one
        (``{"model": model}``), its matching tensors read into in place, the checksum checked
        after (docs/checkpoint.md, "Into live tensors"); the state returned holds views of them.
        """
        if self.dist is not None and self.dist.world_size > 1:
            return self._restore_ranks(self.dist, info, {}, map_location)
        live = flatten_live(into)
        loaded, state = self.catalog.load(info, map_location=map_location, verify=verify, into=live)
        self.last_loaded = loaded
        return state

    def restore(
        self, info: CheckpointInfo | int | None, objects: Mapping[str, Any], *, map_location: MapLocation = None
    ) -> dict[str, Any]:
        """Load a checkpoint into live objects; return the values no object took, as a plain dict.

        ``objects`` maps the names used at save time to objects with
        ``load_state_dict`` (model, optimizer, scheduler, scaler, RNGState).
        ``info`` None restores the newest intact checkpoint (see :meth:`load`);
        :attr:`last_loaded` tells which one it was. Read in place (``load(into=objects)``): after
        an error the objects may hold part of a damaged checkpoint (``spotsafe.Run`` stops there).
        """
        for key, obj in objects.items():
            if not callable(getattr(obj, "load_state_dict", None)):
                raise TypeError(f"objects[{key!r}] ({type(obj).__name__}) has no load_state_dict()")
        if self.dist is not None:
            return self._restore_ranks(self.dist, info, objects, map_location)
        state = self.load(info, map_location=map_location, into=objects)
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
                resolved, known = self.catalog.resolve_read(int(step))
                state = merge_rank_state(
                    lambda r: self.catalog.load_rank(resolved, map_location, True, rank=r, known=known),  # noqa: B023 - called at once
                    ctx.rank,
                    resolved.world_size,
                    self.per_rank,
                )
            except (CheckpointCorrupt, CheckpointNotFound) as e:
                error = e
            failed = failed_ranks(ctx, error is not None)
            if not failed and sharded:
                from spotsafe.distributed.dcp import load_sharded

                dcp = [f for f in self.catalog.manifest(resolved.name).files if f.role == "dcp"]
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
            "generation": self.generation,
            "time": datetime.now(timezone.utc).isoformat(),
            "metadata": plain_metadata(metadata),
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
