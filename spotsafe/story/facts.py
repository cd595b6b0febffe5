"""The run's facts, told from its store alone: what ``spotsafe report --json`` prints.

:func:`build_facts` turns the events every launch kept under ``events/``
(:mod:`spotsafe.story.events`) and the completion marker into launches,
interruptions, redone steps, checkpoint timings and cost. :class:`StoreReport`
reads them from a store, and the images under ``media/``, without taking a
writer's lease or writing anything.
"""

from __future__ import annotations

import statistics
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from spotsafe.checkpoint.completion import read_completion
from spotsafe.storage.base import Store
from spotsafe.story.cost import Prices, cost_of, look_up
from spotsafe.story.events import EventReader
from spotsafe.story.formats import rounded
from spotsafe.story.ranks import rank_facts, split_ranks
from spotsafe.story.validate import read_media

__all__ = ["REPORT_FORMAT", "REPORT_FORMAT_VERSION", "StoreReport", "build_facts"]

REPORT_FORMAT = "spotsafe-report"
REPORT_FORMAT_VERSION = 1

_STEP_KINDS = ("step", "progress", "checkpoint", "notice", "durable", "exit", "restore", "rebalance", "image")
#: The kinds whose (step, time) say when a launch reached a step.
_TIMED_KINDS = ("step", "progress", "notice", "durable", "exit")

Event = Mapping[str, Any]


def _stats(values: Sequence[float]) -> dict[str, Any]:
    if not values:
        return {"count": 0, "median": None, "p95": None, "max": None, "mean": None, "total": None}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {
        "count": len(values),
        "median": rounded(statistics.median(ordered), 6),
        "p95": rounded(p95, 6),
        "max": rounded(ordered[-1], 6),
        "mean": rounded(statistics.fmean(ordered), 6),
        "total": rounded(sum(ordered), 6),
    }


def _time_at_step(points: Sequence[tuple[int, float]], step: int) -> float | None:
    """When a launch reached ``step``, interpolated between its recorded (step, time) points."""
    if not points:
        return None
    before = [p for p in points if p[0] <= step]
    after = [p for p in points if p[0] >= step]
    if not after:
        return None
    hi = after[0]
    if not before:
        return hi[1]
    lo = before[-1]
    if hi[0] == lo[0]:
        return lo[1]
    return lo[1] + (hi[1] - lo[1]) * (step - lo[0]) / (hi[0] - lo[0])


def _events_by_launch(events: Sequence[Event]) -> dict[str, list[Event]]:
    """Each launch's events, the launches in the order they started."""
    by_launch: dict[str, list[Event]] = {}
    for e in events:
        by_launch.setdefault(str(e.get("launch")), []).append(e)

    def started(evs: Sequence[Event]) -> float:
        first = next((e for e in evs if e.get("kind") == "launch"), evs[0])
        return float(first.get("time") or 0.0)

    order = sorted(by_launch, key=lambda k: (started(by_launch[k]), k))
    return {lid: by_launch[lid] for lid in order}


def _by_kind(evs: Sequence[Event]) -> dict[str, list[Event]]:
    kinds: dict[str, list[Event]] = {}
    for e in evs:
        kinds.setdefault(str(e.get("kind")), []).append(e)
    return kinds


def _training_times(
    evs: Sequence[Event], kinds: Mapping[str, Sequence[Event]], *, frontier: int, redone: int, t_end: float
) -> tuple[float | None, float, float]:
    """A launch's (first step's time, seconds spent redoing steps, seconds from first to last step)."""
    points = sorted(
        (int(e["step"]), float(e["time"]))
        for e in evs
        if e.get("kind") in _TIMED_KINDS and isinstance(e.get("step"), int)
    )
    first = next((e for e in kinds.get("step", []) if e.get("first")), None)
    t_first = float(first["time"]) if first is not None else None
    redo_until = _time_at_step(points, frontier) if redone else None
    if redone and t_first is not None:
        seconds_redone = (redo_until if redo_until is not None else t_end) - t_first
    else:
        seconds_redone = 0.0
    t_last_step = points[-1][1] if points else None
    training_s = (t_last_step - t_first) if (t_first is not None and t_last_step is not None) else 0.0
    return t_first, seconds_redone, training_s


