"""Per-deployment health figures: time series for the API (requests/s, generated tokens/s, inference time, queue
duration, replicas, utilization, each also per adapter) and running totals for Prometheus.

Kept in the database (`deployment_points`, `deployment_latency`, the deployment row's `cold_starts`), so every API
process answers the same figures: each process buffers what it served (and the lease holder its replica samples)
and adds them to the rows once per runtime tick, atomically (app/counters.py). One point per `interval` seconds
over the last hour; the running totals (period TOTAL) are kept while the deployment is. Utilization is the share of
replica time with at least one request being served (what a GPU's "utilization" reports: the accelerator was
busy), and cpu_utilization the replicas' processes' CPU time over the machine's.
"""

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import delete, select

from app import counters
from app.db import session_scope
from app.models import Deployment, DeploymentLatency, DeploymentPoint

log = logging.getLogger(__name__)
KEEP_SECONDS = 3600.0
BASE = "base"  # the adapter label of requests to the base model alone
OWN = ""  # the adapter label of a deployment's own row (replica samples)
TOTAL = -1  # the period of the running totals
INFERENCE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # seconds
REQUEST_COLUMNS = ("requests", "errors", "generated_tokens", "prompt_tokens", "inference_ms", "queue_ms")
SAMPLE_COLUMNS = ("samples", "replicas_sum", "busy_sum", "cpu_samples", "cpu_sum", "replica_seconds")


def _point(row: Any, interval: float) -> dict[str, Any]:
    """A point's request figures, from a row (or a sum of rows) with the REQUEST_COLUMNS."""
    n = max(row.requests, 1)
    return {
        "requests": row.requests,
        "errors": row.errors,
        "requests_per_second": round(row.requests / interval, 4),
        "generated_tokens_per_second": round(row.generated_tokens / interval, 3),
        "inference_time_ms": round(row.inference_ms / n, 1) if row.requests else None,
        "queue_duration_ms": round(row.queue_ms / n, 1) if row.requests else None,
    }


@dataclass
class _Sum:
    """REQUEST_COLUMNS summed over rows."""

    requests: int = 0
    errors: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    inference_ms: float = 0.0
    queue_ms: float = 0.0

    def add(self, row: Any) -> None:
        for column in REQUEST_COLUMNS:
            setattr(self, column, getattr(self, column) + getattr(row, column))


