"""Line charts as inline SVG, drawn on the server from Prometheus range queries.

The dashboard's charts are defined in :data:`CHARTS` (title, unit, PromQL with a
legend label per series). :func:`svg` draws one: a polyline per series, a y axis from
zero with four labelled grid lines, and the time range on the x axis (UTC).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from markupsafe import Markup, escape

from meshblock.mgmt.prometheus import Series


@dataclass(frozen=True)
class ChartSpec:
    id: str
    title: str
    unit: str  # "bytes", "bytes/s", or "" for a plain number
    query: str
    legend: str  # a label name whose value names each series, or a fixed name


CHARTS = (
    ChartSpec(
        "capacity",
        "Capacity: allocated and usable",
        "bytes",
        'label_replace(sum(meshblock_pool_allocated_bytes), "series", "allocated", "", "")'
        ' or label_replace(sum(meshblock_pool_usable_bytes), "series", "usable", "", "")',
        "series",
    ),
    ChartSpec(
        "io",
        "Client IO throughput by operation",
        "bytes/s",
        "sum by (op) (rate(meshblock_sdc_bytes_total[2m]))",
        "op",
    ),
)

WIDTH, HEIGHT = 640, 220
LEFT, RIGHT, TOP, BOTTOM = 70, 110, 12, 28
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")


def _number(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def human(value: float, unit: str) -> str:
    """``value`` for a person: IEC prefixes for bytes, no exponent notation."""
    if unit in ("bytes", "bytes/s"):
        suffix = "/s" if unit == "bytes/s" else ""
        for prefix in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(value) < 1024:
                return f"{_number(value)} {prefix}{suffix}"
            value /= 1024
        return f"{_number(value)} PiB{suffix}"
    return _number(value)


def _clock(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%H:%M")


def svg(spec: ChartSpec, series: list[Series], start: float, end: float) -> Markup:
    """The chart as an ``<svg>`` element (safe to insert into the page)."""
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    peak = max((v for s in series for _, v in s.points), default=0.0)
    top = peak * 1.1 if peak > 0 else 1.0
    span = max(end - start, 1.0)

    def x(t: float) -> float:
        return LEFT + (t - start) / span * plot_w

    def y(v: float) -> float:
        return TOP + plot_h - max(v, 0.0) / top * plot_h

    parts = [
        f'<svg class="chart" id="chart-{escape(spec.id)}" role="img" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
        f'xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(spec.title)}</title>",
    ]
    for i in range(5):
        v = top * i / 4
        gy = y(v)
        parts.append(
            f'<line x1="{LEFT}" y1="{gy:.1f}" x2="{LEFT + plot_w}" y2="{gy:.1f}" '
            'stroke="#ddd" stroke-width="1"/>'
            f'<text x="{LEFT - 6}" y="{gy + 4:.1f}" text-anchor="end" font-size="11">'
            f"{escape(human(v, spec.unit))}</text>"
        )
    for t, anchor in ((start, "start"), ((start + end) / 2, "middle"), (end, "end")):
        parts.append(
            f'<text x="{x(t):.1f}" y="{HEIGHT - 8}" text-anchor="{anchor}" font-size="11">'
            f"{_clock(t)} UTC</text>"
        )
    for n, s in enumerate(series):
        colour = COLOURS[n % len(COLOURS)]
        name = s.labels.get(spec.legend, spec.legend) or spec.legend
        if s.points:
            pts = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in s.points)
            parts.append(
                f'<polyline class="series" data-series="{escape(name)}" fill="none" '
                f'stroke="{colour}" stroke-width="2" points="{pts}"/>'
            )
            last = s.points[-1][1]
            label = f"{name}: {human(last, spec.unit)}"
        else:
            label = f"{name}: no data"
        ly = TOP + 14 + n * 16
        parts.append(
            f'<rect x="{LEFT + plot_w + 8}" y="{ly - 9}" width="10" height="10" '
            f'fill="{colour}"/><text x="{LEFT + plot_w + 22}" y="{ly}" font-size="11">'
            f"{escape(label)}</text>"
        )
    parts.append("</svg>")
    return Markup("".join(parts))
