"""One recorder for a run's two event channels: the events file and the store's event log.

Every event a :class:`spotsafe.Run` tells of goes through one :class:`Recorder` call,
which writes it to each channel that carries it:

- the JSON-lines file named by ``SPOTSAFE_EVENTS`` (read once, when the Run builds its recorder), which the
  rehearsal (:mod:`spotsafe.rehearsal.rehearse`) and a user's monitor read while the run
  goes on. Besides the run's milestones it carries a ``step`` progress line (step,
  epoch, batch) at most every :data:`STEP_LINE_EVERY_S` seconds, so a reader can count
  the steps a launch has taken without a line per step on a fast loop;
- the store's :class:`~spotsafe.story.events.EventLog` (the run's story and report),
  once the Run has opened it (rank 0 only records).

Each event keeps the fields it always had on each channel (the file's ``notice`` and
``durable`` lines also carry the batch, the file's ``complete`` is the log's ``exit``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from spotsafe.exitcodes import EXIT_PREEMPTED
from spotsafe.settings import Settings
from spotsafe.story.events import MEDIA_DIR, EventLog, png_bytes, process_start_time
from spotsafe.version import __version__

if TYPE_CHECKING:
    from spotsafe.checkpoint.writer import Checkpointer

log = logging.getLogger(__name__)

#: At most one ``step`` progress line per this many seconds in the events file.
STEP_LINE_EVERY_S = 0.25


class Recorder:
    """Writes each of a run's events, with one call, to the events file and to the store's event log.

    ``events``: the store's log, set once the Run opened it (None: the file only).
    """

    def __init__(self, events: EventLog | None = None, *, events_file: str | None = None) -> None:
        self.events = events
        #: The events file (``SPOTSAFE_EVENTS``, read once here), or None: no file channel.
        self.events_file = events_file if events_file is not None else Settings.from_env().events
        self._last_step_line = -float("inf")

    def _emit(self, event: str, **fields: Any) -> None:
        """Append one event to the events file, if there is one."""
        if not self.events_file:
            return
        record = {"event": event, "time": time.time(), "pid": os.getpid(), **fields}
        line = json.dumps(record, default=str) + "\n"
        try:
            with open(self.events_file, "a", encoding="utf-8") as f:
                f.write(line)  # closing hands it to the kernel: it survives the process, no fsync on the notice path
        except OSError as e:  # a rehearsal aid: never let it break training
            log.warning("could not write event to %s: %s", self.events_file, e)

    def open_log(self, checkpointer: Checkpointer, *, coordinator: bool, world_size: int) -> EventLog:
        """Open this launch's log in the checkpointer's store (recording only on the ``coordinator``): the launch."""
        store = checkpointer.store
        events = EventLog(store, enabled=coordinator)
        if coordinator:
            events.record(
                "launch",
                urgent=True,
                pid=os.getpid(),
                process_started=process_start_time(),
                store=store.url,
                world_size=world_size,
                spotsafe=__version__,
                torch=torch.__version__,
                python=sys.version.split()[0],
            )
            events.record_identity()

            def last_save() -> tuple[int, Mapping[str, float], int] | None:
                info = checkpointer.last_saved
                return None if info is None else (info.step, checkpointer.last_timings, info.size)

            events.watch_saves(last_save)
        self.events = events
        return events

    # -- one channel ----------------------------------------------------------------

    def emit(self, event: str, **fields: Any) -> None:
        """The events file only."""
        self._emit(event, **fields)

    def record(self, kind: str, *, urgent: bool = False, **fields: Any) -> None:
        """The store's event log only."""
        if self.events is not None:
            self.events.record(kind, urgent=urgent, **fields)

    def restored(self, *, step: int, epoch: int, batch: int, checkpoint: str | None, seconds: float) -> None:
        self.record(
            "restore",
            urgent=True,
            step=step,
            epoch=epoch,
            batch=batch,
            checkpoint=checkpoint,
            seconds=round(seconds, 6),
        )

    def image(self, tag: str, image: Any, *, step: int, epoch: int) -> str:
        """Keep ``image`` in the store as ``media/<tag>-<step>.png`` (in the background; rank 0 only): its path."""
        if not tag or not all(c.isalnum() or c in "-_." for c in tag):
            raise ValueError(f"image tag must be letters, digits, '-', '_' or '.', not {tag!r}")
        path = f"{MEDIA_DIR}/{tag}-{step:012d}.png"
        if self.events is not None and self.events.enabled:
            data = png_bytes(image)
            self.events.put_file(path, data)
            self.record("image", tag=tag, path=path, step=step, epoch=epoch, bytes=len(data))
        return path

    def close(self, *, step: int, epoch: int) -> None:
        """Close the store's log; without a recorded exit (a script that ended or crashed), record one first."""
        events = self.events
        if events is None:
            return
        if events.exit_status is None:  # closed without finish() or a notice: a script that ended or crashed
            exc = sys.exc_info()[1]
            status = "error" if exc is not None and not isinstance(exc, SystemExit) else "closed"
            events.record("exit", status=status, step=step, epoch=epoch)
        events.close()

    # -- both channels ------------------------------------------------------------------

    def step(self, step: int, metrics: Mapping[str, Any], *, epoch: int, batch: int) -> None:
        """A step was taken: the log samples its metrics; the file gets a rate-limited progress line."""
        if self.events is not None:
            self.events.step(step, metrics, epoch)
        if not self.events_file:
            return
        now = time.monotonic()
        if now - self._last_step_line >= STEP_LINE_EVERY_S:
            self._last_step_line = now
            self._emit("step", step=step, epoch=epoch, batch=batch)

    def rebalance(self, *, step: int, source: str) -> None:
        self._emit("rebalance", step=step, source=source)
        self.record("rebalance", urgent=True, step=step, source=source)

    def notice(
        self, *, step: int, epoch: int, batch: int, source: str, action: str, detected_at: float, deadline: float
    ) -> None:
        where = {"step": step, "epoch": epoch}
        what = {"source": source, "action": action, "detected_at": detected_at, "deadline": deadline}
        self._emit("notice", **where, batch=batch, **what)
        self.record("notice", urgent=True, **where, **what)

    def durable(self, *, step: int, epoch: int, batch: int, seconds: float, flushed: bool, left: float) -> None:
        self._emit("durable", step=step, epoch=epoch, batch=batch, seconds=seconds, flushed=flushed, left=left)
        self.record("durable", step=step, seconds=seconds, flushed=flushed, left=left)

    def preempted(self, *, step: int, epoch: int) -> None:
        """The store's exit entry (before the log closes); the file's ``exit`` line is :meth:`exited`'s."""
        self.record("exit", status="preempted", code=EXIT_PREEMPTED, step=step, epoch=epoch)

    def exited(self, *, code: int, step: int) -> None:
        """The file's last line: the process exits with ``code`` now."""
        self._emit("exit", code=code, step=step)

    def fenced(self, *, step: int, error: str) -> None:
        """Another writer owns the store: the events file says so; the store gets nothing more from this run."""
        self._emit("fenced", step=step, error=error)
        if self.events is not None:
            self.events.abandon()

    def complete(self, *, step: int, epoch: int) -> None:
        self._emit("complete", step=step, epoch=epoch)
        self.record("exit", urgent=True, status="complete", code=0, step=step, epoch=epoch)
