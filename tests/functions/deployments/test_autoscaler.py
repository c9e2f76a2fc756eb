"""The autoscaler's decisions replayed with a made-up clock: wake from zero, scale up past the threshold, hold
through the cooldown, scale down to min_replicas (zero: Standby), and the floor and ceiling."""

from functions.deployments.autoscaler import ReplicaView, ScalerMemory, ScalingConfig, decide

CONFIG = ScalingConfig(min_replicas=0, max_replicas=3, scale_up_threshold=2, cooldown_time=60)


def ready(*in_flight: int) -> tuple[ReplicaView, ...]:
    return tuple(ReplicaView(f"r{i}", "ready", n) for i, n in enumerate(in_flight))


def test_a_request_wakes_a_deployment_at_zero() -> None:
    decision = decide(CONFIG, (), waiting=1, memory=ScalerMemory(0.0), now=10.0)
    assert decision.target == 1 and "waking" in decision.reason
    assert decision.memory == ScalerMemory(10.0)
    assert decide(CONFIG, (), waiting=0, memory=ScalerMemory(0.0), now=10.0).target == 0  # idle stays at zero


def test_scales_up_once_requests_per_replica_exceed_the_threshold() -> None:
    memory = ScalerMemory(0.0)
    assert decide(CONFIG, ready(2), 0, memory, 5.0).target == 1  # 2 per replica: at the threshold, not above
    up = decide(CONFIG, ready(3), 0, memory, 5.0)
    assert up.target == 2 and "3 concurrent request(s) = 3.0 per replica > scale_up_threshold 2: 1 -> 2" in up.reason
    assert decide(CONFIG, ready(4, 3), 0, memory, 5.0).target == 3  # ceil(7 / 2) = 4, capped at max_replicas
    assert decide(CONFIG, ready(9, 9, 9), 0, memory, 5.0).target == 3  # at the ceiling: stays
    assert decide(CONFIG, ready(2), 2, memory, 5.0).target == 2  # requests waiting for a replica count too


def test_scales_down_only_after_the_cooldown_from_the_last_busy_moment() -> None:
    memory = decide(CONFIG, ready(3, 3), 0, ScalerMemory(0.0), now=100.0).memory  # both replicas needed at 100
    assert memory == ScalerMemory(100.0)
    held = decide(CONFIG, ready(0, 0), 0, memory, now=130.0)
    assert held.target == 2 and held.memory == memory and "cooling down: 30 of 60 s" in held.reason
    busy_again = decide(CONFIG, ready(2, 2), 0, memory, now=140.0)  # a burst restarts the cooldown
    assert busy_again.target == 2 and busy_again.memory == ScalerMemory(140.0)
    assert decide(CONFIG, ready(0, 0), 0, busy_again.memory, now=190.0).target == 2
    down = decide(CONFIG, ready(0, 0), 0, busy_again.memory, now=200.0)
    assert down.target == 0 and "cooldown_time 60 s: 2 -> 0 replicas" in down.reason
    partial = decide(CONFIG, ready(1, 0, 0), 0, ScalerMemory(0.0), now=60.0)  # one replica still needed
    assert partial.target == 1


def test_min_and_max_replicas_bound_every_decision() -> None:
    floor = ScalingConfig(min_replicas=2, max_replicas=3, scale_up_threshold=1, cooldown_time=0)
    assert decide(floor, (), 0, ScalerMemory(0.0), 1.0).target == 2  # brought up to min_replicas at once
    assert decide(floor, ready(0, 0), 0, ScalerMemory(0.0), 99.0).target == 2  # never below it
    lowered = ScalingConfig(min_replicas=0, max_replicas=1, scale_up_threshold=1, cooldown_time=600)
    over = decide(lowered, ready(0, 0, 0), 0, ScalerMemory(0.0), 1.0)  # max_replicas lowered by an update
    assert over.target == 1 and "above max_replicas 1" in over.reason


def test_draining_replicas_are_not_counted_but_their_requests_are() -> None:
    replicas = (ReplicaView("old", "draining", 2), ReplicaView("new", "ready", 1))
    decision = decide(CONFIG, replicas, 0, ScalerMemory(0.0), 1.0)
    assert decision.target == 2  # 3 requests over 1 counted replica, threshold 2


def test_a_day_of_traffic_replays_to_the_same_decisions() -> None:
    """One scripted trace, replica counts following the decisions: deterministic."""
    config = ScalingConfig(min_replicas=0, max_replicas=2, scale_up_threshold=1, cooldown_time=30)
    trace = [(0, 0), (10, 1), (11, 1), (12, 3), (20, 2), (40, 1), (60, 1), (71, 0), (85, 0), (90, 0), (120, 1)]
    replicas, memory, targets = 0, ScalerMemory(0.0), []
    for now, load in trace:
        views = tuple(ReplicaView(f"r{i}", "ready", load if i == 0 else 0) for i in range(replicas))
        decision = decide(config, views, 0 if replicas else load, memory, float(now))
        replicas, memory = decision.target, decision.memory
        targets.append(replicas)
    # 12: 3 requests > 1 per replica -> 2; 20: both needed (busy); 60: 40 s since -> 1, the cooldown restarts;
    # 90: 30 s idle -> 0 (Standby); 120: a request wakes it.
    assert targets == [0, 1, 1, 2, 2, 2, 1, 1, 1, 0, 1]
