"""The read-only view of a checkpoint store: list, find the latest, check, read manifests, load.

A :class:`Catalog` reads what writers committed and nothing else: it never takes the
writer lease (it reads the lease files at most, to leave out the commits of a
superseded writer: the ghost rule of :mod:`spotsafe.checkpoint.lease`), never writes
and leaves no thread running (a load's readers end with it). :class:`spotsafe.checkpoint.writer.Checkpointer` reads
through one; so do the CLI, the resume supervisor and ``launch status``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch

from spotsafe.checkpoint.files import (
    check_checksum,
    check_sizes,
    decode_tree,
    read_back_to_back,
    read_listed_file,
    validate_trees,
)
from spotsafe.checkpoint.lease import GENERATION_KEY, is_ghost, takeovers
from spotsafe.checkpoint.manifest import (
    MANIFEST,
    CheckpointInfo,
    FileEntry,
    Manifest,
    checkpoint_name,
    parse_checkpoint_name,
)
from spotsafe.checkpoint.places import LiveState, live_places, read_into_places, streamable
from spotsafe.errors import CheckpointCorrupt, CheckpointNotFound, FormatVersionError, SpotsafeError
from spotsafe.state import MapLocation, blob_from_buffer, unflatten
from spotsafe.storage.base import Store

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Committed checkpoints with their manifests, oldest first.
Committed = list[tuple[CheckpointInfo, Manifest]]


class Catalog:
    """The committed checkpoints of ``store``, read-only (the caller opens and closes the store)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def __repr__(self) -> str:
        return f"Catalog({self.store!r})"

    # -- listing ----------------------------------------------------------------
    def tiers(self) -> list[Store]:
        """Where a checkpoint can be read from: the store, then a mirror's remote copy."""
        return [self.store, *self.store.tiers[1:]]

    def manifest(self, name: str, store: Store | None = None) -> Manifest:
        """The parsed manifest of the checkpoint directory ``name`` (in ``store``, default: this one).

        The manifest must be the one its directory's name says: the same step, and the same
        writer generation (a directory named for generation g holds only g's commit).
        """
        store = store or self.store
        where = f"{store.url.rstrip('/')}/{name}/{MANIFEST}"
        try:
            data = store.read_file(f"{name}/{MANIFEST}")
        except CheckpointNotFound as e:
            raise CheckpointNotFound(f"{where} does not exist") from e
        m = Manifest.from_json(data, where)
        named = parse_checkpoint_name(name)
        if named is not None:
            step, generation = named
            if step != m.step:
                raise CheckpointCorrupt(f"{where}: a manifest for step {m.step} in the directory of step {step:012d}")
            written_by = m.metadata.get(GENERATION_KEY)
            if generation is not None and written_by != generation:
                raise CheckpointCorrupt(
                    f"{where}: a manifest of writer generation {written_by!r} in the directory of generation {generation}"
                )
        return m

    def names(self) -> list[str]:
        """Every checkpoint directory's name in the store, in (step, generation) order (one listing)."""
        named = [(parsed, n) for n in self.store.listdir("") if (parsed := parse_checkpoint_name(n)) is not None]
        return [n for (step, gen), n in sorted(named, key=lambda item: (item[0][0], item[0][1] or 0))]

    def scan(self) -> Iterator[tuple[str, Manifest | SpotsafeError]]:
        """Every checkpoint directory, oldest first, with its manifest or why it has none usable."""
        for name in self.names():
            try:
                # A mirror whose local manifest is damaged reads the remote one.
                yield name, self.with_fallback(name, lambda store: self.manifest(name, store))  # noqa: B023 - called at once
            except (CheckpointNotFound, CheckpointCorrupt, FormatVersionError) as e:
                yield name, e

    def committed(self, strict: bool = True) -> Committed:
        """Committed checkpoints (ghosts left out) with their manifests, so callers need not read them again."""
        return self.scan_all(strict)[0]

    def scan_all(self, strict: bool = True) -> tuple[Committed, list[CheckpointInfo]]:
        """Committed checkpoints with their manifests (one per step), and the dead ones left out of them.

        Dead: a *ghost*, committed by a superseded writer after a newer generation took the
        store over (:mod:`spotsafe.checkpoint.lease`), which is not part of the run's history;
        or an older generation's copy of a step that a newer generation committed again
        (a step resolves to its newest live generation).
        """
        out = []
        for name, m in self.scan():
            if isinstance(m, Manifest):
                out.append((CheckpointInfo.from_manifest(self.store, name, m), m))
            elif isinstance(m, FormatVersionError) and strict:
                raise m
            elif isinstance(m, CheckpointCorrupt):
                log.warning("spotsafe: ignoring %s: %s", name, m)
        kept, dead = self._without_ghosts(out)
        newest: dict[int, tuple[CheckpointInfo, Manifest]] = {}
        for info, m in kept:  # (step, generation) order: a later entry of a step is a newer generation
            replaced = newest.get(info.step)
            if replaced is not None:
                dead.append(replaced[0])
            newest[info.step] = (info, m)
        return [newest[step] for step in sorted(newest)], dead

    def _without_ghosts(self, out: Committed) -> tuple[Committed, list[CheckpointInfo]]:
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
        return [info for info, _ in self.committed(strict=True)]

    def sizes_ok(self, name: str, manifest: Manifest | None = None) -> bool:
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
        m = manifest or self.manifest(name)
        return self.with_fallback(name, lambda store: self._check_on(store, name, m, full))

    def with_fallback(self, name: str, fn: Callable[[Store], T]) -> T:
        """``fn(store)``; when that finds the checkpoint damaged, ``fn`` on a mirror's remote copy."""
        tiers = self.tiers()
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
        check_sizes(store, name, m.files)
        if full:
            self._verify_files(store, name, list(m.files))
            validate_trees(store, name, m.files)
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
            read_back_to_back(store, name, group, verify=True)

    def latest(self, verify: bool = False) -> CheckpointInfo | None:
        """The newest committed checkpoint whose files exist with the right sizes (and checksums when ``verify``)."""
        for info, m in reversed(self.committed(strict=True)):
            try:
                self.check(info.name, m, full=verify)
            except (CheckpointCorrupt, CheckpointNotFound) as e:
                log.warning("spotsafe: skipping damaged checkpoint: %s", e)
                continue
            return info
        return None

    # -- loading ----------------------------------------------------------------
    def resolve(self, info: CheckpointInfo | int) -> CheckpointInfo:
        """``info`` itself, or the committed checkpoint of a step: its newest generation that is no ghost."""
        return self.resolve_read(info)[0]

    def resolve_read(self, info: CheckpointInfo | int) -> tuple[CheckpointInfo, tuple[Store, Manifest] | None]:
        """:meth:`resolve`, with the manifest it read and the tier it read it from (a load need not read it again)."""
        if isinstance(info, CheckpointInfo):
            return info, None
        if isinstance(info, bool) or not isinstance(info, int):
            raise TypeError(f"info must be a CheckpointInfo, a step or None, not {type(info).__name__}")
        checkpoint_name(info)  # a step out of range: ValueError naming it
        candidates = [n for n in reversed(self.names()) if (parse_checkpoint_name(n) or (-1, None))[0] == info]
        later: list[tuple[int, int]] | None = None
        problems: list[str] = []
        damaged: list[CheckpointCorrupt] = []
        for name in candidates:
            try:
                tier, m = self.with_fallback(name, lambda store: (store, self.manifest(name, store)))  # noqa: B023 - called at once
            except CheckpointCorrupt as e:
                damaged.append(e)
                continue
            except CheckpointNotFound as e:
                problems.append(str(e))
                continue
            found = CheckpointInfo.from_manifest(self.store, name, m)
            if found.generation is not None:
                if later is None:
                    later = takeovers(self.store, found.generation)
                if is_ghost(found.generation, found.step, later):
                    problems.append(f"{found.url}: committed by a superseded writer (generation {found.generation})")
                    continue
            return found, (tier, m)
        if damaged:
            raise damaged[0]  # the step is there, damaged: say how (the newest generation's)
        detail = f" ({'; '.join(problems)})" if problems else ""
        raise CheckpointNotFound(f"{self.store.url.rstrip('/')}: no committed checkpoint for step {info}{detail}")

    def load_rank(
        self,
        info: CheckpointInfo,
        map_location: MapLocation,
        verify: bool,
        rank: int = 0,
        known: tuple[Store, Manifest] | None = None,
        into: LiveState | None = None,
    ) -> dict[str, Any]:
        """One rank's state from ``info``; a mirror whose local copy is damaged reads the remote one.

        ``known``: a manifest of ``info`` just read, and the tier it was read from (not read again there).
        ``into``: live objects (flattened) whose tensors take the saved bytes in place where they
        match (:func:`spotsafe.state.live_places`), on a store that streams its reads.
        """
        return self.with_fallback(
            info.name, lambda store: self._load_from(store, info, map_location, verify, rank, known, into)
        )

    def _load_from(
        self,
        store: Store,
        info: CheckpointInfo,
        map_location: MapLocation,
        verify: bool,
        rank: int,
        known: tuple[Store, Manifest] | None = None,
        into: LiveState | None = None,
    ) -> dict[str, Any]:
        name = info.name
        base = f"{store.url.rstrip('/')}/{name}"
        m = known[1] if known is not None and known[0] is store else self.manifest(name, store)
        trees = [f for f in m.files if f.rank == rank and f.role == "tree"]
        datas = [f for f in m.files if f.rank == rank and f.role == "data"]
        if len(trees) != 1 or not datas:
            raise CheckpointCorrupt(f"{base}/{MANIFEST}: no data/tree files for rank {rank}")
        tree_buf = self._read_one(store, name, trees[0], verify)
        where = f"{base}/{trees[0].path}"
        places: dict[int, torch.Tensor] = {}
        streamed = store.streams_reads and len(datas) == 1 and datas[0].offset is None
        if streamed:
            # The tree first: whether to stream, and which saved blobs have a live tensor to go into.
            desc, blobs = decode_tree(tree_buf, datas[0].size, where)
            streamed = streamable(desc, blobs, map_location)
        if streamed:
            live_blobs = live_places(desc, blobs, into, map_location) if into is not None else {}
            places = {b: into.flat.sources[lb] for b, lb in live_blobs.items()} if into is not None else {}
            check_sizes(store, name, datas)  # a file of another size is refused before a byte of it is read
            data_where = f"{base}/{datas[0].path}"
            try:
                data = read_into_places(store, name, datas[0], blobs, places, verify)
            except BaseException:
                if into is not None and live_blobs:
                    into.mark_damaged(live_blobs.values(), data_where)
                raise
        elif len(datas) == 1 and datas[0].offset is None:
            data = self._read_one(store, name, datas[0], verify)
            data_where = f"{base}/{datas[0].path}"
        else:
            data = self._read_segments(store, name, datas, verify)
            data_where = f"{base}/{datas[0].path} (+{len(datas) - 1} segments)"
        if not streamed:
            desc, blobs = decode_tree(tree_buf, len(data), where)

        def blob(i: int) -> torch.Tensor:
            if not 0 <= i < len(blobs):
                raise CheckpointCorrupt(f"{where}: blob {i} out of range")
            if i in places:
                return places[i]
            return blob_from_buffer(data, blobs[i], data_where)

        state = unflatten(desc, blob, map_location=map_location, where=where)
        if not isinstance(state, dict):
            raise CheckpointCorrupt(f"{where}: the saved state is not a mapping")
        if into is not None and into.damaged:
            into.check_covered(desc, where)  # an earlier read into them failed: this one must cover it
        return state

    def _read_one(self, store: Store, name: str, f: FileEntry, verify: bool) -> memoryview:
        base = f"{store.url.rstrip('/')}/{name}"
        buf = read_listed_file(store, name, f)
        if verify:
            check_checksum(base, f, buf)
        return buf

    def _read_segments(self, store: Store, name: str, segments: Sequence[FileEntry], verify: bool) -> memoryview:
        """One rank's payload from its segments, read in parallel into one private buffer.

        The manifest's parser (``spotsafe.checkpoint.manifest``) has checked that the segments tile
        the payload exactly, with no gap and no overlap.
        """
        ordered = sorted(segments, key=lambda f: -1 if f.offset is None else f.offset)
        # Sizes first (one listing): a manifest that lies about them gets a clear error,
        # not a buffer of whatever size it claims.
        check_sizes(store, name, ordered)
        return read_back_to_back(store, name, ordered, verify)

    def load(
        self,
        info: CheckpointInfo | int | None = None,
        *,
        map_location: MapLocation = None,
        verify: bool = True,
        into: LiveState | None = None,
    ) -> tuple[CheckpointInfo, dict[str, Any]]:
        """The checkpoint loaded and its saved state, as a plain tree of tensors and values (one process: rank 0).

        ``info`` None means the newest intact checkpoint: damaged ones are logged and
        skipped. A given ``info`` (or step) that is damaged raises
        :class:`CheckpointCorrupt`. ``verify`` checks every file's checksum first.
        ``into``: see :meth:`load_rank`.
        """
        if info is not None:
            resolved, known = self.resolve_read(info)
            return resolved, self.load_rank(resolved, map_location, verify, known=known, into=into)
        damaged: list[str] = []
        for candidate in reversed(self.list()):
            try:
                state = self.load_rank(candidate, map_location, verify, into=into)
            except (CheckpointCorrupt, CheckpointNotFound) as e:
                log.error("spotsafe: checkpoint %s is damaged, falling back to the previous one: %s", candidate.url, e)
                damaged.append(f"{candidate.name} ({e})")
                continue
            return candidate, state
        detail = f"; damaged: {', '.join(damaged)}" if damaged else ""
        raise CheckpointNotFound(f"{self.store.url}: no intact checkpoint{detail}")
