"""``python -m spotsafe.resume``: the supervisor a spot instance runs at boot.

    python -m spotsafe.resume --store s3://bucket/runs/mnist [--max-restarts 3] -- python train.py ARGS...

It runs the command with ``SPOTSAFE_STORE`` set (so ``spotsafe.Run()`` with no store
uses it); the child's output goes straight to this process's stdout/stderr. Then:

- exit 0: done, exit 0;
- exit 77 (:data:`spotsafe.EXIT_FENCED`), or any exit after which the child's account says
  it was fenced (torchrun reports its workers' 77 as 1): another instance took the store's
  writer lease over (a capacity-rebalance replacement, say): the run lives on there; exit 77
  without restarting;
- exit 75 (:data:`spotsafe.EXIT_PREEMPTED`), or any exit of a launch during which the
  run committed a notice checkpoint (torchrun reports its workers' 75 as 1): the state
  is safe and the job stopped for a notice. Whose? The child's Run says
  (:mod:`spotsafe.stopaccount`: a file in the directory ``SPOTSAFE_STOP_DIR`` names):
  its own notice (its metadata's, or a SIGTERM sent to the child alone): exit 75 without
  restarting. A notice agreed from another rank, or no account: the supervisor asks
  its own instance (:mod:`spotsafe.cloud.node`; a signal to the supervisor is proof too):
  this instance is going away: exit 75 without restarting; this instance is healthy
  (another node of a multi-node job was preempted): relaunch at once, no backoff, so
  torchrun re-rendezvous with the survivors; nothing here can tell (no metadata
  source answers): exit 75, as before;
- any other exit (a crash, a kill): restart the command (it resumes from the newest
  checkpoint) after a backoff, up to ``--max-restarts`` times, then fail loudly;
- a run already marked complete in the store: do nothing, say so, exit 0;
- SIGTERM/SIGINT to the supervisor: forwarded to the child as SIGTERM, whose Run saves and
  exits 75; the supervisor waits for it and exits with its code.

``--status`` prints whether the run is complete and its newest checkpoint.

A child still running ``--kill-after`` seconds after a forwarded signal (default: the
signal notice's grace, ``SPOTSAFE_SIGNAL_GRACE``, plus 10 s) gets SIGKILL. A store
that cannot be used (a bad URL, no bucket, a path that is a file) or bad arguments
exit :data:`EXIT_USAGE` with one line naming the cause; an unreadable completion
record is reported and the command runs (the checkpoints decide where it resumes).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import FrameType
from typing import Any, TextIO

from spotsafe import stopaccount, units
from spotsafe.checkpoint.completion import read_completion
from spotsafe.cloud.node import InstanceState
from spotsafe.cloud.node import check as check_instance
from spotsafe.errors import CheckpointCorrupt, SpotsafeError
from spotsafe.exitcodes import EXIT_FENCED, EXIT_PREEMPTED
from spotsafe.storage.registry import open_store

#: Exit status when the command kept crashing (EX_SOFTWARE).
EXIT_GAVE_UP = 70
#: Exit status for bad arguments or a store that cannot be used (as argparse's).
EXIT_USAGE = 2
#: Seconds past the signal notice's grace before a child that ignores the signal is killed.
KILL_MARGIN = 10.0
DEFAULT_MAX_RESTARTS = 3
DEFAULT_BACKOFF = 5.0
MAX_BACKOFF = 300.0


def _say(message: str, out: TextIO | None = None) -> None:
    print(f"spotsafe.resume: {message}", file=out or sys.stderr, flush=True)


def exit_status(returncode: int) -> int:
    """A child's returncode as a shell exit status (killed by signal N -> 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


