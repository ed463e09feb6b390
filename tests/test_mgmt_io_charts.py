"""The IO charts of the pool, volume, SDS and SDC pages (docs/mgmt.md, "IO charts"),
in a real browser: a real Prometheus evaluates the repository's recording rules
(monitoring/prometheus/rules/recording.yml) over series a stand-in exporter serves
(the SDC's and SDS's counters growing at known rates, as their daemons would export
them), and MGMT draws each object's recorded IOPS, bandwidth and latency with the
range the picker chose; every legend inside its chart.
"""

from __future__ import annotations

import datetime as dt
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from _mdm import MdmDaemon
from _mgmt import MgmtDaemon
from _monitoring import PrometheusServer, ToolMissing
from _ports import free_port
from _wait import wait_until
from test_mgmt_browser import screenshot
from test_mgmt_gui import browser, login, ok, on_failure  # noqa: F401  (fixture)

if TYPE_CHECKING:
    from playwright.sync_api import Page

REPO = Path(__file__).resolve().parent.parent
RECORDING = REPO / "monitoring" / "prometheus" / "rules" / "recording.yml"
READS, WRITES, REPL = 100.0, 50.0, 25.0  # per second
BLOCK = 4096


class Exporter:
    """``/metrics`` with the SDC's and SDS's IO counters of one SDC, volume, pool and SDS,
    each growing at a fixed rate since the start (labels as the daemons and the
    scrape configuration give them)."""

    def __init__(self, pool_id: int) -> None:
        self.pool_id = pool_id
        self.started = time.monotonic()
        self.port = free_port()
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = exporter.text().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def text(self) -> str:
        t = time.monotonic() - self.started
        sdc = 'sdc="host-c1",volume="vol-c1"'
        sds = 'sds="sds-c1",protection_domain="pd1",fault_set=""'
        lines = [
            f'meshblock_sdc_ops_total{{{sdc},op="read"}} {READS * t}',
            f'meshblock_sdc_ops_total{{{sdc},op="write"}} {WRITES * t}',
            f'meshblock_sdc_bytes_total{{{sdc},op="read"}} {READS * BLOCK * t}',
            f'meshblock_sdc_bytes_total{{{sdc},op="write"}} {WRITES * BLOCK * t}',
            f'meshblock_sdc_volume_info{{{sdc},pool_id="{self.pool_id}"}} 1',
            f'meshblock_pool_info{{pool_id="{self.pool_id}",pool="sp1",protection_domain="pd1"}} 1',
            f'meshblock_sdc_op_duration_seconds_sum{{sdc="host-c1",op="read"}} {0.002 * READS * t}',
            f'meshblock_sdc_op_duration_seconds_count{{sdc="host-c1",op="read"}} {READS * t}',
            f'meshblock_sds_ops_total{{{sds},op="read"}} {READS * t}',
            f'meshblock_sds_ops_total{{{sds},op="repl_write"}} {REPL * t}',
            f'meshblock_sds_bytes_total{{{sds},op="read"}} {READS * BLOCK * t}',
            f'meshblock_sds_bytes_total{{{sds},op="repl_write"}} {REPL * BLOCK * t}',
            f'meshblock_sds_op_duration_seconds_sum{{{sds},op="read"}} {0.0005 * READS * t}',
            f'meshblock_sds_op_duration_seconds_count{{{sds},op="read"}} {READS * t}',
        ]
        return "\n".join(lines) + "\n"

    def __enter__(self) -> Exporter:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Cluster:
    mdm: MdmDaemon
    gui: MgmtDaemon
    prometheus: PrometheusServer
    ids: dict[str, int]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("mgmt-io-charts")
    mdm = MdmDaemon(root / "mdm", f"sqlite+aiosqlite:///{root / 'mdm' / 'mdm.db'}", tls=True)
    mdm.start()
    try:
        api = mdm.api()
        pool = mdm.create_pool("pd1", "sp1", 16)
        sds = ok(
            api.post(
                "/api/v1/sds",
                {
                    "name": "sds-c1",
                    "protection_domain_id": pool["protection_domain_id"],
                    "address": "127.0.0.1",
                    "data_port": 17495,
                    "devices": [
                        {"path": "/dev/chart1", "capacity": "100GiB", "pool_id": pool["id"]}
                    ],
                },
            ),
            201,
        )
        sdc = ok(api.post("/api/v1/sdc", {"guid": "guid-c1", "name": "host-c1"}), 201)
        vol = ok(
            api.post("/api/v1/volumes", {"name": "vol-c1", "pool_id": pool["id"], "size": "1GiB"}),
            201,
        )
        with Exporter(pool["id"]) as exporter:
            try:
                prometheus = PrometheusServer(
                    root / "prometheus",
                    {"rules/recording.yml": RECORDING.read_text()},
                    {
                        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                        "rule_files": ["rules/recording.yml"],
                        "scrape_configs": [
                            {
                                "job_name": "meshblock_io",
                                "honor_labels": True,
                                "static_configs": [{"targets": [f"127.0.0.1:{exporter.port}"]}],
                            }
                        ],
                    },
                )
            except ToolMissing as exc:
                pytest.fail(str(exc), pytrace=False)
            gui = MgmtDaemon(
                root / "mgmt",
                f"sqlite+aiosqlite:///{root / 'mgmt' / 'mgmt.db'}",
                {"mdm": {"url": mdm.url}, "prometheus": {"url": prometheus.url}},
            )
            rc: int | None = None
            try:
                prometheus.start()
                gui.create_users(viewer=False)
                gui.start()
                ids = {"pool": pool["id"], "sds": sds["id"], "sdc": sdc["id"], "volume": vol["id"]}
                yield Cluster(mdm, gui, prometheus, ids)
                rc = gui.stop()
            finally:
                gui.kill()
                prometheus.kill()
            assert rc == 0, f"MGMT exit code {rc}:\n{gui.log_text()}"
            gui.assert_clean_log()
    finally:
        mdm.kill()