def _exit_facts(exit_ev: Event | None) -> dict[str, Any] | None:
    if exit_ev is None:
        return None
    return {
        "status": exit_ev.get("status"),
        "code": exit_ev.get("code"),
        "step": exit_ev.get("step"),
        "time": rounded(exit_ev.get("time")),
    }


def _launch_facts(index: int, lid: str, evs: Sequence[Event], *, frontier: int) -> dict[str, Any]:
    """One launch: where it ran, when it was billed, where it resumed and how far it got.

    ``frontier`` is the furthest step any earlier launch reached: steps below it were trained twice.
    """
    kinds = _by_kind(evs)
    launch_ev = (kinds.get("launch") or [{}])[0]
    ident = (kinds.get("instance") or [{}])[0]
    restore = kinds["restore"][0] if kinds.get("restore") else None
    exit_ev = kinds["exit"][-1] if kinds.get("exit") else None
    reached = max(
        (int(e["step"]) for e in evs if e.get("kind") in _STEP_KINDS and isinstance(e.get("step"), int)), default=0
    )
    resumed = int(restore["step"]) if restore is not None and isinstance(restore.get("step"), int) else None
    t_start = float(launch_ev.get("time") or evs[0].get("time") or 0.0)
    t_end = max(float(e.get("time") or 0.0) for e in evs)
    billed_from = launch_ev.get("process_started") or t_start
    redone = max(0, frontier - resumed) if index > 0 and resumed is not None else 0
    t_first, seconds_redone, training_s = _training_times(evs, kinds, frontier=frontier, redone=redone, t_end=t_end)
    return {
        "id": lid,
        "index": index,
        "started": rounded(t_start),
        "process_started": rounded(launch_ev.get("process_started")),
        "billed_from": rounded(billed_from),
        "ended": rounded(t_end),
        "billed_s": rounded(t_end - float(billed_from)),
        "host": ident.get("host"),
        "instance_id": ident.get("instance_id"),
        "instance_type": ident.get("instance_type"),
        "zone": ident.get("zone"),
        "market": ident.get("market"),
        "pid": launch_ev.get("pid"),
        "resumed_step": resumed,
        "restore_s": rounded(restore.get("seconds"), 6) if restore is not None else None,
        "restored_at": rounded(restore.get("time")) if restore is not None else None,
        "first_step_at": rounded(t_first),
        "last_step": reached,
        "exit": _exit_facts(exit_ev),
        "steps_redone": redone,
        "seconds_redone": rounded(max(seconds_redone, 0.0)),
        "training_s": rounded(max(training_s, 0.0)),
        "checkpoints": len(kinds.get("checkpoint", [])),
    }


def _interruption(
    i: int, launch: Mapping[str, Any], nxt: Mapping[str, Any] | None, evs: Sequence[Event]
) -> dict[str, Any]:
    """How launch ``i`` ended (a notice, a kill, a failure) and how the next one took over."""
    status = (launch["exit"] or {}).get("status")
    notice = next((e for e in evs if e.get("kind") == "notice"), None)
    durable = next((e for e in evs if e.get("kind") == "durable"), None)
    kind = "notice" if notice is not None else ("killed" if launch["exit"] is None else str(status))
    exit_at = (launch["exit"] or {}).get("time") or launch["ended"]
    back_at = nxt["first_step_at"] if nxt is not None else None
    return {
        "launch": i,
        "kind": kind,
        "source": notice.get("source") if notice else None,
        "action": notice.get("action") if notice else None,
        "step": launch["last_step"],
        "notice_at": rounded(notice.get("detected_at") or notice.get("time")) if notice else None,
        "deadline": rounded(notice.get("deadline")) if notice else None,
        "durable_at": rounded(durable.get("time")) if durable else None,
        "durable_step": durable.get("step") if durable else None,
        "seconds_to_durable": rounded(durable.get("seconds"), 6) if durable else None,
        "exit_at": rounded(exit_at),
        "next_launch_at": nxt["billed_from"] if nxt else None,
        "restored_at": nxt["restored_at"] if nxt else None,
        "first_step_back_at": back_at,
        "resumed_step": nxt["resumed_step"] if nxt else None,
        "steps_redone": nxt["steps_redone"] if nxt else None,
        "steps_redone_exact": nxt["steps_redone_exact"] if nxt else False,
        "step_exact": launch["last_step_exact"],
        "seconds_idle": rounded(back_at - exit_at) if (back_at is not None and exit_at is not None) else None,
    }


