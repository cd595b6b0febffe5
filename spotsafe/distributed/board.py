"""A side channel between ranks' background threads: small keys in the job's own c10d store.

A notice that comes mid-step on one rank must reach every rank while their training
threads are still inside the step: the agreement's ``all_reduce`` runs only at
``step()``, and a collective issued from a background thread would interleave with
the training thread's own collectives on the same group. :class:`NoticeBoard`
carries a few small JSON values instead, through a connection of its own to the
store every ``torch.distributed`` job already has (torchrun's rendezvous
``TCPStore``): the notified rank posts a marker, every rank's snapshot guard polls
for it (one cheap ``check`` a poll), and the ranks exchange what they hold and the
files they wrote. Nothing here blocks without a timeout: a rank that died never
holds the others past the notice's deadline.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

from spotsafe.errors import DistributedError

if TYPE_CHECKING:
    from spotsafe.distributed.context import DistContext

log = logging.getLogger("spotsafe.distributed")

#: Seconds between two polls for a peer's marker, at small world sizes...
POLL_S = 0.25
#: ...and at most this many checks a second against the store from the whole job.
MAX_POLLS_PER_S = 4000.0


class NoticeBoard:
    """Small JSON values shared by every rank of one job through its c10d store, under a private prefix.

    Build it with :meth:`open` on every rank (it broadcasts rank 0's prefix: a
    collective). Safe to use from one background thread while the training thread
    runs collectives: it has its own store connection and never touches a process group.
    """

    def __init__(self, store: Any, prefix: str, rank: int, world_size: int) -> None:
        self.store = store
        self.prefix = prefix.rstrip("/")
        self.rank = rank
        self.world_size = world_size
        self._lock = threading.Lock()  # one request at a time on this connection

    def __repr__(self) -> str:
        return f"NoticeBoard({self.prefix!r}, rank={self.rank}, world_size={self.world_size})"

    @classmethod
    def open(cls, ctx: DistContext) -> NoticeBoard:
        """This job's board (every rank must call it, in the same order: rank 0's prefix is broadcast)."""
        from torch.distributed import distributed_c10d

        prefix = ctx.broadcast_object(f"spotsafe/board/{uuid.uuid4().hex}" if ctx.is_coordinator else None)
        # The job's own store: torch has no public accessor for it.
        store = distributed_c10d._get_default_store()
        # A clone is a new connection (torch >= 2.5): its requests never wait behind the process group's.
        # A store that cannot clone (older torch, some custom stores) is shared; c10d serializes its requests.
        own = store
        clone = getattr(store, "clone", None)
        if callable(clone):
            try:
                own = clone()
            except (RuntimeError, NotImplementedError) as e:
                log.info("spotsafe: the job's store cannot be cloned (%s); the snapshot guards share it", e)
        return cls(own, str(prefix), ctx.rank, ctx.world_size)

    @property
    def poll_interval(self) -> float:
        """Seconds between two polls of :meth:`read` by one rank (spaced out on large jobs)."""
        return max(POLL_S, self.world_size / MAX_POLLS_PER_S)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}"

    def post(self, key: str, value: Any) -> None:
        """Set ``key`` to ``value`` (plain JSON)."""
        data = json.dumps(value, separators=(",", ":"), allow_nan=False)
        try:
            with self._lock:
                self.store.set(self._key(key), data)
        except RuntimeError as e:
            raise DistributedError(f"rank {self.rank}: posting {key!r} to the job's store failed: {e}") from e

    def read(self, key: str) -> Any:
        """The value posted under ``key``, or None when nothing is (a non-blocking check)."""
        k = self._key(key)
        try:
            with self._lock:
                if not self.store.check([k]):
                    return None
                raw = self.store.get(k)
        except RuntimeError as e:
            raise DistributedError(f"rank {self.rank}: reading {key!r} from the job's store failed: {e}") from e
        return json.loads(bytes(raw))

    def wait(self, keys: list[str], timeout: float) -> list[Any]:
        """The values of ``keys`` once all are posted; :class:`DistributedError` after ``timeout`` seconds."""
        full = [self._key(k) for k in keys]
        end = time.monotonic() + max(timeout, 0.0)
        while True:
            # Short waits in a loop: the lock is not held for long, and the timeout is ours, not the store's.
            left = end - time.monotonic()
            try:
                with self._lock:
                    self.store.wait(full, _dt.timedelta(seconds=max(0.01, min(left, 0.5))))
                    return [json.loads(bytes(self.store.get(k))) for k in full]
            except RuntimeError as e:
                if end - time.monotonic() <= 0:
                    missing = [k for k, f in zip(keys, full, strict=True) if not self._has(f)]
                    raise DistributedError(
                        f"rank {self.rank}: {', '.join(missing) or 'keys'} not posted within {timeout:.1f} s: {e}"
                    ) from e

    def _has(self, key: str) -> bool:
        try:
            with self._lock:
                return bool(self.store.check([key]))
        except RuntimeError:
            return False

    def gather(self, key: str, value: Any, timeout: float) -> list[Any]:
        """Post this rank's ``value`` under ``key``; every rank's, in rank order, once all are there."""
        self.post(f"{key}/{self.rank}", value)
        return self.wait([f"{key}/{r}" for r in range(self.world_size)], timeout)
