"""What every object-store backend (S3, GCS, Azure Blob) shares: its limits, keys, bounded calls and parallel I/O.

:class:`RemoteStore` is a :class:`~spotsafe.storage.base.Store` over a flat namespace of
objects under a prefix. It reads the tuning every remote store understands from
``storage_options`` (``part_size``, ``max_concurrency``, the timeouts, ``max_attempts``),
maps paths to keys, and runs each call (:meth:`RemoteStore._call`) with retries within its
whole-call limit, enforced by a :class:`~spotsafe.storage.s3_calls.Watchdog`. A backend
supplies what its errors mean (:meth:`RemoteStore._retryable`, :meth:`RemoteStore._describe`).
"""

from __future__ import annotations

import logging
import random
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, TypeVar

from spotsafe.errors import CheckpointCorrupt, CheckpointNotFound, StoreError
from spotsafe.storage.base import Store, run_all
from spotsafe.storage.s3_calls import Call, Overdue, Watchdog

log = logging.getLogger(__name__)

T = TypeVar("T")

MiB = 1024 * 1024
DEFAULT_PART_SIZE = 32 * MiB
DEFAULT_MAX_CONCURRENCY = 16
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 60.0
#: The whole-call limit (every attempt, the body streamed in or out included) is
#: request_timeout + bytes moved / min_throughput. 120 s leaves room for one socket read
#: timing out (read_timeout, 60 s) and a retry; 64 KiB/s per call is what each of the
#: 16 parallel streams gets on a 8 Mbit/s link, so a healthy 32 MiB part (limit 632 s)
#: never fails on any link a checkpoint can reasonably cross, while an endpoint that
#: trickles bytes holds a call for minutes, not forever.
DEFAULT_REQUEST_TIMEOUT = 120.0
DEFAULT_MIN_THROUGHPUT = 64 * 1024
DEFAULT_MAX_ATTEMPTS = 8

#: storage_options every remote store understands (a backend adds its own names).
LIMIT_OPTIONS = frozenset(
    {
        "part_size",
        "max_concurrency",
        "connect_timeout",
        "read_timeout",
        "request_timeout",
        "min_throughput",
        "max_attempts",
    }
)


def retryable_status(status: object) -> bool:
    """An HTTP status worth another attempt: a timeout, throttling, a server error (not 501, a missing call)."""
    return isinstance(status, int) and (status in (408, 429) or status >= 500) and status != 501