def _bound_killed(launches: Sequence[dict[str, Any]]) -> bool:
    """Mark what a launch killed without a word (``kill -9``, a lost instance) leaves unknown; True when all is exact.

    Its events reach the store every ~10 s, so its last step and its billed time are at least what
    they say, and the steps the next launch redid at least the difference to the step it restored.
    The next launch's restore is proof of progress the events may miss: the checkpoint it restored
    was written by a launch before it, so the killed launch got at least that far. A first launch
    that resumed a checkpoint had a predecessor whose events never reached the store: what it redid
    is unknown.
    """
    exact = True
    for i, launch in enumerate(launches):
        nxt = launches[i + 1] if i + 1 < len(launches) else None
        killed = launch["exit"] is None and nxt is not None
        launch["last_step_exact"] = launch["billed_exact"] = not killed
        launch.setdefault("steps_redone_exact", True)
        if i == 0 and (launch["resumed_step"] or 0) > 0:
            launch["steps_redone_exact"] = exact = False
        if killed and nxt is not None:
            launch["last_step"] = max(launch["last_step"], nxt["resumed_step"] or 0)
            nxt["steps_redone_exact"] = exact = False
    return exact


def _interruptions(
    launches: Sequence[Mapping[str, Any]], by_launch: Mapping[str, Sequence[Event]]
) -> list[dict[str, Any]]:
    """Every launch that ended without completing and was followed by another (or said how it ended)."""
    interruptions: list[dict[str, Any]] = []
    for i, launch in enumerate(launches):
        if (launch["exit"] or {}).get("status") == "complete":
            continue
        nxt = launches[i + 1] if i + 1 < len(launches) else None
        if nxt is None and launch["exit"] is None:
            continue  # the newest launch, still running (or killed with nothing after it yet)
        interruptions.append(_interruption(i, launch, nxt, by_launch[launch["id"]]))
    return interruptions


def _checkpoint_facts(checkpoints: Sequence[Event]) -> dict[str, Any]:
    """How many checkpoints, why, how long they stalled training and took to persist, the last one's size."""
    stalls = [float(c["stall_s"]) for c in checkpoints if isinstance(c.get("stall_s"), (int, float))]
    persists = [float(c["persist_s"]) for c in checkpoints if isinstance(c.get("persist_s"), (int, float))]
    sizes = [int(c["bytes"]) for c in checkpoints if isinstance(c.get("bytes"), int)]
    by_reason: dict[str, int] = {}
    for c in checkpoints:
        by_reason[str(c.get("reason"))] = by_reason.get(str(c.get("reason")), 0) + 1
    return {
        "count": len(checkpoints),
        "by_reason": dict(sorted(by_reason.items())),
        "stall_s": _stats(stalls),
        "persist_s": _stats(persists),
        "bytes_last": sizes[-1] if sizes else None,
    }


