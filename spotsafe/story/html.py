"""The report as one self-contained HTML page: plotly.js and every image inlined.

:func:`render_html` turns the facts (:mod:`spotsafe.story.facts`) and the events into a
page that opens offline and fetches nothing at view time: summary cards, the metrics
across launches, the timeline of launches and interruptions, tables of interruptions,
launches, checkpoints and cost, and the sample images. Needs plotly (``spotsafe[report]``).
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping, Sequence
from typing import Any

from spotsafe.errors import MissingDependency
from spotsafe.story.formats import count_text, fmt_seconds, fmt_usd, iso_utc

__all__ = ["MAX_IMAGES", "MAX_METRICS", "pick_images", "plotly_js", "render_html", "require_plotly", "thin"]

#: At most this many images are embedded (evenly spread over the run, the last always in).
MAX_IMAGES = 24
#: At most this many metrics get a curve.
MAX_METRICS = 8
#: The metric curves of the page hold about this many points in all (each thinned for display) ...
MAX_POINTS_PER_FIGURE = 100_000
#: ... and every curve keeps at least this many.
MIN_POINTS_PER_CURVE = 400

Event = Mapping[str, Any]


def require_plotly() -> Any:
    """The plotly module (with ``plotly.graph_objects`` imported); MissingDependency without it."""
    try:
        import plotly
        import plotly.graph_objects
    except ImportError as e:
        raise MissingDependency("the HTML report needs plotly: install spotsafe[report]") from e
    return plotly


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if value in ("nan", "inf", "-inf"):
        return float(value)
    return None


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


def _metric_names(events: Sequence[Event]) -> list[str]:
    """The numeric metrics the steps recorded, in first-seen order, at most :data:`MAX_METRICS`."""
    names: list[str] = []
    for e in events:
        if e.get("kind") == "step":
            for k, v in (e.get("metrics") or {}).items():
                if k not in names and _number(v) is not None:
                    names.append(k)
    return names[:MAX_METRICS]


def _axis(row: int) -> tuple[str, str]:
    """The x and y axis names of subplot ``row`` (plotly numbers them from the second on)."""
    return ("x", "y") if row == 1 else (f"x{row}", f"y{row}")


def _resume_shapes(facts: Mapping[str, Any], rows: int) -> list[dict[str, Any]]:
    """A dotted line where each later launch resumed; red over the steps it trained twice.

    Built as plain shape dicts and set in one call: adding them one by one (``add_vline``) costs
    plotly a pass over every shape already there, which made 100 launches take minutes.
    """
    shapes: list[dict[str, Any]] = []
    for launch in facts["launches"][1:]:
        start = launch["resumed_step"]
        if start is None:
            continue
        for r in range(1, rows + 1):
            x, y = _axis(r)
            where = {"xref": x, "yref": f"{y} domain", "y0": 0, "y1": 1}
            line = {"color": "#555", "dash": "dot", "width": 1}
            shapes.append({"type": "line", "x0": start, "x1": start, "line": line, **where})
            if launch["steps_redone"]:
                end = start + launch["steps_redone"]
                red = {"fillcolor": "#d62728", "opacity": 0.15, "line": {"width": 0}}
                shapes.append({"type": "rect", "x0": start, "x1": end, **red, **where})
    return shapes


def thin(xs: Sequence[int], ys: Sequence[float], most: int) -> tuple[list[int], list[float]]:
    """At most about ``most`` points of a curve for display: per bucket its lowest and highest point, in order.

    Spikes survive (a bucket keeps its extremes); the facts never use this.
    """
    n = len(xs)
    if n <= most:
        return list(xs), list(ys)
    buckets = max(1, most // 2)
    out_x: list[int] = []
    out_y: list[float] = []
    for b in range(buckets):
        lo, hi = b * n // buckets, (b + 1) * n // buckets
        if lo >= hi:
            continue
        chunk = range(lo, hi)
        i_min = min(chunk, key=lambda i: (ys[i] != ys[i], ys[i]))  # nan sorts last
        i_max = max(chunk, key=lambda i: (ys[i] == ys[i], ys[i]))
        for i in sorted({i_min, i_max}):
            out_x.append(xs[i])
            out_y.append(ys[i])
    return out_x, out_y


def _curves(events: Sequence[Event], names: Sequence[str]) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """Each launch's (steps, values) of each metric, in one pass over the events."""
    curves: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for e in events:
        if e.get("kind") != "step":
            continue
        metrics = e.get("metrics") or {}
        per_launch = curves.setdefault(str(e.get("launch")), {})
        for name in names:
            v = _number(metrics.get(name))
            if v is not None:
                xs, ys = per_launch.setdefault(name, ([], []))
                xs.append(int(e["step"]))
                ys.append(v)
    return curves