@dataclass
class Supervisor:
    """Runs ``command`` until it finishes, is preempted, or crashes too often."""

    command: Sequence[str]
    env: Mapping[str, str] | None = None
    max_restarts: int = DEFAULT_MAX_RESTARTS
    backoff: float = DEFAULT_BACKOFF
    cwd: str | None = None
    #: ``preempted(since)``: True when the run saved a notice checkpoint after ``since``
    #: (UTC): a launcher such as torchrun turns its workers' 75 into 1, the store does not lie.
    preempted: Callable[[datetime], bool] | None = None
    #: ``instance()``: this instance's own metadata, asked fresh (:func:`spotsafe.cloud.node.check`);
    #: None: a preempted launch always means this instance is going away.
    instance: Callable[[], InstanceState] | None = None
    #: ``progress()``: the newest checkpoint's step (None: none): a relaunch after another
    #: node's notice is free only when the run moved on since the previous one.
    progress: Callable[[], int | None] | None = None
    #: Seconds a child may run on after a forwarded signal before it gets SIGKILL (None: never).
    kill_after: float | None = None
    #: The directory the child's Run tells why it stopped in (:mod:`spotsafe.stopaccount`; the
    #: caller puts it in the child's ``SPOTSAFE_STOP_DIR``); None: the metadata decides alone.
    stop_dir: str | None = None
    #: returncodes of every launch, in order
    history: list[int] = field(default_factory=list)
    #: Relaunches at once because another node's notice stopped the job (multi-node).
    relaunches: int = 0
    _child: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _stopping: threading.Event = field(default_factory=threading.Event, repr=False)
    _forwarded: int | None = field(default=None, repr=False)
    _forwarded_at: float | None = field(default=None, repr=False)

    def forward(self, signum: int) -> None:
        """Pass a signal to the running child; no restart happens afterwards."""
        self._stopping.set()
        self._forwarded = signum
        if self._forwarded_at is None:
            self._forwarded_at = time.monotonic()
        child = self._child
        if child is not None and child.poll() is None:
            try:
                child.send_signal(signum)
            except ProcessLookupError:
                pass

    def launch_once(self) -> int:
        """Run the command once; its exit status."""
        if self.stop_dir is not None:
            stopaccount.clear(self.stop_dir)
        try:
            child = subprocess.Popen(
                list(self.command), env=dict(self.env) if self.env is not None else None, cwd=self.cwd
            )
        except OSError as e:
            raise SystemExit(f"spotsafe.resume: cannot run {self.command[0]!r}: {e}") from e
        self._child = child
        if self._stopping.is_set() and self._forwarded is not None:  # signal raced the launch
            child.send_signal(self._forwarded)
        try:
            returncode = self._wait(child)
        finally:
            self._child = None
        status = exit_status(returncode)
        self.history.append(status)
        return status

    def _wait(self, child: subprocess.Popen[bytes]) -> int:
        """The child's returncode; SIGKILL once it outlives a forwarded signal by ``kill_after``."""
        while True:
            try:
                return child.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
            since = self._forwarded_at
            if self.kill_after is not None and since is not None and time.monotonic() - since >= self.kill_after:
                _say(
                    f"the command is still running {self.kill_after:g} s after signal {self._forwarded} "
                    "(past the notice's deadline): killing it (SIGKILL)"
                )
                child.kill()
                return child.wait()

    def run(self) -> int:
        """Launch, restarting after crashes; the final exit status."""
        restarts = 0
        free_at: int | None = None  # the progress mark of the last free relaunch
        while True:
            started = datetime.now(timezone.utc)
            status = self.launch_once()
            if status == 0:
                return 0
            if status == EXIT_FENCED or self._fenced():
                _say(
                    f"another instance took the store over (exit {EXIT_FENCED}): the run goes on there; "
                    "not restarting on this instance"
                )
                return EXIT_FENCED
            if status != EXIT_PREEMPTED and self.preempted is not None and self._safe_preempted(started):
                _say(
                    f"the command exited with status {status}, but the run saved a checkpoint on a "
                    "preemption notice during this launch: treating it as preempted"
                )
                status = EXIT_PREEMPTED
            if status == EXIT_PREEMPTED:
                # --- issue 18: whose notice? Only this instance's own stops this node. ---
                if self._stopping.is_set() or self._own_notice() or not self._healthy():
                    _say(
                        f"the run saved its state on a preemption notice (exit {EXIT_PREEMPTED}); "
                        "not restarting on this instance"
                    )
                    return EXIT_PREEMPTED
                mark = self._safe_progress()
                if self.relaunches == 0 or (mark is not None and mark != free_at):
                    free_at = mark
                    self.relaunches += 1
                    restarts = 0  # the run moved on: --max-restarts counts crashes since
                    where = f" (its newest checkpoint: step {mark})" if mark is not None else ""
                    _say(
                        f"the job stopped for a notice on another node{where}; this instance is healthy: "
                        f"relaunching now so the survivors carry on (relaunch {self.relaunches})"
                    )
                    continue
                _say(
                    "the job stopped for a notice again without training past step "
                    f"{mark}: counting it as a failed launch"
                )
                # --- end issue 18 ---
            if self._stopping.is_set():
                _say(f"stopped by signal {self._forwarded}; the command exited with status {status}")
                return status
            if restarts >= self.max_restarts:
                _say(
                    f"GIVING UP: {' '.join(self.command)!r} failed {restarts + 1} times "
                    f"(exit statuses {self.history}); --max-restarts is {self.max_restarts}. "
                    "Fix the error above; the checkpoints in the store are untouched."
                )
                return status if status != 0 else EXIT_GAVE_UP
            delay = min(self.backoff * (2**restarts), MAX_BACKOFF)
            restarts += 1
            _say(f"the command exited with status {status}; restart {restarts}/{self.max_restarts} in {delay:g} s")
            if self._stopping.wait(delay):
                return status

    def _fenced(self) -> bool:
        """True when the child told it was fenced (exit 77 on its own; torchrun turns its workers' 77 into 1)."""
        accounts = stopaccount.read_accounts(self.stop_dir) if self.stop_dir is not None else []
        return any(a.fenced for a in accounts)

    def _own_notice(self) -> bool:
        """True when the child told of a notice of its own (a SIGTERM to it included): this node stops."""
        accounts = stopaccount.final_accounts(self.stop_dir) if self.stop_dir is not None else []
        own = [a for a in accounts if a.own]
        if own:
            _say(f"the training process stopped for {own[0].describe()}")
        elif accounts:
            _say(f"the training process stopped for {accounts[0].describe()}: asking this instance's metadata")
        return bool(own)

    def _healthy(self) -> bool:
        """True only when this instance's own metadata answers and announces nothing."""
        if self.instance is None:
            return False
        try:
            state = self.instance()
        except Exception as e:  # noqa: BLE001 - cannot tell: keep the conservative reading
            _say(f"could not ask this instance's metadata whether it is going away: {e}")
            return False
        if state.verdict == "doomed":
            _say(f"this instance is going away ({state.detail})")
            return False
        if state.verdict == "unknown":
            _say(f"no metadata source of this instance answers ({state.detail}): taking the notice as its own")
            return False
        _say(f"this instance is not going away ({state.detail})")
        return True

    def _safe_progress(self) -> int | None:
        if self.progress is None:
            return None
        try:
            return self.progress()
        except Exception as e:  # noqa: BLE001 - an unreadable store: no progress known
            _say(f"could not read the store's newest checkpoint: {e}")
            return None

    def _safe_preempted(self, since: datetime) -> bool:
        assert self.preempted is not None
        try:
            return self.preempted(since)
        except Exception as e:  # noqa: BLE001 - an unreadable store: treat as a crash, restart
            _say(f"could not read the store to tell a preemption from a crash: {e}")
            return False


