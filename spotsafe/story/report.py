"""``spotsafe report STORE``: the run's story, told from the store alone.

::

    spotsafe report s3://bucket/runs/gan -o report.html      # one self-contained HTML file
    spotsafe report s3://bucket/runs/gan --json              # the same facts as JSON
    spotsafe report /mnt/spotsafe/gan --serve                # a local page that refreshes itself

It reads the events every launch kept under ``events/`` (:mod:`spotsafe.story.events`),
the completion marker and the images under ``media/``, and never takes a writer's
lease or writes anything (except ``-o`` where asked). The HTML embeds plotly.js and
every image: it opens offline and fetches nothing at view time. The same store, or
a copy of it, gives the same bytes.

While a :class:`spotsafe.Run` trains, :class:`LivePage` writes the report into the
store as ``report.html`` every few minutes (an S3 static website, or ``aws s3 cp``,
shows it).
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import logging
import statistics
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from spotsafe.checkpoint.completion import read_completion
from spotsafe.errors import CheckpointNotFound, MissingDependency, SpotsafeError
from spotsafe.storage.base import Store
from spotsafe.storage.registry import open_store
from spotsafe.story.cost import Prices, cost_of, look_up
from spotsafe.story.events import MEDIA_DIR, EventReader

__all__ = ["LivePage", "build_facts", "main", "render_html", "write_report"]

log = logging.getLogger(__name__)

REPORT_FORMAT = "spotsafe-report"
REPORT_FORMAT_VERSION = 1
#: Where the live page goes in the store.
LIVE_REPORT = "report.html"
#: At most this many images are embedded (evenly spread over the run, the last always in).
MAX_IMAGES = 24
#: At most this many metrics get a curve.
MAX_METRICS = 8

_STEP_KINDS = ("step", "progress", "checkpoint", "notice", "durable", "exit", "restore", "rebalance", "image")


def _r(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(float(x), digits)


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _stats(values: Sequence[float]) -> dict[str, Any]:
    if not values:
        return {"count": 0, "median": None, "p95": None, "max": None, "mean": None, "total": None}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {
        "count": len(values),
        "median": _r(statistics.median(ordered), 6),
        "p95": _r(p95, 6),
        "max": _r(ordered[-1], 6),
        "mean": _r(statistics.fmean(ordered), 6),
        "total": _r(sum(ordered), 6),
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


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if value in ("nan", "inf", "-inf"):
        return float(value)
    return None


def build_facts(
    events: Sequence[Mapping[str, Any]],
    *,
    completion: Mapping[str, Any] | None = None,
    prices: Prices | None = None,
    problems: Sequence[str] = (),
) -> dict[str, Any]:
    """The run's facts (what ``--json`` prints) from its events and completion marker."""
    by_launch: dict[str, list[Mapping[str, Any]]] = {}
    for e in events:
        by_launch.setdefault(str(e.get("launch")), []).append(e)

    def started(evs: Sequence[Mapping[str, Any]]) -> float:
        first = next((e for e in evs if e.get("kind") == "launch"), evs[0])
        return float(first.get("time") or 0.0)

    order = sorted(by_launch, key=lambda k: (started(by_launch[k]), k))
    launches: list[dict[str, Any]] = []
    interruptions: list[dict[str, Any]] = []
    frontier = 0  # the furthest step any earlier launch reached
    store_url: str | None = None
    checkpoints: list[Mapping[str, Any]] = []
    complete = completion is not None
    for index, lid in enumerate(order):
        evs = by_launch[lid]
        kinds: dict[str, list[Mapping[str, Any]]] = {}
        for e in evs:
            kinds.setdefault(str(e.get("kind")), []).append(e)
        launch_ev = (kinds.get("launch") or [{}])[0]
        ident = (kinds.get("instance") or [{}])[0]
        restore = kinds["restore"][0] if kinds.get("restore") else None
        exit_ev = kinds["exit"][-1] if kinds.get("exit") else None
        store_url = store_url or launch_ev.get("store")
        points = sorted(
            (int(e["step"]), float(e["time"]))
            for e in evs
            if e.get("kind") in ("step", "progress", "notice", "durable", "exit") and isinstance(e.get("step"), int)
        )
        reached = max(
            (int(e["step"]) for e in evs if e.get("kind") in _STEP_KINDS and isinstance(e.get("step"), int)), default=0
        )
        resumed = int(restore["step"]) if restore is not None and isinstance(restore.get("step"), int) else None
        first = next((e for e in kinds.get("step", []) if e.get("first")), None)
        t_start = float(launch_ev.get("time") or evs[0].get("time") or 0.0)
        t_end = max(float(e.get("time") or 0.0) for e in evs)
        billed_from = launch_ev.get("process_started") or t_start
        redone = max(0, frontier - resumed) if index > 0 and resumed is not None else 0
        t_first = float(first["time"]) if first is not None else None
        redo_until = _time_at_step(points, frontier) if redone else None
        if redone and t_first is not None:
            seconds_redone = (redo_until if redo_until is not None else t_end) - t_first
        else:
            seconds_redone = 0.0
        t_last_step = points[-1][1] if points else None
        training_s = (t_last_step - t_first) if (t_first is not None and t_last_step is not None) else 0.0
        ckpts = kinds.get("checkpoint", [])
        checkpoints.extend(ckpts)
        status = exit_ev.get("status") if exit_ev is not None else None
        launch = {
            "id": lid,
            "index": index,
            "started": _r(t_start),
            "process_started": _r(launch_ev.get("process_started")),
            "billed_from": _r(billed_from),
            "ended": _r(t_end),
            "billed_s": _r(t_end - float(billed_from)),
            "host": ident.get("host"),
            "instance_id": ident.get("instance_id"),
            "instance_type": ident.get("instance_type"),
            "zone": ident.get("zone"),
            "market": ident.get("market"),
            "pid": launch_ev.get("pid"),
            "resumed_step": resumed,
            "restore_s": _r(restore.get("seconds"), 6) if restore is not None else None,
            "restored_at": _r(restore.get("time")) if restore is not None else None,
            "first_step_at": _r(t_first),
            "last_step": reached,
            "exit": None
            if exit_ev is None
            else {
                "status": status,
                "code": exit_ev.get("code"),
                "step": exit_ev.get("step"),
                "time": _r(exit_ev.get("time")),
            },
            "steps_redone": redone,
            "seconds_redone": _r(max(seconds_redone, 0.0)),
            "training_s": _r(max(training_s, 0.0)),
            "checkpoints": len(ckpts),
        }
        launches.append(launch)
        frontier = max(frontier, reached)

    # interruptions: every launch that ended without completing and was followed by another
    for i, launch in enumerate(launches):
        status = (launch["exit"] or {}).get("status")
        if status == "complete":
            continue
        nxt = launches[i + 1] if i + 1 < len(launches) else None
        if nxt is None and launch["exit"] is None:
            continue  # the newest launch, still running (or killed with nothing after it yet)
        evs = by_launch[launch["id"]]
        notice = next((e for e in evs if e.get("kind") == "notice"), None)
        durable = next((e for e in evs if e.get("kind") == "durable"), None)
        kind = "notice" if notice is not None else ("killed" if launch["exit"] is None else str(status))
        exit_at = (launch["exit"] or {}).get("time") or launch["ended"]
        back_at = nxt["first_step_at"] if nxt is not None else None
        interruptions.append(
            {
                "launch": i,
                "kind": kind,
                "source": notice.get("source") if notice else None,
                "action": notice.get("action") if notice else None,
                "step": launch["last_step"],
                "notice_at": _r(notice.get("detected_at") or notice.get("time")) if notice else None,
                "deadline": _r(notice.get("deadline")) if notice else None,
                "durable_at": _r(durable.get("time")) if durable else None,
                "durable_step": durable.get("step") if durable else None,
                "seconds_to_durable": _r(durable.get("seconds"), 6) if durable else None,
                "exit_at": _r(exit_at),
                "next_launch_at": nxt["billed_from"] if nxt else None,
                "restored_at": nxt["restored_at"] if nxt else None,
                "first_step_back_at": back_at,
                "resumed_step": nxt["resumed_step"] if nxt else None,
                "steps_redone": nxt["steps_redone"] if nxt else None,
                "seconds_idle": _r(back_at - exit_at) if (back_at is not None and exit_at is not None) else None,
            }
        )

    stalls = [float(c["stall_s"]) for c in checkpoints if isinstance(c.get("stall_s"), (int, float))]
    persists = [float(c["persist_s"]) for c in checkpoints if isinstance(c.get("persist_s"), (int, float))]
    sizes = [int(c["bytes"]) for c in checkpoints if isinstance(c.get("bytes"), int)]
    by_reason: dict[str, int] = {}
    for c in checkpoints:
        by_reason[str(c.get("reason"))] = by_reason.get(str(c.get("reason")), 0) + 1
    steps = max(
        [frontier] + ([int(completion["step"])] if completion and isinstance(completion.get("step"), int) else [])
    )
    steps_lost = sum(launch["steps_redone"] for launch in launches)
    seconds_redone = sum(float(launch["seconds_redone"] or 0.0) for launch in launches)
    seconds_idle = sum(float(i["seconds_idle"] or 0.0) for i in interruptions)
    training_s = sum(float(launch["training_s"] or 0.0) for launch in launches) - seconds_redone
    return {
        "format": REPORT_FORMAT,
        "format_version": REPORT_FORMAT_VERSION,
        "store": store_url,
        "complete": complete,
        "steps": steps,
        "launches": launches,
        "interruptions": interruptions,
        "steps_lost": steps_lost,
        "seconds_redone": _r(seconds_redone),
        "seconds_idle": _r(seconds_idle),
        "seconds_lost": _r(seconds_redone + seconds_idle),
        "checkpoints": {
            "count": len(checkpoints),
            "by_reason": dict(sorted(by_reason.items())),
            "stall_s": _stats(stalls),
            "persist_s": _stats(persists),
            "bytes_last": sizes[-1] if sizes else None,
        },
        "cost": cost_of(launches, max(training_s, 0.0), prices),
        "problems": list(problems),
    }