def build_facts(
    events: Sequence[Event],
    *,
    completion: Mapping[str, Any] | None = None,
    prices: Prices | None = None,
    problems: Sequence[str] = (),
) -> dict[str, Any]:
    """The run's facts (what ``--json`` prints) from its events and completion marker."""
    events, rank_events = split_ranks(events)  # other ranks' views: `ranks`, not the launches
    by_launch = _events_by_launch(events)
    launches: list[dict[str, Any]] = []
    checkpoints: list[Event] = []
    frontier = 0  # the furthest step any earlier launch reached
    store_url: str | None = None
    for index, (lid, evs) in enumerate(by_launch.items()):
        launch_ev = next((e for e in evs if e.get("kind") == "launch"), {})
        store_url = store_url or launch_ev.get("store")
        launch = _launch_facts(index, lid, evs, frontier=frontier)
        checkpoints.extend(e for e in evs if e.get("kind") == "checkpoint")
        launches.append(launch)
        frontier = max(frontier, launch["last_step"])
    exact = _bound_killed(launches)
    interruptions = _interruptions(launches, by_launch)
    steps = max(
        [frontier] + ([int(completion["step"])] if completion and isinstance(completion.get("step"), int) else [])
    )
    seconds_redone = sum(float(launch["seconds_redone"] or 0.0) for launch in launches)
    seconds_idle = sum(float(i["seconds_idle"] or 0.0) for i in interruptions)
    training_s = sum(float(launch["training_s"] or 0.0) for launch in launches) - seconds_redone
    return {
        "format": REPORT_FORMAT,
        "format_version": REPORT_FORMAT_VERSION,
        "store": store_url,
        "complete": completion is not None,
        "steps": steps,
        "launches": launches,
        "interruptions": interruptions,
        "steps_lost": sum(launch["steps_redone"] for launch in launches),
        # False after a launch that left no exit (a kill -9): steps_lost is then a lower bound
        "steps_lost_exact": exact,
        "seconds_redone": rounded(seconds_redone),
        "seconds_idle": rounded(seconds_idle),
        "seconds_lost": rounded(seconds_redone + seconds_idle),
        "checkpoints": _checkpoint_facts(checkpoints),
        "cost": cost_of(launches, max(training_s, 0.0), prices),
        "problems": list(problems),
        "ranks": rank_facts(events, rank_events, launches),
    }


class StoreReport:
    """Everything the report needs from one store, read (and cached) without any lease."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.reader = EventReader(store)
        self._images: dict[str, bytes] = {}
        #: Images the page wanted but could not show, with why (only those of the current page).
        self.image_problems: dict[str, str] = {}

    def completion(self) -> dict[str, Any] | None:
        return read_completion(self.store)

    def image(self, path: str) -> bytes | None:
        """The PNG at ``path`` under ``media/``, read through the store's safe reads (capped), or None.

        Why one was not read is kept in :attr:`image_problems`.
        """
        if path not in self._images:
            data, why = read_media(self.store, path)
            if data is None:
                self.image_problems[path] = str(why)
                return None
            self.image_problems.pop(path, None)
            self._images[path] = data
        return self._images[path]

    @property
    def images_held(self) -> int:
        """How many images the cache holds now."""
        return len(self._images)

    def keep_images(self, paths: Collection[str]) -> None:
        """Forget every image but ``paths`` (the ones the current page shows): the cache stays bounded."""
        for path in [p for p in self._images if p not in paths]:
            del self._images[path]
        for path in [p for p in self.image_problems if p not in paths]:
            del self.image_problems[path]

    def build(
        self, prices: Prices | None = None, *, lookup_client: Any = None, lookup: bool = False
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        events = self.reader.read()
        problems = [f"events/{name}: {why}" for name, why in sorted(self.reader.problems.items())]
        facts = build_facts(events, completion=self.completion(), prices=prices, problems=problems)
        if lookup:
            prices = prices or Prices()
            found = look_up(prices, facts["launches"], client=lookup_client)
            facts = build_facts(events, completion=self.completion(), prices=prices, problems=problems + found)
        return facts, events
