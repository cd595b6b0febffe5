"""A load straight into live tensors: which saved blobs have a place in live memory, and the read.

:meth:`spotsafe.checkpoint.writer.Checkpointer.restore` hands its objects here: on a store that
streams its reads (a local directory), every saved blob whose live counterpart matches is read
from the disk straight into that tensor's memory (as ``torch.distributed.checkpoint`` loads in
place), checksummed as it comes in; docs/checkpoint.md, "Into live tensors".
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import mmap
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash

from spotsafe.checkpoint.manifest import FileEntry
from spotsafe.errors import CheckpointCorrupt, CheckpointNotFound, StateMismatch
from spotsafe.state import MAX_DEPTH, Blob, FlatState, MapLocation, flatten, resolve_device, to_plain
from spotsafe.storage.base import Store, anonymous_buffer

log = logging.getLogger(__name__)


@dataclass
class LiveState:
    """The live objects a load reads into, flattened, and what reads that then failed left in them."""

    flat: FlatState
    #: Live tensors (indices into ``flat.tensors``) that a read wrote into before it failed.
    damaged: set[int] = field(default_factory=set)
    damaged_from: list[str] = field(default_factory=list)

    def mark_damaged(self, live_blobs: Iterable[int], where: str) -> None:
        """A read into ``live_blobs`` failed (its checksum, a short file): they may hold its bytes."""
        blobs = set(live_blobs)
        self.damaged.update(j for j, t in enumerate(self.flat.tensors) if t["blob"] in blobs)
        self.damaged_from.append(where)

    def check_covered(self, description: Mapping[str, Any], where: str) -> None:
        """Raise :class:`StateMismatch` when the checkpoint loaded (``description``) has nothing for a
        live tensor an earlier, failed read wrote into: ``load_state_dict`` would leave it as that read
        left it, with bytes of a damaged checkpoint (a fallback to an older checkpoint with fewer keys)."""
        pairs: list[tuple[object, object]] = []
        _pair_trees(description.get("tree"), self.flat.tree, pairs, 0)
        left = self.damaged - {j for _, j in pairs}
        if left:
            raise StateMismatch(
                f"{where}: the restore read into the live objects from {', '.join(self.damaged_from)} before "
                f"its checksum failed, and this checkpoint has nothing for {len(left)} of the tensors that read "
                "wrote (they hold damaged bytes): restore into freshly built objects"
            )


def flatten_live(into: Any) -> LiveState | None:
    """``into`` flattened (its tensors found, nothing copied); None when it cannot be, and it is then not used.

    Its objects' ``state_dict()`` is asked for here, before the restore: one that cannot answer
    yet (a trainer whose optimizer is made later) costs the in-place read, never the restore.
    """
    if into is None:
        return None
    if isinstance(into, Mapping):  # one object that cannot answer costs only its own place
        plain = {}
        for key, obj in into.items():
            try:
                plain[key] = to_plain(obj)
            except Exception as e:  # noqa: BLE001 - as below
                log.debug("spotsafe: %r cannot be read into (%r); it is loaded into fresh memory", key, e)
        into = plain
    try:
        return LiveState(flatten(into))
    except Exception as e:  # noqa: BLE001 - the objects' own state_dict(): any failure means "not in place"
        log.debug("spotsafe: the live state cannot be read into (%r); loading into fresh memory", e)
        return None


def live_places(
    description: Mapping[str, Any], blobs: Sequence[Blob], into: LiveState, map_location: MapLocation
) -> dict[int, int]:
    """Saved blobs whose bytes can be read straight into the memory of live tensors: blob -> live blob.

    ``into.flat`` is :func:`flatten` of the objects the checkpoint is restored into (a model's own
    parameters, as ``state_dict()`` gives them). The saved tree and the live one are walked side
    by side; a saved blob gets a place when every pairing agrees on it: each of its tensors
    found at the same key path with the same dtype, shape, strides and offset, its live storage
    a CPU allocation of torch's own (never a foreign buffer, which may be read-only) of exactly
    the blob's size, and no other blob paired with that storage (live weights tied where the
    saved ones were not, or the other way round, get no place). What :func:`unflatten` then
    builds on a place is a view of the live tensor's own memory, at its own offset and strides,
    so ``load_state_dict`` copying it in is a no-op. Everything else (no match, another device,
    a hostile tree) simply gets no place: the load reads it into fresh memory as before.
    """
    live = into.flat
    saved = description.get("tensors") if isinstance(description, Mapping) else None
    if not isinstance(saved, list):
        return {}
    pairs: list[tuple[object, object]] = []
    _pair_trees(description.get("tree"), live.tree, pairs, 0)
    proposals: dict[int, set[int]] = {}
    claimed: dict[int, set[int]] = {}
    refused: set[int] = set()
    paired: set[int] = set()  # live tensors whose saved counterpart agrees
    for i, j in pairs:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(saved) or not isinstance(j, int):
            continue
        mine, theirs = saved[i], live.tensors[j]
        if not isinstance(mine, dict):
            continue
        b = mine.get("blob")
        if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < len(blobs):
            continue
        lb = theirs["blob"]
        if lb < 0 or any(mine.get(k) != theirs.get(k) for k in ("dtype", "shape", "stride", "offset")):
            refused.add(b)
            continue
        saved_on = mine.get("device")
        try:
            if not isinstance(saved_on, str) or len(saved_on) > 64:
                raise ValueError(saved_on)
            dev = resolve_device(str(torch.device(saved_on)), map_location)
        except Exception:  # noqa: BLE001 - the load itself then says what is wrong with it
            refused.add(b)
            continue
        target = live.sources[lb]
        if (
            dev.type != "cpu"
            or target.device.type != "cpu"
            or not target.untyped_storage().resizable()  # torch's own allocation: writable memory
            or target.numel() != blobs[b].nbytes
        ):
            refused.add(b)
            continue
        proposals.setdefault(b, set()).add(lb)
        claimed.setdefault(lb, set()).add(b)
        paired.add(j)
    on_blob: dict[int, list[int]] = {}  # live blob -> its tensors, once (not a pass over all of them per blob)
    for j, t in enumerate(live.tensors):
        on_blob.setdefault(t["blob"], []).append(j)
    places: dict[int, int] = {}
    for b, lbs in proposals.items():
        if b in refused or len(lbs) != 1:
            continue
        lb = next(iter(lbs))
        if len(claimed[lb]) == 1 and _covered(live.tensors, on_blob[lb], paired, blobs[b].nbytes):
            places[b] = lb
    return places


def streamable(description: Mapping[str, Any], blobs: Sequence[Blob], map_location: MapLocation) -> bool:
    """Whether a load of this tree may stream its data file into host memory (:func:`read_into_places`).

    Only when every tensor lands on the CPU: a load onto a GPU keeps the private mapping of the
    file, whose pages the kernel can drop again (a checkpoint bigger than the host's free memory
    still loads), where the stream would hold all of it in anonymous memory. And only when no
    two blobs overlap (never, in a checkpoint spotsafe wrote): then each piece's copies are found
    in one pass over the blobs, where a hostile tree of nested ranges would cost a pass per piece.
    """
    tensors = description.get("tensors")
    if not isinstance(tensors, list):
        return False
    devices = {str(e.get("device"))[:64] for e in tensors if isinstance(e, dict)}  # a hostile one: any value
    try:
        if any(resolve_device(str(torch.device(d)), map_location).type != "cpu" for d in devices):
            return False
    except Exception:  # noqa: BLE001 - the mapped load then says what is wrong with it
        return False
    end = 0
    for b in sorted(blobs, key=lambda b: b.offset):
        if b.nbytes and b.offset < end:
            return False
        end = max(end, b.offset + b.nbytes)
    return True


def _covered(tensors: Sequence[dict[str, Any]], on_it: Sequence[int], paired: set[int], nbytes: int) -> bool:
    """Whether every byte of a live blob belongs to a paired, contiguous live tensor on it (``on_it``).

    The blob's bytes are written whole: a byte of the live storage that no paired tensor owns
    (between the views of a larger buffer, before an offset that is not 16-aligned, a strided
    view's gaps, a tensor on it that the saved tree lacks) would get the saved file's byte
    instead of keeping its own, which ``load_state_dict`` never does. Such a blob gets no place.
    """
    ranges: list[tuple[int, int]] = []
    for j in on_it:
        t = tensors[j]
        if j not in paired:
            return False
        shape, stride = t["shape"], t["stride"]
        expected, step = [], 1
        for size in reversed(shape):
            expected.append(step)
            step *= size
        if stride != expected[::-1] and math.prod(shape) > 1:
            return False
        itemsize = getattr(torch, t["dtype"]).itemsize
        ranges.append((t["offset"], t["offset"] + math.prod(shape) * itemsize))
    end = 0
    for lo, hi in sorted(ranges):
        if lo > end:
            return False
        end = max(end, hi)
    return end >= nbytes


def _pair_trees(saved: Any, live: Any, out: list[tuple[object, object]], depth: int) -> None:
    """(saved tensor id, live tensor id) for every tensor at the same place in both trees."""
    if depth > MAX_DEPTH:
        return
    if isinstance(saved, list) and isinstance(live, list):
        if len(saved) == len(live):
            for a, b in zip(saved, live, strict=True):
                _pair_trees(a, b, out, depth + 1)
        return
    if not isinstance(saved, dict) or not isinstance(live, dict) or saved.get("T") != live.get("T"):
        return
    kind = live.get("T")
    if kind in ("tensor", "ndarray"):
        out.append((saved.get("id"), live.get("id")))
        return
    if kind not in ("dict", "odict", "tuple"):
        return
    mine, theirs = _children(saved), _children(live)
    for key in mine.keys() & theirs.keys():
        _pair_trees(mine[key], theirs[key], out, depth + 1)


def _children(node: dict[str, Any]) -> dict[Any, Any]:
    """A container node's children by key (dict keys; list positions for a tuple), JSON-comparable."""
    v = node.get("v")
    if isinstance(v, dict):
        return v
    if isinstance(v, list):
        return dict(enumerate(v))
    pairs = node.get("items")
    out: dict[Any, Any] = {}
    if isinstance(pairs, list):
        for pair in pairs:
            if isinstance(pair, list) and len(pair) == 2:
                try:
                    out[json.dumps(pair[0], sort_keys=True)] = pair[1]
                except (TypeError, ValueError, RecursionError):
                    continue
    return out


def read_into_places(
    store: Store, directory: str, f: FileEntry, blobs: Sequence[Blob], places: dict[int, torch.Tensor], verify: bool
) -> memoryview:
    """Read the data file ``f`` once, each blob's bytes straight into its place (``places[i]``, live
    memory: :func:`spotsafe.state.live_places`), the other blobs' into a fresh buffer at their offsets.

    Returns that buffer (only the pages of blobs without a place are ever touched). The checksum,
    when ``verify``, is taken over the pieces as they come in, and checked after the last: a
    damaged file raises :class:`CheckpointCorrupt` then, **with the places already written**
    (the caller's objects hold part of it: ``Checkpointer.restore`` says so).
    """
    base = f"{store.url.rstrip('/')}/{directory}"
    spill = anonymous_buffer(f.size, huge_pages=False)
    spill_at = ctypes.addressof(ctypes.c_char.from_buffer(spill)) if len(spill) else 0
    plan = sorted(
        (b.offset, b.offset + b.nbytes, places[i].data_ptr() if i in places else spill_at + b.offset)
        for i, b in enumerate(blobs)
        if b.nbytes
    )
    h = xxhash.xxh3_128() if verify else None
    first = 0  # every range before it ended before the piece at hand
    fresh = [(b.offset, b.offset + b.nbytes) for i, b in enumerate(blobs) if b.nbytes and i not in places]
    prefault = Prefault(spill_at, fresh) if fresh else None

    def consume(offset: int, piece: memoryview) -> None:
        nonlocal first
        if h is not None:
            h.update(piece)  # xxhash lets go of the GIL: the readers go on meanwhile
        end = offset + len(piece)
        at = ctypes.addressof(ctypes.c_char.from_buffer(piece))
        while first < len(plan) and plan[first][1] <= offset:
            first += 1
        k = first
        while k < len(plan) and plan[k][0] < end:
            start, stop, dest = plan[k]
            lo, hi = max(start, offset), min(stop, end)
            if lo < hi:
                ctypes.memmove(dest + (lo - start), at + (lo - offset), hi - lo)  # lets go of the GIL too
            k += 1

    try:
        store.read_file_through(f"{directory}/{f.path}", f.size, consume)
    except CheckpointNotFound as e:
        raise CheckpointCorrupt(f"{base}/{f.path}: missing (the manifest lists it)") from e
    finally:
        if prefault is not None:
            prefault.stop()
    if h is not None and h.hexdigest() != f.checksum:
        raise CheckpointCorrupt(f"{base}/{f.path}: checksum mismatch (the file was modified or damaged)")
    return spill


#: madvise(2) advice that faults a range of anonymous memory in, writable (Linux 5.14).
_MADV_POPULATE_WRITE = 23


class Prefault(threading.Thread):
    """Faults the fresh buffer's pages in ahead of the copies into it, on the other core.

    A page touched for the first time costs a fault (on a VM whose host took the memory back,
    a host fault too): done by the copying thread, those stalls added up to more than the
    disk's read; here they run beside it. A kernel without the advice just stops this.
    """

    STEP = 8 << 20

    def __init__(self, base: int, ranges: Sequence[tuple[int, int]]) -> None:
        super().__init__(name="spotsafe-prefault", daemon=True)
        self.base = base
        self.ranges = ranges
        self.done = threading.Event()
        self.start()

    def run(self) -> None:
        try:
            madvise = ctypes.CDLL(None, use_errno=True).madvise
        except (OSError, AttributeError, TypeError):
            return  # no libc to ask: the copies fault the pages in themselves
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        page = mmap.PAGESIZE
        for start, stop in self.ranges:
            lo = (self.base + start) // page * page
            hi = self.base + stop
            while lo < hi and not self.done.is_set():
                n = min(self.STEP, hi - lo)
                if madvise(lo, n, _MADV_POPULATE_WRITE) != 0:
                    return
                lo += n

    def stop(self) -> None:
        self.done.set()
        self.join()
