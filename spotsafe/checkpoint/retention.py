"""What a checkpoint writer removes: the debris of killed saves, and checkpoints past the retention policy.

Only the holder of the writer lease (:mod:`spotsafe.checkpoint.lease`) removes
anything, and only what is provably dead or no longer kept. Every removal is bounded by
construction, not only by the lease check before it: a writer of generation *g* removes
only directories whose name carries a generation at or below *g* (checkpoint directories
are named by step and generation, :func:`spotsafe.checkpoint.manifest.checkpoint_name`),
so a superseded writer that wakes up inside this loop can never remove what a newer
generation wrote. The lease is checked again before each removal, so one that wakes up
superseded removes at most the one directory it was about to (docs/design.md, "The
commit protocol").
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from spotsafe.checkpoint.catalog import Catalog
from spotsafe.checkpoint.lease import Lease
from spotsafe.checkpoint.manifest import MANIFEST, CheckpointInfo, parse_checkpoint_name
from spotsafe.errors import WriterFenced
from spotsafe.storage.base import Store

log = logging.getLogger(__name__)


def _holder(store: Store, lease: Lease | None, what: str) -> int:
    """The generation of ``lease``, which must be held: nothing is removed without it."""
    if lease is None or lease.generation is None:
        raise WriterFenced(f"{store.url}: {what} needs the writer lease (Checkpointer.acquire)")
    return lease.generation


def removable(name: str, generation: int) -> bool:
    """True when a writer of ``generation`` may remove the checkpoint directory ``name``.

    Its own generation's directories and older ones (and those named before generations
    named directories); never a newer generation's, whatever this writer believes.
    """
    parsed = parse_checkpoint_name(name)
    return parsed is not None and (parsed[1] is None or parsed[1] <= generation)


def _remove(store: Store, lease: Lease, name: str, why: str) -> None:
    """Remove ``name`` after one more look at the lease (a superseded writer stops here)."""
    generation = _holder(store, lease, "removing a checkpoint")
    if not removable(name, generation):
        return
    lease.check()
    log.info("spotsafe: removing %s/%s (%s)", store.url.rstrip("/"), name, why)
    store.delete_dir(name)


def remove_incomplete(store: Store, lease: Lease | None, skip: str, protected: Callable[[str], bool]) -> None:
    """Remove what killed saves left in ``store``: temp files, and checkpoint dirs that never got a manifest.

    Only the lease holder cleans, and only what is provably dead: a directory of this
    generation or an older one without a manifest was left by an earlier generation
    (fenced: it can never commit one there that a reader would take, the ghost rule) or by
    a failed save of this one; ``skip`` is the save in hand (every rank's files of it), and
    a directory ``protected`` says a snapshot persist is writing is left alone.
    """
    generation = _holder(store, lease, "cleaning up")
    assert lease is not None
    lease.check()
    store.cleanup_incomplete()
    for name in store.listdir(""):
        if name == skip or protected(name) or not removable(name, generation):
            continue  # the save in hand, a snapshot persist writing right now, or a newer writer's
        if store.file_size(f"{name}/{MANIFEST}") is None:
            _remove(store, lease, name, "an incomplete checkpoint")


def prune(catalog: Catalog, lease: Lease | None, just_saved: str, keep_last: int, keep_every: int | None) -> None:
    """Remove the dead checkpoints and those the policy no longer keeps, after ``just_saved`` was committed.

    Dead: ghosts and older generations' copies of a step committed again
    (:meth:`Catalog.scan_all`). Kept: the newest ``keep_last``, every multiple of
    ``keep_every``, ``just_saved`` (a directory name) and the newest one whose files all
    have their sizes.
    """
    store = catalog.store
    _holder(store, lease, "pruning")
    assert lease is not None
    lease.check()  # a superseded writer must not prune the new writer's checkpoints
    scanned, dead = catalog.scan_all(strict=True)
    for info in dead:
        if info.name != just_saved:
            _remove(store, lease, info.name, _why_dead(info))
    infos = [info for info, _ in scanned]
    if len(infos) <= keep_last:
        return
    keep = {i.name for i in infos[-keep_last:]}
    keep.add(just_saved)
    if keep_every:
        keep.update(i.name for i in infos if i.step % keep_every == 0)
    newest_intact = next((i for i, m in reversed(scanned) if catalog.sizes_ok(i.name, m)), None)
    if newest_intact is not None:
        keep.add(newest_intact.name)
    for info in infos:
        if info.name not in keep:
            _remove(store, lease, info.name, "past the retention policy")


def _why_dead(info: CheckpointInfo) -> str:
    return f"committed by writer generation {info.generation}, superseded"
