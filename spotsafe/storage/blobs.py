"""What the GCS and Azure Blob stores share: limits on every call, retries, parallel I/O, the exclusive create.

:class:`BlobStore` is a :class:`~spotsafe.storage.base.Store` over a flat namespace of objects
(a bucket or a container, under a prefix). A backend (:mod:`spotsafe.storage.gcs`,
:mod:`spotsafe.storage.azure`) supplies a handful of primitives (list, upload, download,
size, delete, and the conditional upload that never replaces an object) and what its errors
mean; this class makes them a store:

- every call is bounded as the S3 store's are (:mod:`spotsafe.storage.s3_calls`): each socket
  connect/read by ``connect_timeout``/``read_timeout``, and the whole call, all its attempts
  and its body included, by ``request_timeout + bytes / min_throughput`` or the preemption
  notice's deadline (:meth:`BlobStore.set_deadline`) when sooner: a watchdog thread shuts the
  sockets of an overdue call (the clients' HTTP sessions get connections that join the call
  running in their thread, :func:`tracking_session`);
- transient errors (throttling, 5xx, dropped connections) are retried with jittered
  exponential backoff within that limit; every error is a StoreError naming the URL and cause;
- a checkpoint's payload goes up as ``part_size`` segments in parallel (``segment_size``);
- :meth:`BlobStore.create_file` is one conditional upload, and the first one on a store probes
  that the server really refuses a second (:mod:`spotsafe.storage.s3_fence`).
"""

from __future__ import annotations

import logging
import threading
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from spotsafe.errors import CheckpointCorrupt, CheckpointNotFound, StoreError
from spotsafe.storage.base import MAX_MANIFEST_BYTES, Buffer
from spotsafe.storage.buffers import BuffersReader, as_bytes_views
from spotsafe.storage.remote import DEFAULT_MAX_CONCURRENCY, RemoteStore
from spotsafe.storage.s3_calls import current_call
from spotsafe.storage.s3_fence import UNSAFE_OPTION, ConditionalWrites

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class Missing(Exception):
    """A backend primitive found no object (or no bucket/container) where it looked."""


