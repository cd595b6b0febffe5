"""A notice that this instance is going away, and the :class:`Source` every cloud's notices come from."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal, cast, get_args

from spotsafe.cloud.times import parse_iso, utcnow

__all__ = ["ACTIONS", "NOTICE_FORMAT_VERSION", "Action", "Notice", "Source"]

Action = Literal["terminate", "stop", "hibernate", "rebalance"]
ACTIONS: tuple[str, ...] = get_args(Action)

#: Version of :meth:`Notice.to_dict`'s layout; :meth:`Notice.from_dict` refuses others.
NOTICE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Notice:
    """This instance is going away (or, for ``rebalance``, is at elevated risk of it).

    ``deadline`` is when the platform says it will act (for ``rebalance``, which has
    none, the shortest interruption notice that could follow: detection + 120 s).
    """

    source: str
    action: Action
    deadline: datetime
    detected_at: datetime
    payload: Any = None
    version: int = field(default=NOTICE_FORMAT_VERSION, compare=False)

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"Notice action must be one of {ACTIONS}, not {self.action!r}")
        for name in ("deadline", "detected_at"):
            value = getattr(self, name)
            if not isinstance(value, datetime) or value.tzinfo is None:
                raise ValueError(f"Notice.{name} must be a timezone-aware datetime, not {value!r}")
        if self.version != NOTICE_FORMAT_VERSION:
            raise ValueError(f"Notice format version {self.version} is not {NOTICE_FORMAT_VERSION}")

    @property
    def is_final(self) -> bool:
        """True unless this is only a rebalance recommendation (checkpoint, keep going)."""
        return self.action != "rebalance"

    def time_left(self, now: datetime | None = None) -> float:
        """Seconds from ``now`` to the deadline, never below 0."""
        now = now or utcnow()
        return max(0.0, (self.deadline - now).total_seconds())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (times as ISO 8601); the payload must be JSON-serializable."""
        data = asdict(self)
        data["deadline"] = self.deadline.isoformat()
        data["detected_at"] = self.detected_at.isoformat()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Notice:
        """The inverse of :meth:`to_dict`; an unknown version or field raises ValueError."""
        version = data.get("version")
        if version != NOTICE_FORMAT_VERSION:
            raise ValueError(f"unknown Notice format version {version!r} (this spotsafe reads {NOTICE_FORMAT_VERSION})")
        known = {"source", "action", "deadline", "detected_at", "payload", "version"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown Notice fields {sorted(unknown)}")
        return cls(
            source=str(data["source"]),
            action=cast(Action, data["action"]),
            deadline=parse_iso(str(data["deadline"])),
            detected_at=parse_iso(str(data["detected_at"])),
            payload=data.get("payload"),
        )


class Source:
    """One place a notice can come from. Subclasses poll; :meth:`poll` may raise on
    transient failures (the watcher logs, backs off and retries) and returns a Notice
    only when the endpoint says the instance is going away."""

    name: str = "?"
    #: True when :meth:`poll` itself waits (a hanging GET) so no sleep is needed between polls.
    blocking: bool = False

    def probe(self, timeout: float) -> bool:
        """Does this source exist here? Never raises; bounded by about ``timeout``."""
        raise NotImplementedError

    def poll(self, wait: float) -> Notice | None:
        """One look; a blocking source may wait up to ``wait`` seconds for a change."""
        raise NotImplementedError

    def next_delay(self, elapsed: float, interval: float) -> float:
        """Seconds to sleep before the next poll, given how long the last one took."""
        return interval

    def acknowledge(self, notice: Notice) -> None:
        """Tell the platform the instance is ready to go (no-op unless it supports it)."""

    def close(self) -> None:
        """Release connections."""
