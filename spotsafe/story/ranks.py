"""Every rank's view of a multi-rank run: its notice, its checkpoint stall and persist.

Rank 0 tells the run's story; every other rank records, in objects of its own
(``<launch>-rNNNN-<seq>.json``, :data:`spotsafe.story.events.RANK_KINDS`), when it saw
the notice and what each checkpoint cost it. :func:`split_ranks` keeps those events
out of the launch facts, and :func:`rank_facts` says per rank what differs. A rank's
event belongs to the launch of rank 0 that had started by then (ranks of one launch
start together; launches follow each other).
"""

from __future__ import annotations

import bisect
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from spotsafe.story.formats import rounded

__all__ = ["rank_facts", "split_ranks"]

Event = Mapping[str, Any]


def split_ranks(events: Sequence[Event]) -> tuple[list[Event], list[Event]]:
    """(rank 0's events, every other rank's events)."""
    main: list[Event] = []
    others: list[Event] = []
    for e in events:
        (others if e.get("rank") else main).append(e)
    return main, others


def _summary(values: Sequence[float]) -> dict[str, Any]:
    if not values:
        return {"count": 0, "median": None, "p95": None, "max": None}
    ordered = sorted(values)
    return {
        "count": len(ordered),
        "median": rounded(statistics.median(ordered), 6),
        "p95": rounded(ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))], 6),
        "max": rounded(ordered[-1], 6),
    }


def rank_facts(
    main: Sequence[Event], others: Sequence[Event], launches: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """One entry per rank that recorded (rank 0 from the main story), or [] when only rank 0 did."""
    if not others:
        return []
    starts = [float(launch["started"] or 0.0) for launch in launches]

    def launch_of(e: Event) -> int:
        return max(0, bisect.bisect_right(starts, float(e["time"])) - 1)

    by_rank: dict[int, list[Event]] = {0: [e for e in main if e.get("kind") in ("notice", "durable", "checkpoint")]}
    for e in others:
        by_rank.setdefault(int(e["rank"]), []).append(e)
    out = []
    for rank, evs in sorted(by_rank.items()):
        ckpts = [e for e in evs if e.get("kind") == "checkpoint"]
        notices = [
            {
                "launch": launch_of(e),
                "step": e.get("step"),
                "detected_at": rounded(e.get("detected_at") or e.get("time")),
                "source": e.get("source"),
            }
            for e in evs
            if e.get("kind") == "notice"
        ]
        out.append(
            {
                "rank": rank,
                "checkpoints": len(ckpts),
                "stall_s": _summary([float(c["stall_s"]) for c in ckpts if c.get("stall_s") is not None]),
                "persist_s": _summary([float(c["persist_s"]) for c in ckpts if c.get("persist_s") is not None]),
                "notices": notices,
            }
        )
    return out
