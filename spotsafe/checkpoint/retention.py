"""What a checkpoint writer removes: the debris of killed saves, and checkpoints past the retention policy.

Only the holder of the writer lease (:mod:`spotsafe.checkpoint.lease`) removes
anything, and only what is provably dead or no longer kept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from spotsafe.checkpoint.catalog import Catalog
from spotsafe.checkpoint.lease import Lease
from spotsafe.checkpoint.manifest import MANIFEST, STEP_DIR
from spotsafe.errors import WriterFenced
from spotsafe.storage.base import Store

log = logging.getLogger(__name__)


def remove_incomplete(store: Store, lease: Lease | None, skip: str, protected: Callable[[str], bool]) -> None:
    """Remove what killed saves left in ``store``: temp files, and step dirs that never got a manifest.

    Only the lease holder cleans, and only what is provably dead: a directory without
    a manifest was left by an earlier generation (fenced: it can never commit) or by a
    failed save of this one; ``skip`` is the save in hand (every rank's files of it),
    and a directory ``protected`` says a snapshot persist is writing is left alone.
    """
    if lease is None or lease.generation is None:
        raise WriterFenced(f"{store.url}: cleaning up needs the writer lease (Checkpointer.acquire)")
    lease.check()
    store.cleanup_incomplete()
    for name in store.listdir(""):
        if protected(name):
            continue  # a snapshot persist is writing it right now (persist_snapshot_ranks)
        if STEP_DIR.fullmatch(name) and name != skip and store.file_size(f"{name}/{MANIFEST}") is None:
            log.info("spotsafe: removing incomplete checkpoint %s/%s", store.url, name)
            store.delete_dir(name)


def prune(catalog: Catalog, lease: Lease | None, just_saved: int, keep_last: int, keep_every: int | None) -> None:
    """Remove the ghosts and the checkpoints the policy no longer keeps, after ``just_saved`` was committed.

    Kept: the newest ``keep_last``, every multiple of ``keep_every``, ``just_saved``
    and the newest one whose files all have their sizes.
    """
    if lease is not None:
        lease.check()  # a superseded writer must not prune the new writer's checkpoints
    store = catalog.store
    scanned, ghosts = catalog.scan_all(strict=True)
    for ghost in ghosts:  # committed by a superseded writer after the takeover: provably dead
        if ghost.step != just_saved:
            log.warning("spotsafe: removing %s, committed by a superseded writer", ghost.url)
            store.delete_dir(ghost.name)
    infos = [info for info, _ in scanned]
    if len(infos) <= keep_last:
        return
    keep = {i.step for i in infos[-keep_last:]}
    keep.add(just_saved)
    if keep_every:
        keep.update(i.step for i in infos if i.step % keep_every == 0)
    newest_intact = next((i for i, m in reversed(scanned) if catalog.sizes_ok(i.name, m)), None)
    if newest_intact is not None:
        keep.add(newest_intact.step)
    for info in infos:
        if info.step not in keep:
            log.info("spotsafe: retention removes %s", info.url)
            store.delete_dir(info.name)
