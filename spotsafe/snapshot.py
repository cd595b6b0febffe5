"""In-memory snapshots: a durable checkpoint before a deadline shorter than a training step.

A notice is handled at :meth:`spotsafe.Run.step`. When a step (or an evaluation
pass, a compile) outlasts the notice's deadline, the process would die with only
the last periodic checkpoint. :class:`SnapshotKeeper` keeps the newest consistent
copy of the run's state in host memory, taken at a step boundary every
``every`` steps (``"auto"``: as often as keeps the copy's stall under
``budget`` of the step time), and a guard thread waits for a final notice. When
the current step cannot finish and save before the deadline, the guard persists
the held snapshot at once, from its own thread, through the Checkpointer's normal
write-and-commit path (same files, same manifest-last commit, same retention), so
a durable checkpoint at most one snapshot old exists before the deadline while
the training thread is still inside its step.

Cost: one more copy of the state in host memory (pinned when CUDA is present),
and the copy's stall every ``every`` steps. Multi-rank runs (torch.distributed
with several ranks) do not take snapshots yet: their notice path is the agreed
save at a step boundary.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

from spotsafe.checkpoint import Snapshot, SnapshotBuffer, snapshot

if TYPE_CHECKING:
    from spotsafe.checkpoint import Checkpointer
    from spotsafe.interruption import InterruptionWatcher, Notice

log = logging.getLogger("spotsafe.snapshot")

#: Fraction of step time the snapshot copies may take with ``every="auto"``.
DEFAULT_BUDGET = 0.02
#: With ``every="auto"``, never fewer steps between snapshots than this...
MIN_EVERY = 1
#: ... nor more.
MAX_EVERY = 10_000
#: Safety margin (seconds) kept before a deadline when deciding whether the step can still make it.
MARGIN_S = 1.0
#: A save is assumed to take this many times as long as the last one measured.
SAVE_SAFETY = 1.5
#: Bytes per second assumed for a write before any save was measured (a slow network disk).
SLOW_WRITE_BPS = 100e6
#: Steps remembered for the step-time estimate.
_WINDOW = 32

Emit = Callable[..., None]


@dataclass
class HeldSnapshot:
    """The newest snapshot in memory: the state at a step boundary, ready to be persisted."""

    step: int
    epoch: int | None
    metadata: dict[str, Any]
    when: datetime
    snap: Snapshot
    stall_s: float


class SnapshotKeeper:
    """Keeps the newest in-memory snapshot of a run's state; persists it when a notice leaves too little time.

    ``every``: steps between snapshots, ``"auto"`` (chosen from measured step and
    copy times to keep the stall under ``budget`` of step time) or None (off).
    The Run calls :meth:`after_step` at every step boundary, :meth:`saved` when it
    starts a regular save, and :meth:`stand_down` when its own notice save begins.
    """

    def __init__(
        self,
        checkpointer: Checkpointer,
        every: int | Literal["auto"] = "auto",
        *,
        budget: float = DEFAULT_BUDGET,
        emit: Emit | None = None,
    ) -> None:
        if every != "auto" and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"snapshot_every must be 'auto', None or an int >= 1, not {every!r}")
        if not 0 < budget < 1:
            raise ValueError(f"snapshot budget must be a fraction in (0, 1), not {budget!r}")
        self.checkpointer = checkpointer
        self.auto = every == "auto"
        #: Steps between snapshots now (auto: starts at 1 and adapts once a copy is measured).
        self.every: int = 1 if every == "auto" else int(every)
        self.budget = budget
        self._emit = emit
        self._buffer = SnapshotBuffer()
        self._lock = threading.Lock()
        self._held: HeldSnapshot | None = None
        self._persisting = False
        #: Newest step a regular save was started for (a held snapshot at or before it is moot).
        self._saved_step = -1
        self._since = 0
        self._step_times: deque[float] = deque(maxlen=_WINDOW)
        self._copy_s: float | None = None
        self._copy_cold = False
        #: monotonic time the current step began (the end of the previous step())
        self._step_began = time.monotonic()
        self._stand_down = threading.Event()
        self._stop = threading.Event()
        self._guard: threading.Thread | None = None
        #: The last persisted snapshot: (step, seconds from the notice to durable), for tests and logs.
        self.persisted: tuple[int, float] | None = None
        #: Snapshots taken and the seconds the training loop spent in them (its whole cost).
        self.taken = 0
        self.stall_total_s = 0.0
        #: The first snapshot's stall (it also allocates the buffer): a one-off, not the cadence's cost.
        self.first_stall_s = 0.0

    # -- the training thread ----------------------------------------------------------

    @property
    def held_step(self) -> int | None:
        """Step of the snapshot in memory, or None."""
        held = self._held
        return None if held is None else held.step

    @property
    def step_time(self) -> float | None:
        """Median seconds of a training step (between two step() calls), or None before two steps."""
        return statistics.median(self._step_times) if self._step_times else None

    @property
    def nbytes(self) -> int:
        """Host memory the snapshot buffer holds."""
        return self._buffer.capacity

    def after_step(
        self,
        step: int,
        state: Callable[[], Mapping[str, Any]],
        *,
        epoch: int | None,
        metadata: Callable[[], Mapping[str, Any]],
        saving: bool,
    ) -> None:
        """At a step boundary: take a snapshot when one is due (``saving``: a regular save takes this step)."""
        began = time.monotonic()
        self._step_times.append(began - self._step_began)
        try:
            self._since += 1
            if saving:
                self._saved_step = max(self._saved_step, step)
                self._since = 0
                return
            if self._since < self.every or self._stand_down.is_set():
                return
            self._take(step, state, epoch, metadata)
        finally:
            self._step_began = time.monotonic()

    def saved(self, step: int) -> None:
        """A regular save of ``step`` has started: a snapshot at or before it need not be persisted."""
        self._saved_step = max(self._saved_step, step)

    def _take(
        self,
        step: int,
        state: Callable[[], Mapping[str, Any]],
        epoch: int | None,
        metadata: Callable[[], Mapping[str, Any]],
    ) -> None:
        with self._lock:
            if self._persisting:  # the buffer is being written: keep it as it is
                return
            capacity = self._buffer.capacity
            t0 = time.perf_counter()
            snap = snapshot(state(), self._buffer, copy=True)
            stall = time.perf_counter() - t0
            meta = {**dict(metadata()), "snapshot": True}
            self._held = HeldSnapshot(step, epoch, meta, datetime.now(timezone.utc), snap, stall)
        self._since = 0
        self.taken += 1
        self.stall_total_s += stall
        if self.taken == 1:
            self.first_stall_s = stall
        if self._buffer.capacity != capacity:
            # This copy also paid for allocating (and faulting in) the buffer: an upper bound on what the
            # next ones cost. Space them by it now (no second full copy right away); a warm copy replaces it.
            self._copy_s, self._copy_cold = stall, True
        elif self._copy_s is None or self._copy_cold:
            self._copy_s, self._copy_cold = stall, False
        else:
            self._copy_s = 0.7 * self._copy_s + 0.3 * stall
        if self.auto:
            self._retune()

    def _retune(self) -> None:
        step_s = self.step_time
        if step_s is None or self._copy_s is None:
            return
        want = math.ceil(self._copy_s / (self.budget * max(step_s, 1e-6)))
        want = min(MAX_EVERY, max(MIN_EVERY, want))
        if want != self.every and abs(want - self.every) > 0.2 * self.every:
            log.info(
                "snapshot every %d steps (was %d): copy %.4f s, step %.4f s, budget %.0f%%",
                want,
                self.every,
                self._copy_s,
                step_s,
                100 * self.budget,
            )
            self.every = want

    # -- the guard ------------------------------------------------------------------

    def start(self, watcher: InterruptionWatcher) -> None:
        """Start the guard thread: it waits for a final notice from ``watcher``."""
        if self._guard is not None:
            return
        self._guard = threading.Thread(target=self._watch, args=(watcher,), name="spotsafe-snapshot-guard", daemon=True)
        self._guard.start()

    def stand_down(self) -> None:
        """The Run's own notice save has begun: the guard persists nothing more."""
        self._stand_down.set()

    def close(self) -> None:
        """Stop the guard thread and free the snapshot buffer (a persist in flight finishes first)."""
        self._stop.set()
        self._stand_down.set()
        guard = self._guard
        if guard is not None and guard is not threading.current_thread():
            guard.join()
        self._guard = None
        with self._lock:
            self._held = None
            if not self._persisting:
                self._buffer.release()

    def _watch(self, watcher: InterruptionWatcher) -> None:
        while not self._stop.is_set():
            notice = watcher.wait(0.5, final=True)
            if notice is None:
                continue
            try:
                self._on_notice(notice)
            except Exception:  # the Run's own notice path still runs: log and go on
                log.exception("spotsafe: persisting the in-memory snapshot on %s failed", notice)
            return

    def _needed_s(self) -> float:
        """Seconds the training thread still needs to reach step() and save there (an estimate)."""
        step_s = self.step_time
        if step_s is None:
            return math.inf  # nothing measured yet: assume the worst
        elapsed = time.monotonic() - self._step_began
        # A step already running longer than usual (an evaluation pass?) may run as long again.
        remaining = step_s - elapsed if elapsed < step_s else step_s
        return remaining + self._save_s()

    def _save_s(self) -> float:
        """Seconds a save of the live state at step() would take: the last one's, with room to spare."""
        t = self.checkpointer.last_timings
        if t:
            return SAVE_SAFETY * sum(t.get(k, 0.0) for k in ("snapshot_s", "write_s", "commit_s"))
        # Nothing measured yet: a copy plus a write at a slow disk's pace.
        return SAVE_SAFETY * ((self._copy_s or 0.0) + self.nbytes / SLOW_WRITE_BPS) + MARGIN_S

    def _on_notice(self, notice: Notice) -> None:
        detected = time.monotonic()
        while True:
            left = notice.time_left()
            needed = self._needed_s()
            if needed + MARGIN_S >= left:
                break
            # The step should make it: look again when it would be the last moment to persist instead.
            slack = left - needed - MARGIN_S - self._save_s()
            if self._stand_down.wait(max(0.05, min(slack, 0.5))):
                return  # the Run reached step() and saves the live state itself
        if self._stand_down.is_set():
            return
        with self._lock:
            held = self._held
            if held is None or held.step <= self._saved_step:
                log.warning(
                    "spotsafe: notice with %.1f s left and the step will not finish in time; no in-memory snapshot "
                    "newer than the last save (step %s) to persist",
                    left,
                    self._saved_step,
                )
                return
            self._persisting = True
        log.warning(
            "spotsafe: %s notice with %.1f s left; the current step needs ~%.1f s more: persisting the in-memory "
            "snapshot of step %d now",
            notice.source,
            left,
            needed,
            held.step,
        )
        self.checkpointer.store.set_deadline(notice.deadline)
        try:
            self.checkpointer.persist_snapshot(
                held.step,
                held.snap,
                epoch=held.epoch,
                reason="notice",
                when=held.when,
                metadata=held.metadata,
                stall_s=held.stall_s,
            )
            self.checkpointer.wait()
            took = time.monotonic() - detected
            flushed = self.checkpointer.store.flush(timeout=max(notice.time_left(), 0.0))
            self._saved_step = max(self._saved_step, held.step)
            self.persisted = (held.step, took)
            log.warning(
                "spotsafe: snapshot of step %d durable %.2f s after the notice; %.1f s left",
                held.step,
                took,
                notice.time_left(),
            )
            if self._emit is not None:
                self._emit(
                    "snapshot_durable",
                    step=held.step,
                    epoch=held.epoch,
                    seconds=took,
                    flushed=flushed,
                    left=notice.time_left(),
                )
        finally:
            with self._lock:
                self._persisting = False
