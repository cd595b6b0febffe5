"""Small helpers shared by the tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from spotsafe.cloud.watcher import InterruptionWatcher

T = TypeVar("T")

#: What a ``root``-marked test needs besides root itself.
ROOT_TOOLS = ("losetup", "blkid", "mount", "umount", "mkfs.ext4")


def wait_until(predicate: Callable[[], T], timeout: float, *, interval: float = 0.05, what: str = "") -> T:
    """Call ``predicate`` until it returns something truthy, and return that.

    Raises AssertionError naming ``what`` after ``timeout`` seconds. ``predicate`` may
    itself raise (an AssertionError when a watched process died, say): that ends the wait.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or predicate}")
        time.sleep(interval)


def root_unavailable() -> str | None:
    """Why a ``root``-marked test cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (losetup, mount, mkfs)"
    for tool in ROOT_TOOLS:
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


def slow_enabled(config: pytest.Config) -> bool:
    """Whether the opt-in long runs go too: ``SPOTSAFE_SLOW=1``, or ``pytest -m slow``.

    A few tests that take minutes of both cores, second lines behind a shorter test of the
    same path in the default run, skip otherwise, so the default run stays inside CI's budget.
    """
    return os.environ.get("SPOTSAFE_SLOW") == "1" or "slow" in str(config.getoption("markexpr") or "")


def git(*args: str, cwd: Path) -> str:
    """Run ``git ARGS`` in ``cwd`` as a throwaway author; its stdout, stripped (raises if git fails)."""
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.invalid",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.invalid",
    }
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


def stop_child(proc: subprocess.Popen[Any], *, grace: float = 0.0) -> None:
    """End a child a test started, if it still runs; reap it and close its pipes (unread output is dropped).

    With ``grace``, SIGTERM first and that many seconds to exit; then SIGKILL.
    """
    if proc.poll() is None and grace > 0:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass  # SIGKILL next
    if proc.poll() is None:
        proc.kill()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    try:
        if proc.stdin is not None:
            proc.stdin.close()
    except BrokenPipeError:
        pass  # the child is gone: what was left unsent does not matter
    finally:
        proc.wait()


@contextmanager
def child(cmd: Sequence[str], *, grace: float = 0.0, **popen: Any) -> Iterator[subprocess.Popen[Any]]:
    """``subprocess.Popen(cmd, **popen)`` that :func:`stop_child` ends and reaps however the block ends.

    The block may wait for the child itself (``communicate``): after it, ``proc.returncode`` is the child's.
    """
    proc = subprocess.Popen(cmd, **popen)
    try:
        yield proc
    finally:
        stop_child(proc, grace=grace)


def quiet_watcher() -> InterruptionWatcher:
    """A watcher with no metadata source and no signal handler: nothing interrupts but the test."""
    return InterruptionWatcher(sources="none", signals=())


def checkpoint_dir(root: Path, step: int) -> Path:
    """The directory of ``step``'s checkpoint under a local store ``root``: its newest writer generation's."""
    found = sorted(root.glob(f"step-{step:012d}-g*"))
    assert found, f"{root}: no checkpoint directory for step {step} (has {sorted(p.name for p in root.iterdir())})"
    return found[-1]
