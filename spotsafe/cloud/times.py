"""Times as the clouds write them, and the one clock (UTC-aware) that notices are stamped with."""

from __future__ import annotations

import email.utils
from datetime import datetime, timezone

__all__ = ["parse_iso", "parse_rfc1123", "utcnow"]


def utcnow() -> datetime:
    """Now, timezone-aware, in UTC."""
    return datetime.now(timezone.utc)


def parse_iso(text: str) -> datetime:
    """An ISO 8601 time as AWS writes it (``2026-11-22T08:22:00Z``), UTC-aware.

    ValueError for anything else, including a time that cannot be expressed in UTC
    (``9999-12-31T23:59:59-12:00``).
    """
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    try:
        return parsed.astimezone(timezone.utc)
    except OverflowError as e:
        raise ValueError(f"{text[:64]!r} is out of range in UTC") from e


def parse_rfc1123(text: str) -> datetime:
    """An RFC 1123 time as Azure writes it (``Mon, 19 Sep 2016 18:29:47 GMT``), UTC-aware."""
    parsed = email.utils.parsedate_to_datetime(text)
    if parsed is None:  # older Pythons return None instead of raising
        raise ValueError(f"not an RFC 1123 time: {text!r}")
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc)