def notice_checkpoint_since(store: str, since: datetime) -> bool:
    """True when the newest checkpoint in ``store`` was saved on a notice at or after ``since``."""
    from spotsafe.checkpoint.catalog import Catalog

    with open_store(store) as opened:
        infos = Catalog(opened).list()
    return bool(infos) and infos[-1].reason == "notice" and infos[-1].time >= since


def newest_step(store: str) -> int | None:
    """The step of the newest committed checkpoint in ``store``, or None."""
    from spotsafe.checkpoint.catalog import Catalog

    with open_store(store) as opened:
        infos = Catalog(opened).list()
    return infos[-1].step if infos else None


def completion(store: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """What ``Run.finish()`` wrote for the run in ``store``, or None."""
    with open_store(store, storage_options=storage_options) as opened:
        return read_completion(opened)


def status_text(store: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """The run's state in a few lines: complete or not; the newest checkpoint."""
    from spotsafe.checkpoint.catalog import Catalog

    unreadable = ""
    with open_store(store, storage_options=storage_options) as opened:
        try:
            done = read_completion(opened)
        except CheckpointCorrupt as e:
            done, unreadable = None, str(e)
        infos = Catalog(opened).list()
    lines = [f"store: {store}"]
    if unreadable:
        lines.append(f"complete: unknown (unreadable completion record: {unreadable})")
    else:
        lines.append(f"complete: yes ({_describe(done)})" if done is not None else "complete: no")
    if not infos:
        lines.append("checkpoints: none")
    else:
        newest = infos[-1]
        age = (datetime.now(timezone.utc) - newest.time).total_seconds()
        batch = newest.metadata.get("batch") if isinstance(newest.metadata, Mapping) else None
        where = f"epoch {newest.epoch}" + (f", batch {batch}" if batch is not None else "")
        lines.append(f"checkpoints: {len(infos)}")
        lines.append(
            f"newest: step {newest.step} ({where}), reason {newest.reason}, "
            f"{units.age(age)} old, {newest.size} bytes, {newest.url}"
        )
    return "\n".join(lines)


def _describe(done: Mapping[str, Any]) -> str:
    parts = [f"step {done.get('step')}"]
    meta = done.get("metadata")
    if isinstance(meta, Mapping) and meta.get("epoch") is not None:
        parts.append(f"epoch {meta['epoch']}")
    if done.get("time"):
        parts.append(f"at {done['time']}")
    return ", ".join(parts)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m spotsafe.resume",
        description="Run a training command until it finishes, resuming it from its newest checkpoint.",
        epilog="Example: python -m spotsafe.resume --store /mnt/spotsafe/runs/mnist -- python train.py",
    )
    parser.add_argument(
        "--store",
        default=os.environ.get("SPOTSAFE_STORE"),
        help="checkpoint store (path or URL); default $SPOTSAFE_STORE",
    )
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=DEFAULT_MAX_RESTARTS,
        help=f"restarts after crashes before giving up (default {DEFAULT_MAX_RESTARTS})",
    )
    parser.add_argument(
        "--backoff",
        type=float,
        default=DEFAULT_BACKOFF,
        help=f"seconds before the first restart, doubling each time (default {DEFAULT_BACKOFF:g})",
    )
    parser.add_argument(
        "--kill-after",
        type=float,
        default=None,
        metavar="SECONDS",
        help="SIGKILL the command this long after forwarding it a signal "
        f"(default: SPOTSAFE_SIGNAL_GRACE + {KILL_MARGIN:g})",
    )
    parser.add_argument("--status", action="store_true", help="print the run's state and exit")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the training command")
    args = parser.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not args.store:
        parser.error("--store is required (or set SPOTSAFE_STORE)")
    if args.max_restarts < 0:
        parser.error("--max-restarts must be >= 0")
    if not math.isfinite(args.backoff) or not 0 <= args.backoff <= MAX_BACKOFF:
        parser.error(f"--backoff must be a number of seconds within 0..{MAX_BACKOFF:g}, not {args.backoff}")
    if args.kill_after is not None and (not math.isfinite(args.kill_after) or args.kill_after <= 0):
        parser.error(f"--kill-after must be a number of seconds > 0, not {args.kill_after}")
    if not args.status and not args.command:
        parser.error("give the training command after --")
    return args


