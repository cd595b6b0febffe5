"""Sizes and ages for people, one spelling for every command (``spotsafe ls``, ``status``, ``resume --status``)."""

from __future__ import annotations


def size(n: int) -> str:
    """Bytes as ``512 B``, ``3.5 MiB``, ``1.2 GiB`` (GiB the largest unit)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def age(seconds: float) -> str:
    """How long, for people: ``42 s``, ``3.5 min``, ``1.2 h``, ``2.0 d`` (negative counts as 0)."""
    seconds = max(seconds, 0.0)
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= n:
            return f"{seconds / n:.1f} {unit}"
    return f"{seconds:.0f} s"
