"""Per-deployment health figures: time series for the API (requests/s, generated tokens/s, inference time, queue
duration, replicas, utilization, each also per adapter) and running totals for Prometheus.

Kept in memory by the API process that runs the replicas, one point per `interval` seconds over the last hour.
Utilization is the share of replica time with at least one request being served (what a GPU's "utilization"
reports: the accelerator was busy), and cpu_utilization the replicas' processes' CPU time over the machine's.
"""

import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

KEEP_SECONDS = 3600.0
BASE = "base"  # the adapter label of requests to the base model alone
INFERENCE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # seconds


@dataclass
class _Figures:
    requests: int = 0
    errors: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    inference_ms: float = 0.0  # summed over requests
    queue_ms: float = 0.0

    def add(self, tokens: int, prompt: int, inference_ms: float, queue_ms: float, ok: bool) -> None:
        self.requests += 1
        self.errors += 0 if ok else 1
        self.generated_tokens += tokens
        self.prompt_tokens += prompt
        self.inference_ms += inference_ms
        self.queue_ms += queue_ms

    def point(self, interval: float) -> dict[str, Any]:
        n = max(self.requests, 1)
        return {
            "requests": self.requests,
            "errors": self.errors,
            "requests_per_second": round(self.requests / interval, 4),
            "generated_tokens_per_second": round(self.generated_tokens / interval, 3),
            "inference_time_ms": round(self.inference_ms / n, 1) if self.requests else None,
            "queue_duration_ms": round(self.queue_ms / n, 1) if self.requests else None,
        }


@dataclass
class _Bucket:
    figures: _Figures = field(default_factory=_Figures)
    adapters: dict[str, _Figures] = field(default_factory=lambda: defaultdict(_Figures))
    replica_samples: list[int] = field(default_factory=list)
    busy_samples: list[float] = field(default_factory=list)  # per sample: busy replicas / replicas
    cpu_samples: list[float] = field(default_factory=list)


@dataclass
class _Totals:
    """Since the API process started, for Prometheus counters."""

    by_adapter: dict[str, _Figures] = field(default_factory=lambda: defaultdict(_Figures))
    histogram: dict[str, list[int]] = field(default_factory=dict)  # adapter -> counts per bucket (+Inf last)
    replica_seconds: float = 0.0
    cold_starts: list[dict[str, Any]] = field(default_factory=list)  # the last few


@dataclass
class Gauges:
    """What the runtime reports at scrape time."""

    deployment_id: str
    name: str
    tenant_id: str
    accelerator: str
    status: str
    replicas: dict[str, int]  # state -> count
    in_flight: int
    waiting: int