def _rows_layout(titles: Sequence[str], spacing: float = 0.06) -> dict[str, Any]:
    """Rows of plots over one shared step axis, titled: what ``make_subplots`` builds, without its cost."""
    rows = len(titles)
    height = (1 - spacing * (rows - 1)) / rows
    layout: dict[str, Any] = {"annotations": []}
    for r, title in enumerate(titles, start=1):
        x_axis, y_axis = _axis(r)
        top = 1 - (r - 1) * (height + spacing)
        layout["xaxis" + x_axis[1:]] = {
            "anchor": y_axis,
            "domain": [0.0, 1.0],
            **({"matches": "x"} if r > 1 else {}),
            **({"showticklabels": False} if r < rows else {}),
        }
        layout["yaxis" + y_axis[1:]] = {"anchor": x_axis, "domain": [max(0.0, top - height), top]}
        layout["annotations"].append(
            {"text": title, "x": 0.5, "xanchor": "center", "xref": "paper", "y": top, "yanchor": "bottom"}
            | {"yref": "paper", "showarrow": False, "font": {"size": 16}}
        )
    return layout


def _metric_figure(facts: Mapping[str, Any], events: Sequence[Event]) -> dict[str, Any]:
    """The metrics across launches, one row per metric: a plain figure dict (no per-trace validation)."""
    names = _metric_names(events)
    rows = max(len(names), 1)
    layout = _rows_layout(names or ["(no metrics recorded)"])
    curves = _curves(events, names)
    most = max(MIN_POINTS_PER_CURVE, MAX_POINTS_PER_FIGURE // max(1, len(facts["launches"]) * rows))
    data: list[dict[str, Any]] = []
    for r, name in enumerate(names, start=1):
        x_axis, y_axis = _axis(r)
        for launch in facts["launches"]:
            got = curves.get(launch["id"], {}).get(name)
            if not got:
                continue
            xs, ys = thin(*got, most)
            i = launch["index"]
            data.append(
                {
                    "type": "scatter",
                    "x": xs,
                    "y": ys,
                    "mode": "lines",
                    "name": f"launch {i + 1}",
                    "legendgroup": f"launch {i + 1}",
                    "showlegend": r == 1,
                    "line": {"color": _PALETTE[i % len(_PALETTE)], "width": 1.5},
                    "xaxis": x_axis,
                    "yaxis": y_axis,
                }
            )
    last_x = "xaxis" if rows == 1 else f"xaxis{rows}"
    layout[last_x] = {**layout.get(last_x, {}), "title": {"text": "step"}}
    layout.update(
        shapes=_resume_shapes(facts, rows),
        height=220 * rows + 80,
        margin={"l": 60, "r": 20, "t": 40, "b": 40},
        legend={"orientation": "h", "y": 1.05},
    )
    return {"data": data, "layout": layout}


def _timeline_marks(facts: Mapping[str, Any]) -> dict[str, list[tuple[str, float]]]:
    """Every timeline marker by what it marks: (launch label, time)."""
    marks: dict[str, list[tuple[str, float]]] = {k: [] for k, _ in _MARKS}
    by_launch: dict[int, list[Mapping[str, Any]]] = {}
    for interruption in facts["interruptions"]:
        by_launch.setdefault(interruption["launch"], []).append(interruption)
    for launch in facts["launches"]:
        label = f"launch {launch['index'] + 1}"
        found = [("restored", launch["restored_at"]), ("first step", launch["first_step_at"])]
        for interruption in by_launch.get(launch["index"], []):
            found += [
                ("notice", interruption["notice_at"]),
                ("durable", interruption["durable_at"]),
                ("exit", interruption["exit_at"]),
            ]
        if launch["exit"] is not None and launch["exit"]["status"] == "complete":
            found.append(("complete", launch["exit"]["time"]))
        for what, t in found:
            if t is not None:
                marks[what].append((label, t))
    return marks


_MARKS = (
    ("notice", "x"),
    ("durable", "diamond"),
    ("exit", "square"),
    ("restored", "triangle-right"),
    ("first step", "circle"),
    ("complete", "star"),
)


def _timeline_figure(facts: Mapping[str, Any]) -> dict[str, Any]:
    """One bar per launch and its markers: a trace per colour and one per kind of marker (not per launch)."""
    data: list[dict[str, Any]] = []
    bars: dict[int, tuple[list[str | None], list[str | None]]] = {}
    for launch in facts["launches"]:
        i = launch["index"]
        label = f"launch {i + 1}"
        xs, ys = bars.setdefault(i % len(_PALETTE), ([], []))
        xs += [iso_utc(launch["billed_from"]), iso_utc(launch["ended"]), None]
        ys += [label, label, None]
    for colour, (xs, ys) in sorted(bars.items()):
        data.append(
            {
                "type": "scatter",
                "x": xs,
                "y": ys,
                "mode": "lines",
                "line": {"color": _PALETTE[colour], "width": 14},
                "showlegend": False,
                "hovertemplate": "%{y}<br>%{x}<extra></extra>",
                "connectgaps": False,
            }
        )
    marks = _timeline_marks(facts)
    for what, symbol in _MARKS:
        points = marks[what]
        if points:
            data.append(
                {
                    "type": "scatter",
                    "x": [iso_utc(t) for _, t in points],
                    "y": [label for label, _ in points],
                    "mode": "markers",
                    "marker": {"symbol": symbol, "size": 11, "color": "#222"},
                    "name": what,
                    "showlegend": False,
                    "hovertemplate": f"%{{y}}: {what}<br>%{{x}}<extra></extra>",
                }
            )
    labels = [f"launch {launch['index'] + 1}" for launch in facts["launches"]]
    layout = {
        "height": 120 + 40 * max(len(labels), 1) if len(labels) <= 20 else 120 + 14 * len(labels),
        "margin": {"l": 80, "r": 20, "t": 20, "b": 40},
        "yaxis": {"autorange": "reversed", "categoryorder": "array", "categoryarray": labels},
        "xaxis": {"type": "date"},
    }
    return {"data": data, "layout": layout}


def _checkpoint_figure(events: Sequence[Event]) -> dict[str, Any]:
    """Stall and persist time of every checkpoint over steps; one pair of series per rank where ranks recorded."""
    by_rank: dict[int, list[Event]] = {}
    for e in events:
        if e.get("kind") == "checkpoint":
            by_rank.setdefault(int(e.get("rank") or 0), []).append(e)
    data: list[dict[str, Any]] = []
    for rank, ckpts in sorted(by_rank.items()) or [(0, [])]:
        who = f"rank {rank} " if len(by_rank) > 1 else ""
        done = [c for c in ckpts if isinstance(c.get("persist_s"), (int, float))]
        data += [
            {
                "type": "scatter",
                "x": [int(c["step"]) for c in ckpts],
                "y": [float(c.get("stall_s") or 0.0) * 1000 for c in ckpts],
                "mode": "markers",
                "name": f"{who}stall (training blocked), ms",
            },
            {
                "type": "scatter",
                "x": [int(c["step"]) for c in done],
                "y": [float(c["persist_s"]) * 1000 for c in done],
                "mode": "markers",
                "name": f"{who}persist (background), ms",
            },
        ]
    layout = {
        "height": 300,
        "margin": {"l": 60, "r": 20, "t": 20, "b": 40},
        "xaxis": {"title": {"text": "step"}},
        "yaxis": {"title": {"text": "ms"}, "type": "log"},
        "legend": {"orientation": "h", "y": 1.1},
    }
    return {"data": data, "layout": layout}


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
    return "–" if a is None or b is None else fmt_seconds(b - a)


def pick_images(images: Sequence[Event]) -> list[Mapping[str, Any]]:
    """At most :data:`MAX_IMAGES` of ``images``, evenly spread, the first and the last always in."""
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


def _figure_html(fig: dict[str, Any], div_id: str) -> str:
    """A figure dict as a ``<div>`` and its script; plotly's per-property validation skipped (the dicts are ours)."""
    import plotly.io

    config = {"displaylogo": False, "responsive": True}
    return str(
        plotly.io.to_html(fig, validate=False, full_html=False, include_plotlyjs=False, div_id=div_id, config=config)
    )


def plotly_js() -> tuple[str, str]:
    """(a file name that says plotly.js's version, its text): the shared copy beside a store's pages."""
    from plotly.offline import get_plotlyjs, get_plotlyjs_version

    version = re.sub(r"[^0-9A-Za-z.-]", "_", str(get_plotlyjs_version()))
    return f"plotly-{version}.min.js", str(get_plotlyjs())


def _head(refresh_seconds: float | None, plotly_src: str | None) -> list[str]:
    """From the doctype to ``<body>``: the styles and plotly.js (inlined, or from ``plotly_src``); a refresh."""
    from plotly.offline import get_plotlyjs

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
        f'<script type="text/javascript">{get_plotlyjs()}</script>'
        if plotly_src is None
        else f'<script type="text/javascript" src="{html.escape(plotly_src)}"></script>',
        "</head><body>",
    ]
    return parts


