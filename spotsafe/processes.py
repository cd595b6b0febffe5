"""Processes on this machine: which boot this is, when a pid started, whether it is still alive."""

from __future__ import annotations

import os


def boot_id() -> str:
    """This boot of the machine (Linux's random boot id; "" where not reported): pids mean something only within one."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def process_start(pid: int) -> str:
    """The start time of ``pid`` (clock ticks since boot), so a recycled pid is told apart ("" if unknown)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def pid_alive(pid: int, start: str = "") -> bool:
    """True while ``pid`` exists (another user's too); with ``start`` (its :func:`process_start`), only that process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return not start or process_start(pid) in ("", start)