def recorded(c: Cluster) -> None:
    """Every recorded series the pages chart has a value (a 1-minute rate needs two
    scrapes, the rules an evaluation after them)."""
    for series in (
        'pool:meshblock_sdc_ops:rate1m{pool="sp1"}',
        'volume:meshblock_sdc_bytes:rate1m{volume="vol-c1"}',
        'sdc:meshblock_sdc_op_duration_seconds:mean1m{sdc="host-c1"}',
        'sds:meshblock_sds_op_duration_seconds:mean1m{sds="sds-c1"}',
    ):

        def found(s: str = series) -> list[Any] | None:
            return c.prometheus.get(f"query?query={s}")["result"] or None

        wait_until(found, timeout=60, what=f"Prometheus to record {series}")


def legends_inside(page: Page) -> int:
    """Every chart's legend entries lie inside the chart; how many there are."""
    n = 0
    for chart in page.locator("#io-charts svg.chart").all():
        box = chart.bounding_box()
        assert box is not None
        for legend in chart.locator("text.legend").all():
            lb = legend.bounding_box()
            assert lb is not None
            text = legend.text_content()
            assert lb["x"] >= box["x"] and lb["x"] + lb["width"] <= box["x"] + box["width"] + 0.5, (
                f"legend {text!r} ({lb}) outside its chart ({box})"
            )
            assert lb["y"] >= box["y"] and lb["y"] + lb["height"] <= box["y"] + box["height"]
            n += 1
    return n


LEGEND = re.compile(r"^(\w+): ([0-9.,]+)\s*(.*)$")


def legend_value(page: Page, chart: str, op: str) -> tuple[float, str]:
    """The last value a chart's legend gives ``op`` (``read: 6.45/s``) and its unit."""
    text = page.locator(f"svg#chart-{chart} text.legend").filter(has_text=f"{op}: ").text_content()
    m = LEGEND.match(str(text))
    assert m is not None and m.group(1) == op, text
    return float(m.group(2).replace(",", "")), m.group(3)


def ratio(page: Page, chart: str, a: str, b: str) -> float:
    """The ratio of two operations' last values in a chart (both in one unit)."""
    (va, unit_a), (vb, unit_b) = legend_value(page, chart, a), legend_value(page, chart, b)
    assert unit_a == unit_b, (chart, a, unit_a, b, unit_b)
    return va / vb


def axis_start(page: Page, chart: str) -> str:
    """The time the chart's x axis starts at (``HH:MM``)."""
    first = page.locator(f"svg#chart-{chart} text").filter(has_text="UTC").first
    return str(first.text_content()).removesuffix(" UTC")


