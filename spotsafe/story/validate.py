"""What the report accepts from a store it did not write: every event checked by type and range.

A store is shared with other tools and people, and an object under ``events/`` or
``media/`` may be damaged, truncated, hand-edited or hostile. The report reads it
anyway and tells the story of what it can: an object larger than
:data:`MAX_EVENTS_OBJECT_BYTES` is not downloaded, one that is not a spotsafe events
object is skipped, and inside a good object each event is checked
(:func:`check_event`); a bad event is dropped and named under ``problems`` with its
object and position. Nothing here raises on content: only a newer format version
(:class:`~spotsafe.errors.FormatVersionError`) is the caller's to decide.

Images are read only from ``media/`` through the store's safe reads (a link leading
out of the store, a FIFO or a device is refused by the store), only when their
listed size is at most :data:`MAX_MEDIA_BYTES`, and only when they are PNGs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from spotsafe.errors import CheckpointNotFound, SpotsafeError
from spotsafe.storage.base import Store

__all__ = [
    "MAX_EVENTS_OBJECT_BYTES",
    "MAX_MEDIA_BYTES",
    "MAX_METRICS_PER_EVENT",
    "MAX_TEXT",
    "MEDIA_PATH",
    "check_event",
    "read_media",
]

#: An events object larger than this is not read (the writer splits its batches far below it).
MAX_EVENTS_OBJECT_BYTES = 16 << 20
#: An image larger than this is neither written by ``run.log_image`` nor read by the report.
MAX_MEDIA_BYTES = 8 << 20
#: A step event with more metrics than this is dropped (the page draws at most eight curves).
MAX_METRICS_PER_EVENT = 256
#: The longest text field (a host name, a store URL, a reason) an event may hold.
MAX_TEXT = 4096
#: The only image paths the report reads: ``media/<name>.png``, one level, no ``..``.
MEDIA_PATH = re.compile(r"^media/[A-Za-z0-9_][A-Za-z0-9._-]{0,250}\.png$")
#: Times between 1970 and 2200 (UNIX seconds); anything else is not a time of this run.
MAX_TIME = 7.3e9
#: Steps, epochs, byte counts and process ids fit here (JSON's exact integers).
MAX_INT = 2**53

_PNG = b"\x89PNG\r\n\x1a\n"


class Invalid(ValueError):
    """One event's fault, said in words."""


def _int(name: str, v: Any, *, lo: int = 0) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v < MAX_INT:
        raise Invalid(f"{name!r} is not an integer in [{lo}, 2**53): {_show(v)}")


def _seconds(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and 0 <= v < 1e9):
        raise Invalid(f"{name!r} is not a duration in seconds: {_show(v)}")


def _time(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and 0 < v < MAX_TIME):
        raise Invalid(f"{name!r} is not a UNIX time: {_show(v)}")


def _text(name: str, v: Any) -> None:
    if not isinstance(v, str) or len(v) > MAX_TEXT:
        raise Invalid(f"{name!r} is not a text of at most {MAX_TEXT} characters: {_show(v)}")


