"""A :class:`spotsafe.Run`'s own state in each checkpoint: its key, its format, its check on restore.

Under :data:`RUN_STATE_KEY` a checkpoint written by a Run holds the run's counters and
data position (epoch, batch in the epoch, the epoch's shuffle seed, the sampler
generator's or a StatefulDataLoader's state, the world size) and its history (seconds
trained and interruptions over all launches), as a dict of format
:data:`RUN_STATE_FORMAT`.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import threading
from collections.abc import Mapping
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch

from spotsafe.errors import SpotsafeError
from spotsafe.settings import Settings

if TYPE_CHECKING:
    from spotsafe.checkpoint.notice import Durable
    from spotsafe.story.recorder import Recorder

#: Version of the dict the run stores under ``"spotsafe"`` in each checkpoint.
RUN_STATE_FORMAT = 1
#: Key of the run's own counters in the checkpoint.
RUN_STATE_KEY = "spotsafe"
#: Keys of a Run's checkpoint that ``extra_state`` may not use.
RESERVED_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng", RUN_STATE_KEY)


class RunStateError(SpotsafeError, ValueError):
    """The run's own state in a checkpoint is missing or from an unknown format."""


def pop_run_state(restored: dict[str, Any], url: str) -> Mapping[str, Any]:
    """Take the run's own state out of what a restore returned; checked to be a Run's, in a known format."""
    run_state = restored.pop(RUN_STATE_KEY, None)
    if not isinstance(run_state, Mapping):
        raise RunStateError(
            f"{url}: the newest checkpoint has no {RUN_STATE_KEY!r} run state "
            "(written by Checkpointer.save directly, not by spotsafe.Run?)"
        )
    if run_state.get("format") != RUN_STATE_FORMAT:
        raise RunStateError(
            f"{url}: run state format {run_state.get('format')!r} is not {RUN_STATE_FORMAT} (written by a newer spotsafe?)"
        )
    return run_state


def plain_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The metrics a checkpoint's metadata keeps: plain values and one-element tensors as numbers."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = str(value)  # a diverged loss: the manifest's JSON has no nan/inf, and the save must not fail
        if isinstance(value, (bool, int, float, str)) or value is None:
            out[key] = value
    return out


def notice_signals(settings: Settings) -> tuple[signal.Signals, ...]:
    """The signals a Run's own watcher turns into a notice: SIGTERM, and SIGINT unless ``SPOTSAFE_SIGINT=interrupt``."""
    if settings.sigint == "interrupt":
        return (signal.SIGTERM,)
    return (signal.SIGTERM, signal.SIGINT)


class InterruptGuard:
    """Remembers a KeyboardInterrupt raised by SIGINT, so that ``Run.finish()`` never marks a run
    complete because Ctrl+C unwound its loop (a script that catches KeyboardInterrupt to "break
    out early" reaches ``finish()`` with half its epochs done).

    Installed only where Python's own SIGINT handler is in place (``SPOTSAFE_SIGINT=interrupt``,
    or a Run that watches no signals); it raises the same KeyboardInterrupt.
    """

    def __init__(self) -> None:
        #: True once a SIGINT raised KeyboardInterrupt while the guard was installed.
        self.interrupted = False
        self._installed = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return  # the watcher (SIGINT as a notice) or the script's own handler owns SIGINT
        signal.signal(signal.SIGINT, self._on_sigint)
        self._installed = True

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        self.interrupted = True
        raise KeyboardInterrupt

    def uninstall(self) -> None:
        if not self._installed or threading.current_thread() is not threading.main_thread():
            return
        self._installed = False
        if signal.getsignal(signal.SIGINT) == self._on_sigint:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def announce_resume(message: str, logger: logging.Logger, settings: Settings) -> None:
    """Say where a run resumes: in the log, and on stderr when no handler shows it (``SPOTSAFE_QUIET=1``: not)."""
    logger.info("%s", message)
    if settings.quiet or (logger.isEnabledFor(logging.INFO) and _has_handler(logger)):
        return
    print(f"spotsafe: {message}", file=sys.stderr, flush=True)


def _has_handler(logger: logging.Logger) -> bool:
    """True when a handler of ``logger`` or its ancestors would see its records (not logging's last resort)."""
    current: logging.Logger | None = logger
    while current is not None:
        if current.handlers:
            return True
        if not current.propagate:
            return False
        current = current.parent
    return False


def live_state(state: Mapping[str, Any] | None, extra_state: Mapping[str, Any] | None) -> dict[str, Any]:
    """The mapping a Run saves with every checkpoint and restores in place: the caller's own dict, not a copy."""
    if state is not None and extra_state is not None:
        raise ValueError("give state= or extra_state= (the same thing, under its older name), not both")
    given = state if state is not None else extra_state
    live: dict[str, Any] = given if isinstance(given, dict) else dict(given or {})
    check_state_keys(live)
    return live


def check_state_keys(state: Mapping[str, Any]) -> None:
    """Refuse keys of ``run.state`` that the Run's own entries use."""
    clash = sorted(set(state) & set(RESERVED_KEYS))
    if clash:
        raise ValueError(f"run.state keys {clash} are reserved by spotsafe.Run")


def announce_durable(
    durable: Durable, recorder: Recorder, logger: logging.Logger, *, step: int, epoch: int, batch: int
) -> None:
    """Log and record how a notice save went (the checkpoint of ``step`` is durable, or only local)."""
    if durable.flushed:
        logger.warning(
            "checkpoint of step %d durable in %.2f s; %.0f s left before the deadline",
            step,
            durable.took_s,
            durable.left_s,
        )
    else:
        logger.error(
            "checkpoint of step %d committed locally in %.2f s but the remote copy did not finish before the deadline",
            step,
            durable.took_s,
        )
    recorder.durable(
        step=step, epoch=epoch, batch=batch, seconds=durable.took_s, flushed=durable.flushed, left=durable.left_s
    )
