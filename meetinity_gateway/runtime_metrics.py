"""Metrics of the process and of the loaded configuration, beside the observe layer's own.

Registered in the observe layer's registry (so they come out of the same ``/metrics``) by the
loader once a pipeline is built (:func:`watch_pipeline`, called by
:mod:`meetinity_gateway.assembly` under every loader), read at scrape time::

    process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, …
                                  prometheus-client's process collector (Linux: /proc)
    python_info{implementation,major,minor,patchlevel,version}
    gateway_build_info{version,python}                                 gauge, always 1
    gateway_upstream_target_state{upstream,target,state}               gauge, 1 or 0
    gateway_config_reloads_total{result}                               counter
    gateway_otel_spans_exported_total, gateway_otel_spans_dropped_total,
    gateway_otel_export_failures_total           counters, with OpenTelemetry tracing on

``state`` is each of ``healthy``, ``ejected`` and ``panic`` (ejected, but getting traffic
because every target of its upstream is ejected): 1 for the target's current state, 0 for
the others, so ``sum by (upstream) (…{state="ejected"})`` counts the ejected targets.
``result`` is ``success`` or ``failure`` (a configuration the reload refused).
A reload keeps these collectors and points them at the new pipeline's upstreams. With
``PROMETHEUS_MULTIPROC_DIR`` (several worker processes) the observe layer has no registry
of its own and nothing is registered here: the scale-out setup merges its own view.
"""
from __future__ import annotations

import platform
import sys
import threading
import typing as t

from meetinity_gateway import __version__
from meetinity_gateway.pipeline import described

__all__ = ["RELOADS", "RuntimeCollector", "count_reload", "watch_pipeline"]

#: Configuration reloads of this process, by result.
RELOADS = {"success": 0, "failure": 0}
_lock = threading.Lock()

STATES = ("healthy", "ejected", "panic")


def count_reload(ok: bool) -> None:
    with _lock:
        RELOADS["success" if ok else "failure"] += 1


class RuntimeCollector:
    """A prometheus-client custom collector (see the module docstring)."""

    def __init__(self, namespace: str = "gateway") -> None:
        self.namespace = namespace
        self.pools: t.Callable[[], t.Mapping[str, t.Any]] = dict

    def describe(self):
        return []  # registered without describing: collected only at scrape time

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        ns = self.namespace
        build = GaugeMetricFamily(f"{ns}_build_info", "The gateway's version (always 1).",
                                  labels=("version", "python"))
        build.add_metric((__version__, platform.python_version()), 1)
        yield build
        state = GaugeMetricFamily(
            f"{ns}_upstream_target_state", "Each upstream target's state: 1 for the current "
            "one of healthy, ejected, panic (ejected but served: all targets are ejected).",
            labels=("upstream", "target", "state"))
        for name, pool in sorted(self.pools().items()):
            panic = bool(getattr(pool, "panic", False))
            for row in pool.snapshot():
                current = row["state"]
                if current == "ejected" and panic:
                    current = "panic"
                for value in STATES:
                    state.add_metric((name, row["target"], value), 1 if value == current else 0)
        yield state
        reloads = CounterMetricFamily(f"{ns}_config_reloads", "Configuration reloads, by "
                                      "result (failure: the new files were refused).",
                                      labels=("result",))
        with _lock:
            counts = dict(RELOADS)
        for result, count in counts.items():
            reloads.add_metric((result,), count)
        yield reloads
        tracing = sys.modules.get("meetinity_gateway.tracing")  # loaded only when it is on
        current = getattr(tracing, "_tracing", None) if tracing is not None else None
        if current is not None:
            spans = current.processor
            for name, value, text in (
                    ("otel_spans_exported", spans.exported, "Spans the collector accepted."),
                    ("otel_spans_dropped", spans.dropped, "Spans dropped: the export queue "
                     "was full (collector down or slow)."),
                    ("otel_export_failures", spans.failed, "Spans whose export failed.")):
                family = CounterMetricFamily(f"{ns}_{name}", text)
                family.add_metric((), value)
                yield family


def watch_pipeline(pipeline) -> None:
    """Register the runtime metrics in the registry of the pipeline's observe layer (once per
    registry) and point them at this pipeline's upstream pools."""
    router = pipeline.router
    pools = {name: endpoint.pool for name, endpoint in
             (router.endpoints.items() if router is not None else ())
             if getattr(endpoint, "pool", None) is not None and not name.startswith("@")}
    for layer in described(pipeline):
        if layer.kind != "observe" or layer.app.registry is None:
            continue  # not the observe layer, or its metrics are off or multiprocess
        metrics = layer.app.metrics
        collector = metrics.runtime
        if collector is None:
            from prometheus_client import PlatformCollector, ProcessCollector

            registry = layer.app.registry
            collector = RuntimeCollector(layer.app.namespace)
            registry.register(collector)
            ProcessCollector(registry=registry)  # nothing where /proc is missing
            PlatformCollector(registry=registry)
            metrics.runtime = collector
        collector.pools = lambda pools=pools: pools