def _flag(name: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise Invalid(f"{name!r} is not true or false: {_show(v)}")


def _signed(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not -(2**31) <= v < 2**31:
        raise Invalid(f"{name!r} is not an exit code: {_show(v)}")


def _number(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or abs(v) > 1e9:
        raise Invalid(f"{name!r} is not a number: {_show(v)}")


def _metrics(name: str, v: Any) -> None:
    if not isinstance(v, dict):
        raise Invalid(f"{name!r} is not an object of named numbers: {_show(v)}")
    if len(v) > MAX_METRICS_PER_EVENT:
        raise Invalid(f"{name!r} has {len(v)} entries, more than {MAX_METRICS_PER_EVENT}")
    for key, value in v.items():
        if len(key) > 200:
            raise Invalid(f"{name!r} has a name of {len(key)} characters")
        if value is None or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # json.loads reads NaN and Infinity; the writer writes them as text
                raise Invalid(f"{name!r}[{key!r}] is not finite")
            continue
        if value in ("nan", "inf", "-inf"):
            continue
        raise Invalid(f"{name!r}[{key!r}] is not a number: {_show(value)}")


def _media(name: str, v: Any) -> None:
    if not isinstance(v, str) or not MEDIA_PATH.match(v):
        raise Invalid(f"{name!r} is not an image path media/NAME.png: {_show(v)}")


def _show(v: Any) -> str:
    text = repr(v) if not isinstance(v, (dict, list)) else type(v).__name__
    return text if len(text) <= 60 else text[:57] + "..."


_TEXT_FIELDS: tuple[str, ...] = ("status", "reason", "source", "action", "store", "checkpoint", "tag", "host")
_TEXT_FIELDS += ("cloud", "instance_id", "instance_type", "zone", "region", "market", "spotsafe", "torch", "python")

#: Every field the writer writes, and what it must be (null is always allowed but for ``time``).
FIELDS: Mapping[str, Callable[[str, Any], None]] = {
    "step": _int,
    "epoch": _int,
    "batch": _int,
    "rank": _int,
    "world_size": lambda n, v: _int(n, v, lo=1),
    "pid": _int,
    "bytes": _int,
    "code": _signed,
    "time": _time,
    "started": _time,
    "process_started": _time,
    "detected_at": _time,
    "deadline": _time,
    "stall_s": _seconds,
    "persist_s": _seconds,
    "seconds": _seconds,
    "left": _number,
    "first": _flag,
    "durable": _flag,
    "flushed": _flag,
    "metrics": _metrics,
    "path": _media,
    **dict.fromkeys(_TEXT_FIELDS, _text),
}

#: What each kind of event must carry (besides ``kind`` and ``time``).
REQUIRED: Mapping[str, tuple[str, ...]] = {
    "step": ("step",),
    "progress": ("step",),
    "checkpoint": ("step",),
    "restore": ("step",),
    "notice": ("step",),
    "durable": ("step",),
    "rebalance": ("step",),
    "image": ("path",),
    "exit": ("status",),
}


def check_event(event: Any) -> dict[str, Any]:
    """``event`` when it is an event the report can use; :class:`Invalid` saying why not.

    Unknown fields are kept unchecked only when they are flat (text, numbers, true/false, null):
    a later spotsafe may add some; nested values of unknown meaning are not carried.
    """
    if not isinstance(event, dict):
        raise Invalid(f"not an object: {_show(event)}")
    kind = event.get("kind")
    if not isinstance(kind, str) or not 0 < len(kind) <= 64:
        raise Invalid(f"'kind' is not a short text: {_show(kind)}")
    if "time" not in event or event["time"] is None:
        raise Invalid("'time' is missing")
    for name in REQUIRED.get(kind, ()):
        if event.get(name) is None:
            raise Invalid(f"{name!r} is missing")
    for name, value in event.items():
        if not isinstance(name, str) or len(name) > 64:
            raise Invalid(f"a field name is not a short text: {_show(name)}")
        check = FIELDS.get(name)
        if value is None and name != "time":
            continue
        if check is not None:
            check(name, value)
        elif name != "kind" and not isinstance(value, (str, int, float, bool)):
            raise Invalid(f"{name!r} is not a plain value: {_show(value)}")
        elif isinstance(value, str) and len(value) > MAX_TEXT:
            raise Invalid(f"{name!r} is longer than {MAX_TEXT} characters")
    return event


def read_media(store: Store, path: str) -> tuple[bytes | None, str | None]:
    """(the PNG at ``path``, None) or (None, why it was not read): never raises on the store's content."""
    if not MEDIA_PATH.match(path):
        return None, f"{_show(path)}: not an image path media/NAME.png; not read"
    try:
        size = store.file_size(path)
        if size is None:
            return None, f"{path}: not there, or not a regular file inside the store"
        if size > MAX_MEDIA_BYTES:
            return None, f"{path}: {size} bytes, more than an image may hold ({MAX_MEDIA_BYTES}); not read"
        data = bytes(store.read_file(path))
    except CheckpointNotFound:
        return None, f"{path}: not there"
    except (SpotsafeError, OSError, ValueError) as e:
        return None, f"{path}: {e}"
    if len(data) > MAX_MEDIA_BYTES:
        return None, f"{path}: {len(data)} bytes, more than an image may hold ({MAX_MEDIA_BYTES}); not read"
    if not data.startswith(_PNG):
        return None, f"{path}: not a PNG; not shown"
    return data, None
