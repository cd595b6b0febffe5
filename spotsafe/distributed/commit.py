"""The commit protocol for files several ranks wrote: barrier, gather on rank 0, commit, broadcast.

Writer roles for replicated (DDP) state: rank 0 writes model/optimizer, every rank
writes its own small file (RNG, data position); :func:`source_rank` and
:func:`rescale_batch` carry them over to a changed world size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from spotsafe.distributed.context import DistContext
from spotsafe.errors import DistributedError, WriterFenced

log = logging.getLogger("spotsafe.distributed")


@dataclass(frozen=True)
class FileRecord:
    """One file a rank wrote into a checkpoint: store path (relative to the checkpoint), size, checksum."""

    path: str
    size: int
    #: xxh3_128 hex digest of the content
    checksum: str


def source_rank(rank: int, old_world_size: int) -> int:
    """Whose per-rank state rank ``rank`` restores from a checkpoint of ``old_world_size`` ranks.

    Same world size: its own. A changed one (elastic): rank ``r`` takes rank
    ``r mod old_world_size``'s RNG streams. The data position is not taken per
    rank: it is re-split from the global samples-consumed count
    (:class:`ElasticDistributedSampler`).
    """
    if old_world_size < 1:
        raise ValueError(f"old world size must be >= 1, got {old_world_size}")
    return rank % old_world_size


def commit_collectively(
    ctx: DistContext | None,
    mine: list[Any],
    commit: Callable[[list[Any]], None] | None,
    what: str,
) -> list[Any]:
    """Gather every rank's file entries on rank 0, let it commit, broadcast the outcome.

    Entries are small picklable records with a ``path`` (:class:`FileRecord`, or
    the checkpoint engine's ``FileEntry``); the list rank 0 commits is sorted by path.
    """
    if ctx is None or ctx.world_size == 1:
        if commit is not None:
            commit(sorted(mine, key=lambda r: r.path))
        return sorted(mine, key=lambda r: r.path)
    gathered = ctx.gather_object(list(mine))
    files: list[Any] = []
    if ctx.is_coordinator:
        assert gathered is not None
        seen: dict[str, Any] = {}
        for rank_files in gathered:
            for rec in rank_files:
                seen[rec.path] = rec
        files = [seen[p] for p in sorted(seen)]
        try:
            if commit is not None:
                commit(list(files))
        except BaseException as e:
            kind = "fenced" if isinstance(e, WriterFenced) else "error"
            ctx.broadcast_object((kind, f"{type(e).__name__}: {e}"))
            raise
        ctx.broadcast_object(("ok", files))
        return files
    outcome = ctx.broadcast_object(None)
    if outcome[0] == "fenced":  # every rank stops the same way: another instance owns the store
        raise WriterFenced(f"{what}: {outcome[1]}")
    if outcome[0] != "ok":
        raise DistributedError(f"{what}: rank 0 failed to commit: {outcome[1]}")
    return list(outcome[1])


def persist_rank_files(
    ctx: DistContext | None,
    write: Callable[[], list[Any]],
    commit: Callable[[list[Any]], None],
    *,
    timeout: float | None = None,
    what: str = "checkpoint",
) -> list[Any]:
    """Every rank writes its own files (``write``), then the commit protocol runs.

    ``write`` returns this rank's file entries once they are durable. A rank
    whose write fails still reaches the barrier and votes no, so nobody waits
    for it to time out and nothing is committed; it re-raises its own error,
    the others raise :class:`DistributedError` naming it. A rank that never
    arrives (killed, hung) is named by the barrier.
    """
    error: BaseException | None = None
    mine: list[Any] = []
    try:
        mine = list(write())
    except Exception as e:  # noqa: BLE001 - voted on below, then re-raised
        error = e
    if ctx is None or ctx.world_size == 1:
        if error is not None:
            raise error
        return commit_collectively(ctx, mine, commit, what)
    ctx.barrier(timeout, what=what)
    failed = failed_ranks(ctx, error is not None)
    if failed:
        # Rank 0 found its writer lease superseded: every rank stops the same way.
        fenced = ctx.broadcast_object(isinstance(error, WriterFenced) if ctx.is_coordinator else None)
        if error is not None:
            raise error
        if fenced:
            raise WriterFenced(f"{what}: rank 0's writer lease was superseded; nothing was committed")
        who = ", ".join(map(str, failed))
        raise DistributedError(f"{what}: rank(s) {who} failed to write their files; nothing was committed")
    return commit_collectively(ctx, mine, commit, what)


def failed_ranks(ctx: DistContext, failed: bool) -> list[int]:
    """The ranks that report ``failed`` (every rank gets the same list); over the checkpoint group."""
    import torch
    import torch.distributed as dist

    t = torch.zeros(ctx.world_size, dtype=torch.int32)
    t[ctx.rank] = int(failed)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.group)
    return [r for r in range(ctx.world_size) if t[r].item()]


#: Keys of a :class:`spotsafe.Run`'s state that differ per rank (RNG streams, data
#: position); everything else is replicated under DDP and written by rank 0 only.
RANK_KEYS = ("rng", "spotsafe")


def rank_state(state: Mapping[str, Any], ctx: DistContext | None, rank_keys: Sequence[str]) -> dict[str, Any]:
    """What this rank writes: everything on rank 0, only ``rank_keys`` elsewhere (replicated state once)."""
    if ctx is None or ctx.is_coordinator:
        return dict(state)
    return {k: v for k, v in state.items() if k in rank_keys}


def merge_rank_state(
    load_rank: Callable[[int], dict[str, Any]],
    rank: int,
    old_world_size: int,
    rank_keys: Sequence[str],
) -> dict[str, Any]:
    """Rank 0's (replicated) state with ``rank_keys`` taken from :func:`source_rank`'s own file."""
    state = load_rank(0)
    src = source_rank(rank, max(old_world_size, 1))
    if src != 0:
        own = load_rank(src)
        for key in rank_keys:
            if key in own:
                state[key] = own[key]
    return state


def rescale_batch(batch: int, old_world_size: int, new_world_size: int) -> int:
    """The batch index in an epoch that continues it on ``new_world_size`` ranks.

    ``DistributedSampler`` deals the epoch's permutation (the same for every world
    size) round-robin, so after ``batch`` batches per rank on ``old_world_size``
    ranks exactly the first ``batch * old_world_size`` batches' worth of the
    permutation were read; on the new world size rank ``r`` skips its first
    ``batch * old_world_size // new_world_size`` batches, which are those
    samples. Rounding down re-reads less than one batch per rank when it does not
    divide evenly; never skips an unread sample.
    """
    if old_world_size == new_world_size:
        return batch
    return (batch * old_world_size) // new_world_size
