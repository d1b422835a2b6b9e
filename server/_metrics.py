"""Prometheus metrics (prometheus_client): the server's counters and gauges, and latency histograms
of the ``Server-Timing`` phases of every tensor call. One registry per app."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ._timing import CallTimer

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

HELP: dict[str, str] = {
    "sessions_active": "Open device sessions.",
    "steps_applied_total": "Steps applied to segment B since it was created (restored across restarts).",
    "lease_waiting": "Requests waiting for B's lease now.",
    "requests_total": "HTTP requests received.",
    "errors_total": "HTTP responses with status >= 400.",
    "bytes_in_total": "Bytes of tensor request bodies.",
    "bytes_out_total": "Bytes of tensor response bodies.",
    "retries_total": "Repeated calls answered from the exactly-once store.",
    "storage_errors_total": "Failed commits or snapshots (disk full, I/O errors).",
    "rounds_completed_total": "Strategy rounds completed.",
    "iterations_total": "Strategy iterations opened.",
    "barrier_waiting": "Requests waiting at a strategy's round barrier now.",
    "threads": "Threads of the server process (waiting requests hold none).",
}

BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _StateCollector(Collector):
    def __init__(self, read: Callable[[], Mapping[str, float]]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        for name, value in self.read().items():
            help_text = HELP.get(name, name.replace("_", " "))
            if name.endswith("_total"):
                yield CounterMetricFamily(f"splitexport_{name[:-6]}", help_text, value=value)
            else:
                yield GaugeMetricFamily(f"splitexport_{name}", help_text, value=value)


class Metrics:
    """The app's registry: state counters read at scrape time, phase histograms observed per call."""

    def __init__(self, read: Callable[[], Mapping[str, float]]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_StateCollector(read))
        self.phases = Histogram("splitexport_call_phase_seconds", "Server time of a tensor call by Server-Timing "
                                "phase (decode, wait, b, checkpoint, encode, total).", ["call", "phase"],
                                buckets=BUCKETS, registry=self.registry)
        self._children: dict[tuple[str, str], Histogram] = {}
        """(call, phase) -> its histogram: ``labels()`` takes a lock and validates on every call."""

    def _child(self, call: str, phase: str) -> Histogram:
        child = self._children.get((call, phase))
        if child is None:
            child = self._children[call, phase] = self.phases.labels(call, phase)
        return child

    def observe(self, call: str, timer: CallTimer) -> None:
        total = 0.0
        for phase, seconds in timer.seconds.items():
            self._child(call, phase).observe(seconds)
            total += seconds
        self._child(call, "total").observe(total)

    def render(self) -> bytes:
        return generate_latest(self.registry)