class RemoteStore(Store):
    """A store of objects under a prefix, every call bounded; a backend supplies its primitives and its errors' meaning."""

    #: The key prefix of the store's root inside its bucket or container ("" for the whole of it).
    prefix = ""
    #: The smallest ``part_size`` the service takes, and how a refusal says so.
    min_part_size = MiB
    min_part_reason = "below 1 MiB"
    #: The name of the pool's threads.
    thread_prefix = "spotsafe-remote"
    confirms_writes = True  # S3 PUT / CompleteMultipartUpload, a GCS or Azure upload: whole or absent
    #: Errors a call raises at once, whatever its time left (a backend's "not there", a damaged object).
    never_retried: tuple[type[BaseException], ...] = ()

    def __init__(self, url: str, opts: Mapping[str, Any], known: frozenset[str]) -> None:
        self.url = url.rstrip("/")
        self._read_limits(opts, known)
        self.endpoint = "the service"
        self._deadline: float | None = None  # time.monotonic() value
        self._closed = False
        self._pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix=self.thread_prefix)
        self._watchdog = Watchdog(f"{self.thread_prefix}-watchdog({self.url})")
        weakref.finalize(self, self._watchdog.stop)  # a store dropped unclosed does not leave it behind

    def _read_limits(self, opts: Mapping[str, Any], known: frozenset[str]) -> None:
        """Part size, concurrency, timeouts, attempts and call limits from ``storage_options``, checked."""
        unknown = sorted(set(opts) - LIMIT_OPTIONS - known)
        if unknown:
            raise ValueError(f"{self.url}: unknown storage_options {unknown}; known: {sorted(LIMIT_OPTIONS | known)}")
        self.part_size = int(opts.get("part_size", DEFAULT_PART_SIZE))
        if self.part_size < self.min_part_size:
            raise ValueError(f"{self.url}: part_size {self.part_size} is {self.min_part_reason}")
        # A checkpoint's payload goes up as objects of one part each: parallel PUTs and
        # nothing to assemble at the end.
        self.segment_size = self.part_size
        self.max_concurrency = int(opts.get("max_concurrency", DEFAULT_MAX_CONCURRENCY))
        if self.max_concurrency < 1:
            raise ValueError(f"{self.url}: max_concurrency must be >= 1")
        self.connect_timeout = float(opts.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT))
        self.read_timeout = float(opts.get("read_timeout", DEFAULT_READ_TIMEOUT))
        self.max_attempts = max(1, int(opts.get("max_attempts", DEFAULT_MAX_ATTEMPTS)))
        self.request_timeout = float(opts.get("request_timeout", DEFAULT_REQUEST_TIMEOUT))
        self.min_throughput = float(opts.get("min_throughput", DEFAULT_MIN_THROUGHPUT))
        if not self.request_timeout > 0:  # also refuses NaN
            raise ValueError(f"{self.url}: request_timeout must be > 0 seconds, not {self.request_timeout}")
        if not self.min_throughput > 0:
            raise ValueError(f"{self.url}: min_throughput must be > 0 bytes/s, not {self.min_throughput}")

    # ------------------------------------------------------------------ what a backend supplies

    def _retryable(self, e: BaseException) -> bool:
        """A transient error (throttling, 5xx, a dropped connection) worth another attempt."""
        raise NotImplementedError

    def _describe(self, e: BaseException) -> str:
        """The cause of ``e`` in a sentence: status, code, the endpoint when unreachable."""
        raise NotImplementedError

    # ------------------------------------------------------------------ keys

    def _key(self, path: str) -> str:
        path = path.strip("/")
        if not self.prefix:
            return path
        return f"{self.prefix}/{path}" if path else self.prefix

    def _dir_key(self, path: str) -> str:
        key = self._key(path)
        return f"{key}/" if key else ""

    def _where(self, path: str = "") -> str:
        return f"{self.url}/{path}" if path else self.url

    # ------------------------------------------------------------------ calls

    def set_deadline(self, deadline: datetime | None) -> None:
        if deadline is None:
            self._deadline = None
        else:
            self._deadline = time.monotonic() + (deadline - datetime.now(timezone.utc)).total_seconds()
        self._watchdog.set_notice(self._deadline)  # calls in flight are bounded by it too

    def _call(
        self,
        what: str,
        fn: Callable[..., T],
        /,
        *args: Any,
        attempts: int | None = None,
        nbytes: int = 0,
        **kwargs: Any,
    ) -> T:
        """Run one call with retries on transient failures, within its whole-call limit.

        ``fn`` does all the call's I/O (a streamed body read included) in this thread;
        ``nbytes`` (what it sends or receives) widens the limit by ``nbytes / min_throughput``.
        """
        if self._closed:  # its watchdog is gone: nothing would bound the call
            raise StoreError(f"{self.url}: store is closed")
        tries = self.max_attempts if attempts is None else attempts
        call = Call(self._watchdog, time.monotonic() + self.request_timeout + nbytes / self.min_throughput)
        if self._deadline is not None and self._deadline <= time.monotonic():
            # Still running past the notice's deadline: it was an estimate (an assumed one, a
            # rebalance). Refusing every call now would fail the run's own cleanup (the lease,
            # a last save): one attempt, within the call's own limit, as before this deadline.
            call.after_notice = True
            tries = 1
        attempt, last = 0, None  # last: the error of the latest attempt that was retried
        with call.running():
            while True:
                attempt += 1
                try:
                    return fn(*args, **kwargs)
                except self.never_retried:
                    raise
                except Exception as e:
                    if call.expired or call.left() <= 0:  # its socket was shut, or a capped timeout fired
                        raise self._overdue(what, call, nbytes, last) from e
                    if not self._retryable(e) or attempt >= tries:
                        raise
                    delay = min(5.0, 0.1 * 2 ** (attempt - 1)) * (0.5 + random.random())
                    if delay >= call.left():
                        # The limit, not this error, is what ends the call: say both (a socket
                        # timeout of its own can fire a hair before the watchdog cuts the call).
                        log.warning("%s: %s failed (%s); no time left for a retry, not retrying", self.url, what, e)
                        raise self._overdue(what, call, nbytes, e, retried=False) from e
                    log.info("%s: %s failed (%s); retry %d in %.2fs", self.url, what, e, attempt, delay)
                    last = e
                    time.sleep(delay)

    def _overdue(
        self, what: str, call: Call, nbytes: int, last: Exception | None = None, *, retried: bool = True
    ) -> StoreError:
        label = "its last retried attempt" if retried else "its last attempt, with no time left for a retry"
        after = "" if last is None else f" ({label}: {self._describe(last)})"
        if call.notice_first():
            return Overdue(
                f"{what}: cut at the preemption notice's deadline (set_deadline), before {self.endpoint} completed it"
                + after
            )
        budget = self.request_timeout + nbytes / self.min_throughput
        how = f"request_timeout {self.request_timeout:g} s"
        if nbytes / self.min_throughput >= 0.05:
            how += f" + {nbytes} bytes at min_throughput {self.min_throughput:g} bytes/s"
        return Overdue(f"{what}: {self.endpoint} did not complete it within its limit of {budget:.3g} s ({how}){after}")

    def _run_parallel(self, tasks: Sequence[Callable[[], Any]]) -> list[Any]:
        """Run tasks on the pool; results in order; on the first failure cancel the rest and raise."""
        if self._closed:
            raise StoreError(f"{self.url}: store is closed")
        if len(tasks) == 1:
            return [tasks[0]()]
        return run_all(self._pool, tasks)

    def _error(self, path: str, action: str, e: BaseException) -> StoreError:
        return StoreError(f"{self._where(path)}: {action} failed: {self._describe(e)}")

    def _read_all(self, items: Sequence[tuple[str, memoryview]], tasks: Sequence[Callable[[], Any]]) -> None:
        """Run the reads of ``items`` (``tasks``) in parallel; a missing or damaged file is said as such."""
        try:
            self._run_parallel(tasks)
        except (CheckpointNotFound, CheckpointCorrupt):
            raise
        except Exception as e:
            raise self._error(items[0][0] if len(items) == 1 else "", f"download of {len(items)} files", e) from e

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._watchdog.stop()
