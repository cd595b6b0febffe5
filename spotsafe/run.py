"""``spotsafe.Run``: a training loop that checkpoints, survives a notice and resumes exactly (README.md).

What a checkpoint holds: every stateful object given (``model``, ``optimizer``, ``scheduler``,
``scaler``), ``run.state`` (the loop's own values and tensors), every RNG
(:class:`spotsafe.state.RNGState`) and, under the key ``"spotsafe"``, the run's counters and data
position (:mod:`spotsafe.runstate`). Restoring all of it makes the resumed run's remaining steps
bit-identical to the uninterrupted run's (CPU, deterministic ops).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, NoReturn

import torch

from spotsafe.checkpoint.notice import save_before_deadline, seconds_left
from spotsafe.checkpoint.snapshots import SnapshotKeeper
from spotsafe.checkpoint.writer import Checkpointer
from spotsafe.cloud.times import utcnow
from spotsafe.cloud.watcher import InterruptionWatcher
from spotsafe.data import ResumableLoader, derive_epoch_seed, draw_epoch_seed
from spotsafe.distributed.board import NoticeBoard
from spotsafe.distributed.commit import RANK_KEYS, rank_state, rescale_batch
from spotsafe.distributed.multirank import MultiRank
from spotsafe.distributed.sharded import ShardedState, is_sharded
from spotsafe.errors import WriterFenced
from spotsafe.exitcodes import EXIT_FENCED, EXIT_PREEMPTED
from spotsafe.interval import AutoInterval, Cadence, History
from spotsafe.runstate import (
    RUN_STATE_FORMAT,
    RUN_STATE_KEY,
    InterruptGuard,
    RunStateError,
    announce_durable,
    announce_resume,
    check_state_keys,
    live_state,
    notice_signals,
    plain_metrics,
    pop_run_state,
)
from spotsafe.settings import Settings
from spotsafe.state import RNGState, StateGroup
from spotsafe.story.recorder import Recorder

if TYPE_CHECKING:
    from typing_extensions import Self

    from spotsafe.checkpoint.manifest import CheckpointInfo, Reason
    from spotsafe.cloud.notice import Notice
    from spotsafe.storage.base import Store
    from spotsafe.story.events import EventLog
    from spotsafe.story.live import LivePage

log = logging.getLogger(__name__)

#: The fixed ``every_seconds`` of old (``every="auto"`` is the default now), for callers that want it.
DEFAULT_EVERY_SECONDS = 600.0


class Run:
    """A training run that outlives the instances it runs on.

    On construction it restores the newest intact checkpoint in ``store`` (logging
    where it resumes from) or starts fresh. ``store`` is a local path (an EBS
    mount), an fsspec URL (``s3://...``) or a :class:`spotsafe.storage.base.Store`; None
    takes ``SPOTSAFE_STORE`` (set by ``python -m spotsafe.resume --store``).

    ``watch``: True builds ``InterruptionWatcher()`` (AWS, GCP, Azure, SIGTERM;
    ``SPOTSAFE_SOURCES`` overrides); False watches nothing; or pass your own
    watcher. With ``exit_on_notice`` (default) a final notice makes :meth:`step`
    save, wait until the checkpoint is durable and exit the process with
    :data:`spotsafe.EXIT_PREEMPTED` (75); without it :attr:`should_stop` becomes
    True and :meth:`epochs`/:meth:`batches` stop yielding.

    Under ``torchrun`` (a process group of several ranks) every rank builds its
    Run; saves are collective (rank 0 writes the replicated state, each rank its
    RNGs and data position), and a notice on any rank is agreed by all at the same
    step (checked every ``agree_every`` steps; "auto" spaces the checks ~0.5 s).

    ``seed``: the per-epoch shuffle seeds are derived from it; None draws each
    epoch's seed from torch's global RNG when the epoch starts (as a plain
    DataLoader does), so ``torch.manual_seed`` keeps runs reproducible.

    ``every="auto"`` (the default when none of ``every_steps``/``every_seconds``/
    ``every_epochs`` is given) persists at the interval the Young–Daly rule picks
    from this run's measured save cost and the interruption rate: the store's
    history once there is one, else ``interruption_rate`` (per hour, or a Spot
    Advisor bucket such as ``"10-15%"``), else a pessimistic default; bounded to
    [60 s, 30 min] and logged when it changes (:mod:`spotsafe.interval`).

    ``snapshot_every``: steps between in-memory snapshots of the state (``"auto"``:
    keep their stall under 2% of step time; None: off). On a notice that the
    current step cannot meet, the newest one is persisted from a background thread
    before the deadline (:mod:`spotsafe.checkpoint.snapshots`). Costs one more copy of the state
    in host memory (two under torchrun: ranks run up to a step apart); under torchrun
    every rank snapshots the same steps and a notice on one rank makes every rank
    persist the same one (not for sharded FSDP state).

    ``model``/``optimizer``/``scheduler``/``scaler`` also take a mapping (or list)
    of such objects, e.g. a GAN's ``model={"G": g, "D": d}``: each is saved and
    restored under its name. Every launch records its events in the store
    (:mod:`spotsafe.story.events`; :attr:`events`), and every ``report_every`` seconds
    (None: never) the report page is rewritten there as ``report.html``
    (:mod:`spotsafe.story.live`, needs ``spotsafe[report]``).
    """

    def __init__(
        self,
        store: str | os.PathLike[str] | Store | None = None,
        *,
        model: Any = None,
        optimizer: Any = None,
        scheduler: Any = None,
        scaler: Any = None,
        every_steps: int | None = None,
        every_seconds: float | None = None,
        every_epochs: int | None = None,
        keep_last: int = 3,
        watch: bool | InterruptionWatcher = True,
        extra_state: Mapping[str, Any] | None = None,
        storage_options: Mapping[str, Any] | None = None,
        seed: int | None = None,
        exit_on_notice: bool = True,
        map_location: Any = None,
        async_: bool = True,
        agree_every: int | str = "auto",
        every: Literal["auto"] | None = None,
        interruption_rate: float | str | None = None,
        snapshot_every: int | Literal["auto"] | None = "auto",
        report_every: float | None = 300.0,
        state: Mapping[str, Any] | None = None,
    ) -> None:
        #: When a periodic save is due (``every_steps``/``every_seconds``/``every_epochs``/``every``).
        self._cadence = Cadence(every_steps, every_seconds, every_epochs, every, interruption_rate)
        if report_every is not None and report_every <= 0:
            raise ValueError(f"report_every must be > 0 seconds or None, got {report_every}")
        self.exit_on_notice = exit_on_notice
        self._settings = Settings.from_env()
        self._init_counters(live_state(state, extra_state), seed)
        self._init_state_group(model, optimizer, scheduler, scaler)
        #: The multi-rank path (torch.distributed initialized with world size > 1), else None.
        self._ddp: MultiRank | None = MultiRank.detect(
            agree_every, sharded=isinstance(self._objects.get("model"), ShardedState)
        )
        # One commit path for one or many ranks: the Checkpointer gets the process-group context.
        self.checkpointer: Checkpointer = Checkpointer(
            store,
            storage_options=storage_options,
            keep_last=keep_last,
            async_=async_,
            dist=self._ddp.ctx if self._ddp is not None else None,
            per_rank=RANK_KEYS,
        )
        #: This launch's events: the events file and, once open, the store's log (rank 0 only records).
        self._recorder = Recorder()
        self._open(map_location)
        self._live: LivePage | None = None
        if report_every is not None and self.events is not None and self.events.enabled:
            from spotsafe.story.live import LivePage

            self._live = LivePage.start(self.store, every=report_every)
        self._cadence.last_save = time.monotonic()
        #: The in-memory snapshots (``snapshot_every`` not None; not for sharded state), else None.
        self.snapshots: SnapshotKeeper | None = self._snapshot_keeper(snapshot_every)
        self.watcher: InterruptionWatcher | None
        self._owns_watcher = watch is True
        if watch is True:  # SIGINT too (a supervisor's, a platform's): SPOTSAFE_SIGINT=interrupt keeps Ctrl+C
            self.watcher = InterruptionWatcher(signals=notice_signals(self._settings)).start()
        else:
            self.watcher = None if watch is False or watch is None else watch
        #: Where SIGINT still raises KeyboardInterrupt: remembered, so finish() marks nothing complete after it.
        self._sigint = InterruptGuard()
        self._sigint.install()
        if self.snapshots is not None:
            self.snapshots.start(self.watcher)  # several ranks: it also watches for a peer's notice
        atexit.register(self._atexit)

    def _init_counters(self, extra: dict[str, Any], seed: int | None) -> None:
        """The run's counters, data position and bookkeeping, as a fresh start has them."""
        #: ``state=`` (or ``extra_state=``): the caller's own dict, live; restored values replace its entries.
        self.extra_state: dict[str, Any] = extra
        #: The last metrics passed to :meth:`step`.
        self.metrics: dict[str, Any] = {}
        #: The checkpoint this run resumed from, or None for a fresh start.
        self.resumed_from: CheckpointInfo | None = None
        self.step_count = 0
        self.epoch = 0
        #: Batches of the current epoch already handed out (where a resume continues); after a
        #: world-size change mid-epoch, counted from the re-split (``_offset``).
        self.batch = 0
        #: Samples of the current epoch's global order read before it was re-split over a new
        #: world size (0: not re-split); ``_resplit``: (old world size, old batch) to apply.
        self._offset = 0
        self._resplit: tuple[int, int] | None = None
        self.seed = seed
        self._epoch_seed: int | None = None
        self._sampler_state: torch.Tensor | None = None
        self._loader_state: dict[str, Any] | None = None
        self._loaders: dict[int, ResumableLoader] = {}
        self._active: ResumableLoader | None = None
        self._in_epochs = False
        self._should_stop = False
        self._closed = False
        self._saved_step: int | None = None
        self._save_due = False
        self._handled: set[int] = set()
        self._lock = threading.Lock()

    def _init_state_group(self, model: Any, optimizer: Any, scheduler: Any, scaler: Any) -> None:
        """The stateful objects saved under their names (several of one kind: a StateGroup), and the RNGs."""
        self._objects: dict[str, Any] = {}
        for name, obj in (("model", model), ("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
            if isinstance(obj, (Mapping, list, tuple)):  # several models / optimizers: {"G": g, "D": d}
                obj = StateGroup(name, obj)
            if obj is not None:
                self._objects[name] = obj
        self._rng = RNGState()
        if model is not None and is_sharded(model):
            # FSDP2 / DTensor parameters: model and optimizer go through torch.distributed.checkpoint.
            self._objects["model"] = ShardedState(model, self._objects.pop("optimizer", None))

    def _open(self, map_location: Any) -> None:
        """Take the store's lease, open the events, restore the newest checkpoint (or start fresh)."""
        try:
            # Before restoring: the run resumes from everything the previous writer committed, and a
            # writer still alive on another instance keeps the store until it lets go (rank 0 holds it).
            self.checkpointer.acquire()
            self._recorder.open_log(
                self.checkpointer,
                coordinator=self._ddp is None or self._ddp.ctx.is_coordinator,
                world_size=self._ddp.ctx.world_size if self._ddp is not None else 1,
            )
            t_restore = time.monotonic()
            self._restore(map_location)
            info = self.resumed_from
            self._recorder.restored(
                step=self.step_count,
                epoch=self.epoch,
                batch=self.batch,
                checkpoint=None if info is None else info.name,
                seconds=time.monotonic() - t_restore,
            )
        except BaseException:
            if self.events is not None:
                self.events.record("exit", status="failed to start", step=self.step_count)
                self.events.close()
            self.checkpointer.close()
            raise

    def _snapshot_keeper(self, snapshot_every: int | Literal["auto"] | None) -> SnapshotKeeper | None:
        """The in-memory snapshots ``snapshot_every`` asks for, where the state allows them."""
        if snapshot_every is None:
            return None
        if self._ddp is None:
            return SnapshotKeeper(self.checkpointer, snapshot_every, recorder=self._recorder)
        if isinstance(self._objects.get("model"), ShardedState):
            log.info("sharded state (saved through DCP): no in-memory snapshots; notices are handled at step()")
            return None
        # A collective (rank 0's prefix is broadcast): every rank builds its Run with the same arguments.
        board = NoticeBoard.open(self._ddp.ctx)
        return SnapshotKeeper(self.checkpointer, snapshot_every, recorder=self._recorder, board=board)

    # -- public -------------------------------------------------------------------

    @property
    def store(self) -> Store:
        return self.checkpointer.store

    @property
    def interval(self) -> AutoInterval | None:
        """The automatic interval policy (``every="auto"``), else None."""
        return self._cadence.interval

    @property
    def every_steps(self) -> int | None:
        return self._cadence.every_steps

    @property
    def every_seconds(self) -> float | None:
        return self._cadence.every_seconds

    @property
    def every_epochs(self) -> int | None:
        return self._cadence.every_epochs

    @property
    def events(self) -> EventLog | None:
        """This launch's events, kept in the store (:mod:`spotsafe.story.events`); rank 0 only records."""
        return self._recorder.events

    @property
    def should_stop(self) -> bool:
        """True once a final notice was handled (checkpoint durable); stop training."""
        return self._should_stop

    @property
    def state(self) -> dict[str, Any]:
        """The loop's own state beside the model (an lr, a best loss, an RNN's hidden tensors): a live
        dict (the one given as ``state=``), saved with every checkpoint and restored in place on resume."""
        return self.extra_state

    def epochs(self, n: int, start: int = 0) -> Iterator[int]:
        """``n`` epoch numbers, ``start`` to ``start + n - 1``, from the restored epoch on.

        ``start=1`` for a script that counts epochs from 1 (:attr:`epoch` itself counts from 0).
        An epoch counts as done when its body finishes; ``every_epochs`` saves then.
        """
        self._in_epochs = True
        try:
            while self.epoch < n and not self._should_stop:
                yield self.epoch + start
                if self.should_stop:  # the loop body may have set it
                    return
                self._end_epoch()
                self._check_notice()
        finally:
            self._in_epochs = False

    def batches(self, loader: Iterable[Any]) -> Iterator[Any]:
        """The current epoch's batches from ``loader``, from the restored batch on.

        Batches already trained on before an interruption are not loaded again (for
        map-style DataLoaders; see :mod:`spotsafe.data`). Use it for the one training
        loader; iterate evaluation loaders directly.
        """
        rl = self._loaders.get(id(loader))
        if rl is None or rl.loader is not loader:
            rl = self._loaders[id(loader)] = ResumableLoader(loader)
        self._active = rl
        if self._epoch_seed is None:
            # A fresh epoch: draw its seed now (after the checkpoint that resumes mid-epoch).
            self._epoch_seed = derive_epoch_seed(self.seed, self.epoch) if self.seed is not None else draw_epoch_seed()
            self._sampler_state = None
            self._loader_state = None
            self.batch = 0
        if self._resplit is not None:
            self._apply_resplit(rl)
        iterator = rl.epoch(
            epoch=self.epoch,
            epoch_seed=self._epoch_seed,
            start=self.batch,
            sampler_state=self._sampler_state,
            loader_state=self._loader_state,
            offset=self._offset,
        )
        self._sampler_state = rl.sampler_state
        try:
            for item in iterator:
                if self._should_stop:
                    return
                self.batch += 1
                yield item
        finally:
            close = getattr(iterator, "close", None)
            if callable(close):
                close()
        if not self._in_epochs and not self._should_stop:
            self._end_epoch()

    def enumerate(self, loader: Iterable[Any], start: int = 0) -> Iterator[tuple[int, Any]]:
        """``(i, batch)`` of :meth:`batches`, ``i`` the batch's index in the epoch: after a resume it
        continues where the interrupted launch was (``enumerate(run.batches(...))`` restarts at 0)."""
        for item in self.batches(loader):
            yield self.batch - 1 + start, item

    def step(self, **metrics: Any) -> None:
        """Count one optimizer step; save when due; handle a notice.

        On a final notice with ``exit_on_notice`` this does not return: it saves,
        waits until durable and exits with :data:`spotsafe.EXIT_PREEMPTED`. When
        another instance took the store over (:class:`~spotsafe.errors.WriterFenced`)
        it exits with :data:`spotsafe.EXIT_FENCED` (or, without ``exit_on_notice``,
        raises).
        """
        try:
            self._step(**metrics)
        except WriterFenced as e:
            self._on_fenced(e)

    def _on_fenced(self, error: WriterFenced) -> NoReturn:
        """Another instance owns the store: stop writing, never restart here."""
        log.error("%s; stopping at step %d (exit %d: not restarted)", error, self.step_count, EXIT_FENCED)
        self._recorder.fenced(step=self.step_count, error=str(error))  # nothing more to the store: no event,
        if self._live is not None:  # no live report; the supervisor is told (not restarted there)
            self._live.close(refresh=False)
        self._should_stop = True
        try:
            self.close()
        except Exception as e:  # noqa: BLE001 - a save in flight fails the same way; already reported
            log.info("closing the superseded run: %s", e)
        if not self.exit_on_notice:
            raise error
        if self._ddp is not None:  # every rank learnt it from the same collective save: leave gloo together
            self._ddp.leave(self.step_count, drain_may_fail=True)
        sys.stdout.flush()
        sys.stderr.flush()
        sys.exit(EXIT_FENCED)

    def _step(self, **metrics: Any) -> None:
        self.step_count += 1
        if metrics:
            self.metrics = metrics
        self._recorder.step(self.step_count, metrics, epoch=self.epoch, batch=self.batch)
        if self._ddp is not None:
            self._step_multi_rank(self._ddp)
            return
        entered = time.monotonic()
        if self._check_notice():
            return
        self._cadence.observe(entered, not self.checkpointer.save_in_flight, lambda: self.checkpointer.last_timings)
        if self._cadence.step_due(self.step_count) or self._cadence.clock_due():
            self._save_due = True
        # Never stall the loop behind a slow upload: while the previous save is still
        # in flight, the due one waits for a later step. A pruning pass after a sync save is
        # no reason to skip one (save() waits for it; it re-raises a failed save's error too).
        saving = self._save_due and not self.checkpointer.save_in_flight
        if saving:
            self._save("periodic", async_=None)
        if self.snapshots is not None:
            self.snapshots.after_step(
                self.step_count, self._state, epoch=self.epoch, metadata=self._save_metadata, saving=saving
            )
        self._cadence.step_entered = time.monotonic()

    def save(self, reason: Reason = "manual", *, async_: bool | None = None) -> None:
        """Checkpoint now (``reason`` as in the manifest)."""
        try:
            self._save(reason, async_=async_)
        except WriterFenced as e:
            self._on_fenced(e)

    def finish(self, metadata: Mapping[str, Any] | None = None) -> bool:
        """Write a final checkpoint and mark the run complete; then release everything.

        Returns False (and marks nothing) when the run was stopped by a notice.
        """
        try:
            return self._finish(metadata)
        except WriterFenced as e:
            self._on_fenced(e)

    def _finish(self, metadata: Mapping[str, Any] | None) -> bool:
        if self._should_stop:
            log.warning("run stopped by a notice at step %d: not marking it complete", self.step_count)
            self.close()
            return False
        self.checkpointer.wait()  # a periodic save of this very step may still be in flight
        if self._sigint.interrupted:  # Ctrl+C unwound the loop (SPOTSAFE_SIGINT=interrupt): save, stay resumable
            log.warning("interrupted (SIGINT) at step %d: saving it, not marking the run complete", self.step_count)
            if self._saved_step != self.step_count:
                self._save("manual", async_=False)
            self.close()
            return False
        if self._ddp is not None:
            self._ddp.agreement.drain(self.step_count)  # the run is over: a late notice changes nothing
        if self._saved_step != self.step_count:
            self._save("final", async_=False)
        self.checkpointer.wait()
        info = {"epoch": self.epoch, "metrics": plain_metrics(self.metrics), **dict(metadata or {})}
        if self._ddp is None or self._ddp.ctx.is_coordinator:
            self.checkpointer.mark_complete(self.step_count, info)
        if self._ddp is not None:
            self._ddp.ctx.barrier(what="marking the run complete")
        log.info("run complete at step %d (epoch %d) in %s", self.step_count, self.epoch, self.store.url)
        self._recorder.complete(step=self.step_count, epoch=self.epoch)
        self.close(refresh_report=True)
        return True

    def close(self, *, refresh_report: bool = False) -> None:
        """Wait for in-flight saves, stop the watcher (if the run built it), close the store.

        Records this launch's exit in the store's events (``refresh_report``: and
        writes the live report once more before closing).
        """
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._atexit)
        self._sigint.uninstall()
        try:
            try:
                try:
                    if self.snapshots is not None:
                        self.snapshots.close()
                finally:
                    self.checkpointer.wait()  # the last save's persist time goes into the events below
            finally:
                self._close_events(refresh_report)
                self.checkpointer.close()
        finally:
            if self._owns_watcher and self.watcher is not None:
                self.watcher.stop()

    @property
    def purge_step(self) -> int | None:
        """For ``SummaryWriter(log_dir, purge_step=run.purge_step)``: the restored step, None when fresh.

        Log a step's scalars with ``global_step=run.step_count`` *before* calling
        :meth:`step`; on resume TensorBoard then drops whatever the interrupted launch
        logged past its last checkpoint, and the redone steps are logged once.
        """
        return self.step_count if self.resumed_from is not None else None

    def log_image(self, tag: str, image: Any) -> str:
        """Keep ``image`` (PNG bytes, or an ``HW``/``CHW`` tensor in [0, 1]) in the store; the report shows it.

        Written in the background as ``media/<tag>-<step>.png`` (rank 0 only); returns that path.
        """
        return self._recorder.image(tag, image, step=self.step_count, epoch=self.epoch)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Run({self.store.url!r}, step={self.step_count}, epoch={self.epoch}, batch={self.batch})"

    # -- state --------------------------------------------------------------------

    def _run_state(self) -> dict[str, Any]:
        loader_state = self._active.state_dict() if self._active is not None else None
        return {
            "format": RUN_STATE_FORMAT,
            "step": self.step_count,
            "epoch": self.epoch,
            "batch": self.batch,
            "seed": self.seed,
            "epoch_seed": self._epoch_seed,
            "sampler_state": self._sampler_state,
            "loader_state": loader_state,
            "world_size": self._ddp.ctx.world_size if self._ddp is not None else 1,
            "offset": self._offset,
            # Seconds trained and interruptions over all launches so far: every="auto"'s rate estimate.
            "history": self._cadence.history().to_dict(),
        }

    def _state(self) -> dict[str, Any]:
        state: dict[str, Any] = dict(self._objects)
        check_state_keys(self.extra_state)
        state.update(self.extra_state)
        state["rng"] = self._rng
        state[RUN_STATE_KEY] = self._run_state()
        return state

    def _restore(self, map_location: Any) -> None:
        if not self.checkpointer.list():
            log.info("no checkpoint in %s: starting fresh", self.store.url)
            self._recorder.emit("start", step=0, store=self.store.url)
            return
        objects: dict[str, Any] = dict(self._objects)
        stateful = {k: v for k, v in self.extra_state.items() if callable(getattr(v, "load_state_dict", None))}
        objects.update(stateful)
        # RNGs last: nothing after it may draw from them before training continues.
        objects["rng"] = self._rng
        # None: the newest intact checkpoint, falling back past corrupt ones (on every rank together).
        rest = self.checkpointer.restore(None, objects, map_location=map_location)
        run_state = pop_run_state(rest, self.store.url)
        info = getattr(self.checkpointer, "last_loaded", None)
        for key, value in rest.items():
            if key not in stateful:
                self.extra_state[key] = value
        self.step_count = int(run_state["step"])
        self.epoch = int(run_state["epoch"])
        self.batch = int(run_state["batch"])
        self._offset = int(run_state.get("offset") or 0)
        old_world = int(run_state.get("world_size") or 1)
        new_world = self._ddp.ctx.world_size if self._ddp is not None else 1
        if old_world != new_world:
            # DistributedSampler deals one permutation round-robin: the global count of
            # samples read is what carries over to another number of ranks. batches()
            # re-splits the epoch at that count when the loader allows; otherwise the
            # batch position is rescaled (exact when the new world size divides it).
            self._resplit = (old_world, self.batch)
            self.batch = rescale_batch(self.batch, old_world, new_world)
            log.info("world size %d -> %d: the interrupted epoch is re-split", old_world, new_world)
        if self.seed is None and run_state.get("seed") is not None:
            self.seed = int(run_state["seed"])
        self._epoch_seed = None if run_state.get("epoch_seed") is None else int(run_state["epoch_seed"])
        self._sampler_state = run_state.get("sampler_state")
        self._loader_state = run_state.get("loader_state")
        self._saved_step = self.step_count
        self.resumed_from = info
        self._cadence.resumed(History.from_dict(run_state.get("history")))
        where = info.url if info is not None else self.store.url
        if self._ddp is None or self._ddp.ctx.is_coordinator:
            announce_resume(
                f"resuming from step {self.step_count} (epoch {self.epoch}, batch {self.batch}) at {where}",
                log,
                self._settings,
            )
        self._recorder.emit("resumed", step=self.step_count, epoch=self.epoch, batch=self.batch, url=where)

    def _apply_resplit(self, rl: ResumableLoader) -> None:
        """Continue the restored epoch on this world size at the exact global sample count."""
        assert self._resplit is not None
        old_world, old_batch = self._resplit
        self._resplit = None
        size = rl.batch_size
        if size is None:  # not a DistributedSampler loader: keep the rescaled batch position
            if self._offset:
                raise RunStateError(
                    f"{self.store.url}: the checkpoint continues a re-split epoch, which needs a "
                    "DataLoader over a DistributedSampler with batch_size set"
                )
            return
        self._offset += old_batch * old_world * size
        self.batch = 0
        log.info("epoch %d continues after %d samples of its global order", self.epoch, self._offset)

    def _end_epoch(self) -> None:
        try:
            self._next_epoch()
        except WriterFenced as e:
            self._on_fenced(e)

    def _next_epoch(self) -> None:
        self.epoch += 1
        self.batch = self._offset = 0  # a new epoch: nothing of the old one's position carries over
        self._resplit = self._epoch_seed = self._sampler_state = self._loader_state = None
        if self._cadence.epoch_due(self.epoch):
            self.checkpointer.wait()
            self._save("periodic", async_=None)

    def _save_metadata(self) -> dict[str, Any]:
        return {"batch": self.batch, "metrics": plain_metrics(self.metrics)}

    def _save(self, reason: Reason, *, async_: bool | None) -> None:
        metadata = self._save_metadata()
        if self.events is not None:
            self.events.before_save()
        t0 = time.perf_counter()
        self.checkpointer.save(
            self.step_count, self._state(), epoch=self.epoch, reason=reason, async_=async_, metadata=metadata
        )
        if self.events is not None:
            self.events.checkpoint(self.step_count, epoch=self.epoch, reason=reason, stall_s=time.perf_counter() - t0)
        self._saved_step = self.step_count
        self._save_due = False
        self._cadence.saved()
        if self.snapshots is not None:
            self.snapshots.saved(self.step_count)

    # -- notices ------------------------------------------------------------------

    def _check_notice(self) -> bool:
        """Handle a pending notice; True when the run must stop."""
        if self._should_stop:
            return True
        watcher = self.watcher
        if watcher is None or self._ddp is not None:  # ranks agree on notices in step() only
            return False
        notice = watcher.notice
        if notice is None or id(notice) in self._handled:
            return False
        self._handled.add(id(notice))
        if not notice.is_final:
            log.warning("rebalance recommendation from %s: checkpointing at step %d", notice.source, self.step_count)
            self._recorder.rebalance(step=self.step_count, source=notice.source)
            if not self.checkpointer.save_in_flight and self._saved_step != self.step_count:
                self._save("rebalance", async_=None)
            return False
        self._on_final_notice(notice)
        return True

    def _on_final_notice(self, notice: Notice) -> None:
        try:
            self._final_save(
                notice.deadline, source=notice.source, action=notice.action, detected_at=notice.detected_at.timestamp()
            )
        except WriterFenced as e:
            self._on_fenced(e)

    def _final_save(
        self, deadline: datetime | None, *, source: str, action: str, detected_at: float, own: bool = True
    ) -> None:
        t0 = time.monotonic()
        if self.snapshots is not None:
            self.snapshots.stand_down()  # the live state is saved here: the guard persists nothing more
        if deadline is None:  # a rank agreed without a deadline: assume the shortest platform notice
            deadline = utcnow() + timedelta(seconds=30)
        left = seconds_left(deadline)
        log.warning(
            "%s notice (%s) at step %d (epoch %d, batch %d): %.0f s to the deadline; checkpointing",
            source,
            action,
            self.step_count,
            self.epoch,
            self.batch,
            left,
        )
        self._recorder.notice(
            step=self.step_count,
            epoch=self.epoch,
            batch=self.batch,
            source=source,
            action=action,
            detected_at=detected_at,
            deadline=deadline.timestamp(),
        )
        save_before_deadline(
            self.store,
            deadline,
            lambda: self._save_live(left),
            started=t0,
            announce=lambda d: announce_durable(
                d, self._recorder, log, step=self.step_count, epoch=self.epoch, batch=self.batch
            ),
        )
        if self.events is not None:
            self.events.flush()  # the story so far is in the store before the instance goes
        if self.watcher is not None:
            self.watcher.acknowledge()
        self._should_stop = True
        self._recorder.stop_account(own=own, source=source, action=action, step=self.step_count)
        if self.exit_on_notice:
            self._recorder.preempted(step=self.step_count, epoch=self.epoch)
            self.close()
            if self._ddp is not None:
                self._ddp.leave(self.step_count)  # every rank leaves gloo together, then exits 75
            self._recorder.exited(code=EXIT_PREEMPTED, step=self.step_count)
            sys.stdout.flush()
            sys.stderr.flush()
            sys.exit(EXIT_PREEMPTED)

    def _save_live(self, left: float) -> None:
        """The notice save of the live state: after any save in flight, this step's (synchronously)."""
        if self._ddp is not None:  # a rank lost now must not hold the others past the deadline
            self.checkpointer.barrier_timeout = max(10.0, min(left, self._ddp.ctx.timeout))
        try:  # an in-flight periodic save first; if it failed, the notice save must still run
            self.checkpointer.wait()
        except WriterFenced:
            raise  # another instance owns the store: no notice save here
        except Exception as e:  # noqa: BLE001 - logged; the notice save below matters more
            log.error("an earlier background save failed (%s); saving step %d on the notice anyway", e, self.step_count)
            self._saved_step = None
        if self._saved_step != self.step_count:
            self._save("notice", async_=False)
        self.checkpointer.wait()

    def _step_multi_rank(self, ddp: MultiRank) -> None:
        """step() on one of several ranks: every decision is taken by all ranks at the same step."""
        if self._should_stop:
            return
        entered = time.monotonic()
        self._cadence.observe(entered, not self.checkpointer.save_in_flight, lambda: self.checkpointer.last_timings)
        self._cadence.step_entered = entered
        clock_due = self._cadence.clock_due()
        notice = self.watcher.notice if self.watcher is not None else None
        keeper = self.snapshots
        agreed = ddp.agree(notice, self.step_count, due=clock_due, keeper=keeper)
        if agreed is not None and agreed.is_final:
            final = ddp.final(agreed, notice)
            own = notice is not None and notice.is_final  # else a peer's: the supervisor may relaunch here
            self._final_save(
                final.deadline, source=final.source, action=final.action, detected_at=final.detected_at, own=own
            )
            return
        due = ddp.agreement.take_due() or self._cadence.step_due(self.step_count)
        if agreed is not None:  # a rebalance recommendation somewhere: save, go on
            log.warning(
                "rebalance recommendation from rank %d: checkpointing at step %d", agreed.source_rank, self.step_count
            )
            self._recorder.rebalance(step=self.step_count, source=f"rank {agreed.source_rank}")
            due = True
        saving = due and self._saved_step != self.step_count
        if saving:
            self._save("rebalance" if agreed is not None else "periodic", async_=None)
        if keeper is not None:
            keeper.after_step(
                self.step_count, self._rank_state, epoch=self.epoch, metadata=self._save_metadata, saving=saving
            )

    def _rank_state(self) -> dict[str, Any]:
        """What this rank writes of the state (rank 0: all of it; the others: their RNGs and data position)."""
        return rank_state(self._state(), self._ddp.ctx if self._ddp is not None else None, RANK_KEYS)

    # -- events ---------------------------------------------------------------------

    def _close_events(self, refresh_report: bool) -> None:
        self._recorder.close(step=self.step_count, epoch=self.epoch)
        if self._live is not None:
            self._live.close(refresh=refresh_report)

    def _atexit(self) -> None:
        # A script that ends (or crashes) without finish(): let an async save land.
        try:
            self.close()
        except Exception as e:  # noqa: BLE001 - at exit there is no one left to raise to
            log.error("closing the run at exit failed: %s", e)
