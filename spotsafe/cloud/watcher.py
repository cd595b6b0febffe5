"""Noticing, as early as the cloud tells, that this instance is about to go away.

:class:`InterruptionWatcher` watches every source that applies here and keeps the
first :class:`Notice` it sees (a later terminate upgrades an earlier rebalance):

* ``aws``: EC2 instance metadata (IMDSv2 with IMDSv1 fallback):
  ``spot/instance-action``, the legacy ``spot/termination-time``, and the
  ``events/recommendations/rebalance`` early warning;
* ``gcp``: the GCE metadata server's ``instance/preempted`` (hanging GETs with
  ETags) and ``instance/maintenance-event``;
* ``azure``: Azure Scheduled Events (``Preempt`` / ``Terminate`` for this VM),
  acknowledged through :meth:`InterruptionWatcher.acknowledge`;
* ``signal``: SIGTERM (and whatever else is passed in ``signals``), which
  SageMaker, Kubernetes, SLURM and systemd send before they kill a process.

With ``sources="auto"`` each metadata source is probed once, in parallel, with a
short timeout, and only those that answer like the real service are polled. Off
the cloud that settles in well under a second and then costs nothing: no thread
polls anything; one thread sleeps until a signal or :meth:`stop` wakes it.

The sources live with their clouds (:mod:`spotsafe.cloud.aws.notices`,
:mod:`spotsafe.cloud.gcp.notices`, :mod:`spotsafe.cloud.azure.notices`); every
metadata request is one :func:`spotsafe.cloud.http.http_request`, straight to the
endpoint (proxies from the environment are ignored, as botocore does for IMDS).
"""

from __future__ import annotations

import logging
import os
import queue
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from types import FrameType
from typing import TYPE_CHECKING, Any

from spotsafe.cloud.aws.notices import AWSSource
from spotsafe.cloud.azure.notices import AzureSource
from spotsafe.cloud.gcp.notices import GCPSource
from spotsafe.cloud.notice import Action, Notice, Source
from spotsafe.cloud.times import utcnow
from spotsafe.settings import Settings

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["SIGNAL_GRACE_SECONDS", "InterruptionWatcher", "probe_bound"]

log = logging.getLogger(__name__)

#: systemd's and Kubernetes' default grace between SIGTERM and SIGKILL.
SIGNAL_GRACE_SECONDS = 30.0  # the default of SPOTSAFE_SIGNAL_GRACE (spotsafe.settings)

_PROVIDERS = ("aws", "gcp", "azure")


def probe_bound(timeout: float) -> float:
    """The longest :meth:`InterruptionWatcher.start` waits for its probes (``probe_timeout=timeout``).

    A probe makes at most two requests in turn, each bounded by ``timeout``; the margin is for
    starting threads and a DNS lookup that no timeout bounds. 1.35 s at the default 0.5 s.
    """
    return 2 * timeout + 0.35


SourceSpec = str | Iterable[str | Source]
Callback = Callable[[Notice], Any]


# --------------------------------------------------------------------------- the watcher


