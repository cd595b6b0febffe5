"""``spotsafe.Run``: a training loop that checkpoints, survives a notice and resumes exactly.

A few lines change in a loop::

    run = spotsafe.Run("s3://bucket/runs/mnist", model=model, optimizer=opt, every_seconds=600)
    for epoch in run.epochs(10):                 # starts at the restored epoch
        for x, y in run.batches(train_loader):   # starts at the restored batch of that epoch
            ...
            run.step(loss=loss.item())            # may checkpoint; on a notice: save, exit 75
    run.finish()                                  # final checkpoint; marks the run complete

What a checkpoint holds: every stateful object given (``model``, ``optimizer``,
``scheduler``, ``scaler``, ``extra_state``), every RNG (:class:`spotsafe.state.RNGState`)
and, under the key ``"spotsafe"``, the run's counters and data position (epoch, batch
in the epoch, the epoch's shuffle seed, the sampler generator's state or a
StatefulDataLoader's state). Restoring all of it makes the resumed run's remaining
steps bit-identical to the uninterrupted run's (CPU, deterministic ops).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timezone
from datetime import timedelta as _timedelta
from typing import TYPE_CHECKING, Any, Literal, NoReturn

import torch

from spotsafe.data import ResumableLoader, derive_epoch_seed, draw_epoch_seed
from spotsafe.errors import SpotsafeError, WriterFenced
from spotsafe.exitcodes import EXIT_FENCED, EXIT_PREEMPTED
from spotsafe.interval import AutoInterval, History
from spotsafe.settings import Settings

if TYPE_CHECKING:
    from typing_extensions import Self

    from spotsafe.checkpoint.manifest import CheckpointInfo, Reason
    from spotsafe.checkpoint.snapshots import SnapshotKeeper
    from spotsafe.checkpoint.writer import Checkpointer
    from spotsafe.cloud.notice import Notice
    from spotsafe.cloud.watcher import InterruptionWatcher
    from spotsafe.storage.base import Store
    from spotsafe.story.events import EventLog
    from spotsafe.story.live import LivePage

log = logging.getLogger(__name__)

#: Version of the dict the run stores under ``"spotsafe"`` in each checkpoint.
RUN_STATE_FORMAT = 1
#: Key of the run's own counters in the checkpoint.
RUN_STATE_KEY = "spotsafe"
#: Periodic checkpoint interval of ``every_seconds`` before spotsafe chose it itself (``every="auto"``,
#: now the default); kept for callers that want the old fixed cadence.
DEFAULT_EVERY_SECONDS = 600.0

_RESERVED = ("model", "optimizer", "scheduler", "scaler", "rng", RUN_STATE_KEY)


class RunStateError(SpotsafeError, ValueError):
    """The run's own state in a checkpoint is missing or from an unknown format."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