def supervise(
    command: Sequence[str],
    store: str,
    *,
    env: Mapping[str, str] | None = None,
    max_restarts: int = DEFAULT_MAX_RESTARTS,
    backoff: float = DEFAULT_BACKOFF,
    check_complete: bool = True,
    kill_after: float | None = None,
) -> int:
    """The supervisor's work (what ``main`` does after parsing); returns the exit status.

    Installs SIGTERM/SIGINT forwarding while it runs when called from the main thread.
    """
    if check_complete:
        try:
            done = completion(store)
        except CheckpointCorrupt as e:
            # Unreadable, so not known to be complete: train (it resumes from the newest intact checkpoint).
            _say(f"ignoring an unreadable completion record: {e}")
            done = None
        if done is not None:
            _say(f"the run in {store} is already complete ({_describe(done)}); nothing to do", sys.stdout)
            return 0
    child_env = dict(os.environ if env is None else env)
    child_env["SPOTSAFE_STORE"] = store
    # issue 18: torchrun's agent-shared TCPStore does not publish the new round's MASTER_ADDR when
    # a node joins a running job (the joiner waits 60 s and fails; pytorch/pytorch#135712 for restarts):
    # the workers get their own store, as before torch 2.5.
    child_env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    stop_dir = tempfile.mkdtemp(prefix="spotsafe-stop-")  # the child tells why it stopped here
    child_env[stopaccount.STOP_DIR_ENV] = stop_dir
    sup = Supervisor(
        command,
        env=child_env,
        max_restarts=max_restarts,
        backoff=backoff,
        preempted=lambda since: notice_checkpoint_since(store, since),
        instance=lambda: check_instance(child_env),
        progress=lambda: newest_step(store),
        kill_after=_default_kill_after() if kill_after is None else kill_after,
        stop_dir=stop_dir,
    )

    def handler(signum: int, frame: FrameType | None) -> None:
        # SIGINT goes on as SIGTERM, the notice every Run handles (even with SPOTSAFE_SIGINT=interrupt,
        # which keeps a terminal's Ctrl+C, sent to the whole process group, as the script's own "stop now").
        _say(f"got signal {signum}: forwarding SIGTERM to the training process and waiting for its final save")
        sup.forward(signal.SIGTERM)

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
    try:
        return sup.run()
    finally:
        for num, old in previous.items():
            signal.signal(num, old)
        shutil.rmtree(stop_dir, ignore_errors=True)


def _default_kill_after() -> float:
    from spotsafe.settings import Settings

    return Settings.from_env().signal_grace + KILL_MARGIN


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.status:
            print(status_text(args.store))
            return 0
        # The store is opened (and a bad URL, a missing bucket or a file for a path reported) before any launch.
        _check_store(args.store)
        return supervise(
            args.command, args.store, max_restarts=args.max_restarts, backoff=args.backoff, kill_after=args.kill_after
        )
    except (SpotsafeError, ValueError, OSError) as e:
        _say(f"cannot use the store {args.store!r}: {e}")
        return EXIT_USAGE


def _check_store(store: str) -> None:
    open_store(store).close()


if __name__ == "__main__":
    raise SystemExit(main())
