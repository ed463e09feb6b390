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
    """``value`` for a person: IEC prefixes for bytes, seconds as ms or µs, no
    exponent notation."""
    if unit == "seconds":
        if value == 0:
            return "0 s"
        if abs(value) < 1e-3:
            return f"{_number(value * 1e6)} \u00b5s"
        if abs(value) < 1:
            return f"{_number(value * 1e3)} ms"
        return f"{_number(value)} s"
    if unit == "ops/s":
        return f"{_number(value)}/s"
    if unit in ("bytes", "bytes/s"):
        suffix = "/s" if unit == "bytes/s" else ""
        for prefix in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(value) < 1024:
                return f"{_number(value)} {prefix}{suffix}"
            value /= 1024
        return f"{_number(value)} PiB{suffix}"
    return _number(value)


def _clock(t: float, span: float = 0.0) -> str:
    """``HH:MM``; with the date (``MM-DD HH:MM``) over a span of more than 12 hours."""
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime(
        "%m-%d %H:%M" if span > 12 * 3600 else "%H:%M"
    )


def svg(spec: ChartSpec, series: list[Series], start: float, end: float) -> Markup:
    """The chart as an ``<svg>`` element (safe to insert into the page)."""
    labels = []
    for s in series:
        name = s.labels.get(spec.legend, spec.legend) or spec.legend
        if s.points:
            labels.append(f"{name}: {human(s.points[-1][1], spec.unit)}")
        else:
            labels.append(f"{name}: no data")
    # The legend is drawn right of the plot, inside the chart: room for its longest
    # label (about 6.5 px a character at 11 px), the plot narrower for it.
    right = min(max(RIGHT, 30 + round(6.5 * max((len(x) for x in labels), default=0))), 300)
    plot_w, plot_h = WIDTH - LEFT - right, HEIGHT - TOP - BOTTOM
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
            f"{_clock(t, span)} UTC</text>"
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
        ly = TOP + 14 + n * 16
        parts.append(
            f'<rect x="{LEFT + plot_w + 8}" y="{ly - 9}" width="10" height="10" '
            f'fill="{colour}"/><text class="legend" x="{LEFT + plot_w + 22}" y="{ly}" '
            f'font-size="11">{escape(labels[n])}</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))


# -- the IO charts of one pool, volume, SDS or SDC ---------------------------------------

#: The time ranges a detail page's charts offer (``?range=``), in seconds.
RANGES = {"15m": 900, "1h": 3600, "6h": 6 * 3600, "24h": 86400}
DEFAULT_RANGE = "1h"
POINTS = 240  # per series: the step is the range / this (at least 1 s)

#: Per kind of object: the label its recorded series name it by, and the recording
#: rules (monitoring/prometheus/rules/recording.yml) of its IOPS, bandwidth and mean
#: latency ("" where no rule exists: the SDC's and SDS's latency histograms are by
#: operation only, so a pool or a volume has no latency of its own).
OBJECT_SERIES = {
    "pool": ("pool", "pool:meshblock_sdc_ops:rate1m", "pool:meshblock_sdc_bytes:rate1m", ""),
    "volume": (
        "volume",
        "volume:meshblock_sdc_ops:rate1m",
        "volume:meshblock_sdc_bytes:rate1m",
        "",
    ),
    "sdc": (
        "sdc",
        "sdc:meshblock_sdc_ops:rate1m",
        "sdc:meshblock_sdc_bytes:rate1m",
        "sdc:meshblock_sdc_op_duration_seconds:mean1m",
    ),
    "sds": (
        "sds",
        "sds:meshblock_sds_ops:rate1m",
        "sds:meshblock_sds_bytes:rate1m",
        "sds:meshblock_sds_op_duration_seconds:mean1m",
    ),
}


def promql_string(value: str) -> str:
    """``value`` as a PromQL double-quoted string literal."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def range_of(text: str | None) -> str:
    """The range key a page asked for (``?range=``); the default for anything else."""
    return text if text in RANGES else DEFAULT_RANGE


def step_of(range_s: float) -> float:
    return max(1.0, round(range_s / POINTS))


def object_charts(kind: str, name: str) -> list[ChartSpec]:
    """IOPS, bandwidth and (SDS, SDC) mean latency of ``kind`` ``name``, by operation."""
    label, ops, rate, latency = OBJECT_SERIES[kind]
    match = f"{{{label}={promql_string(name)}}}"
    specs = [
        ChartSpec("iops", "IOPS by operation", "ops/s", f"sum by (op) ({ops}{match})", "op"),
        ChartSpec(
            "bandwidth", "Bandwidth by operation", "bytes/s", f"sum by (op) ({rate}{match})", "op"
        ),
    ]
    if latency:
        specs.append(
            ChartSpec(
                "latency",
                "Latency by operation (mean over 1 min)",
                "seconds",
                f"max by (op) ({latency}{match})",
                "op",
            )
        )
    return specs
