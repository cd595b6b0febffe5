"""Checkpoint engine speed, side by side with its peers, in one run, on a model-like state.

State (``--scale 1``): 352 float32 tensors, 1 GiB, shaped like a model with its
optimizer: 48 of 16 MiB, 48 of 4 MiB and 256 of 256 KiB. Every round, each writer
writes a *fresh* file (or checkpoint directory) and deletes the one from two
rounds back, as ``keep_last=2`` does: a disk is often much slower on fresh blocks
than on just-freed ones, so overwriting a baseline file in place is not the same
work. The order of the writers follows a Williams design (each writer at each
position, and right after each other writer, equally often over ``2n`` rounds
for ``n`` writers), so a writer that slows the next one down (a write just after
a big write is slower here) cannot favour one contender; each ratio is computed
within a round and the median of the per-round ratios is printed with its
spread (min, quartiles, max), because a shared machine's noise is larger than the
gaps measured here.

Writers (all fsync before they count as done):

- ``raw write``: the same bytes, written sequentially with ``os.write`` + fsync;
- ``raw O_DIRECT write``: the same, with ``O_DIRECT`` from the page-aligned buffer
  (what the disk itself can do, past the page cache; spotsafe's local store writes
  large files this way);
- ``torch.save``: ``torch.save`` of the state dict + fsync;
- ``spotsafe persist``: an async ``Checkpointer.save``'s background write + fsync +
  manifest commit (``write_s + commit_s``), with the training stall reported apart;
- ``spotsafe sync save``: ``Checkpointer.save(async_=False)`` (what a notice does);
- ``snapshot persist``: the deadline path (:mod:`spotsafe.checkpoint.snapshots`): from the
  notice to the in-memory snapshot being durable (time-to-durable).

The limits beside the peers: a bare ``O_DIRECT`` write of the same bytes from one
page-aligned buffer + fsync (the disk's own write speed; the persist and the sync save
target >= 0.9x of it), and a bare ``O_DIRECT`` sequential read of that file into
preallocated aligned memory (the disk's own read speed, beside every load).

Also reported: the in-memory snapshot's stall (the copy a Run takes every few
steps), a plain copy of the tensors into preallocated memory, load with and
without verification vs ``torch.load(mmap=True)``, the load into live tensors that
``restore()`` does (``load(into=...)``: the preallocated sink laid out as the saved state;
target >= 0.8x the bare ``O_DIRECT`` read), every load from a cold cache
(every file under the work directory evicted with ``POSIX_FADV_DONTNEED`` before each
contender; loads in their own rotated rounds), and (unless ``--no-dcp``)
``torch.distributed.checkpoint.async_save`` on a gloo group of one.

Run: ``python benchmarks/bench_checkpoint.py [--scale 1] [--rounds 12] [--dir .bench] [--no-dcp]``.
The directory should be on the disk you care about (the repo's disk by default).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import fcntl
import gc
import json
import mmap
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import torch

from spotsafe.checkpoint.snapshots import SnapshotKeeper
from spotsafe.checkpoint.writer import Checkpointer
from spotsafe.cloud.notice import Notice

CHUNK = 32 << 20
O_DIRECT: int = getattr(os, "O_DIRECT", 0)
_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
#: (count, bytes) of the model-like state at scale 1: 1 GiB in 352 tensors.
SHAPES = ((48, 16 << 20), (48, 4 << 20), (256, 256 << 10))


def build_state(scale: float = 1.0) -> dict[str, torch.Tensor]:
    """352 float32 tensors of mixed sizes (1 GiB at ``scale`` 1), filled with random values."""
    g = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    for count, nbytes in SHAPES:
        n = max(1, int(nbytes * scale) // 4)
        for i in range(count):
            state[f"t{nbytes >> 10}k.{i}"] = torch.randn(n, generator=g)
    return state


def tensors_of(obj: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(obj)
    return out


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def huge_buffer(nbytes: int) -> memoryview:
    """Private anonymous memory on a 2 MiB boundary, advised into transparent huge pages, faulted in."""
    huge = 2 << 20
    mm = mmap.mmap(-1, nbytes + huge, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    first = ctypes.c_char.from_buffer(mm)
    start = -ctypes.addressof(first) % huge
    del first
    if hasattr(mmap, "MADV_HUGEPAGE"):
        mm.madvise(mmap.MADV_HUGEPAGE, start, nbytes - nbytes % huge)
    view = memoryview(mm)[start : start + nbytes]
    torch.frombuffer(view, dtype=torch.uint8).fill_(0)
    return view


def back_memory(nbytes: int) -> None:
    """Touch ``nbytes`` of fresh memory and free it: the next allocations find pages the host backs.

    This VM's balloon reports free guest pages to the host (virtio-balloon free page
    reporting), which takes them back a couple of seconds after they are freed; touching
    them again costs a host fault per page (up to ~0.6 s per GiB here). A load allocates
    its memory (page cache or buffer), so without this its time depended on whether the
    previous contender's freed memory had been reported yet (loads went bimodal, 0.6 s or
    3-4 s for 1 GiB). A cloud instance's memory is backed from boot: every load contender
    starts from memory backed the same way, right before it runs.
    """
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        view = memoryview(mm)
        torch.frombuffer(view, dtype=torch.uint8).fill_(1)
        view.release()
    finally:
        mm.close()


def _files(root: Path) -> list[str]:
    return [os.path.join(d, n) for d, _dirs, files in os.walk(root) for n in files]


def cached_bytes(path: str) -> int:
    """How many bytes of ``path`` sit in the page cache now (``mincore`` on a fresh mapping)."""
    size = os.path.getsize(path)
    if size == 0:
        return 0
    page = mmap.PAGESIZE
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mm:
        vec = (ctypes.c_ubyte * -(-size // page))()
        first = ctypes.c_char.from_buffer(mm)  # mapping touches no page: mincore sees the cache as it is
        try:
            if _LIBC.mincore(ctypes.c_void_p(ctypes.addressof(first)), ctypes.c_size_t(size), vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
        finally:
            del first
        return sum(v & 1 for v in vec) * page


def _cached_if_there(path: str) -> int:
    try:
        return cached_bytes(path)
    except FileNotFoundError:
        return 0  # gone since: nothing of it can be read


def evict(root: Path) -> None:
    """Drop every (clean, fsynced) file under ``root`` from the page cache: the next read is cold.

    A page still mapped by a live object (a previous load's tensors over an mmap, not yet
    collected) cannot be dropped: collect first, then check that nothing stayed cached,
    so a "cold" load is never quietly served from memory.
    """
    gc.collect()
    files: list[str] = []
    for path in _files(root):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue  # a lease's temp file, renamed by its renewal thread since the listing
        files.append(path)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    left = sum(_cached_if_there(p) for p in files)
    if left > 1 << 20:
        raise RuntimeError(f"{left} bytes under {root} stayed in the page cache after eviction: a load would be warm")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spread(values: Sequence[float]) -> str:
    """min / quartiles / max of ``values``, for people."""
    v = sorted(values)
    if len(v) < 4:
        return " ".join(f"{x:.2f}" for x in v)
    q1, _, q3 = statistics.quantiles(v, n=4)
    return f"{v[0]:.2f} [{q1:.2f} {q3:.2f}] {v[-1]:.2f}"


def williams_orders(n: int) -> list[list[int]]:
    """Orders of ``n`` contenders, each at each position and after each other one equally often.

    A Williams design: plain rotation (``k, k+1, ...``) keeps every contender behind the same
    neighbour in every round, so a neighbour's after-effect (write-back, discards) lands on one
    contender only. Row 0 is ``0, 1, n-1, 2, n-2, ...``, row ``r`` adds ``r`` mod ``n``; for odd
    ``n`` the mirrored rows are added, so ``2n`` rounds balance it.
    """
    first, lo, hi = [0], 1, n - 1
    while len(first) < n:
        if len(first) % 2:
            first.append(lo)
            lo += 1
        else:
            first.append(hi)
            hi -= 1
    rows = [[(x + r) % n for x in first] for r in range(n)]
    if n % 2:
        rows += [row[::-1] for row in rows]
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="state size: 1 = 1 GiB in 352 tensors")
    ap.add_argument("--rounds", type=int, default=12, help="a multiple of 6 balances the order")
    ap.add_argument("--dir", default=str(Path(__file__).resolve().parent.parent / ".bench"))
    ap.add_argument("--no-dcp", action="store_true", help="skip torch.distributed.checkpoint")
    ap.add_argument("--json", metavar="PATH", help="also write every round's seconds and the order of its writers")
    args = ap.parse_args(argv)
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-", dir=root))
    rounds = args.rounds
    try:
        tensors_by_name = build_state(args.scale)
        state: dict[str, Any] = {"model": tensors_by_name}
        tensors = list(tensors_by_name.values())
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        print(f"state: {len(tensors)} tensors, {nbytes / 2**30:.2f} GiB float32; {rounds} rounds; dir {work}")
        print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start")
        samples: dict[str, list[float]] = {}
        per_round: list[dict[str, float]] = []

        def record(name: str, seconds: float) -> None:
            samples.setdefault(name, []).append(seconds)
            per_round[-1][name] = seconds

        dst = [torch.empty_like(t) for t in tensors]  # preallocated (pages faulted in below)

        def plain_copy() -> None:
            for d, t in zip(dst, tensors, strict=True):
                d.copy_(t)

        ours = Checkpointer(work / "spotsafe", keep_last=2)
        sync = Checkpointer(work / "sync", keep_last=2)
        deadline_ckpt = Checkpointer(work / "deadline", keep_last=2)
        keeper = SnapshotKeeper(deadline_ckpt, every=1)
        ours.save(0, state)  # allocates the reusable snapshot buffer
        ours.wait()
        keeper.after_step(0, lambda: state, epoch=0, metadata=dict, saving=False)  # allocates the snapshot's
        plain_copy()
        held = keeper._held
        assert held is not None
        raw_parts = held.snap.parts  # the very bytes spotsafe writes
        # The limit writes them from the best memory there is for it: its own page-aligned buffer
        # in huge pages (on this VM a 1 GiB O_DIRECT write from 4 KiB pages took 0.61-0.75 s, from
        # 2 MiB pages 0.48 s: a request holds a limited number of segments). The limit must not
        # depend on how spotsafe allocates.
        limit_buf = huge_buffer(sum(len(p) for p in raw_parts))
        pos = 0
        for part in raw_parts:
            limit_buf[pos : pos + len(part)] = part
            pos += len(part)
        current = [0]

        def settle() -> None:
            # Freed blocks are discarded at the next journal commit (ext4 -o discard): flush that
            # now, untimed, or whoever fsyncs next pays for the previous contender's deletes.
            os.sync()

        def fresh(prefix: str, suffix: str) -> Path:
            return work / f"{prefix}-{current[0]}{suffix}"

        def retire(prefix: str, suffix: str) -> None:
            # What keep_last=2 deletes, outside the timing, and *after* the new file is durable, as the
            # Checkpointer's retention does (it never deletes before the new checkpoint is committed).
            # Deleting first would hand the baselines just-freed blocks for their write, which this
            # machine's disk writes faster than the blocks the Checkpointer gets.
            (work / f"{prefix}-{current[0] - 2}{suffix}").unlink(missing_ok=True)

        def raw() -> None:
            path = fresh("raw", ".bin")
            settle()
            t0 = time.perf_counter()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                for part in raw_parts:
                    for i in range(0, len(part), CHUNK):
                        os.write(fd, part[i : i + CHUNK])
                os.fsync(fd)
            finally:
                os.close(fd)
            record("raw write+fsync", time.perf_counter() - t0)
            retire("raw", ".bin")

        def raw_direct() -> None:
            path = fresh("direct", ".bin")
            settle()
            t0 = time.perf_counter()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | O_DIRECT, 0o644)
            try:
                for part in [limit_buf]:  # one page-aligned view, in huge pages
                    whole = len(part) // 4096 * 4096
                    for i in range(0, whole, CHUNK):
                        os.write(fd, part[i : min(i + CHUNK, whole)])
                    if whole < len(part):
                        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~O_DIRECT)
                        os.write(fd, part[whole:])
                os.fsync(fd)
            finally:
                os.close(fd)
            record("raw O_DIRECT write+fsync", time.perf_counter() - t0)
            retire("direct", ".bin")

        def tsave() -> None:
            path = fresh("state", ".pt")
            settle()
            t0 = time.perf_counter()
            torch.save(tensors_by_name, path)
            fsync_path(path)
            record("torch.save+fsync", time.perf_counter() - t0)
            retire("state", ".pt")

        def ours_async() -> None:
            settle()
            t0 = time.perf_counter()
            ours.save(current[0], state)
            t1 = time.perf_counter()
            ours.wait()
            record("spotsafe async stall", t1 - t0)
            t = ours.last_timings
            record("spotsafe persist", t["write_s"] + t["commit_s"])
            # Where it went: the data file's write + fsync (the raw write's twin), then the extras.
            w = ours.last_write_parts
            record("  persist: data write+fsync", w["payload_s"])
            record("  persist: checksum wait", w["hash_wait_s"])
            record("  persist: tree file", w["tree_s"])
            record("  persist: commit (manifest)", t["commit_s"])
            record("spotsafe retention (delete old)", ours.last_timings["retention_s"])

        def ours_sync() -> None:
            settle()
            t0 = time.perf_counter()
            sync.save(current[0], state, async_=False)
            record("spotsafe sync save", time.perf_counter() - t0)
            # Where it went: from the tensors' own memory (not page-aligned: copied through the bounce buffers).
            record("  sync: capture (no copy)", sync.last_timings["snapshot_s"])
            record("  sync: data write+fsync", sync.last_write_parts["payload_s"])
            record("  sync: tree + commit", sync.last_write_parts["tree_s"] + sync.last_timings["commit_s"])
            sync.wait()  # pruning the retired checkpoint goes on in the background: not part of the save

        def deadline() -> None:
            t0 = time.perf_counter()
            keeper.after_step(current[0], lambda: state, epoch=0, metadata=dict, saving=False)
            record("snapshot stall", time.perf_counter() - t0)
            settle()
            now = datetime.now(timezone.utc)
            notice = Notice("bench", "terminate", now + timedelta(seconds=30), now)
            keeper._stand_down.clear()
            keeper._step_times.clear()  # no step time known: the step "cannot" finish, persist at once
            t1 = time.perf_counter()
            keeper._on_notice(notice)  # what the guard thread runs on a notice
            record("snapshot notice-to-durable", time.perf_counter() - t1)

        contenders: list[Callable[[], None]] = [raw, ours_async, tsave, ours_sync, deadline]
        if O_DIRECT and len(raw_parts) == 1:
            contenders.append(raw_direct)
        # Interleaved in a balanced order, so that a neighbour's after-effects or the disk's mood hit
        # every contender alike.
        orders = williams_orders(len(contenders))
        if rounds % len(orders):
            print(f"note: {rounds} rounds do not balance the order; a multiple of {len(orders)} does")
        for i in range(rounds):
            current[0] = i + 1
            per_round.append({})
            t0 = time.perf_counter()
            plain_copy()
            record("plain copy", time.perf_counter() - t0)
            for k in orders[i % len(orders)]:
                contenders[k]()
        keeper.close()
        deadline_ckpt.close()
        sync.close()
        dst = []
        if not args.no_dcp:
            # DCP in its own phase: in the same rounds its staging memory and threads slowed the others down.
            dcp = DCP(work / "dcp")
            dcp.save(state, "warm")
            for _ in range(rounds):
                stall, total = dcp.save(state, "s")
                samples.setdefault("DCP async_save stall", []).append(stall)
                samples.setdefault("DCP async_save total", []).append(total)
            dcp.close()

        # Load from a cold cache (every file under the work directory evicted before each contender),
        # then read every byte into preallocated memory; the limit: a bare O_DIRECT sequential read.
        pt_path = work / f"state-{current[0]}.pt"
        direct_path = work / f"direct-{current[0]}.bin"
        sink = [torch.empty_like(t) for t in tensors]
        for sk, t in zip(sink, tensors, strict=True):
            sk.copy_(t)
        # The sink laid out as the saved state: what a resume restores into (a live model's tensors).
        live = {"model": dict(zip(tensors_by_name, sink, strict=True))}
        raw_size = sum(len(p) for p in raw_parts)
        read_buf = huge_buffer(-(-raw_size // 4096) * 4096)  # page-aligned, huge pages
        torch.frombuffer(read_buf, dtype=torch.uint8).fill_(0)  # faulted in, as the sink is

        def read_all(obj: Any) -> None:
            got = tensors_of(obj)
            assert len(got) == len(sink), f"{(len(got), len(sink))}"
            for sk, t in zip(sink, got, strict=True):
                sk.copy_(t)

        def raw_direct_read(into: memoryview | None = None) -> None:
            buf = read_buf if into is None else into
            fd = os.open(direct_path, os.O_RDONLY | O_DIRECT)
            try:
                pos = 0
                while True:
                    n = os.preadv(fd, [buf[pos : pos + CHUNK]], pos)
                    pos += n
                    if n < CHUNK or pos >= len(buf):
                        break
            finally:
                os.close(fd)
            assert pos == raw_size, f"read {pos} of {raw_size} bytes"

        def raw_direct_read_fresh() -> None:
            # The same read into memory allocated for it, in 4 KiB pages as the page cache's: every
            # load has to put the bytes somewhere new (faulting pages in, zeroing them).
            fresh = mmap.mmap(-1, len(read_buf), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            view = memoryview(fresh)
            try:
                raw_direct_read(view)
            finally:
                view.release()
                fresh.close()

        loads: dict[str, Callable[[], None]] = {
            "torch.load mmap+read": lambda: read_all(torch.load(pt_path, mmap=True, weights_only=True)),
            "spotsafe load verified+read": lambda: read_all(ours.load(verify=True)),
            "spotsafe load unverified+read": lambda: read_all(ours.load(verify=False)),
            # What restore() does: the bytes read straight into the live tensors (read_all's copies are no-ops).
            "spotsafe load into live, verified": lambda: read_all(ours.load(verify=True, into=live)),
        }
        if O_DIRECT and direct_path.exists():
            loads["raw O_DIRECT read"] = raw_direct_read
            loads["raw O_DIRECT read, fresh memory"] = raw_direct_read_fresh
        for fn in loads.values():
            fn()  # first touches (imports, allocations), untimed
        names = list(loads)
        load_orders = williams_orders(len(names))
        load_rounds: list[dict[str, float]] = []
        for i in range(max(rounds // 2, len(load_orders))):
            load_rounds.append({})
            for k in load_orders[i % len(load_orders)]:
                evict(work)
                back_memory(2 * raw_size)
                t0 = time.perf_counter()
                loads[names[k]]()
                seconds = time.perf_counter() - t0
                samples.setdefault(names[k], []).append(seconds)
                load_rounds[-1][names[k]] = seconds
        read_buf.release()
        ours.close()
        sink = []
        live = {}
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
        if args.json:
            names = [c.__name__ for c in contenders]
            written = [[names[k] for k in orders[i % len(orders)]] for i in range(rounds)]
            Path(args.json).write_text(json.dumps({"orders": written, "rounds": per_round}, indent=1))
        print()
        print(f"{'measurement':34} {'median s':>9} {'GB/s':>7}  spread (min [q1 q3] max), s")
        for name, v in samples.items():
            med = statistics.median(v)
            print(f"{name:34} {med:9.3f} {nbytes / med / 1e9:7.2f}  {spread(v)}")
        print()

        def ratio(num: str, den: str) -> list[float]:
            return [r[num] / r[den] for r in per_round if num in r and den in r]

        checks = [
            ("persist throughput / raw write+fsync", ratio("raw write+fsync", "spotsafe persist"), ">=", 0.8),
            ("persist throughput / torch.save+fsync", ratio("torch.save+fsync", "spotsafe persist"), ">=", 0.9),
            # The same bytes through the store's write_file vs os.write: any gap here is the write path's own.
            (
                "persist's data write / raw write+fsync",
                ratio("raw write+fsync", "  persist: data write+fsync"),
                "~",
                1.0,
            ),
            # What the disk itself can do (past the page cache): how close the persist comes to it.
            (
                "persist throughput / raw O_DIRECT write",
                ratio("raw O_DIRECT write+fsync", "spotsafe persist"),
                ">=",
                0.9,
            ),
            ("sync save throughput / torch.save+fsync", ratio("torch.save+fsync", "spotsafe sync save"), ">=", 0.9),
            (
                "sync save throughput / raw O_DIRECT write",
                ratio("raw O_DIRECT write+fsync", "spotsafe sync save"),
                ">=",
                0.9,
            ),
            ("async stall / plain copy", ratio("spotsafe async stall", "plain copy"), "<=", 1.5),
            ("snapshot stall / plain copy", ratio("snapshot stall", "plain copy"), "<=", 1.5),
            ("async stall / torch.save+fsync", ratio("spotsafe async stall", "torch.save+fsync"), "<=", 0.25),
            (
                "notice-to-durable / raw write+fsync",
                ratio("snapshot notice-to-durable", "raw write+fsync"),
                "<=",
                1.25,
            ),
            (
                "notice-to-durable / raw O_DIRECT write",
                ratio("snapshot notice-to-durable", "raw O_DIRECT write+fsync"),
                "~",
                1.0,
            ),
        ]
        checks = [c for c in checks if c[1]]  # a baseline this platform lacks (O_DIRECT) has no ratios
        print(f"{'per-round ratio':42} {'median':>7}  target    spread (min [q1 q3] max)")
        for name, values, op, target in checks:
            value = statistics.median(values)
            if op == "~":  # reported, no target
                print(f"{name:42} {value:7.2f}  (report)        {spread(values)}")
                continue
            ok = value <= target if op == "<=" else value >= target
            print(f"{name:42} {value:7.2f}  {op} {target:<5} {'ok' if ok else 'MISSED':6}  {spread(values)}")

        def load_ratio(num: str, den: str) -> list[float]:
            return [r[num] / r[den] for r in load_rounds if num in r and den in r]

        load_checks = [
            (
                "verified load / torch.load mmap (time)",
                load_ratio("spotsafe load verified+read", "torch.load mmap+read"),
                "<=",
                2.0,
            ),
            (
                "unverified load / torch.load mmap (time)",
                load_ratio("spotsafe load unverified+read", "torch.load mmap+read"),
                "<=",
                1.1,
            ),
            (
                "into-live load / torch.load mmap (time)",
                load_ratio("spotsafe load into live, verified", "torch.load mmap+read"),
                "~",
                1.0,
            ),
            # The disk's own read speed (throughput ratios: the O_DIRECT read's time over the load's).
            (
                "into-live load thrpt / O_DIRECT read",
                load_ratio("raw O_DIRECT read", "spotsafe load into live, verified"),
                ">=",
                0.8,
            ),
            (
                "verified load throughput / O_DIRECT read",
                load_ratio("raw O_DIRECT read", "spotsafe load verified+read"),
                "~",
                1.0,
            ),
            (
                "unverified load thrpt / O_DIRECT read",
                load_ratio("raw O_DIRECT read", "spotsafe load unverified+read"),
                "~",
                1.0,
            ),
            (
                "torch.load throughput / O_DIRECT read",
                load_ratio("raw O_DIRECT read", "torch.load mmap+read"),
                "~",
                1.0,
            ),
            # The disk plus the memory a load must allocate for what it reads (see raw_direct_read_fresh).
            (
                "verified load thrpt / O_DIRECT, fresh mem",
                load_ratio("raw O_DIRECT read, fresh memory", "spotsafe load verified+read"),
                "~",
                1.0,
            ),
            (
                "unverified load / O_DIRECT, fresh mem",
                load_ratio("raw O_DIRECT read, fresh memory", "spotsafe load unverified+read"),
                "~",
                1.0,
            ),
        ]
        for name, values, op, target in load_checks:
            if not values:
                continue
            value = statistics.median(values)
            if op == "~":
                print(f"{name:42} {value:7.2f}  (report)        {spread(values)}")
                continue
            ok = value <= target if op == "<=" else value >= target
            print(f"{name:42} {value:7.2f}  {op} {target:<5} {'ok' if ok else 'MISSED':6}  {spread(values)}")
        if "DCP async_save stall" in samples:
            ours_stall = statistics.median(samples["spotsafe async stall"])
            print(
                f"{'async stall / DCP async_save stall':42} "
                f"{ours_stall / statistics.median(samples['DCP async_save stall']):7.2f}  (report; separate phase)"
            )
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


class DCP:
    """torch.distributed.checkpoint.async_save on a gloo process group of world size 1 (loopback TCP store)."""

    def __init__(self, path: Path) -> None:
        import torch.distributed as dist

        self.path = path
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)

    def save(self, state: dict[str, Any], name: str) -> tuple[float, float]:
        import torch.distributed.checkpoint as dcp

        # As a DCP user would pass it: a module's or optimizer's state_dict(), a plain dict as is.
        sd = {k: v.state_dict() if callable(getattr(v, "state_dict", None)) else v for k, v in state.items()}
        t0 = time.perf_counter()
        fut = dcp.async_save(sd, checkpoint_id=str(self.path / name))
        t1 = time.perf_counter()
        fut.result()
        t2 = time.perf_counter()
        shutil.rmtree(self.path, ignore_errors=True)
        return t1 - t0, t2 - t0

    def close(self) -> None:
        import torch.distributed as dist

        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