class DeploymentMetrics:
    def __init__(self, interval: float, clock: Any = time.time) -> None:
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._series: dict[str, dict[int, _Bucket]] = defaultdict(dict)
        self._totals: dict[str, _Totals] = defaultdict(_Totals)

    def _bucket(self, deployment_id: str) -> _Bucket:
        index = int(self._clock() // self.interval)
        series = self._series[deployment_id]
        bucket = series.get(index)
        if bucket is None:
            bucket = series[index] = _Bucket()
            oldest = index - int(KEEP_SECONDS // self.interval)
            for old in [i for i in series if i < oldest]:
                del series[old]
        return bucket

    def request(
        self,
        deployment_id: str,
        adapter: str | None,
        generated_tokens: int,
        prompt_tokens: int,
        inference_ms: float,
        queue_ms: float,
        ok: bool,
    ) -> None:
        label = adapter or BASE
        with self._lock:
            bucket = self._bucket(deployment_id)
            for figures in (bucket.figures, bucket.adapters[label], self._totals[deployment_id].by_adapter[label]):
                figures.add(generated_tokens, prompt_tokens, inference_ms, queue_ms, ok)
            counts = self._totals[deployment_id].histogram.setdefault(label, [0] * (len(INFERENCE_BUCKETS) + 1))
            seconds = inference_ms / 1000
            index = next((i for i, edge in enumerate(INFERENCE_BUCKETS) if seconds <= edge), len(INFERENCE_BUCKETS))
            counts[index] += 1

    def sample(self, deployment_id: str, replicas: int, busy: int, cpu_fraction: float | None, seconds: float) -> None:
        """One look at the replicas (every tick): how many are up, how many serve a request, their CPU."""
        with self._lock:
            bucket = self._bucket(deployment_id)
            bucket.replica_samples.append(replicas)
            bucket.busy_samples.append(busy / replicas if replicas else 0.0)
            if cpu_fraction is not None:
                bucket.cpu_samples.append(cpu_fraction)
            self._totals[deployment_id].replica_seconds += replicas * seconds

    def cold_start(self, deployment_id: str, record: dict[str, Any]) -> None:
        with self._lock:
            starts = self._totals[deployment_id].cold_starts
            starts.append(record)
            del starts[:-20]

    def forget(self, deployment_id: str) -> None:
        with self._lock:
            self._series.pop(deployment_id, None)
            self._totals.pop(deployment_id, None)

    def series(self, deployment_id: str, minutes: float) -> dict[str, Any]:
        """Points oldest first over the last `minutes`; intervals without samples (no runtime then) are left out."""
        with self._lock:
            now = int(self._clock() // self.interval)
            first = now - int(minutes * 60 // self.interval)
            buckets = sorted((i, b) for i, b in self._series.get(deployment_id, {}).items() if i >= first)
            points, adapters = [], defaultdict(list)
            for index, bucket in buckets:
                at = datetime.fromtimestamp(index * self.interval, UTC).isoformat()
                point = {"t": at} | bucket.figures.point(self.interval)
                point["replicas"] = _mean(bucket.replica_samples)
                point["utilization"] = _mean(bucket.busy_samples)
                point["cpu_utilization"] = _mean(bucket.cpu_samples)
                points.append(point)
                for label, figures in bucket.adapters.items():
                    adapters[label].append({"t": at} | figures.point(self.interval))
            totals = self._totals.get(deployment_id, _Totals())
            return {
                "interval_seconds": self.interval,
                "points": points,
                "adapters": dict(adapters),
                "cold_starts": list(totals.cold_starts),
            }

    def collector(self, gauges: Any) -> Collector:
        """A Prometheus collector reading these figures and the runtime's `gauges()` at scrape time."""
        return _Collector(self, gauges)

    def _snapshot(self) -> dict[str, _Totals]:
        with self._lock:
            return {
                k: _Totals(
                    by_adapter={a: _Figures(**vars(f)) for a, f in t.by_adapter.items()},
                    histogram={a: list(c) for a, c in t.histogram.items()},
                    replica_seconds=t.replica_seconds,
                    cold_starts=list(t.cold_starts),
                )
                for k, t in self._totals.items()
            }


def _mean(values: list[float] | list[int]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


class _Collector(Collector):
    def __init__(self, metrics: DeploymentMetrics, gauges: Any) -> None:
        self.metrics, self.gauges = metrics, gauges

    def collect(self) -> Iterator[Any]:
        live: Iterable[Gauges] = self.gauges()
        by_id = {g.deployment_id: g for g in live}
        totals = self.metrics._snapshot()
        labels = ["deployment", "tenant", "adapter"]

        def names(deployment_id: str) -> tuple[str, str] | None:
            g = by_id.get(deployment_id)
            return (g.name, g.tenant_id) if g else None

        families = {
            "requests": CounterMetricFamily("loraplex_deployment_requests", "Requests served", labels=labels),
            "errors": CounterMetricFamily("loraplex_deployment_request_errors", "Requests that failed", labels=labels),
            "generated": CounterMetricFamily("loraplex_deployment_generated_tokens", "Tokens generated", labels=labels),
            "prompt": CounterMetricFamily("loraplex_deployment_prompt_tokens", "Prompt tokens", labels=labels),
            "queue": CounterMetricFamily(
                "loraplex_deployment_queue_seconds", "Time requests waited for a replica or a batch slot", labels=labels
            ),
        }
        histogram = HistogramMetricFamily(
            "loraplex_deployment_inference_seconds", "Time from a request's arrival to its last token", labels=labels
        )
        for deployment_id, t in totals.items():
            who = names(deployment_id)
            if who is None:
                continue
            for adapter, f in t.by_adapter.items():
                values = [*who, adapter]
                families["requests"].add_metric(values, f.requests)
                families["errors"].add_metric(values, f.errors)
                families["generated"].add_metric(values, f.generated_tokens)
                families["prompt"].add_metric(values, f.prompt_tokens)
                families["queue"].add_metric(values, f.queue_ms / 1000)
                counts = t.histogram.get(adapter, [0] * (len(INFERENCE_BUCKETS) + 1))
                cumulative, buckets = 0, []
                for edge, count in zip([*map(str, INFERENCE_BUCKETS), "+Inf"], counts, strict=True):
                    cumulative += count
                    buckets.append((edge, cumulative))
                histogram.add_metric(values, buckets, f.inference_ms / 1000)
        yield from families.values()
        yield histogram

        dep_labels = ["deployment", "tenant", "accelerator"]
        replicas = GaugeMetricFamily("loraplex_deployment_replicas", "Replicas by state", labels=[*dep_labels, "state"])
        status = GaugeMetricFamily(
            "loraplex_deployment_status", "1 for the current status", labels=[*dep_labels, "status"]
        )
        in_flight = GaugeMetricFamily(
            "loraplex_deployment_in_flight_requests", "Requests being served", labels=dep_labels
        )
        waiting = GaugeMetricFamily(
            "loraplex_deployment_waiting_requests", "Requests waiting for a replica", labels=dep_labels
        )
        seconds = CounterMetricFamily("loraplex_deployment_replica_seconds", "Replica time up", labels=dep_labels)
        cold = GaugeMetricFamily("loraplex_deployment_cold_start_seconds", "Last wake from zero", labels=dep_labels)
        for g in by_id.values():
            values = [g.name, g.tenant_id, g.accelerator]
            for state in ("starting", "ready", "draining"):
                replicas.add_metric([*values, state], g.replicas.get(state, 0))
            status.add_metric([*values, g.status], 1)
            in_flight.add_metric(values, g.in_flight)
            waiting.add_metric(values, g.waiting)
            kept = totals.get(g.deployment_id)
            seconds.add_metric(values, kept.replica_seconds if kept else 0.0)
            if kept and kept.cold_starts:
                cold.add_metric(values, kept.cold_starts[-1]["seconds"])
        yield from (replicas, status, in_flight, waiting, seconds, cold)