def parse_url(url: str, schemes: Sequence[str], what: str) -> tuple[str, str, str]:
    """``scheme://bucket/some/prefix/`` -> ``(scheme, "bucket", "some/prefix")``."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in schemes:
        raise ValueError(f"{url}: not a {' or '.join(s + '://' for s in schemes)} URL")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"{url}: no {what} name in the URL (expected {schemes[0]}://{what}/prefix)")
    return scheme.lower(), bucket, prefix.strip("/")


class BlobStore(RemoteStore):
    """A store on an object service with native conditional writes; a backend supplies the primitives."""

    verifies_exclusive_create = True  # its own probe, once per store (spotsafe.storage.s3_fence)

    #: The service's name in messages ("GCS", "Azure Blob") and the conditional header it sends.
    service = "object store"
    condition = "a conditional write"
    #: What to use instead, in the refusal of a server that ignores :attr:`condition`.
    remedy = "a server that honours conditional writes"
    thread_prefix = "spotsafe-blob"
    never_retried = (Missing, CheckpointCorrupt)

    def __init__(self, url: str, opts: Mapping[str, Any], known: frozenset[str]) -> None:
        super().__init__(url, opts, known | {UNSAFE_OPTION})
        self.endpoint = self.service
        self._unsafe = bool(opts.get(UNSAFE_OPTION, False))
        self._conditional: ConditionalWrites | None = None

    # ------------------------------------------------------------------ the backend's primitives

    @abstractmethod
    def _list(self, prefix: str, delimited: bool) -> tuple[list[str], dict[str, int]]:
        """Keys under ``prefix``: (sub-prefixes one level down when ``delimited``, objects' sizes by key)."""

    @abstractmethod
    def _upload(self, key: str, body: BuffersReader, if_absent: bool) -> bool:
        """Upload ``body`` as ``key``; with ``if_absent`` only when no object exists (False when one does)."""

    @abstractmethod
    def _download(self, key: str, dest: memoryview, start: int) -> int:
        """Ask for bytes ``[start, start + len(dest)]`` of ``key`` (one past ``dest``), fill ``dest``.

        Returns how many bytes the server sent (0 when the object ends before ``start``);
        raises :class:`Missing` when there is no such object.
        """

    @abstractmethod
    def _size(self, key: str) -> int | None:
        """The object's size, None when it does not exist."""

    @abstractmethod
    def _delete(self, key: str) -> None:
        """Delete one object; no error when it is already gone."""

    @abstractmethod
    def _retryable(self, e: BaseException) -> bool:
        """A transient error (throttling, 5xx, a dropped connection) worth another attempt."""

    @abstractmethod
    def _describe(self, e: BaseException) -> str:
        """The cause of ``e`` in a sentence: status, code, the endpoint when unreachable."""

    # ------------------------------------------------------------------ calls

    def timeouts(self) -> tuple[float, float]:
        """(connect, read) for a socket operation of the call in this thread: never past what it has left."""
        call = current_call()
        left = self.read_timeout if call is None else max(0.001, call.left())
        return min(self.connect_timeout, left), min(self.read_timeout, left)

    def _error(self, path: str, action: str, e: BaseException) -> StoreError:
        if isinstance(e, StoreError):
            return StoreError(f"{self._where(path)}: {action} failed: {e}")
        return StoreError(f"{self._where(path)}: {action} failed: {self._describe(e)}")

    # ------------------------------------------------------------------ reads

    def listdir(self, path: str = "") -> list[str]:
        prefix = self._dir_key(path)
        try:
            dirs, files = self._call(f"LIST {prefix or '/'}", lambda: self._list(prefix, True))
        except Exception as e:
            raise self._error(path, "listing", e) from e
        names = {d[len(prefix) :].rstrip("/") for d in dirs} | {k[len(prefix) :] for k in files}
        return sorted(n for n in names if n)

    def file_sizes(self, path: str) -> dict[str, int]:
        prefix = self._dir_key(path)
        try:
            _, files = self._call(f"LIST {prefix or '/'}", lambda: self._list(prefix, True))
        except Exception as e:
            raise self._error(path, "listing", e) from e
        return {k[len(prefix) :]: n for k, n in files.items() if k[len(prefix) :]}

    def file_size(self, path: str) -> int | None:
        key = self._key(path)
        try:
            return self._call(f"HEAD {key}", lambda: self._size(key))
        except Exception as e:
            raise self._error(path, "stat", e) from e

    def read_file(self, path: str) -> memoryview:
        size = self.file_size(path)
        if size is None:
            raise CheckpointNotFound(f"{self._where(path)}: no such object")
        if size > MAX_MANIFEST_BYTES and path.rpartition("/")[2] == MANIFEST:
            raise CheckpointCorrupt(
                f"{self._where(path)}: {size} bytes, more than any manifest ({MAX_MANIFEST_BYTES}); not downloaded"
            )
        view = memoryview(bytearray(size))
        self.read_files_into([(path, view)])
        return view

    def read_files_into(self, items: Sequence[tuple[str, memoryview]]) -> None:
        tasks: list[Callable[[], None]] = []
        for path, dest in items:
            size = len(dest)
            for start in range(0, max(size, 1), self.part_size):
                end = min(start + self.part_size, size)
                tasks.append(partial(self._get_range, path, dest, start, end))
        self._read_all(items, tasks)

    def _get_range(self, path: str, dest: memoryview, start: int, end: int) -> None:
        """Bytes ``[start, end)`` of ``path`` into ``dest[start:end]``, and one byte past as a check of its size."""
        key = self._key(path)
        try:
            got = self._call(
                f"GET {key} bytes {start}-{end}",
                lambda: self._download(key, dest[start:end], start),
                nbytes=end - start,
            )
        except Missing as e:
            raise CheckpointNotFound(f"{self._where(path)}: no such object") from e
        expected = end - start + (1 if end < len(dest) else 0)  # the byte past the range exists but the last's
        if got != expected:
            size = f"{start + got} bytes" if got < expected else "more bytes"
            raise CheckpointCorrupt(f"{self._where(path)}: {size}, expected {len(dest)}")

    # ------------------------------------------------------------------ writes

    def _put(self, path: str, buffers: Sequence[Buffer], *, if_absent: bool = False) -> bool:
        views, offsets, total = as_bytes_views(buffers)
        key = self._key(path)
        body = BuffersReader(views, offsets, 0, total)
        attempts = 0

        def once() -> bool:
            nonlocal attempts
            attempts += 1
            body.seek(0)
            return self._upload(key, body, if_absent)

        created = self._call(f"PUT {key}", once, nbytes=total)
        if if_absent and not created and attempts > 1:
            # An earlier attempt may have created it and lost only its answer (a dropped
            # connection): then the object that exists is this one, byte for byte.
            return bytes(self.read_file(path)) == bytes(BuffersReader(views, offsets, 0, total).read())
        return created

    def write_file(self, path: str, buffers: Sequence[Buffer]) -> None:
        try:
            self._put(path, buffers)
        except Exception as e:
            raise self._error(path, "upload", e) from e

    def write_files(self, items: Sequence[tuple[str, Sequence[Buffer]]]) -> None:
        try:
            self._run_parallel([partial(self._put, path, buffers) for path, buffers in items])
        except Exception as e:
            path = items[0][0] if len(items) == 1 else items[0][0].rpartition("/")[0]
            raise self._error(path, f"upload of {len(items)} objects", e) from e

    def commit_file(self, path: str, data: bytes) -> None:
        try:
            self._put(path, [data])
        except Exception as e:
            raise self._error(path, "commit", e) from e

    def create_file(self, path: str, data: bytes) -> bool:
        """One conditional upload that the service refuses when the object exists.

        The first call on this store checks that the server really refuses (:mod:`~spotsafe.storage.s3_fence`).
        """
        if self._conditional is None:
            conditional = ConditionalWrites(
                self.url, self.endpoint, unsafe=self._unsafe, condition=self.condition, remedy=self.remedy
            )
            conditional.probe(self._put_if_absent, self._delete_quietly)
            self._conditional = conditional
        if not self._conditional.honoured:
            return super().create_file(path, data)
        return self._put_if_absent(path, data)

    def _put_if_absent(self, path: str, data: bytes) -> bool:
        try:
            return self._put(path, [data], if_absent=True)
        except Exception as e:
            raise self._error(path, f"create ({self.condition})", e) from e

    def _delete_key(self, key: str) -> None:
        self._call(f"DELETE {key}", lambda: self._delete(key))

    def _delete_quietly(self, path: str) -> None:
        key = self._key(path)
        try:
            self._call(f"DELETE {key}", lambda: self._delete(key))
        except Exception as e:  # noqa: BLE001 - best effort: a probe object left behind is only litter
            log.warning("%s: could not delete %s: %s", self.url, self._where(path), e)

    def delete_dir(self, path: str) -> None:
        prefix = self._dir_key(path)
        if not prefix:
            raise ValueError(f"{self.url}: refusing to delete the whole store")
        try:
            _, files = self._call(f"LIST {prefix}", lambda: self._list(prefix, False))
            manifests = [k for k in files if k.endswith(f"/{MANIFEST}")]
            rest = [k for k in files if not k.endswith(f"/{MANIFEST}")]
            for batch in (manifests, rest):  # the manifest first: never a half-deleted "complete" checkpoint
                if batch:
                    self._run_parallel([partial(self._delete_key, k) for k in batch])
        except Exception as e:
            raise self._error(path, "delete", e) from e


def tracking_session(session: Any = None, connections: int = DEFAULT_MAX_CONCURRENCY) -> Any:
    """A ``requests`` session (``session`` itself when given) whose connections join the call in their thread.

    So the watchdog of :mod:`spotsafe.storage.s3_calls` can shut the socket of an overdue call,
    as it does for boto3's: an endpoint that trickles bytes cannot hold a thread past the limit.
    """
    import requests

    if session is None:
        session = requests.Session()
    adapter = _tracking_adapter()(pool_maxsize=connections + 4)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


_ADAPTER: type | None = None
_ADAPTER_LOCK = threading.Lock()


def _tracking_adapter() -> Any:
    global _ADAPTER
    with _ADAPTER_LOCK:
        if _ADAPTER is None:
            import urllib3
            from requests.adapters import HTTPAdapter

            class Tracking:
                def connect(self) -> None:
                    call = current_call()
                    if call is not None:
                        call.adopt(self)
                    parent: Any = super()
                    parent.connect()

                def request(self, *args: Any, **kwargs: Any) -> Any:
                    call = current_call()
                    if call is not None:
                        call.adopt(self)
                    parent: Any = super()
                    return parent.request(*args, **kwargs)

            http = type("SpotsafeHTTPConnection", (Tracking, urllib3.connection.HTTPConnection), {})
            https = type("SpotsafeHTTPSConnection", (Tracking, urllib3.connection.HTTPSConnection), {})
            pools = {
                "http": type("SpotsafeHTTPPool", (urllib3.HTTPConnectionPool,), {"ConnectionCls": http}),
                "https": type("SpotsafeHTTPSPool", (urllib3.HTTPSConnectionPool,), {"ConnectionCls": https}),
            }

            class Adapter(HTTPAdapter):
                def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
                    super().init_poolmanager(*args, **kwargs)
                    self.poolmanager.pool_classes_by_scheme = pools

            _ADAPTER = Adapter
        return _ADAPTER