class InterruptionWatcher:
    """Watches every interruption source that applies here; keeps the first notice.

    ``sources``: ``"auto"`` (the default; ``SPOTSAFE_SOURCES`` overrides it) probes
    AWS, GCP and Azure; or a comma-separated string / an iterable of names
    (``"aws"``, ``"gcp"``, ``"azure"``, ``"none"``) and :class:`Source` objects,
    enabled without probing. POSIX signals are always watched, whatever
    ``sources`` says (``"signal"`` is accepted as a name); ``signals=()`` turns
    them off.

    ``callback(notice)`` runs on a watcher thread when a notice is accepted (a
    rebalance, then possibly its terminate upgrade). ``signals`` are installed only
    when :meth:`start` runs in the main thread; a caught signal becomes a terminate
    notice with a deadline ``signal_grace`` seconds later (default:
    ``SPOTSAFE_SIGNAL_GRACE``, else 30 s).
    """

    def __init__(
        self,
        sources: SourceSpec = "auto",
        *,
        poll_interval: float = 2.0,
        callback: Callback | None = None,
        signals: Sequence[signal.Signals | int] = (signal.SIGTERM,),
        rebalance: bool = True,
        signal_grace: float | None = None,
        timeout: float = 1.0,
        probe_timeout: float = 0.5,
    ) -> None:
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be > 0, not {poll_interval!r}")
        self.poll_interval = float(poll_interval)
        self.callback = callback
        self.signals = tuple(signal.Signals(s) for s in signals)
        self.rebalance = rebalance
        self._settings = Settings.from_env()
        # Kubernetes' terminationGracePeriodSeconds or SLURM's --signal lead time, where known.
        self.signal_grace = float(self._settings.signal_grace if signal_grace is None else signal_grace)
        self.timeout = float(timeout)
        self.probe_timeout = float(probe_timeout)
        self._spec = sources
        self._sources: list[Source] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._notice: Notice | None = None
        self._pending_callbacks: list[Notice] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = False
        # A caught signal is handed over through a reentrant queue and a socket write:
        # a signal handler must take no lock the interrupted code could be holding.
        self._signal_queue: queue.SimpleQueue[tuple[int, datetime]] = queue.SimpleQueue()
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._previous_handlers: dict[signal.Signals, Any] = {}
        self._signals_active = False
        self._signals_pid = 0

    def __repr__(self) -> str:
        return f"InterruptionWatcher(sources={self.sources!r}, notice={self._notice!r})"

    # -- configuration

    def _make_source(self, name: str) -> Source:
        if name == "aws":
            return AWSSource(self._settings.aws_endpoint, rebalance=self.rebalance, timeout=self.timeout)
        if name == "gcp":
            return GCPSource(self._settings.gcp_host, timeout=self.timeout)
        return AzureSource(self._settings.azure_endpoint, timeout=self.timeout)

    def _resolve(self) -> tuple[list[Source], list[Source]]:
        """(metadata sources to probe, metadata sources enabled as given)."""
        spec: SourceSpec = self._spec
        origin = "sources"
        if isinstance(spec, str) and spec.strip().lower() == "auto" and self._settings.sources:
            spec, origin = self._settings.sources, "SPOTSAFE_SOURCES"
        items: list[str | Source] = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
        known = ("", "none", "auto", "signal", *_PROVIDERS)
        for item in items:
            if not isinstance(item, Source) and str(item).strip().lower() not in known:
                raise ValueError(
                    f"unknown interruption source {item!r} in {origin}={spec!r}; "
                    "use auto, aws, gcp, azure, signal or none"
                )
        probe: list[Source] = []
        given: list[Source] = []
        for item in items:
            if isinstance(item, Source):
                given.append(item)
                continue
            name = str(item).strip().lower()
            if name in ("", "none"):
                continue
            if name == "auto":
                for key in _PROVIDERS:
                    if key == "aws" and self._settings.aws_disabled:
                        log.debug("AWS source off: AWS_EC2_METADATA_DISABLED is set")
                        continue
                    probe.append(self._make_source(key))
            elif name == "signal":
                pass  # signals are governed by ``signals=``; the name is accepted for clarity
            elif name == "aws" and self._settings.aws_disabled:
                log.info("AWS source off: AWS_EC2_METADATA_DISABLED is set")
            else:
                given.append(self._make_source(name))
        # The same provider named twice (auto plus explicit) is watched once.
        names = {s.name for s in given}
        for source in [s for s in probe if s.name in names]:
            source.close()
            probe.remove(source)
        return probe, given

    def _probe_all(self, candidates: list[Source]) -> list[Source]:
        """Probe in parallel; a source that has not answered in time is off."""
        if not candidates:
            return []
        results: dict[int, bool] = {}
        abandoned: set[int] = set()
        guard = threading.Lock()

        def probe(i: int, source: Source) -> None:
            ok = False
            try:
                ok = source.probe(self.probe_timeout)
            except Exception:  # a probe must never stop the watcher from starting
                log.debug("probe of %s failed", source, exc_info=True)
            with guard:
                results[i] = ok
                late = i in abandoned
            if late or not ok:
                source.close()

        threads = [
            threading.Thread(target=probe, args=(i, s), name=f"spotsafe-probe-{s.name}", daemon=True)
            for i, s in enumerate(candidates)
        ]
        for t in threads:
            t.start()
        # Connect and read timeouts bound each probe, but a DNS lookup is not bounded
        # by them: the overall deadline is. A probe may take two requests in turn (AWS behind a
        # hop limit: the token PUT times out, then the IMDSv1 GET); one timeout plus a margin cut
        # that GET off after 0.1-0.35 s, and a loaded instance lost its AWS notices silently.
        deadline = time.monotonic() + probe_bound(self.probe_timeout)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        enabled = []
        with guard:
            for i, source in enumerate(candidates):
                if results.get(i):
                    enabled.append(source)
                elif i not in results:
                    abandoned.add(i)
                    log.debug("probe of %s did not finish in time: off", source)
        return enabled

    # -- life cycle

    @property
    def sources(self) -> tuple[str, ...]:
        """Names of the sources being watched (``"signal"`` when handlers are installed)."""
        names = [s.name for s in self._sources]
        if self._signals_active:
            names.append("signal")
        return tuple(names)

    def start(self) -> InterruptionWatcher:
        """Probe (``auto``), install signal handlers, start the threads. Returns self."""
        if self._started:
            return self
        started = time.monotonic()
        probe, given = self._resolve()
        self._sources = given + self._probe_all(probe)
        self._stop.clear()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        if self.signals:
            self._install_signals()
        dispatcher = threading.Thread(target=self._dispatch, name="spotsafe-watcher", daemon=True)
        self._threads = [dispatcher]
        for source in self._sources:
            self._threads.append(
                threading.Thread(
                    target=self._poll_loop, args=(source,), name=f"spotsafe-watcher-{source.name}", daemon=True
                )
            )
        self._started = True
        for t in self._threads:
            t.start()
        log.info(
            "interruption watcher started in %.3f s: watching %s",
            time.monotonic() - started,
            ", ".join(self.sources) or "nothing",
        )
        return self

    def stop(self) -> None:
        """Stop the threads, restore signal handlers, close connections. Idempotent.

        Returns within about one poll interval (a GCP hanging GET is bounded by it).
        The notice stays readable.
        """
        if not self._started:
            return
        self._stop.set()
        self._wake()
        join_timeout = self.poll_interval + 2 * self.timeout + 2.0
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(join_timeout)
                if t.is_alive():
                    log.warning("%s did not stop within %.1f s", t.name, join_timeout)
        self._threads = []
        self._restore_signals()
        for source in self._sources:
            source.close()
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._wake_r = self._wake_w = None
        self._started = False

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the notice

    @property
    def notice(self) -> Notice | None:
        """The notice (first wins; a final one replaces a rebalance), or None. No I/O."""
        self._drain_signals()
        return self._notice

    def wait(self, timeout: float | None = None, *, final: bool = False) -> Notice | None:
        """Block until there is a notice (a final one, with ``final=True``) or ``timeout``."""

        def ready() -> bool:
            return self._notice is not None and (self._notice.is_final or not final)

        self._drain_signals()
        with self._changed:
            self._changed.wait_for(ready, timeout)
            return self._notice if ready() else None

    def time_left(self) -> float | None:
        """Seconds until the notice's deadline (0 once past), or None without a notice."""
        notice = self.notice
        return None if notice is None else notice.time_left()

    def trigger(self, action: Action = "terminate", *, deadline_in: float = 120.0, source: str = "manual") -> Notice:
        """Inject a notice (tests, user code, a scheduler's own warning); returns it.

        It is accepted under the same rule as any other: it becomes :attr:`notice`
        unless a notice is already set (a final one replaces a rebalance).
        """
        now = utcnow()
        notice = Notice(source, action, now + timedelta(seconds=deadline_in), now)
        self._offer(notice)
        return notice

    def acknowledge(self) -> None:
        """Tell the platform this instance may go now (after the final checkpoint is durable).

        Azure: POSTs a StartRequest for the event, so the eviction can proceed early.
        Elsewhere a no-op. Never raises: a failure is logged.
        """
        notice = self._notice
        if notice is None:
            return
        for source in self._sources:
            if source.name == notice.source:
                try:
                    source.acknowledge(notice)
                except Exception as e:  # noqa: BLE001 - the checkpoint is already safe; this is a courtesy
                    log.warning("could not acknowledge the %s notice: %s", notice.source, e)

    def _offer(self, notice: Notice) -> bool:
        with self._changed:
            current = self._notice
            if current is not None and (current.is_final or not notice.is_final):
                return False
            self._notice = notice
            self._pending_callbacks.append(notice)
            self._changed.notify_all()
        log.warning(
            "interruption notice from %s: %s by %s (%.0f s left)",
            notice.source,
            notice.action,
            notice.deadline.isoformat(),
            notice.time_left(),
        )
        self._wake()
        return True

    # -- threads

    def _wake(self) -> None:
        sock = self._wake_w
        if sock is not None:
            try:
                sock.send(b"\0")
            except OSError:  # full (already awake) or closed (stopping)
                pass

    def _dispatch(self) -> None:
        """Sleep until woken; then turn caught signals into notices and run callbacks."""
        assert self._wake_r is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._wake_r, selectors.EVENT_READ)
            while True:
                sel.select()  # no timeout: costs nothing until a signal, a notice or stop()
                try:
                    while self._wake_r.recv(4096):
                        pass
                except OSError:
                    pass
                self._drain_signals()
                self._run_callbacks()
                if self._stop.is_set():
                    return

    def _run_callbacks(self) -> None:
        with self._lock:
            pending, self._pending_callbacks = self._pending_callbacks, []
        if self.callback is None:
            return
        for notice in pending:
            try:
                self.callback(notice)
            except Exception:
                log.exception("interruption callback failed on %s", notice)

    def _poll_loop(self, source: Source) -> None:
        failures = 0
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                notice = source.poll(self.poll_interval)
            except Exception as e:  # noqa: BLE001 - a source's failure must not end the watch
                failures += 1
                # Back off, but never so far that a notice could be missed by much.
                # Capped at 5 s (AWS advises polling at least that often) or the poll interval.
                delay = min(self.poll_interval * 2 ** min(failures - 1, 6), max(self.poll_interval, 5.0))
                (log.warning if failures == 1 else log.debug)(
                    "%s source: %s (attempt %d; retrying in %.1f s)", source.name, e, failures, delay
                )
                self._stop.wait(delay)
                continue
            if failures:
                log.info("%s source answers again after %d failed attempts", source.name, failures)
                failures = 0
            if notice is not None:
                self._offer(notice)
            current = self._notice
            if current is not None and current.is_final:
                return  # nothing can replace a final notice: stop polling
            self._stop.wait(source.next_delay(time.monotonic() - began, self.poll_interval))

    # -- signals

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.debug("not in the main thread: signal handlers not installed")
            return
        self._previous_handlers = {}
        for sig in self.signals:
            try:
                self._previous_handlers[sig] = signal.signal(sig, self._on_signal)
            except (ValueError, OSError) as e:
                log.debug("cannot handle %s: %s", sig.name, e)
        self._signals_active = bool(self._previous_handlers)
        self._signals_pid = os.getpid()

    def _restore_signals(self) -> None:
        if not self._signals_active:
            return
        self._signals_active = False  # a handler left behind now defers to the previous one
        if threading.current_thread() is not threading.main_thread():
            log.warning(
                "stop() outside the main thread: signal handlers left installed (they defer to the previous ones)"
            )
            return
        for sig, previous in self._previous_handlers.items():
            if signal.getsignal(sig) == self._on_signal:
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
            else:
                log.debug("%s handler was replaced after start(); leaving it", sig.name)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Runs between bytecodes of the main thread: no locks, no logging, no I/O
        # beyond one non-blocking send. The dispatcher thread (or the next read of
        # .notice) turns it into a Notice.
        sig = signal.Signals(signum)
        previous = self._previous_handlers.get(sig)
        if not self._signals_active or os.getpid() != self._signals_pid:
            # A stopped watcher's handler still installed (another handler was stacked
            # on it and restored it), or a forked child (a DataLoader worker) that
            # inherited it: behave exactly as the previous disposition would.
            if callable(previous):
                previous(signum, frame)
            elif previous != signal.SIG_IGN:
                signal.signal(sig, signal.SIG_DFL)
                signal.raise_signal(sig)
            return
        self._signal_queue.put((signum, utcnow()))
        self._wake()
        # Python's own SIGINT handler raises KeyboardInterrupt: a watched SIGINT is a notice instead.
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)

    def _drain_signals(self) -> None:
        if self._signal_queue.empty():  # the common case, read on every training step
            return
        while True:
            try:
                signum, detected = self._signal_queue.get_nowait()
            except queue.Empty:
                return
            name = signal.Signals(signum).name
            self._offer(
                Notice(
                    "signal", "terminate", detected + timedelta(seconds=self.signal_grace), detected, {"signal": name}
                )
            )