# -- reading a store ---------------------------------------------------------------


class StoreReport:
    """Everything the report needs from one store, read (and cached) without any lease."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.reader = EventReader(store)
        self._images: dict[str, bytes] = {}

    def completion(self) -> dict[str, Any] | None:
        return read_completion(self.store)

    def image(self, path: str) -> bytes | None:
        if path not in self._images:
            try:
                self._images[path] = bytes(self.store.read_file(path))
            except CheckpointNotFound:
                return None
        return self._images[path]

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


# -- HTML --------------------------------------------------------------------------


def _plotly() -> Any:
    try:
        import plotly
        import plotly.graph_objects
    except ImportError as e:
        raise MissingDependency("the HTML report needs plotly: install spotsafe[report]") from e
    return plotly


_PALETTE = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
]


def _metric_figure(facts: Mapping[str, Any], events: Sequence[Mapping[str, Any]]) -> Any:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names: list[str] = []
    for e in events:
        if e.get("kind") == "step":
            for k, v in (e.get("metrics") or {}).items():
                if k not in names and _number(v) is not None:
                    names.append(k)
    names = names[:MAX_METRICS]
    rows = max(len(names), 1)
    fig = make_subplots(
        rows=rows, cols=1, shared_xaxes=True, vertical_spacing=0.06, subplot_titles=names or ["(no metrics recorded)"]
    )
    index = {launch["id"]: launch["index"] for launch in facts["launches"]}
    for r, name in enumerate(names, start=1):
        for launch in facts["launches"]:
            xs: list[int] = []
            ys: list[float] = []
            for e in events:
                if e.get("launch") == launch["id"] and e.get("kind") == "step":
                    v = _number((e.get("metrics") or {}).get(name))
                    if v is not None:
                        xs.append(int(e["step"]))
                        ys.append(v)
            if not xs:
                continue
            i = index[launch["id"]]
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=ys,
                    mode="lines",
                    name=f"launch {i + 1}",
                    legendgroup=f"launch {i + 1}",
                    showlegend=r == 1,
                    line={"color": _PALETTE[i % len(_PALETTE)], "width": 1.5},
                ),
                row=r,
                col=1,
            )
    for launch in facts["launches"][1:]:
        start = launch["resumed_step"]
        if start is None:
            continue
        for r in range(1, rows + 1):
            fig.add_vline(x=start, line={"color": "#555", "dash": "dot", "width": 1}, row=r, col=1)
        if launch["steps_redone"]:
            for r in range(1, rows + 1):
                fig.add_vrect(
                    x0=start,
                    x1=start + launch["steps_redone"],
                    fillcolor="#d62728",
                    opacity=0.15,
                    line_width=0,
                    row=r,
                    col=1,
                )
    fig.update_xaxes(title_text="step", row=rows, col=1)
    fig.update_layout(
        height=220 * rows + 80, margin={"l": 60, "r": 20, "t": 40, "b": 40}, legend={"orientation": "h", "y": 1.05}
    )
    return fig


def _timeline_figure(facts: Mapping[str, Any]) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure()
    for launch in facts["launches"]:
        i = launch["index"]
        label = f"launch {i + 1}"
        start, end = launch["billed_from"], launch["ended"]
        fig.add_trace(
            go.Scatter(
                x=[_iso(start), _iso(end)],
                y=[label, label],
                mode="lines",
                line={"color": _PALETTE[i % len(_PALETTE)], "width": 14},
                name=label,
                showlegend=False,
                hovertemplate=f"{label}<br>%{{x}}<extra></extra>",
            )
        )
        marks = [
            ("restored", launch["restored_at"], "triangle-right"),
            ("first step", launch["first_step_at"], "circle"),
        ]
        for interruption in facts["interruptions"]:
            if interruption["launch"] == i:
                marks += [
                    ("notice", interruption["notice_at"], "x"),
                    ("durable", interruption["durable_at"], "diamond"),
                    ("exit", interruption["exit_at"], "square"),
                ]
        if launch["exit"] is not None and launch["exit"]["status"] == "complete":
            marks.append(("complete", launch["exit"]["time"], "star"))
        for what, t, symbol in marks:
            if t is None:
                continue
            fig.add_trace(
                go.Scatter(
                    x=[_iso(t)],
                    y=[label],
                    mode="markers",
                    marker={"symbol": symbol, "size": 11, "color": "#222"},
                    name=what,
                    showlegend=False,
                    hovertemplate=f"{label}: {what}<br>%{{x}}<extra></extra>",
                )
            )
    fig.update_layout(
        height=120 + 40 * max(len(facts["launches"]), 1),
        margin={"l": 80, "r": 20, "t": 20, "b": 40},
        yaxis={"autorange": "reversed"},
        xaxis={"type": "date"},
    )
    return fig


def _checkpoint_figure(events: Sequence[Mapping[str, Any]]) -> Any:
    import plotly.graph_objects as go

    ckpts = [e for e in events if e.get("kind") == "checkpoint"]
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=[int(c["step"]) for c in ckpts],
            y=[float(c.get("stall_s") or 0.0) * 1000 for c in ckpts],
            mode="markers",
            name="stall (training blocked), ms",
        )
    )
    done = [c for c in ckpts if isinstance(c.get("persist_s"), (int, float))]
    fig.add_trace(
        go.Scatter(
            x=[int(c["step"]) for c in done],
            y=[float(c["persist_s"]) * 1000 for c in done],
            mode="markers",
            name="persist (background), ms",
        )
    )
    fig.update_layout(
        height=300,
        margin={"l": 60, "r": 20, "t": 20, "b": 40},
        xaxis={"title": {"text": "step"}},
        yaxis={"title": {"text": "ms"}, "type": "log"},
        legend={"orientation": "h", "y": 1.1},
    )
    return fig


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _fmt_usd(x: float | None) -> str:
    return "–" if x is None else f"${x:,.2f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape('–' if c is None else str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _exit_label(launch: Mapping[str, Any], *, last: bool) -> str:
    exit_ = launch["exit"]
    if exit_ is None:  # nothing said goodbye: a kill -9, a lost instance, or still training
        return "running (or gone)" if last else "vanished (no exit recorded)"
    return str(exit_["status"]) + ("" if exit_["code"] is None else f" ({exit_['code']})")


def _between(a: float | None, b: float | None) -> str:
    return "–" if a is None or b is None else _fmt_s(b - a)


def _pick_images(images: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    if len(images) <= MAX_IMAGES:
        return list(images)
    n = len(images)
    picked = sorted({round(i * (n - 1) / (MAX_IMAGES - 1)) for i in range(MAX_IMAGES)})
    return [images[i] for i in picked]


_CSS = """
body{font-family:-apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#666;font-size:13px}.cards{display:flex;flex-wrap:wrap;gap:10px;margin:16px 0}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px 14px;min-width:120px}
.card b{display:block;font-size:20px}.card span{color:#666;font-size:12px}
table{border-collapse:collapse;font-size:13px;background:#fff}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left}
th{background:#f0f0f0}.imgs{display:flex;flex-wrap:wrap;gap:12px}.imgs figure{margin:0;background:#fff;border:1px solid #ddd;padding:6px}
.imgs img{image-rendering:pixelated;width:192px;height:auto;display:block}.imgs figcaption{font-size:12px;color:#555}
.ok{color:#2ca02c}.bad{color:#d62728}
"""


def render_html(
    facts: Mapping[str, Any],
    events: Sequence[Mapping[str, Any]],
    image_data: Mapping[str, bytes] | None = None,
    *,
    refresh_seconds: float | None = None,
) -> str:
    """The report as one self-contained HTML page (plotly.js and the images inlined)."""
    plotly = _plotly()
    from plotly.offline import get_plotlyjs

    config = {"displaylogo": False, "responsive": True}

    def fig_html(fig: Any, div_id: str) -> str:
        return str(fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config=config))

    cost = facts["cost"]
    status = '<b class="ok">complete</b>' if facts["complete"] else '<b class="bad">not complete</b>'
    cards = [
        (status, "status", True),
        (str(facts["steps"]), "steps", False),
        (str(len(facts["launches"])), "launches", False),
        (str(len(facts["interruptions"])), "interruptions", False),
        (str(facts["steps_lost"]), "steps redone", False),
        (_fmt_s(facts["seconds_lost"]), "lost (redone + idle)", False),
        (f"{cost['billed_hours']:.2f} h", "billed instance-hours", False),
        (_fmt_usd(cost["spot_cost"]), "spot cost", False),
        (_fmt_usd(cost["on_demand_cost_same_hours"]), "on-demand, same hours", False),
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
    ]
    if refresh_seconds:
        parts.append(f'<meta http-equiv="refresh" content="{max(1, round(refresh_seconds))}">')
    parts += [
        "<title>spotsafe report</title>",
        f"<style>{_CSS}</style>",
        f'<script type="text/javascript">{get_plotlyjs()}</script>',
        "</head><body>",
        "<h1>spotsafe run report</h1>",
        f'<div class="sub">store {html.escape(str(facts["store"]))} · plotly {html.escape(plotly.__version__)} · '
        f"last event {html.escape(str(_iso(max((float(e.get('time') or 0) for e in events), default=None)) or '–'))}</div>",
        '<div class="cards">'
        + "".join(
            f'<div class="card">{value if raw else "<b>" + html.escape(value) + "</b>"}<span>{html.escape(label)}</span></div>'
            for value, label, raw in cards
        )
        + "</div>",
        "<h2>Metrics across launches</h2>",
        '<div class="sub">Each launch in its own colour; dotted lines: where a launch resumed; '
        "red: steps trained twice (the previous launch had gone past its last checkpoint).</div>",
        fig_html(_metric_figure(facts, events), "spotsafe-metrics"),
        "<h2>Launches and interruptions</h2>",
        '<div class="sub">Markers: ✕ notice, ◆ checkpoint durable, ■ exit, ▶ restored, ● first step, ★ complete.</div>',
        fig_html(_timeline_figure(facts), "spotsafe-timeline"),
    ]
    rows = []
    for i in facts["interruptions"]:
        rows.append(
            [
                i["launch"] + 1,
                i["kind"] + (f" ({i['source']} {i['action']})" if i["source"] else ""),
                i["step"],
                _between(i["notice_at"], i["durable_at"]),
                _between(i["durable_at"], i["exit_at"]),
                _between(i["exit_at"], i["next_launch_at"]),
                _between(i["next_launch_at"], i["first_step_back_at"]),
                i["resumed_step"],
                i["steps_redone"],
                _fmt_s(i["seconds_idle"]),
                "–" if i["deadline"] is None or i["durable_at"] is None else _fmt_s(i["deadline"] - i["durable_at"]),
            ]
        )
    parts.append(
        _table(
            [
                "launch",
                "interruption",
                "at step",
                "notice → durable",
                "durable → exit",
                "exit → next launch",
                "next launch → first step",
                "resumed at",
                "steps redone",
                "GPU idle",
                "deadline to spare",
            ],
            rows,
        )
        if rows
        else "<p>No interruptions.</p>"
    )
    parts.append("<h2>Launches</h2>")
    parts.append(
        _table(
            [
                "#",
                "instance",
                "type",
                "zone",
                "market",
                "host",
                "resumed at",
                "restore",
                "last step",
                "exit",
                "billed",
                "checkpoints",
            ],
            [
                [
                    launch["index"] + 1,
                    launch["instance_id"],
                    launch["instance_type"],
                    launch["zone"],
                    launch["market"],
                    launch["host"],
                    launch["resumed_step"],
                    _fmt_s(launch["restore_s"]),
                    launch["last_step"],
                    _exit_label(launch, last=launch["index"] == len(facts["launches"]) - 1),
                    _fmt_s(launch["billed_s"]),
                    launch["checkpoints"],
                ]
                for launch in facts["launches"]
            ],
        )
    )
    ck = facts["checkpoints"]
    parts.append("<h2>Checkpoints</h2>")
    parts.append(
        _table(
            ["", "count", "median", "p95", "max", "total"],
            [
                [
                    "stall (loop blocked)",
                    ck["stall_s"]["count"],
                    *(_fmt_s(ck["stall_s"][k]) for k in ("median", "p95", "max", "total")),
                ],
                [
                    "persist (background)",
                    ck["persist_s"]["count"],
                    *(_fmt_s(ck["persist_s"][k]) for k in ("median", "p95", "max", "total")),
                ],
            ],
        )
    )
    parts.append(
        f'<div class="sub">by reason: {html.escape(", ".join(f"{k} {v}" for k, v in ck["by_reason"].items()) or "none")}'
        + (f" · last size {ck['bytes_last'] / 2**20:.1f} MiB" if ck["bytes_last"] else "")
        + "</div>"
    )
    parts.append(fig_html(_checkpoint_figure(events), "spotsafe-checkpoints"))
    parts.append("<h2>Cost</h2>")
    parts.append(
        _table(
            [
                "billed instance-hours",
                "training hours",
                "spot cost",
                "on-demand price",
                "on-demand, same hours",
                "on-demand, training hours only",
                "savings",
                "prices from",
            ],
            [
                [
                    f"{cost['billed_hours']:.3f}",
                    f"{cost['training_hours']:.3f}",
                    _fmt_usd(cost["spot_cost"]),
                    "–" if cost["on_demand_price"] is None else f"${cost['on_demand_price']:.4f}/h",
                    _fmt_usd(cost["on_demand_cost_same_hours"]),
                    _fmt_usd(cost["on_demand_cost_training_hours"]),
                    "–" if cost["savings"] is None else f"{cost['savings'] * 100:.1f}%",
                    cost["price_source"],
                ]
            ],
        )
    )
    parts.append(
        "<div class=\"sub\">Billed from each launch's process start to its last recorded event (the instance's boot "
        "before it is not seen); training hours exclude redone steps. Prices: <code>--spot-price</code>, "
        "<code>--price TYPE=USD</code>, <code>--lookup-prices</code> (EC2 DescribeSpotPriceHistory), "
        "<code>--on-demand-price</code>.</div>"
    )
    images = [e for e in events if e.get("kind") == "image"]
    if images:
        parts.append('<h2>Samples</h2><div class="imgs">')
        for e in _pick_images(images):
            data = (image_data or {}).get(str(e.get("path")))
            if data is None:
                continue
            src = "data:image/png;base64," + base64.b64encode(data).decode()
            caption = f"{e.get('tag')} · epoch {e.get('epoch')} · step {e.get('step')}"
            parts.append(
                f'<figure><img src="{src}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>'
            )
        parts.append("</div>")
    if facts["problems"]:
        parts.append("<h2>Problems reading the store</h2><ul>")
        parts += [f"<li>{html.escape(p)}</li>" for p in facts["problems"]]
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _media(report: StoreReport, events: Sequence[Mapping[str, Any]]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for e in _pick_images([e for e in events if e.get("kind") == "image"]):
        path = str(e.get("path"))
        if path.startswith(f"{MEDIA_DIR}/"):
            data = report.image(path)
            if data is not None:
                out[path] = data
    return out


def write_report(
    store: str | Store,
    output: str | None = None,
    *,
    prices: Prices | None = None,
    lookup: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], str]:
    """Build the report of ``store``; write the HTML to ``output`` (a local path) when given. (facts, html)."""
    opened = open_store(store, storage_options=storage_options) if not isinstance(store, Store) else store
    try:
        report = StoreReport(opened)
        facts, events = report.build(prices, lookup=lookup)
        page = render_html(facts, events, _media(report, events))
    finally:
        if opened is not store:
            opened.close()
    if output:
        with open(output, "w", encoding="utf-8") as f:
            f.write(page)
    return facts, page


# -- the live page -------------------------------------------------------------------


class LivePage:
    """Rewrites ``report.html`` in the store every ``every`` seconds while a run trains.

    A named daemon thread; the first page comes a minute after the launch (or
    ``every``, whichever is shorter). Needs plotly (``spotsafe[report]``): without it
    :meth:`start` logs once and returns None.
    """

    def __init__(self, store: Store, *, every: float = 300.0, first_after: float | None = None) -> None:
        self.store = store
        self.every = float(every)
        self.first_after = min(60.0, self.every) if first_after is None else first_after
        self.report = StoreReport(store)
        #: How many pages were written, and the last error (the thread keeps going).
        self.written = 0
        self.last_error: BaseException | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=f"spotsafe-live-report({store.url})", daemon=True)

    @classmethod
    def start(cls, store: Store, *, every: float = 300.0) -> LivePage | None:
        import importlib.util

        if importlib.util.find_spec("plotly") is None:  # found, not imported: the thread imports it later
            log.info("spotsafe: no live report page (install spotsafe[report] for one)")
            return None
        page = cls(store, every=every)
        page._thread.start()
        return page

    def refresh(self) -> bool:
        """Build the page now and write it into the store. True when written."""
        with self._lock:
            try:
                facts, events = self.report.build()
                page = render_html(facts, events, _media(self.report, events), refresh_seconds=self.every)
                self.store.commit_file(LIVE_REPORT, page.encode())
            except Exception as e:  # noqa: BLE001 - a live page must never stop training; kept in last_error
                if self.last_error is None:
                    log.warning("spotsafe: could not write the live report to %s: %s", self.store.url, e)
                self.last_error = e
                return False
            self.written += 1
            return True

    def _loop(self) -> None:
        if self._stop.wait(self.first_after):
            return
        while True:
            self.refresh()
            if self._stop.wait(self.every):
                return

    def close(self, *, refresh: bool = False) -> None:
        """Stop the thread; ``refresh`` writes the page one last time, where one was written before.

        (A run shorter than the first page's delay never had a live page: nothing to update.)
        """
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if refresh and self.written:
            self.refresh()


# -- serving ---------------------------------------------------------------------------


def make_server(
    store: Store,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    refresh_seconds: float = 30.0,
    prices: Prices | None = None,
) -> ThreadingHTTPServer:
    """An HTTP server whose ``/`` is the report of ``store``, rebuilt at most every ``refresh_seconds``."""
    report = StoreReport(store)
    lock = threading.Lock()
    cache: dict[str, Any] = {"at": -1e18, "page": b""}

    def page() -> bytes:
        with lock:
            if time.monotonic() - cache["at"] >= refresh_seconds:
                facts, events = report.build(prices)
                cache["page"] = render_html(
                    facts, events, _media(report, events), refresh_seconds=refresh_seconds
                ).encode()
                cache["at"] = time.monotonic()
            return bytes(cache["page"])

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            log.debug("report server: " + format, *args)

        def do_GET(self) -> None:
            if self.path.split("?")[0] not in ("/", "/index.html", "/report.html"):
                self.send_error(404)
                return
            try:
                body = page()
            except SpotsafeError as e:
                self.send_error(500, str(e))
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

    return ThreadingHTTPServer((host, port), Handler)


# -- the command ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="spotsafe report",
        description="The run's story from its store: launches, interruptions, redone steps, checkpoints, cost.",
    )
    parser.add_argument("store", help="a path or URL such as s3://bucket/run")
    parser.add_argument("-o", "--output", help="write the HTML report here (default: report.html)")
    parser.add_argument("--json", action="store_true", help="print the facts as JSON instead of writing HTML")
    parser.add_argument("--serve", action="store_true", help="serve the report locally; the page refreshes itself")
    parser.add_argument("--port", type=int, default=8765, help="port for --serve (default 8765; 0: any free one)")
    parser.add_argument("--refresh", type=float, default=30.0, help="seconds between page refreshes with --serve")
    parser.add_argument("--spot-price", type=float, help="USD per instance-hour of every launch")
    parser.add_argument(
        "--price", action="append", default=[], metavar="TYPE=USD", help="USD per hour of an instance type (repeatable)"
    )
    parser.add_argument("--on-demand-price", type=float, help="USD per hour on demand, to compare with")
    parser.add_argument(
        "--lookup-prices", action="store_true", help="ask EC2 DescribeSpotPriceHistory for each launch's spot price"
    )
    parser.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="storage option (repeatable)"
    )
    args = parser.parse_args(argv)
    for flag, value in (("--spot-price", args.spot_price), ("--on-demand-price", args.on_demand_price)):
        if value is not None and value < 0:
            parser.error(f"{flag} must be >= 0, not {value}")
    try:
        by_type = Prices.parse_type_prices(args.price)
    except ValueError as e:
        parser.error(str(e))
    prices = None
    if args.spot_price is not None or by_type or args.on_demand_price is not None or args.lookup_prices:
        prices = Prices(spot=args.spot_price, by_type=by_type, on_demand=args.on_demand_price)
    options: dict[str, Any] = {}
    for pair in args.option:
        key, sep, value = pair.partition("=")
        if not sep:
            parser.error(f"--option wants KEY=VALUE, got {pair!r}")
        options[key] = value
    try:
        store = open_store(args.store, storage_options=options or None)
    except (SpotsafeError, ValueError) as e:
        print(f"spotsafe report: {e}", file=sys.stderr)
        return 2
    try:
        if args.serve:
            _plotly()
            server = make_server(store, port=args.port, refresh_seconds=args.refresh, prices=prices)
            port = server.server_address[1]
            print(f"spotsafe report: serving {store.url} at http://127.0.0.1:{port}/ (Ctrl-C stops)", flush=True)
            try:
                server.serve_forever()
            except KeyboardInterrupt:
                pass
            finally:
                server.server_close()
            return 0
        report = StoreReport(store)
        facts, events = report.build(prices, lookup=args.lookup_prices)
        if args.json:
            print(json.dumps(facts, indent=1, sort_keys=True))
            return 0
        output = args.output or "report.html"
        page = render_html(facts, events, _media(report, events))
        with open(output, "w", encoding="utf-8") as f:
            f.write(page)
        print(
            f"spotsafe report: {output}: {len(facts['launches'])} launch(es), {len(facts['interruptions'])} "
            f"interruption(s), {facts['steps_lost']} step(s) redone, {'complete' if facts['complete'] else 'not complete'} "
            f"at step {facts['steps']}"
        )
        return 0
    except (SpotsafeError, ValueError, OSError) as e:
        print(f"spotsafe report: {e}", file=sys.stderr)
        return 2
    finally:
        store.close()


if __name__ == "__main__":
    raise SystemExit(main())