def clocks_around(t: float) -> set[str]:
    return {dt.datetime.fromtimestamp(t + d, dt.UTC).strftime("%H:%M") for d in (-60, 0, 60)}


@pytest.mark.cluster
def test_each_objects_io_charts_with_the_range_picker(
    cluster: Cluster,
    browser: Any,  # noqa: F811
) -> None:
    from playwright.sync_api import expect

    c = cluster
    recorded(c)
    page = browser.new_page()
    try:
        login(page, c.gui, "admin", c.gui.admin_password, f"/pools/{c.ids['pool']}")
        charts = page.locator("#io-charts")
        expect(charts.locator("#chart-range a.current")).to_have_text("1h")
        expect(charts.locator("a[data-range]")).to_have_text(["15m", "1h", "6h", "24h"])
        for chart in ("iops", "bandwidth"):
            svg = charts.locator(f"svg#chart-{chart}")
            expect(svg.locator("polyline.series[data-series=read]")).to_have_count(1)
            expect(svg.locator("polyline.series[data-series=write]")).to_have_count(1)
        # The recorded rates, whatever their age (a young series' 1-minute rate is
        # low: rate() divides by the whole window): in the exporter's proportions.
        assert ratio(page, "iops", "read", "write") == pytest.approx(READS / WRITES, rel=0.05)
        assert ratio(page, "bandwidth", "read", "write") == pytest.approx(READS / WRITES, rel=0.05)
        expect(charts.locator("svg#chart-bandwidth text.legend").first).to_contain_text(
            re.compile(r"^read: [0-9.,]+ (B|KiB)/s$")
        )
        expect(charts.locator("svg#chart-latency")).to_have_count(0)
        expect(charts.locator("#no-latency")).to_be_visible()
        assert axis_start(page, "iops") in clocks_around(time.time() - 3600)
        assert legends_inside(page) == 4
        screenshot(page, "gui-charts-pool.png")

        # -- the picker: 15 minutes, then back; an unknown range is the default
        with page.expect_navigation():
            charts.locator("a[data-range='15m']").click()
        assert page.url.endswith(f"/pools/{c.ids['pool']}?range=15m"), page.url
        expect(page.locator("#chart-range a.current")).to_have_text("15m")
        assert axis_start(page, "iops") in clocks_around(time.time() - 900)
        page.goto(c.gui.url + f"/pools/{c.ids['pool']}?range=7d")
        expect(page.locator("#chart-range a.current")).to_have_text("1h")

        # -- the volume: IOPS and bandwidth, no latency of its own
        page.goto(c.gui.url + f"/volumes/{c.ids['volume']}?range=6h")
        expect(page.locator("#chart-range a.current")).to_have_text("6h")
        expect(page.locator("svg#chart-iops polyline.series")).to_have_count(2)
        assert ratio(page, "bandwidth", "read", "write") == pytest.approx(READS / WRITES, rel=0.05)
        expect(page.locator("#no-latency")).to_be_visible()
        assert legends_inside(page) == 4

        # -- the SDS: its wire operations, replication included, and their latency
        page.goto(c.gui.url + f"/sds/{c.ids['sds']}?range=24h")
        expect(
            page.locator("svg#chart-iops polyline.series[data-series=repl_write]")
        ).to_have_count(1)
        assert ratio(page, "iops", "read", "repl_write") == pytest.approx(READS / REPL, rel=0.05)
        expect(page.locator("svg#chart-latency text.legend")).to_have_text("read: 500 \u00b5s")
        expect(page.locator("#no-latency")).to_have_count(0)
        assert legends_inside(page) == 5
        assert re.fullmatch(r"\d\d-\d\d \d\d:\d\d", axis_start(page, "iops"))  # with the date
        screenshot(page, "gui-charts-sds.png")

        # -- the SDC: by its name, as the scrape configuration labels it
        page.goto(c.gui.url + f"/sdc/{c.ids['sdc']}?range=15m")
        expect(page.locator("svg#chart-iops polyline.series")).to_have_count(2)
        expect(page.locator("svg#chart-latency text.legend")).to_have_text("read: 2 ms")
        assert legends_inside(page) == 5
    except BaseException:
        on_failure(page)
        raise