@dataclass
class _Totals:
    """Since the deployment was created, for Prometheus counters (read from the TOTAL rows)."""

    by_adapter: dict[str, Any] = field(default_factory=dict)  # label -> its TOTAL row
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
    """This process's figures not yet added to the rows, and the reading of the rows. `clock`: wall-clock seconds
    (the periods are shared by every process)."""

    def __init__(self, interval: float, clock: Any = time.time) -> None:
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._amounts: dict[tuple[str, str, int], dict[str, float]] = {}  # (deployment, label, period) -> column -> n
        self._latency: dict[tuple[str, str, int], int] = defaultdict(int)  # (deployment, label, bucket) -> requests
        self._cold_starts: list[tuple[str, dict[str, Any]]] = []
        self._pruned_at = 0.0

    def _add(self, key: tuple[str, str, int], **amounts: float) -> None:
        kept = self._amounts.setdefault(key, {})
        for column, amount in amounts.items():
            kept[column] = kept.get(column, 0) + amount

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
        period = int(self._clock() // self.interval)
        figures = {
            "requests": 1,
            "errors": 0 if ok else 1,
            "generated_tokens": generated_tokens,
            "prompt_tokens": prompt_tokens,
            "inference_ms": inference_ms,
            "queue_ms": queue_ms,
        }
        seconds = inference_ms / 1000
        bucket = next((i for i, edge in enumerate(INFERENCE_BUCKETS) if seconds <= edge), len(INFERENCE_BUCKETS))
        with self._lock:
            self._add((deployment_id, label, period), **figures)
            self._add((deployment_id, label, TOTAL), **figures)
            self._latency[(deployment_id, label, bucket)] += 1

    def sample(self, deployment_id: str, replicas: int, busy: int, cpu_fraction: float | None, seconds: float) -> None:
        """One look at the replicas (every tick of the lease holder): how many are up, how many serve, their CPU."""
        period = int(self._clock() // self.interval)
        figures: dict[str, float] = {
            "samples": 1,
            "replicas_sum": replicas,
            "busy_sum": busy / replicas if replicas else 0.0,
        }
        if cpu_fraction is not None:
            figures |= {"cpu_samples": 1, "cpu_sum": cpu_fraction}
        with self._lock:
            self._add((deployment_id, OWN, period), **figures, replica_seconds=replicas * seconds)
            self._add((deployment_id, OWN, TOTAL), replica_seconds=replicas * seconds)

    def cold_start(self, deployment_id: str, record: dict[str, Any]) -> None:
        with self._lock:
            self._cold_starts.append((deployment_id, record))

    def flush(self) -> None:
        """Add what this process gathered since the last flush to the rows (every runtime tick). A flush that fails
        keeps its figures for the next one."""
        with self._lock:
            amounts, self._amounts = self._amounts, {}
            latency, self._latency = self._latency, defaultdict(int)
            starts, self._cold_starts = self._cold_starts, []
        if not amounts and not latency and not starts:
            return
        try:
            with session_scope() as s:
                ids = {k[0] for k in amounts} | {k[0] for k in latency} | {d for d, _ in starts}
                live = set(s.scalars(select(Deployment.id).where(Deployment.id.in_(ids))))  # deleted: dropped
                for (deployment_id, label, period), values in sorted(amounts.items()):
                    if deployment_id in live:
                        key = {"deployment_id": deployment_id, "adapter": label, "period": period}
                        counters.add(s, DeploymentPoint, key, values)
                for (deployment_id, label, bucket), count in sorted(latency.items()):
                    if deployment_id in live:
                        key = {"deployment_id": deployment_id, "adapter": label, "bucket": bucket}
                        counters.add(s, DeploymentLatency, key, {"count": count})
                for deployment_id, record in starts:
                    row = s.get(Deployment, deployment_id)
                    if row is not None:
                        row.cold_starts = [*(row.cold_starts or []), record][-20:]
        except Exception:  # noqa: BLE001 - the figures are kept for the next flush
            log.warning("could not write deployment figures; keeping them for the next flush", exc_info=True)
            with self._lock:
                for kept, values in amounts.items():
                    self._add(kept, **values)
                for bucket_key, count in latency.items():
                    self._latency[bucket_key] += count
                self._cold_starts[:0] = starts

    def prune(self) -> None:
        """Forget points older than KEEP_SECONDS (the lease holder, once a minute)."""
        now = self._clock()
        if now - self._pruned_at < 60:
            return
        self._pruned_at = now
        oldest = int((now - KEEP_SECONDS) // self.interval)
        with session_scope() as s:
            s.execute(delete(DeploymentPoint).where(DeploymentPoint.period >= 0, DeploymentPoint.period < oldest))

    def forget(self, deployment_id: str) -> None:
        """A deployment deleted: its figures go."""
        with self._lock:
            self._amounts = {k: v for k, v in self._amounts.items() if k[0] != deployment_id}
        with session_scope() as s:
            s.execute(delete(DeploymentPoint).where(DeploymentPoint.deployment_id == deployment_id))
            s.execute(delete(DeploymentLatency).where(DeploymentLatency.deployment_id == deployment_id))

    def series(self, deployment_id: str, minutes: float) -> dict[str, Any]:
        """Points oldest first over the last `minutes`; intervals without figures (no runtime then) are left out."""
        now = int(self._clock() // self.interval)
        first = now - int(minutes * 60 // self.interval)
        with session_scope() as s:
            rows = s.scalars(
                select(DeploymentPoint)
                .where(DeploymentPoint.deployment_id == deployment_id, DeploymentPoint.period >= first)
                .order_by(DeploymentPoint.period, DeploymentPoint.adapter)
            ).all()
            deployment = s.get(Deployment, deployment_id)
            cold_starts = list(deployment.cold_starts or []) if deployment is not None else []
        by_period: dict[int, list[DeploymentPoint]] = defaultdict(list)
        for row in rows:
            by_period[row.period].append(row)
        points, adapters = [], defaultdict(list)
        for period, kept in sorted(by_period.items()):
            at = datetime.fromtimestamp(period * self.interval, UTC).isoformat()
            summed = _Sum()
            own = None
            for row in kept:
                if row.adapter == OWN:
                    own = row
                    continue
                summed.add(row)
                adapters[row.adapter].append({"t": at} | _point(row, self.interval))
            point = {"t": at} | _point(summed, self.interval)
            point["replicas"] = round(own.replicas_sum / own.samples, 4) if own and own.samples else None
            point["utilization"] = round(own.busy_sum / own.samples, 4) if own and own.samples else None
            point["cpu_utilization"] = round(own.cpu_sum / own.cpu_samples, 4) if own and own.cpu_samples else None
            points.append(point)
        return {
            "interval_seconds": self.interval,
            "points": points,
            "adapters": dict(adapters),
            "cold_starts": cold_starts,
        }

    def collector(self, gauges: Any) -> Collector:
        """A Prometheus collector reading the rows and the runtime's `gauges()` at scrape time."""
        return _Collector(self, gauges)

    def _snapshot(self) -> dict[str, _Totals]:
        """Every deployment's running totals, from the rows."""
        with session_scope() as s:
            rows = s.scalars(select(DeploymentPoint).where(DeploymentPoint.period == TOTAL)).all()
            latency = s.scalars(select(DeploymentLatency)).all()
            starts = s.execute(
                select(Deployment.id, Deployment.cold_starts).where(Deployment.status != "Deleted")
            ).all()
        totals: dict[str, _Totals] = defaultdict(_Totals)
        for row in rows:
            if row.adapter == OWN:
                totals[row.deployment_id].replica_seconds = row.replica_seconds
            else:
                totals[row.deployment_id].by_adapter[row.adapter] = row
        for bucket in latency:
            counts = totals[bucket.deployment_id].histogram.setdefault(
                bucket.adapter, [0] * (len(INFERENCE_BUCKETS) + 1)
            )
            counts[bucket.bucket] += bucket.count
        for deployment_id, cold_starts in starts:
            if cold_starts:
                totals[deployment_id].cold_starts = list(cold_starts)
        return dict(totals)


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
