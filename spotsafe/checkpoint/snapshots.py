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
and the copy's stall every ``every`` steps.

Multi-rank runs (torch.distributed with several ranks, replicated state as under
DDP) take their snapshots at the same steps on every rank: the cadence rides on
the notice agreement's reduce (:attr:`NoticeAgreement.snapshot_every`, the largest
rank's wish), switched at the same call everywhere. A notice seen by one rank
reaches the others through a :class:`~spotsafe.distributed.board.NoticeBoard`
(small keys in the job's own c10d store, polled by every rank's guard thread), not
through a collective: the training threads may be inside a step or a collective
save. The guards exchange the steps they hold, agree on the newest one all of them
hold, and persist it with :meth:`Checkpointer.persist_snapshot_ranks` (every rank's
files durable, then rank 0 commits the manifest). Ranks run up to a step apart (a
rank may have taken snapshot ``s`` while another is still inside step ``s``), so each
rank keeps its two newest snapshots: two copies of what it writes in host memory
(rank 0 writes the replicated state; the others only their RNG streams and data
position). Sharded (FSDP/DCP) state takes no snapshots.
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

import torch

from spotsafe.checkpoint.notice import Durable, EventSink, save_before_deadline, seconds_left
from spotsafe.checkpoint.staging import SideStreams, StagedState, StagingBuffer, stage
from spotsafe.errors import DistributedError
from spotsafe.state import flatten

if TYPE_CHECKING:
    from spotsafe.checkpoint.writer import Checkpointer
    from spotsafe.cloud.notice import Notice
    from spotsafe.cloud.watcher import InterruptionWatcher
    from spotsafe.distributed.board import NoticeBoard

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
#: Seconds close() waits for a multi-rank guard (its persist is bounded by the notice's deadline anyway).
CLOSE_WAIT_S = 30.0
#: Steps remembered for the step-time estimate.
_WINDOW = 32


@dataclass
class HeldSnapshot:
    """The newest snapshot in memory: the state at a step boundary, ready to be persisted."""

    step: int
    epoch: int | None
    metadata: dict[str, Any]
    when: datetime
    snap: StagedState
    stall_s: float


