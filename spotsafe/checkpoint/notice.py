"""The notice save: from a final notice's deadline to a durable checkpoint, written once.

Three callers save against a deadline, each with what differs:

- :class:`spotsafe.Run` at ``step()``: the live state (a save of the current step, after
  any save in flight);
- the snapshot guard (:class:`spotsafe.checkpoint.snapshots.SnapshotKeeper`, one rank):
  the newest in-memory snapshot, while the training thread is still inside its step;
- the multi-rank guard: the snapshot step every rank holds, persisted by all ranks.

Each passes a ``persist`` callable (write and commit what it saves) and an ``announce``
callable (its log line and its durable event); :func:`save_before_deadline` sets the
store's deadline, persists, flushes what the store still holds (a mirror's upload)
within the seconds left, times it all and announces the outcome.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from spotsafe.storage.base import Store


class EventSink(Protocol):
    """Where a notice save tells of itself: the run's recorder (:class:`spotsafe.story.recorder.Recorder`)."""

    def emit(self, event: str, **fields: Any) -> None:
        """Record ``event`` with ``fields`` on the run's event channels."""


@dataclass(frozen=True)
class Durable:
    """How a notice save went (seconds are counted from the caller's ``started``)."""

    #: True when the store's remote copy finished too (False: committed locally only).
    flushed: bool
    #: Seconds until the checkpoint was committed (before the flush).
    committed_s: float
    #: Seconds until it was durable (after the flush).
    took_s: float
    #: Seconds left before the deadline once it was durable.
    left_s: float


def seconds_left(deadline: datetime) -> float:
    """Seconds from now to ``deadline`` (negative once it passed)."""
    return (deadline - datetime.now(timezone.utc)).total_seconds()


def save_before_deadline(
    store: Store,
    deadline: datetime,
    persist: Callable[[], None],
    *,
    started: float,
    announce: Callable[[Durable], None],
) -> Durable:
    """Persist with ``store``'s deadline set, flush it before the deadline, announce and return how it went.

    ``started``: the ``time.monotonic()`` the caller counts from (the notice, or its save's start).
    """
    store.set_deadline(deadline)
    persist()
    committed_s = time.monotonic() - started
    flushed = store.flush(timeout=max(seconds_left(deadline), 0.0))
    durable = Durable(flushed, committed_s, time.monotonic() - started, seconds_left(deadline))
    announce(durable)
    return durable
