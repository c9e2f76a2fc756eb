"""The health figures the runtime samples once per tick: per deployment, the replicas serving, how many of them
have a request in flight, and their processes' share of the machine's CPU (metrics.py keeps the series)."""

from typing import Any

from functions.deployments.live import Fleet
from functions.deployments.metrics import DeploymentMetrics
from functions.deployments.replica import Replica


class Sampler:
    """Samples into `metrics`; keeps one psutil handle per replica process (CPU use is measured between calls)."""

    def __init__(self, fleet: Fleet, metrics: DeploymentMetrics) -> None:
        self.fleet, self.metrics = fleet, metrics
        self._cpu: dict[int, Any] = {}  # pid -> psutil.Process

    def sample(self, seconds: float) -> None:
        """One sample per deployment, covering the `seconds` since the last one."""
        with self.fleet.lock:
            figures = []
            for live in self.fleet.deployments.values():
                serving = [r for r in live.replicas if r.state in ("ready", "draining")]
                figures.append((live.id, len(serving), sum(1 for r in serving if r.load > 0), serving))
        for deployment_id, count, busy, serving in figures:
            cpu = self.cpu_fraction(serving)
            self.metrics.sample(deployment_id, count, busy, cpu, seconds)

    def cpu_fraction(self, replicas: list[Replica]) -> float | None:
        """The replicas' CPU use as a share of the machine's cores (psutil; None where it cannot tell)."""
        try:
            import psutil
        except ImportError:
            return None
        total, cores = 0.0, psutil.cpu_count() or 1
        for r in replicas:
            pid = r.pid
            if pid is None:
                continue
            process = self._cpu.get(pid)
            try:
                if process is None:
                    process = self._cpu[pid] = psutil.Process(pid)
                    process.cpu_percent(None)  # the first call starts the measurement
                    continue
                total += process.cpu_percent(None)
            except psutil.Error:
                self._cpu.pop(pid, None)
        return round(total / 100 / cores, 4) if replicas else 0.0
