"""How the report writes numbers and times: rounded facts, ISO-8601 UTC, seconds and dollars for people."""

from __future__ import annotations

from datetime import datetime, timezone

__all__ = ["count_text", "fmt_seconds", "fmt_usd", "iso_utc", "rounded"]


def rounded(x: float | None, digits: int = 3) -> float | None:
    """``x`` as a float rounded to ``digits`` places (None stays None): how the facts keep numbers."""
    return None if x is None else round(float(x), digits)


def iso_utc(t: float | None) -> str | None:
    """A Unix time as ISO-8601 UTC to the millisecond (``...Z``); None stays None."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def fmt_seconds(seconds: float | None) -> str:
    """A duration for people: ms, s, min or h; ``–`` for None.

    Negative where one phase began before the last ended (a replacement that capacity
    rebalancing launched before the old instance's exit): ``-45.0 s``, not ``-45000 ms``.
    """
    if seconds is None:
        return "–"
    if seconds < 0:
        return "-" + fmt_seconds(-seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def fmt_usd(x: float | None) -> str:
    """Dollars with cents; ``–`` for None."""
    return "–" if x is None else f"${x:,.2f}"


def count_text(n: int | None, exact: bool) -> str:
    """A count the store may only bound: ``N``, ``at least N``, or ``unknown`` (a lower bound of 0 says nothing)."""
    if n is None or (not exact and n == 0):
        return "unknown"
    return str(n) if exact else f"at least {n}"