def _summary(facts: Mapping[str, Any], events: Sequence[Event], plotly_version: str) -> list[str]:
    """The title, where the store is and its last event, and the cards of headline numbers."""
    cost = facts["cost"]
    status = '<b class="ok">complete</b>' if facts["complete"] else '<b class="bad">not complete</b>'
    cards = [
        (status, "status", True),
        (str(facts["steps"]), "steps", False),
        (str(len(facts["launches"])), "launches", False),
        (str(len(facts["interruptions"])), "interruptions", False),
        (count_text(facts["steps_lost"], facts["steps_lost_exact"]), "steps redone", False),
        (fmt_seconds(facts["seconds_lost"]), "lost (redone + idle)", False),
        (f"{cost['billed_hours']:.2f} h", "billed instance-hours", False),
        (fmt_usd(cost["spot_cost"]), "spot cost", False),
        (fmt_usd(cost["on_demand_cost_same_hours"]), "on-demand, same hours", False),
    ]
    last_event = iso_utc(max((float(e.get("time") or 0) for e in events), default=None))
    return [
        "<h1>spotsafe run report</h1>",
        f'<div class="sub">store {html.escape(str(facts["store"]))} · plotly {html.escape(plotly_version)} · '
        f"last event {html.escape(str(last_event or '–'))}</div>",
        '<div class="cards">'
        + "".join(
            f'<div class="card">{value if raw else "<b>" + html.escape(value) + "</b>"}<span>{html.escape(label)}</span></div>'
            for value, label, raw in cards
        )
        + "</div>",
    ]


