"""The report as one self-contained HTML page: plotly.js and every image inlined.

:func:`render_html` turns the facts (:mod:`spotsafe.story.facts`) and the events into a
page that opens offline and fetches nothing at view time: summary cards, the metrics
across launches, the timeline of launches and interruptions, tables of interruptions,
launches, checkpoints and cost, and the sample images. Needs plotly (``spotsafe[report]``).
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from typing import Any

from spotsafe.errors import MissingDependency
from spotsafe.story.formats import count_text, fmt_seconds, fmt_usd, iso_utc

__all__ = ["MAX_IMAGES", "MAX_METRICS", "pick_images", "render_html", "require_plotly"]

#: At most this many images are embedded (evenly spread over the run, the last always in).
MAX_IMAGES = 24
#: At most this many metrics get a curve.
MAX_METRICS = 8

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


def _mark_resumes(fig: Any, facts: Mapping[str, Any], rows: int) -> None:
    """A dotted line where each later launch resumed; red over the steps it trained twice."""
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


def _metric_figure(facts: Mapping[str, Any], events: Sequence[Event]) -> Any:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = _metric_names(events)
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
    _mark_resumes(fig, facts, rows)
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
                x=[iso_utc(start), iso_utc(end)],
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
                    x=[iso_utc(t)],
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


def _checkpoint_figure(events: Sequence[Event]) -> Any:
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


def _figure_html(fig: Any, div_id: str) -> str:
    config = {"displaylogo": False, "responsive": True}
    return str(fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config=config))


def _head(refresh_seconds: float | None) -> list[str]:
    """From the doctype to ``<body>``: the styles and plotly.js inlined; a refresh where asked."""
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
        f'<script type="text/javascript">{get_plotlyjs()}</script>',
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
) -> str:
    """The report as one self-contained HTML page (plotly.js and the images inlined)."""
    plotly = require_plotly()
    parts = [
        *_head(refresh_seconds),
        *_summary(facts, events, plotly.__version__),
        *_charts(facts, events),
        _interruptions_table(facts),
        *_launches_section(facts),
        *_checkpoints_section(facts, events),
        *_cost_section(facts),
        *_samples_section(events, image_data),
        *_problems_section(facts),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
