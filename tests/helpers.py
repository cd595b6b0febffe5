"""Small helpers shared by the tests."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from typing import TypeVar

import pytest

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