def _charts(facts: Mapping[str, Any], events: Sequence[Event]) -> list[str]:
    """The metrics across launches, and the timeline of launches and interruptions."""
    return [
        "<h2>Metrics across launches</h2>",
        '<div class="sub">Each launch in its own colour; dotted lines: where a launch resumed; '
        "red: steps trained twice (the previous launch had gone past its last checkpoint).</div>",
        _figure_html(_metric_figure(facts, events), "spotsafe-metrics"),
        "<h2>Launches and interruptions</h2>",
        '<div class="sub">Markers: ✕ notice, ◆ checkpoint durable, ■ exit, ▶ restored, ● first step, ★ complete.</div>',
        _figure_html(_timeline_figure(facts), "spotsafe-timeline"),
    ]


def _interruptions_table(facts: Mapping[str, Any]) -> str:
    """Each interruption's phases, from the notice to the next launch's first step."""
    rows = []
    for i in facts["interruptions"]:
        rows.append(
            [
                i["launch"] + 1,
                i["kind"] + (f" ({i['source']} {i['action']})" if i["source"] else ""),
                i["step"] if i["step_exact"] else f"≥ {i['step']}",
                _between(i["notice_at"], i["durable_at"]),
                _between(i["durable_at"], i["exit_at"]),
                _between(i["exit_at"], i["next_launch_at"]),
                _between(i["next_launch_at"], i["first_step_back_at"]),
                i["resumed_step"],
                None if i["steps_redone"] is None else count_text(i["steps_redone"], i["steps_redone_exact"]),
                fmt_seconds(i["seconds_idle"]),
                "–"
                if i["deadline"] is None or i["durable_at"] is None
                else fmt_seconds(i["deadline"] - i["durable_at"]),
            ]
        )
    if not rows:
        return "<p>No interruptions.</p>"
    return _table(
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


def _launches_section(facts: Mapping[str, Any]) -> list[str]:
    header = [
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
    ]
    rows = [
        [
            launch["index"] + 1,
            launch["instance_id"],
            launch["instance_type"],
            launch["zone"],
            launch["market"],
            launch["host"],
            launch["resumed_step"],
            fmt_seconds(launch["restore_s"]),
            launch["last_step"] if launch["last_step_exact"] else f"≥ {launch['last_step']}",
            _exit_label(launch, last=launch["index"] == len(facts["launches"]) - 1),
            fmt_seconds(launch["billed_s"]) if launch["billed_exact"] else f"≥ {fmt_seconds(launch['billed_s'])}",
            launch["checkpoints"],
        ]
        for launch in facts["launches"]
    ]
    return ["<h2>Launches</h2>", _table(header, rows)]


def _checkpoints_section(facts: Mapping[str, Any], events: Sequence[Event]) -> list[str]:
    """Stall and persist times, checkpoints by reason, the last size, and the timings per step."""
    ck = facts["checkpoints"]
    rows = [
        [
            "stall (loop blocked)",
            ck["stall_s"]["count"],
            *(fmt_seconds(ck["stall_s"][k]) for k in ("median", "p95", "max", "total")),
        ],
        [
            "persist (background)",
            ck["persist_s"]["count"],
            *(fmt_seconds(ck["persist_s"][k]) for k in ("median", "p95", "max", "total")),
        ],
    ]
    return [
        "<h2>Checkpoints</h2>",
        _table(["", "count", "median", "p95", "max", "total"], rows),
        f'<div class="sub">by reason: {html.escape(", ".join(f"{k} {v}" for k, v in ck["by_reason"].items()) or "none")}'
        + (f" · last size {ck['bytes_last'] / 2**20:.1f} MiB" if ck["bytes_last"] else "")
        + "</div>",
        _figure_html(_checkpoint_figure(events), "spotsafe-checkpoints"),
    ]


def _notice_cell(rank: Mapping[str, Any], first: Mapping[int, float]) -> str:
    """A rank's notices: launch, step, and how long after the first rank's it saw each."""
    cells = []
    for n in rank["notices"]:
        seen = n["detected_at"]
        lag = "" if seen is None or n["launch"] not in first else f" (+{fmt_seconds(seen - first[n['launch']])})"
        cells.append(f"launch {n['launch'] + 1}: step {n['step']}{lag}")
    return "; ".join(cells) or "–"


def _ranks_section(facts: Mapping[str, Any]) -> list[str]:
    """Every rank's notice, stall and persist, where more than rank 0 recorded; what differs is said."""
    ranks = facts.get("ranks") or []
    if len(ranks) < 2:
        return []
    first: dict[int, float] = {}
    for rank in ranks:
        for n in rank["notices"]:
            if n["detected_at"] is not None:
                first[n["launch"]] = min(first.get(n["launch"], n["detected_at"]), n["detected_at"])
    rows = [
        [
            rank["rank"],
            rank["checkpoints"],
            *(fmt_seconds(rank["stall_s"][k]) for k in ("median", "p95", "max")),
            *(fmt_seconds(rank["persist_s"][k]) for k in ("median", "p95", "max")),
            _notice_cell(rank, first),
        ]
        for rank in ranks
    ]
    names = ["checkpoints", "stall", "stall", "stall", "persist", "persist", "persist", "notice"]
    differ = sorted({names[c - 1] for c in range(1, 9) if len({str(r[c]) for r in rows}) > 1})
    header = ["rank", "checkpoints", "stall median", "stall p95", "stall max"]
    header += ["persist median", "persist p95", "persist max", "notice seen"]
    return [
        "<h2>Ranks</h2>",
        f'<div class="sub">{html.escape("ranks differ in: " + ", ".join(differ) if differ else "every rank agrees")}'
        " · notice lag: after the first rank that saw it</div>",
        _table(header, rows),
    ]


def _cost_section(facts: Mapping[str, Any]) -> list[str]:
    """Billed and training hours, spot against on-demand, and where the prices came from."""
    cost = facts["cost"]
    header = [
        "billed instance-hours",
        "training hours",
        "spot cost",
        "on-demand price",
        "on-demand, same hours",
        "on-demand, training hours only",
        "savings",
        "prices from",
    ]
    row = [
        f"{cost['billed_hours']:.3f}",
        f"{cost['training_hours']:.3f}",
        fmt_usd(cost["spot_cost"]),
        "–" if cost["on_demand_price"] is None else f"${cost['on_demand_price']:.4f}/h",
        fmt_usd(cost["on_demand_cost_same_hours"]),
        fmt_usd(cost["on_demand_cost_training_hours"]),
        "–" if cost["savings"] is None else f"{cost['savings'] * 100:.1f}%",
        cost["price_source"],
    ]
    return [
        "<h2>Cost</h2>",
        _table(header, [row]),
        "<div class=\"sub\">Billed from each launch's process start to its last recorded event (the instance's boot "
        "before it is not seen); training hours exclude redone steps. Prices: <code>--spot-price</code>, "
        "<code>--price TYPE=USD</code>, <code>--lookup-prices</code> (EC2 DescribeSpotPriceHistory), "
        "<code>--on-demand-price</code>.</div>",
    ]


def _samples_section(events: Sequence[Event], image_data: Mapping[str, bytes] | None) -> list[str]:
    """The images the run logged (at most :data:`MAX_IMAGES`), inlined as data: URLs; none, no section."""
    images = [e for e in events if e.get("kind") == "image"]
    if not images:
        return []
    parts = ['<h2>Samples</h2><div class="imgs">']
    for e in pick_images(images):
        data = (image_data or {}).get(str(e.get("path")))
        if data is None:
            continue
        src = "data:image/png;base64," + base64.b64encode(data).decode()
        caption = f"{e.get('tag')} · epoch {e.get('epoch')} · step {e.get('step')}"
        parts.append(
            f'<figure><img src="{src}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>'
        )
    parts.append("</div>")
    return parts


def _problems_section(facts: Mapping[str, Any]) -> list[str]:
    if not facts["problems"]:
        return []
    return [
        "<h2>Problems reading the store</h2><ul>",
        *(f"<li>{html.escape(p)}</li>" for p in facts["problems"]),
        "</ul>",
    ]


def render_html(
    facts: Mapping[str, Any],
    events: Sequence[Event],
    image_data: Mapping[str, bytes] | None = None,
    *,
    refresh_seconds: float | None = None,
    plotly_src: str | None = None,
) -> str:
    """The report as one HTML page with the images inlined; plotly.js too, unless ``plotly_src`` names its file.

    ``plotly_src`` (a relative URL such as ``plotly-3.1.0.min.js``, :func:`plotly_js`) makes the page
    ~100 KB instead of ~5 MB; the file must then sit beside the page (the live page and ``--serve`` do that).
    """
    plotly = require_plotly()
    parts = [
        *_head(refresh_seconds, plotly_src),
        *_summary(facts, events, plotly.__version__),
        *_charts(facts, events),
        _interruptions_table(facts),
        *_launches_section(facts),
        *_checkpoints_section(facts, events),
        *_ranks_section(facts),
        *_cost_section(facts),
        *_samples_section(events, image_data),
        *_problems_section(facts),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
