"""Prometheus metrics of one engine (served at ``/metrics`` by ``osum-serve``).

A registry per engine, so that several engines in one process (tests) do not collide.
Under ``osum-serve --workers N`` (:mod:`streaming.workers`), ``PROMETHEUS_MULTIPROC_DIR`` is
set: every worker writes its values there and renders the sum over all workers, so a
scrape that reaches any worker sees the whole server (gauges: the live workers' sum).

| metric | type | meaning |
|---|---|---|
| ``osum_sessions_opened_total`` | counter | sessions opened (``resumed`` label) |
| ``osum_sessions_refused_total`` | counter | sessions refused, by error ``code`` |
| ``osum_sessions_active`` | gauge | open sessions |
| ``osum_audio_seconds_total`` | counter | audio received, seconds |
| ``osum_events_total`` | counter | events sent, by ``type`` |
| ``osum_errors_total`` | counter | error events, by ``code`` |
| ``osum_calls_failed_total`` | counter | calls a server refused or ended with an error, by ``protocol`` (grpc, ws, realtime, http) and ``code`` |
| ``osum_result_latency_seconds`` | histogram | ``processing_latency_ms`` of the results sent (audio arrived -> result handed over), by ``type`` |
| ``osum_work_seconds`` | histogram | queue wait + model time of a request, by ``kind`` |
| ``osum_queue_depth`` | gauge | requests waiting for the model worker |
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["EngineMetrics"]

_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)


class EngineMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.opened = Counter("osum_sessions_opened", "Sessions opened", ["resumed"], registry=r)
        self.refused = Counter("osum_sessions_refused", "Sessions refused", ["code"], registry=r)
        self.active = Gauge("osum_sessions_active", "Open sessions", registry=r, multiprocess_mode="livesum")
        self.audio = Counter("osum_audio_seconds", "Audio received, seconds", registry=r)
        self.events = Counter("osum_events", "Events sent", ["type"], registry=r)
        self.errors = Counter("osum_errors", "Error events", ["code"], registry=r)
        self.failed = Counter("osum_calls_failed", "Calls a server refused or ended with an error", ["protocol", "code"], registry=r)
        self.latency = Histogram("osum_result_latency_seconds", "Audio arrived -> result handed to the connection",
                                 ["type"], buckets=_BUCKETS, registry=r)  # fmt: skip
        self.work = Histogram("osum_work_seconds", "Queue wait plus model time per request", ["kind"], buckets=_BUCKETS, registry=r)
        self.queue = Gauge("osum_queue_depth", "Requests waiting for the model worker", registry=r, multiprocess_mode="livesum")

    def render(self) -> bytes:
        """The text exposition format (with workers: all workers' values, summed)."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged)
            return generate_latest(merged)
        return generate_latest(self.registry)
