"""The caller's buffers as one stream of bytes: upload bodies sent without a copy."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

from spotsafe.storage.base import Buffer


class BuffersReader:
    """A seekable, read-only file over ``[start, end)`` of a list of buffers.

    botocore wants a file-like body; this one serves the bytes of a multipart part
    straight from the caller's memoryviews, crossing buffer boundaries as needed,
    without ever materialising the part.
    """

    def __init__(self, views: Sequence[memoryview], offsets: Sequence[int], start: int, end: int):
        self._views = views
        self._offsets = offsets  # offsets[i] = absolute start of views[i]
        self._start = start
        self._end = end
        self._pos = start

    def __len__(self) -> int:
        return self._end - self._start

    def tell(self) -> int:
        return self._pos - self._start

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: self._start, 1: self._pos, 2: self._end}[whence]
        self._pos = min(max(base + offset, self._start), self._end)
        return self.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def read(self, n: int | None = -1) -> memoryview | bytes:
        # A slice of the caller's buffer, not a copy: http.client sends it as it is
        # (sendall takes any buffer), and hashlib/zlib take it for checksums.
        if n is None or n < 0:
            n = self._end - self._pos
        n = min(n, self._end - self._pos)
        if n <= 0:
            return b""
        i = bisect.bisect_right(self._offsets, self._pos) - 1  # the buffer holding _pos
        local = self._pos - self._offsets[i]
        chunk = self._views[i][local : local + n]
        self._pos += len(chunk)
        if len(chunk) < n and i + 1 < len(self._views):
            return bytes(chunk) + self.read(n - len(chunk))  # crossing buffers: rare, small
        return chunk

    def close(self) -> None:
        pass


def as_bytes_views(buffers: Sequence[Buffer]) -> tuple[list[memoryview], list[int], int]:
    """Flat byte views of the non-empty ``buffers``, the absolute offset of each, and the total length."""
    views: list[memoryview] = []
    offsets: list[int] = []
    total = 0
    for b in buffers:
        v = memoryview(b)
        if v.format != "B" or v.ndim != 1:
            v = v.cast("B") if v.c_contiguous else memoryview(v.tobytes())
        if len(v) == 0:
            continue
        views.append(v)
        offsets.append(total)
        total += len(v)
    return views, offsets, total


class Into:
    """A write-only file over a byte view: what a download writes lands in it; ``count`` is all it was sent."""

    def __init__(self, dest: memoryview) -> None:
        self.dest = dest
        self.count = 0

    def write(self, data: Any) -> int:
        chunk = memoryview(data).cast("B")
        room = max(0, len(self.dest) - self.count)
        n = min(room, len(chunk))
        if n:
            self.dest[self.count : self.count + n] = chunk[:n]
        self.count += len(chunk)
        return len(chunk)

    def seekable(self) -> bool:
        return False

    def writable(self) -> bool:
        return True


class BytesReader:
    """A :class:`BuffersReader` whose reads are ``bytes`` (the GCS and Azure clients' uploads take nothing else)."""

    def __init__(self, body: BuffersReader) -> None:
        self.body = body

    def read(self, n: int | None = -1) -> bytes:
        return bytes(self.body.read(n))

    def tell(self) -> int:
        return self.body.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.body.seek(offset, whence)
