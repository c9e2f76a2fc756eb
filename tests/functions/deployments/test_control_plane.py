"""The control plane's pieces that many API processes share through the database (SQLite and PostgreSQL): one
holder of a lease at a time, taken over once it expires; counters that concurrent writers add to without losing a
count; a requests-per-second limit that two limiters (two processes) enforce together; health figures written by
two processes and read the same by either; load reports that the holder adds up. (Two real API processes:
tests/e2e/test_control_plane_e2e.py.)"""

import threading
import time

import pytest

from app.control_lease import Lease
from app.db import session_scope, sessions
from app.models import Deployment, RateLog
from conftest import TINY_MODEL, Platform, make_tenant
from web.errors import APIError
from web.shared_limits import SharedLimiter


def test_one_holder_at_a_time_and_a_take_over_once_it_expires(platform: Platform) -> None:
    first, second = Lease("loop", "host:1", 0.6), Lease("loop", "host:2", 0.6)
    assert first.hold() and not second.hold()
    assert first.hold() and first.held  # renewed (or still fresh)
    time.sleep(0.7)  # the first stops renewing (it died, or hangs): the lease runs out
    assert second.hold() and not first.hold()
    second.release()
    assert first.hold()


def test_concurrent_additions_lose_no_count(platform: Platform) -> None:
    from app import counters

    def add() -> None:
        for _ in range(10):
            with session_scope() as s:
                counters.add(s, RateLog, {"key": "k", "at": 7}, {"count": 1})

    threads = [threading.Thread(target=add) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with session_scope() as s:
        assert s.get_one(RateLog, ("k", 7)).count == 80


def test_the_requests_per_second_limit_holds_across_two_limiters(platform: Platform) -> None:
    now = [100.2]
    processes = [SharedLimiter(clock=lambda: now[0]), SharedLimiter(clock=lambda: now[0])]
    db = sessions()()  # the request's session, which the check commits
    refused = 0
    for i in range(7):  # 3 allowed in any second: 4 refused, whichever process each request reaches
        now[0] += 0.1
        try:
            processes[i % 2]._rate(db, "t1", 3)
        except APIError as error:
            assert error.status == 429 and error.headers == {"Retry-After": "1"}
            refused += 1
    assert refused == 4
    processes[0]._rate(db, "t2", 3)  # another tenant's own count
    now[0] = 101.35  # the first request (at 100.3) left the last second: one more goes through, not two
    processes[1]._rate(db, "t1", 3)
    with pytest.raises(APIError):
        processes[0]._rate(db, "t1", 3)


def test_health_figures_written_by_two_processes_read_the_same_from_either(platform: Platform) -> None:
    from functions.deployments.metrics import DeploymentMetrics

    tenant_id, _ = make_tenant("acme")
    with session_scope() as s:
        row = Deployment(
            tenant_id=tenant_id,
            name="d",
            base_model=TINY_MODEL,
            accelerator="cpu",
            engine="native",
            min_replicas=0,
            max_replicas=1,
            scale_up_threshold=1,
            cooldown_time=60,
        )
        s.add(row)
        s.flush()
        deployment_id = row.id
    clock = [1_000_000.0]
    a, b = DeploymentMetrics(10, clock=lambda: clock[0]), DeploymentMetrics(10, clock=lambda: clock[0])
    a.request(deployment_id, None, 4, 3, 120.0, 5.0, True)
    b.request(deployment_id, "repo/1", 6, 3, 80.0, 0.0, True)
    b.request(deployment_id, None, 0, 3, 10.0, 0.0, False)
    a.sample(deployment_id, 2, 1, 0.25, 0.5)
    a.cold_start(deployment_id, {"seconds": 1.5})
    for process in (a, b):
        process.flush()
    assert a.series(deployment_id, 5) == b.series(deployment_id, 5)
    series = a.series(deployment_id, 5)
    [point] = series["points"]
    assert (point["requests"], point["errors"], point["generated_tokens_per_second"]) == (3, 1, 1.0)
    assert (point["replicas"], point["utilization"], point["cpu_utilization"]) == (2, 0.5, 0.25)
    assert sum(p["requests"] for p in series["adapters"]["base"]) == 2
    assert series["cold_starts"] == [{"seconds": 1.5}]
    totals = b._snapshot()[deployment_id]
    assert totals.by_adapter["base"].requests == 2 and sum(totals.histogram["base"]) == 2
    assert totals.replica_seconds == pytest.approx(1.0)