class SnapshotKeeper:
    """Keeps the newest in-memory snapshot of a run's state; persists it when a notice leaves too little time.

    ``every``: steps between snapshots, ``"auto"`` (chosen from measured step and
    copy times to keep the stall under ``budget`` of step time) or None (off).
    The Run calls :meth:`after_step` at every step boundary, :meth:`saved` when it
    starts a regular save, and :meth:`stand_down` when its own notice save begins.

    With ``board`` (a multi-rank run) the keeper snapshots at the steps every rank
    agreed on (``step % every == 0``, ``every`` set by :meth:`agree` at the same call
    on every rank from :meth:`proposal`), keeps its two newest snapshots, and its
    guard persists the newest step every rank holds when any rank's notice leaves
    too little time (see the module doc).
    """

    def __init__(
        self,
        checkpointer: Checkpointer,
        every: int | Literal["auto"] = "auto",
        *,
        budget: float = DEFAULT_BUDGET,
        recorder: EventSink | None = None,
        board: NoticeBoard | None = None,
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
        self._recorder = recorder
        self._board = board
        #: Snapshots kept: the newest, and under several ranks the one before (a peer may not have the newest yet).
        self.depth = 1 if board is None else 2
        self._buffers = [StagingBuffer() for _ in range(self.depth)]
        #: CUDA present: device tensors are copied on side streams (pinned buffers, non-blocking), else None.
        self._streams: SideStreams | None = SideStreams() if torch.cuda.is_available() else None
        self._ring: list[HeldSnapshot | None] = [None] * self.depth
        self._lock = threading.Lock()
        self._persisting = False
        #: Multi-rank: this rank's wish for ``every`` (auto), sent in the agreement's reduce.
        self._want = self.every
        #: Steps a notice may take to be agreed at step() after it is seen (the agreement's bound).
        self.lag_steps = 0
        #: Newest step a regular save was started for (a held snapshot at or before it is moot).
        self._saved_step = -1
        self._since = 0
        self._step_times: deque[float] = deque(maxlen=_WINDOW)
        self._copy_s: float | None = None
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
        #: Seconds of those stalls spent allocating and faulting in buffers (one-offs, in ``stall_total_s`` too).
        self.alloc_total_s = 0.0

    # -- the training thread ----------------------------------------------------------

    @property
    def _held(self) -> HeldSnapshot | None:
        """The newest snapshot in memory."""
        held = [h for h in self._ring if h is not None]
        return max(held, key=lambda h: h.step) if held else None

    @property
    def held_step(self) -> int | None:
        """Step of the newest snapshot in memory, or None."""
        held = self._held
        return None if held is None else held.step

    @property
    def held_steps(self) -> list[int]:
        """Steps of every snapshot in memory, oldest first."""
        return sorted(h.step for h in self._ring if h is not None)

    @property
    def step_time(self) -> float | None:
        """Median seconds of a training step (between two step() calls), or None before two steps."""
        return statistics.median(self._step_times) if self._step_times else None

    @property
    def nbytes(self) -> int:
        """Host memory the snapshot buffers hold."""
        return sum(b.capacity for b in self._buffers)

    def proposal(self) -> int:
        """Multi-rank: the ``every`` this rank wishes for (auto: from its own copy and step times)."""
        return self._want if self.auto else self.every

    def agree(self, every: int) -> None:
        """Multi-rank: the ``every`` all ranks agreed on, applied at the same step everywhere (0: none yet)."""
        if every >= 1 and every != self.every:
            log.info("snapshot every %d steps (was %d), as agreed by every rank", every, self.every)
            self.every = every

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
            if self._stand_down.is_set():
                return
            # Several ranks: the same steps everywhere (the step count and ``every`` are the same on each).
            due = step % self.every == 0 if self._board is not None else self._since >= self.every
            if not due:
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
            if self._persisting:  # a buffer is being written: keep them as they are
                return
            previous = self._held
            # Overwrite the oldest slot (or an empty one): the newest stays until this copy is complete.
            slot = self._free_slot()
            buffer = self._buffers[slot]
            self._ring[slot] = None
            t0 = time.perf_counter()
            flat = flatten(state())
            t1 = time.perf_counter()
            # Allocating and faulting in the buffer (the first snapshot, or a state that grew) is a one-off:
            # timed apart, so the cadence is set by what every later copy costs, from the first snapshot on.
            allocated = buffer.reserve(flat.nbytes)
            alloc_s = time.perf_counter() - t1
            snap = stage(flat, buffer, copy=True, streams=self._streams)
            stall = time.perf_counter() - t0
            meta = {**dict(metadata()), "snapshot": True}
            self._ring[slot] = HeldSnapshot(step, epoch, meta, datetime.now(timezone.utc), snap, stall)
        self._since = 0
        self.taken += 1
        self.stall_total_s += stall
        if allocated:
            self.alloc_total_s += alloc_s
        if self.taken == 1:
            self.first_stall_s = stall
        # On a GPU the host only queues the copies; the compute stream waits for them, so their device
        # time (known once the previous snapshot's copies are done) is the cost the cadence must budget.
        cost = stall - (alloc_s if allocated else 0.0)
        device_s = previous.snap.device_seconds() if previous is not None else None
        if device_s is not None:
            cost = max(cost, device_s)
        self._copy_s = cost if self._copy_s is None else 0.7 * self._copy_s + 0.3 * cost
        if self.auto:
            self._retune()

    def _free_slot(self) -> int:
        """The ring slot to overwrite: an empty one, else the oldest snapshot's."""
        oldest, oldest_step = 0, None
        for i, held in enumerate(self._ring):
            if held is None:
                return i
            if oldest_step is None or held.step < oldest_step:
                oldest, oldest_step = i, held.step
        return oldest

    def _retune(self) -> None:
        step_s = self.step_time
        if step_s is None or self._copy_s is None:
            return
        want = math.ceil(self._copy_s / (self.budget * max(step_s, 1e-6)))
        want = min(MAX_EVERY, max(MIN_EVERY, want))
        if self._board is not None:
            self._want = want  # proposed in the agreement; every rank switches at the same step (agree())
            return
        # Slower copies space the snapshots out at once (the budget is a ceiling); faster ones only once
        # they are 20% faster, so a noisy copy time does not flip the cadence back and forth.
        if want > self.every or want < 0.8 * self.every:
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

    def start(self, watcher: InterruptionWatcher | None) -> None:
        """Start the guard thread: it waits for a final notice from ``watcher`` (and, multi-rank, from a peer)."""
        if self._guard is not None or (watcher is None and self._board is None):
            return
        target = self._watch if self._board is None else self._watch_ranks
        self._guard = threading.Thread(target=target, args=(watcher,), name="spotsafe-snapshot-guard", daemon=True)
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
            # Several ranks: a request to a job store that stopped answering must not hang the exit.
            guard.join(None if self._board is None else CLOSE_WAIT_S)
            if guard.is_alive():
                log.warning("spotsafe: the snapshot guard did not stop within %.0f s; leaving it", CLOSE_WAIT_S)
        self._guard = None
        with self._lock:
            self._ring = [None] * self.depth
            if not self._persisting:
                for buffer in self._buffers:
                    buffer.release()

    def _watch(self, watcher: InterruptionWatcher | None) -> None:
        assert watcher is not None
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
        # Several ranks: the notice is acted on only once every rank agreed on it, up to lag_steps later.
        return remaining + self.lag_steps * step_s + self._save_s()

    def _save_s(self) -> float:
        """Seconds a save of the live state at step() would take: the last one's, with room to spare."""
        t = self.checkpointer.last_timings
        if t:
            return SAVE_SAFETY * sum(t.get(k, 0.0) for k in ("snapshot_s", "write_s", "commit_s"))
        # Nothing measured yet: a copy plus a write at a slow disk's pace.
        one = max(b.capacity for b in self._buffers)  # one snapshot's bytes (two are kept under several ranks)
        return SAVE_SAFETY * ((self._copy_s or 0.0) + one / SLOW_WRITE_BPS) + MARGIN_S

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
        chosen: HeldSnapshot = held

        def persist() -> None:
            self.checkpointer.persist_snapshot(
                chosen.step,
                chosen.snap,
                epoch=chosen.epoch,
                reason="notice",
                when=chosen.when,
                metadata=chosen.metadata,
                stall_s=chosen.stall_s,
                retain=False,  # the deadline's seconds go to durability and the upload; the next save prunes
            )
            self.checkpointer.wait()

        def announce(durable: Durable) -> None:
            took = durable.committed_s  # this guard counts from the notice to the commit
            self._persisted(chosen.step, took)
            log.warning(
                "spotsafe: snapshot of step %d durable %.2f s after the notice; %.1f s left",
                chosen.step,
                took,
                durable.left_s,
            )
            self._record_durable(chosen.step, chosen.epoch, took, durable)

        try:
            save_before_deadline(self.checkpointer.store, notice.deadline, persist, started=detected, announce=announce)
        finally:
            with self._lock:
                self._persisting = False

    def _persisted(self, step: int, took: float) -> None:
        """The snapshot of ``step`` is durable, ``took`` seconds after the notice: a later one need not be."""
        self._saved_step = max(self._saved_step, step)
        self.persisted = (step, took)

    def _record_durable(self, step: int, epoch: int | None, took: float, durable: Durable, **fields: Any) -> None:
        """The ``snapshot_durable`` event (``fields``: the multi-rank agreement's own)."""
        if self._recorder is None:
            return
        self._recorder.emit(
            "snapshot_durable",
            step=step,
            every=self.every,
            epoch=epoch,
            seconds=took,
            **fields,
            flushed=durable.flushed,
            left=durable.left_s,
        )

    # -- several ranks ----------------------------------------------------------------

    def _watch_ranks(self, watcher: InterruptionWatcher | None) -> None:
        """The guard of one rank of several: its own notice, or a peer's marker on the board."""
        board = self._board
        assert board is not None
        local: Notice | None = None
        warned = False
        while not self._stop.is_set():
            if local is None and watcher is not None:
                local = watcher.wait(board.poll_interval, final=True)
            elif self._stop.wait(board.poll_interval):
                return
            try:
                marker = board.read("notice")
                # Until the Run's own (agreed) notice save begins, this rank may be the one to call it.
                if (
                    marker is None
                    and local is not None
                    and not self._stand_down.is_set()
                    and self._needed_s() + MARGIN_S >= local.time_left()
                ):
                    marker = {
                        "rank": board.rank,
                        "deadline": local.deadline.timestamp(),
                        "detected": local.detected_at.timestamp(),
                        "source": local.source,
                    }
                    board.post("notice", marker)
            except DistributedError as e:  # the store went away (the job is ending): keep trying until closed
                if not warned:
                    log.warning("spotsafe: the snapshot guard cannot reach the job's store: %s", e)
                    warned = True
                continue
            if marker is None:
                continue
            # A marker commits every rank's guard, even after its Run began the agreed save: peers count on it.
            deadline = float(marker["deadline"])
            if local is not None:
                deadline = min(deadline, local.deadline.timestamp())
            try:
                self._persist_agreed(
                    datetime.fromtimestamp(deadline, timezone.utc), int(marker["rank"]), float(marker["detected"])
                )
            except Exception:  # the Run's own notice path still runs: log and go on
                log.exception("spotsafe: persisting the in-memory snapshot with the other ranks failed")
            return

    def _persist_agreed(self, deadline: datetime, source_rank: int, detected_at: float) -> None:
        """Agree with every rank on the newest step all of them hold, and persist it together.

        ``detected_at``: when the source rank saw the notice (a UTC timestamp), for the time-to-durable figure.
        """
        board = self._board
        assert board is not None
        detected = time.monotonic()

        def left() -> float:
            return seconds_left(deadline)

        with self._lock:
            self._persisting = True  # frozen: what this rank announces below stays in memory
            held = {h.step: h for h in self._ring if h is not None}
        try:
            everyone = board.gather("held", {"steps": sorted(held), "saved": self._saved_step}, max(left(), 0.0))
            common = set.intersection(*(set(e["steps"]) for e in everyone))
            floor = min(int(e["saved"]) for e in everyone)  # every rank began a regular save of this step or later
            candidates = [s for s in common if s > floor]
            if not candidates:
                log.warning(
                    "spotsafe: notice from rank %d with %.1f s left; no in-memory snapshot step held by every rank "
                    "(here %s) is newer than the last save: nothing to persist",
                    source_rank,
                    left(),
                    sorted(held),
                )
                return
            step = max(candidates)
            h = held[step]
            log.warning(
                "spotsafe: notice from rank %d with %.1f s left; persisting the in-memory snapshot of step %d on "
                "every rank now",
                source_rank,
                left(),
                step,
            )

            def persist() -> None:
                self.checkpointer.persist_snapshot_ranks(
                    step,
                    h.snap,
                    board,
                    epoch=h.epoch,
                    reason="notice",
                    when=h.when,
                    metadata=h.metadata,
                    timeout=max(left(), 0.0),
                    stall_s=h.stall_s,
                )

            def announce(durable: Durable) -> None:
                # From the source rank's notice (wall clocks: one host, or NTP-synchronized ones).
                since_notice = time.time() - detected_at
                self._persisted(step, durable.took_s)
                log.warning(
                    "spotsafe: snapshot of step %d durable on every rank %.2f s after rank %d saw the notice; "
                    "%.1f s left",
                    step,
                    since_notice,
                    source_rank,
                    durable.left_s,
                )
                self._record_durable(
                    step,
                    h.epoch,
                    durable.took_s,
                    durable,
                    since_notice=since_notice,
                    rank=board.rank,
                    source_rank=source_rank,
                )

            save_before_deadline(self.checkpointer.store, deadline, persist, started=detected, announce=announce)
        finally:
            with self._lock:
                self._persisting = False
