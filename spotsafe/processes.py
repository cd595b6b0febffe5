"""Processes on this machine: which boot and pid namespace this is, when a pid started, whether it is still alive."""

from __future__ import annotations

import os


def boot_id() -> str:
    """This boot of the machine (Linux's random boot id; "" where not reported): pids mean something only within one."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def pid_namespace() -> str:
    """This process's pid namespace (``pid:[4026531836]``; "" where not reported).

    Containers on one machine share its boot id but number their processes apart: a pid
    means something only within one boot *and* one pid namespace (pid 7 in one pod is not
    pid 7 in the next).
    """
    try:
        return os.readlink("/proc/self/ns/pid")
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