def emit_event(event: str, **fields: Any) -> None:
    """Append one event to the file named by ``SPOTSAFE_EVENTS`` (if set)."""
    path = Settings.from_env().events
    if not path:
        return
    record = {"event": event, "time": time.time(), "pid": os.getpid(), **fields}
    line = json.dumps(record, default=str) + "\n"
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)  # closing hands it to the kernel: it survives the process, no fsync on the notice path
    except OSError as e:  # a rehearsal aid: never let it break training
        log.warning("could not write event to %s: %s", path, e)


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
    (:mod:`spotsafe.story.report`, needs ``spotsafe[report]``).
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
    ) -> None:
        from spotsafe.checkpoint.writer import Checkpointer
        from spotsafe.state import RNGState

        for name, value in (("every_steps", every_steps), ("every_epochs", every_epochs)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if every_seconds is not None and every_seconds <= 0:
            raise ValueError(f"every_seconds must be > 0, got {every_seconds}")
        if every not in (None, "auto"):
            raise ValueError(f"every must be 'auto' or None, not {every!r} (for a fixed interval use every_seconds)")
        if every == "auto" and every_seconds is not None:
            raise ValueError("every='auto' chooses the interval in seconds itself: do not also give every_seconds")
        if every is None and every_steps is None and every_seconds is None and every_epochs is None:
            every = "auto"
        #: The automatic interval policy (``every="auto"``), else None.
        self.interval: AutoInterval | None = AutoInterval(interruption_rate) if every == "auto" else None
        if every != "auto" and interruption_rate is not None:
            raise ValueError("interruption_rate only steers every='auto'")
        if report_every is not None and report_every <= 0:
            raise ValueError(f"report_every must be > 0 seconds or None, got {report_every}")
        extra = dict(extra_state or {})
        clash = sorted(set(extra) & set(_RESERVED))
        if clash:
            raise ValueError(f"extra_state keys {clash} are reserved by spotsafe.Run")

        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.every_epochs = every_epochs
        self.exit_on_notice = exit_on_notice
        #: Plain (non-stateful) values of ``extra_state``; restored values replace them.
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
        #: A rehearsal asks to be told after this many steps of this process (spotsafe.rehearsal.rehearse).
        self._rehearsal_steps = Settings.from_env().rehearsal_after_steps
        self._rehearsal_at: int | None = None
        self._lock = threading.Lock()
        #: What the store's checkpoints say about this run's past launches (restored on resume).
        self._history = History()
        self._launched = time.monotonic()
        self._step_entered: float | None = None
        self._save_observed = True

        self._objects: dict[str, Any] = {}
        for name, obj in (("model", model), ("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
            if isinstance(obj, (Mapping, list, tuple)):  # several models / optimizers: {"G": g, "D": d}
                from spotsafe.state import StateGroup

                obj = StateGroup(name, obj)
            if obj is not None:
                self._objects[name] = obj
        self._rng = RNGState()
        from spotsafe.distributed.sharded import ShardedState, is_sharded

        if model is not None and is_sharded(model):
            # FSDP2 / DTensor parameters: model and optimizer go through torch.distributed.checkpoint.
            self._objects["model"] = ShardedState(model, self._objects.pop("optimizer", None))

        #: The multi-rank path (torch.distributed initialized with world size > 1), else None.
        self._ddp: _MultiRank | None = _MultiRank.detect(
            agree_every, sharded="model" in self._objects and _is_sharded_state(self._objects["model"])
        )
        from spotsafe.distributed.commit import RANK_KEYS

        # One commit path for one or many ranks: the Checkpointer gets the process-group context.
        self.checkpointer: Checkpointer = Checkpointer(
            store,
            storage_options=storage_options,
            keep_last=keep_last,
            async_=async_,
            dist=self._ddp.ctx if self._ddp is not None else None,
            per_rank=RANK_KEYS,
        )
        #: This launch's events, kept in the store (spotsafe.story.events); rank 0 only records.
        self.events: EventLog | None = None
        self._live: LivePage | None = None
        try:
            # Before restoring: the run resumes from everything the previous writer committed, and a
            # writer still alive on another instance keeps the store until it lets go (rank 0 holds it).
            self.checkpointer.acquire()
            self.events = self._start_events()
            t_restore = time.monotonic()
            self._restore(map_location)
            self._record_restore(time.monotonic() - t_restore)
        except BaseException:
            if self.events is not None:
                self.events.record("exit", status="failed to start", step=self.step_count)
                self.events.close()
            self.checkpointer.close()
            raise
        if report_every is not None and self.events is not None and self.events.enabled:
            from spotsafe.story.live import LivePage

            self._live = LivePage.start(self.store, every=report_every)
        self._last_save = time.monotonic()
        #: The in-memory snapshots (``snapshot_every`` not None; not for sharded state), else None.
        self.snapshots: SnapshotKeeper | None = None
        if snapshot_every is not None:
            from spotsafe.checkpoint.snapshots import SnapshotKeeper

            if self._ddp is None:
                self.snapshots = SnapshotKeeper(self.checkpointer, snapshot_every, emit=emit_event)
            elif _is_sharded_state(self._objects.get("model")):
                log.info("sharded state (saved through DCP): no in-memory snapshots; notices are handled at step()")
            else:
                from spotsafe.distributed.board import NoticeBoard

                # A collective (rank 0's prefix is broadcast): every rank builds its Run with the same arguments.
                board = NoticeBoard.open(self._ddp.ctx)
                self.snapshots = SnapshotKeeper(self.checkpointer, snapshot_every, emit=emit_event, board=board)

        self.watcher: InterruptionWatcher | None
        self._owns_watcher = False
        if watch is True:
            from spotsafe.cloud.watcher import InterruptionWatcher

            self.watcher = InterruptionWatcher().start()
            self._owns_watcher = True
        elif watch is False or watch is None:
            self.watcher = None
        else:
            self.watcher = watch
        if self.snapshots is not None:
            self.snapshots.start(self.watcher)  # several ranks: it also watches for a peer's notice
        atexit.register(self._atexit)

    # -- public -------------------------------------------------------------------

    @property
    def store(self) -> Store:
        return self.checkpointer.store

    @property
    def should_stop(self) -> bool:
        """True once a final notice was handled (checkpoint durable); stop training."""
        return self._should_stop

    def epochs(self, n: int) -> Iterator[int]:
        """Epoch numbers from the restored epoch up to ``n - 1``.

        An epoch counts as done when its body finishes; ``every_epochs`` saves then.
        """
        self._in_epochs = True
        try:
            while self.epoch < n and not self._should_stop:
                yield self.epoch
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
        emit_event("fenced", step=self.step_count, error=str(error))
        self._should_stop = True
        try:
            self.close()
        except Exception as e:  # noqa: BLE001 - a save in flight fails the same way; already reported
            log.info("closing the superseded run: %s", e)
        if not self.exit_on_notice:
            raise error
        if self._ddp is not None:  # every rank learnt it from the same collective save: leave gloo together
            try:
                self._ddp.agreement.drain(self.step_count)
            except Exception as e:  # noqa: BLE001 - leaving anyway
                log.info("draining the notice agreement: %s", e)
            self._ddp.ctx.leave()
        sys.stdout.flush()
        sys.stderr.flush()
        sys.exit(EXIT_FENCED)

    def _step(self, **metrics: Any) -> None:
        if self._rehearsal_steps is not None and self._rehearsal_at is None:
            self._rehearsal_at = self.step_count + self._rehearsal_steps  # counted from where it resumed
        self.step_count += 1
        if metrics:
            self.metrics = metrics
        if self.events is not None:
            self.events.step(self.step_count, metrics, self.epoch)
        if self.step_count == self._rehearsal_at:
            emit_event("reached", step=self.step_count, epoch=self.epoch, batch=self.batch)
        if self._ddp is not None:
            self._step_multi_rank(self._ddp)
            return
        entered = time.monotonic()
        if self._check_notice():
            return
        idle = not self.checkpointer.save_in_flight
        self._observe(entered, idle)
        every_s = self._every_seconds()
        if (self.every_steps is not None and self.step_count % self.every_steps == 0) or (
            every_s is not None and time.monotonic() - self._last_save >= every_s
        ):
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
        self._step_entered = time.monotonic()

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
        if self._ddp is not None:
            self._ddp.agreement.drain(self.step_count)  # the run is over: a late notice changes nothing
        if self._saved_step != self.step_count:
            self._save("final", async_=False)
        self.checkpointer.wait()
        info = {"epoch": self.epoch, "metrics": _plain_metrics(self.metrics), **dict(metadata or {})}
        if self._ddp is None or self._ddp.ctx.is_coordinator:
            self.checkpointer.mark_complete(self.step_count, info)
        if self._ddp is not None:
            self._ddp.ctx.barrier(what="marking the run complete")
        log.info("run complete at step %d (epoch %d) in %s", self.step_count, self.epoch, self.store.url)
        emit_event("complete", step=self.step_count, epoch=self.epoch)
        self._record("exit", urgent=True, status="complete", code=0, step=self.step_count, epoch=self.epoch)
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
        from spotsafe.story.events import MEDIA_DIR, png_bytes

        if not tag or not all(c.isalnum() or c in "-_." for c in tag):
            raise ValueError(f"image tag must be letters, digits, '-', '_' or '.', not {tag!r}")
        path = f"{MEDIA_DIR}/{tag}-{self.step_count:012d}.png"
        if self.events is not None and self.events.enabled:
            data = png_bytes(image)
            self.events.put_file(path, data)
            self._record("image", tag=tag, path=path, step=self.step_count, epoch=self.epoch, bytes=len(data))
        return path

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
            "history": History(
                self._history.seconds + time.monotonic() - self._launched, self._history.interruptions
            ).to_dict(),
        }

    def _state(self) -> dict[str, Any]:
        state: dict[str, Any] = dict(self._objects)
        state.update(self.extra_state)
        state["rng"] = self._rng
        state[RUN_STATE_KEY] = self._run_state()
        return state

    def _restore(self, map_location: Any) -> None:
        if not self.checkpointer.list():
            log.info("no checkpoint in %s: starting fresh", self.store.url)
            emit_event("start", step=0, store=self.store.url)
            return
        objects: dict[str, Any] = dict(self._objects)
        stateful = {k: v for k, v in self.extra_state.items() if callable(getattr(v, "load_state_dict", None))}
        objects.update(stateful)
        # RNGs last: nothing after it may draw from them before training continues.
        objects["rng"] = self._rng
        # None: the newest intact checkpoint, falling back past corrupt ones (on every rank together).
        rest = self.checkpointer.restore(None, objects, map_location=map_location)
        run_state = rest.pop(RUN_STATE_KEY, None)
        if not isinstance(run_state, Mapping):
            raise RunStateError(
                f"{self.store.url}: the newest checkpoint has no {RUN_STATE_KEY!r} run state "
                "(written by Checkpointer.save directly, not by spotsafe.Run?)"
            )
        if run_state.get("format") != RUN_STATE_FORMAT:
            raise RunStateError(
                f"{self.store.url}: run state format {run_state.get('format')!r} "
                f"is not {RUN_STATE_FORMAT} (written by a newer spotsafe?)"
            )
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
            from spotsafe.distributed.commit import rescale_batch

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
        # This launch resumes an unfinished run: the previous one was interrupted (a notice, a kill, a crash).
        past = History.from_dict(run_state.get("history"))
        self._history = History(past.seconds, past.interruptions + 1)
        if self.interval is not None:
            self.interval.observe_history(self._history)
        where = info.url if info is not None else self.store.url
        log.info("resuming from step %d (epoch %d, batch %d) at %s", self.step_count, self.epoch, self.batch, where)
        emit_event("resumed", step=self.step_count, epoch=self.epoch, batch=self.batch, url=where)

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
        self.batch = 0
        self._offset = 0
        self._resplit = None
        self._epoch_seed = None
        self._sampler_state = None
        self._loader_state = None
        if self.every_epochs is not None and self.epoch % self.every_epochs == 0:
            self.checkpointer.wait()
            self._save("periodic", async_=None)

    def _save_metadata(self) -> dict[str, Any]:
        return {"batch": self.batch, "metrics": _plain_metrics(self.metrics)}

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
        self._last_save = time.monotonic()
        self._save_observed = False
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
            emit_event("rebalance", step=self.step_count, source=notice.source)
            self._record("rebalance", urgent=True, step=self.step_count, source=notice.source)
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

    def _final_save(self, deadline: datetime | None, *, source: str, action: str, detected_at: float) -> None:
        t0 = time.monotonic()
        if self.snapshots is not None:
            self.snapshots.stand_down()  # the live state is saved here: the guard persists nothing more
        if deadline is None:  # a rank agreed without a deadline: assume the shortest platform notice
            deadline = _now() + _timedelta(seconds=30)
        left = (deadline - _now()).total_seconds()
        log.warning(
            "%s notice (%s) at step %d (epoch %d, batch %d): %.0f s to the deadline; checkpointing",
            source,
            action,
            self.step_count,
            self.epoch,
            self.batch,
            left,
        )
        emit_event(
            "notice",
            step=self.step_count,
            epoch=self.epoch,
            batch=self.batch,
            source=source,
            action=action,
            detected_at=detected_at,
            deadline=deadline.timestamp(),
        )
        self._record(
            "notice",
            urgent=True,
            step=self.step_count,
            epoch=self.epoch,
            source=source,
            action=action,
            detected_at=detected_at,
            deadline=deadline.timestamp(),
        )
        self.store.set_deadline(deadline)
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
        left = (deadline - _now()).total_seconds()
        flushed = self.store.flush(timeout=max(left, 0.0))
        took = time.monotonic() - t0
        left = (deadline - _now()).total_seconds()
        if flushed:
            log.warning(
                "checkpoint of step %d durable in %.2f s; %.0f s left before the deadline", self.step_count, took, left
            )
        else:
            log.error(
                "checkpoint of step %d committed locally in %.2f s but the remote copy did not finish before "
                "the deadline",
                self.step_count,
                took,
            )
        emit_event(
            "durable",
            step=self.step_count,
            epoch=self.epoch,
            batch=self.batch,
            seconds=took,
            flushed=flushed,
            left=left,
        )
        self._record("durable", step=self.step_count, seconds=took, flushed=flushed, left=left)
        if self.events is not None:
            self.events.flush()  # the story so far is in the store before the instance goes
        if self.watcher is not None:
            self.watcher.acknowledge()
        self._should_stop = True
        if self.exit_on_notice:
            self._record("exit", status="preempted", code=EXIT_PREEMPTED, step=self.step_count, epoch=self.epoch)
            self.close()
            if self._ddp is not None:
                self._ddp.agreement.drain(self.step_count)
                self._ddp.ctx.leave()  # every rank leaves gloo together, then exits 75
            emit_event("exit", code=EXIT_PREEMPTED, step=self.step_count)
            sys.stdout.flush()
            sys.stderr.flush()
            sys.exit(EXIT_PREEMPTED)

    def _every_seconds(self) -> float | None:
        """The periodic interval in seconds now: fixed, automatic, or None (steps/epochs only)."""
        if self.interval is not None:
            return self.interval.seconds
        return self.every_seconds

    def _observe(self, entered: float, idle: bool) -> None:
        """Feed the automatic interval: this step's duration, and the last save's cost once it landed."""
        interval = self.interval
        if interval is None:
            return
        if self._step_entered is not None:
            interval.observe_step(entered - self._step_entered, saving=not idle)
        if idle and not self._save_observed:
            self._save_observed = True
            # the hours trained so far, so a run that is rarely interrupted sees its rate fall
            interval.observe_history(
                History(self._history.seconds + time.monotonic() - self._launched, self._history.interruptions)
            )
            t = self.checkpointer.last_timings
            if t:
                interval.observe_save(t.get("snapshot_s", 0.0), t.get("write_s", 0.0) + t.get("commit_s", 0.0))

    def _step_multi_rank(self, ddp: _MultiRank) -> None:
        """step() on one of several ranks: every decision is taken by all ranks at the same step."""
        if self._should_stop:
            return
        entered = time.monotonic()
        self._observe(entered, not self.checkpointer.save_in_flight)
        self._step_entered = entered
        every_s = self._every_seconds()
        clock_due = every_s is not None and time.monotonic() - self._last_save >= every_s
        notice = self.watcher.notice if self.watcher is not None else None
        keeper = self.snapshots
        wish = keeper.proposal() if keeper is not None else 0
        agreed = ddp.agreement.step(notice, self.step_count, due=clock_due, snapshot_every=wish)
        if keeper is not None:
            keeper.agree(ddp.agreement.snapshot_every)  # the same value after the same call on every rank
            keeper.lag_steps = ddp.agreement.bound_steps()
        if agreed is not None and agreed.is_final:
            local = notice if notice is not None and notice.is_final else None
            self._final_save(
                agreed.deadline,
                source=local.source if local is not None else f"rank {agreed.source_rank}",
                action=local.action if local is not None else "terminate",
                detected_at=local.detected_at.timestamp() if local is not None else time.time(),
            )
            return
        due = ddp.agreement.take_due() or (self.every_steps is not None and self.step_count % self.every_steps == 0)
        if agreed is not None:  # a rebalance recommendation somewhere: save, go on
            log.warning(
                "rebalance recommendation from rank %d: checkpointing at step %d", agreed.source_rank, self.step_count
            )
            emit_event("rebalance", step=self.step_count, source=f"rank {agreed.source_rank}")
            self._record("rebalance", urgent=True, step=self.step_count, source=f"rank {agreed.source_rank}")
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
        from spotsafe.distributed.commit import RANK_KEYS, rank_state

        return rank_state(self._state(), self._ddp.ctx if self._ddp is not None else None, RANK_KEYS)

    # -- events ---------------------------------------------------------------------

    def _start_events(self) -> EventLog:
        from spotsafe.story.events import EventLog, process_start_time
        from spotsafe.version import __version__

        coordinator = self._ddp is None or self._ddp.ctx.is_coordinator
        events = EventLog(self.store, enabled=coordinator)
        if coordinator:
            events.record(
                "launch",
                urgent=True,
                pid=os.getpid(),
                process_started=process_start_time(),
                store=self.store.url,
                world_size=self._ddp.ctx.world_size if self._ddp is not None else 1,
                spotsafe=__version__,
                torch=torch.__version__,
                python=sys.version.split()[0],
            )
            events.record_identity()
            ckpt = self.checkpointer

            def last_save() -> tuple[int, Mapping[str, float], int] | None:
                info = ckpt.last_saved
                return None if info is None else (info.step, ckpt.last_timings, info.size)

            events.watch_saves(last_save)
        return events

    def _record(self, kind: str, *, urgent: bool = False, **fields: Any) -> None:
        if self.events is not None:
            self.events.record(kind, urgent=urgent, **fields)

    def _record_restore(self, seconds: float) -> None:
        info = self.resumed_from
        self._record(
            "restore",
            urgent=True,
            step=self.step_count,
            epoch=self.epoch,
            batch=self.batch,
            checkpoint=None if info is None else info.name,
            seconds=round(seconds, 6),
        )

    def _close_events(self, refresh_report: bool) -> None:
        events = self.events
        if events is None:
            return
        if events.exit_status is None:  # closed without finish() or a notice: a script that ended or crashed
            exc = sys.exc_info()[1]
            status = "error" if exc is not None and not isinstance(exc, SystemExit) else "closed"
            events.record("exit", status=status, step=self.step_count, epoch=self.epoch)
        events.close()
        if self._live is not None:
            self._live.close(refresh=refresh_report)

    def _atexit(self) -> None:
        # A script that ends (or crashes) without finish(): let an async save land.
        try:
            self.close()
        except Exception as e:  # noqa: BLE001 - at exit there is no one left to raise to
            log.error("closing the run at exit failed: %s", e)


def _is_sharded_state(obj: Any) -> bool:
    from spotsafe.distributed.sharded import ShardedState

    return isinstance(obj, ShardedState)


def _plain_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (bool, int, float, str)) or value is None:
            out[key] = value
    return out


class _MultiRank:
    """Run's loop-side state when torch.distributed runs several ranks: the context and the agreement.

    Saves and restores are the Checkpointer's own (it holds the context): rank 0 writes
    everything, every other rank only its own RNG streams and data position
    (``spotsafe.distributed.commit.RANK_KEYS``); after every rank's files are durable (a
    monitored barrier), rank 0 commits the manifest. A notice seen by any rank is
    agreed by all at the same step (:class:`spotsafe.distributed.agreement.NoticeAgreement`).
    Resuming on another world size takes rank ``r mod old`` RNG streams and rescales
    the batch position.
    """

    def __init__(self, ctx: Any, agree_every: int | str = "auto") -> None:
        from spotsafe.distributed.agreement import NoticeAgreement

        self.ctx = ctx
        self.agreement = NoticeAgreement(ctx, every=agree_every)  # type: ignore[arg-type]

    @classmethod
    def detect(cls, agree_every: int | str = "auto", *, sharded: bool = False) -> _MultiRank | None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return None
        if dist.get_world_size() < 2 and not sharded:  # sharded state needs DCP even on one rank
            return None
        from spotsafe.distributed.context import DistContext

        ctx = DistContext.detect()
        return None if ctx is None else cls(ctx, agree_every)
