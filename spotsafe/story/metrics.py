"""The run's story as Prometheus metrics: what ``spotsafe report STORE --serve`` answers on ``/metrics``.

Built at scrape time from the same facts as the page (:mod:`spotsafe.story.facts`) and the
store's newest checkpoint (:class:`~spotsafe.checkpoint.catalog.Catalog`), written in the
Prometheus text format by ``prometheus_client`` (``spotsafe[report]``). Every name is in
:data:`METRICS`; ``docs/grafana-dashboard.json`` uses only these.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from spotsafe.errors import MissingDependency, SpotsafeError
from spotsafe.storage.base import Store

__all__ = ["BUCKETS", "METRICS", "metrics_text", "require_prometheus"]

#: Histogram buckets (seconds) of the checkpoint stall and persist times.
BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)

#: Every metric family ``/metrics`` serves: name → (type, help).
METRICS: Mapping[str, tuple[str, str]] = {
    "spotsafe_launches": ("counter", "Processes that built a Run on this store"),
    "spotsafe_interruptions": ("counter", "Launches that ended without completing and were followed by another"),
    "spotsafe_steps_redone": ("counter", "Steps trained twice (lost to interruptions and trained again)"),
    "spotsafe_seconds_lost": ("counter", "Seconds lost to interruptions: redoing steps plus idle between launches"),
    "spotsafe_seconds_redone": ("counter", "Seconds spent training steps a second time"),
    "spotsafe_seconds_idle": ("counter", "Seconds between a launch's exit and the next launch's first step"),
    "spotsafe_steps": ("gauge", "The furthest step the run reached"),
    "spotsafe_complete": ("gauge", "1 when the run is marked complete"),
    "spotsafe_checkpoint_stall_seconds": ("histogram", "Seconds the training loop was blocked per checkpoint"),
    "spotsafe_checkpoint_persist_seconds": ("histogram", "Seconds a checkpoint took to persist in the background"),
    "spotsafe_newest_checkpoint_step": ("gauge", "Step of the newest committed checkpoint"),
    "spotsafe_newest_checkpoint_age_seconds": ("gauge", "Seconds since the newest committed checkpoint was written"),
    "spotsafe_billed_hours": ("gauge", "Instance-hours billed so far (process start to last event, every launch)"),
    "spotsafe_cost_usd": ("gauge", "Spot cost so far in USD (where prices were given)"),
    "spotsafe_report_problems": ("gauge", "Objects or events of the store the report could not use"),
}


def require_prometheus() -> Any:
    """The ``prometheus_client`` module; MissingDependency without it."""
    try:
        import prometheus_client
        import prometheus_client.core
    except ImportError as e:
        raise MissingDependency("/metrics needs prometheus_client: install spotsafe[report]") from e
    return prometheus_client


def _histogram(core: Any, name: str, by_rank: Mapping[int, Sequence[float]]) -> Any:
    family = core.HistogramMetricFamily(name, METRICS[name][1], labels=["rank"], unit="")
    for rank, values in sorted(by_rank.items()):
        counts = [sum(1 for v in values if v <= b) for b in BUCKETS]
        buckets = [(repr(b), c) for b, c in zip(BUCKETS, counts, strict=True)] + [("+Inf", len(values))]
        family.add_metric([str(rank)], buckets, sum_value=float(sum(values)))
    return family


def _timings(events: Iterable[Mapping[str, Any]], field: str) -> dict[int, list[float]]:
    """Each rank's ``stall_s`` or ``persist_s`` of every checkpoint (rank 0: events without a rank)."""
    out: dict[int, list[float]] = {}
    for e in events:
        if e.get("kind") == "checkpoint" and isinstance(e.get(field), (int, float)):
            out.setdefault(int(e.get("rank") or 0), []).append(float(e[field]))
    return out or {0: []}


def _families(store: Store, facts: Mapping[str, Any], events: Sequence[Mapping[str, Any]]) -> list[Any]:
    core = require_prometheus().core

    def counter(name: str, value: float) -> Any:
        return core.CounterMetricFamily(name, METRICS[name][1], value=float(value))

    def gauge(name: str, value: float) -> Any:
        return core.GaugeMetricFamily(name, METRICS[name][1], value=float(value))

    from spotsafe.checkpoint.catalog import Catalog  # torch comes with it: only on a scrape, not for a page

    problems = len(facts["problems"])
    try:
        newest = Catalog(store).latest()
    except (SpotsafeError, OSError):
        newest, problems = None, problems + 1
    cost = facts["cost"]
    families = [
        counter("spotsafe_launches", len(facts["launches"])),
        counter("spotsafe_interruptions", len(facts["interruptions"])),
        counter("spotsafe_steps_redone", facts["steps_lost"]),
        counter("spotsafe_seconds_lost", facts["seconds_lost"] or 0.0),
        counter("spotsafe_seconds_redone", facts["seconds_redone"] or 0.0),
        counter("spotsafe_seconds_idle", facts["seconds_idle"] or 0.0),
        gauge("spotsafe_steps", facts["steps"]),
        gauge("spotsafe_complete", 1.0 if facts["complete"] else 0.0),
        _histogram(core, "spotsafe_checkpoint_stall_seconds", _timings(events, "stall_s")),
        _histogram(core, "spotsafe_checkpoint_persist_seconds", _timings(events, "persist_s")),
        gauge("spotsafe_billed_hours", cost["billed_hours"] or 0.0),
        gauge("spotsafe_report_problems", problems),
    ]
    if cost.get("spot_cost") is not None:
        families.append(gauge("spotsafe_cost_usd", cost["spot_cost"]))
    if newest is not None:
        families.append(gauge("spotsafe_newest_checkpoint_step", newest.step))
        families.append(
            gauge("spotsafe_newest_checkpoint_age_seconds", max(0.0, time.time() - newest.time.timestamp()))
        )
    return families


def metrics_text(store: Store, facts: Mapping[str, Any], events: Sequence[Mapping[str, Any]]) -> bytes:
    """The Prometheus text exposition of the run's metrics (:data:`METRICS`), through ``prometheus_client``."""
    client = require_prometheus()
    families = _families(store, facts, events)

    class Collector:
        def collect(self) -> Iterable[Any]:
            return iter(families)

    registry = client.CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    return bytes(client.generate_latest(registry))
