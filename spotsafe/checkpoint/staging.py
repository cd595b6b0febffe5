"""Staging: a training state's bytes copied from the device to host memory, ready to be written.

:func:`stage` flattens a state (:mod:`spotsafe.state`) and copies every tensor's
bytes into one reusable CPU buffer (:class:`StagingBuffer`, pinned when CUDA is
present); the result is a :class:`StagedState`. It is the only part of a save a
training loop waits for. :class:`SideStreams` lets the in-memory deadline snapshots
(:mod:`spotsafe.checkpoint.snapshots`) issue those copies without blocking the host.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from spotsafe.state import Blob, FlatState, flatten
from spotsafe.storage.base import DIRECT_ALIGN, anonymous_buffer


class StagingBuffer:
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
            if self.pin:
                whole = torch.empty(n + DIRECT_ALIGN, dtype=torch.uint8, pin_memory=True)
            else:
                # Huge pages where the kernel gives them: the disk gets large requests (an O_DIRECT
                # write of 1 GiB took 0.48 s instead of 0.61-0.75 s from 4 KiB pages).
                whole = torch.frombuffer(anonymous_buffer(n + DIRECT_ALIGN), dtype=torch.uint8)
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
class StagedState:
    """A state captured for writing: its description and the data file's bytes, in order.

    After a copying stage the parts are views of the staging buffer (training
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


def stage(
    state: Mapping[str, Any] | FlatState,
    buffer: StagingBuffer,
    *,
    copy: bool = True,
    streams: SideStreams | None = None,
) -> StagedState:
    """Step 1 of a save: capture ``state`` for writing.

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
    and this returns without blocking the host: :attr:`StagedState.pending` holds the
    events, and :meth:`StagedState.wait` (called by :func:`spotsafe.checkpoint.files.write_rank_files`) blocks
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
    snap = StagedState(flat.description(), [view], list(flat.blobs), [dst, buffer])
    if devices and streams is None:
        torch.cuda.synchronize()
    elif devices and streams is not None:
        snap.pending, snap.timing = streams.end()
    return snap


class SideStreams:
    """One CUDA side stream per device for the in-memory snapshots' device-to-host copies.

    :meth:`begin` (per copy) makes the device's side stream wait for the compute
    stream's work so far (once per staging) and records a timing event;
    :meth:`end` records each device's completion event, makes the compute stream
    wait for it (nothing on the device can change a tensor before its copy is done;
    the host does not block) and returns ``(events, timing pairs)``.
    """

    def __init__(self) -> None:
        self._streams: dict[torch.device, Any] = {}
        self._open: dict[torch.device, Any] = {}  # device -> start event of the copies under way

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


def _zero_copy(flat: FlatState) -> StagedState:
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
    return StagedState(flat.description(), parts, list(flat.blobs), keep)
