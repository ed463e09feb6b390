"""What every daemon's ``/metrics`` carries besides its own series.

Each daemon (MDM, SDS, SDC, MGMT) renders a :class:`CollectorRegistry` of its own,
never prometheus_client's default one, so the process and platform collectors that
the default registry has are not there unless added: :func:`daemon_registry` makes
the registry a daemon starts from, with

- ``process_*`` (CPU seconds, resident and virtual memory, open and maximum file
  descriptors, start time; Linux only, from ``/proc/self``),
- ``python_info`` (the interpreter's version and implementation),
- ``meshblock_build_info{version}``, always 1: the release the process runs, for
  ``count by (version) (meshblock_build_info)`` during a rolling upgrade.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from meshblock import __version__

BUILD_INFO = "meshblock_build_info"


class BuildInfoCollector(Collector):
    """``meshblock_build_info{version="..."} 1``."""

    def __init__(self, version: str = __version__) -> None:
        self.version = version

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            BUILD_INFO, "The meshblock release this process runs (always 1)", labels=["version"]
        )
        info.add_metric([self.version], 1)
        yield info


def daemon_registry(auto_describe: bool = False) -> CollectorRegistry:
    """A new registry with the process, platform and build-info collectors in it."""
    registry = CollectorRegistry(auto_describe=auto_describe)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    registry.register(BuildInfoCollector())
    return registry
