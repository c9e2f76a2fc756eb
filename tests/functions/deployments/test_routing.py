"""Routing: the least-loaded replica that holds the adapter, else the least-loaded one."""

from functions.deployments.routing import Candidate, pick


def replica(name: str, in_flight: int, *adapters: str, order: int = 0) -> Candidate:
    return Candidate(name, in_flight, frozenset(adapters), order)


def test_prefers_a_replica_holding_the_adapter_then_the_least_loaded() -> None:
    replicas = [replica("a", 0), replica("b", 1, "k1"), replica("c", 2, "k1")]
    assert pick(replicas, "k1", threshold=4).id == "b"  # holds it, least loaded of the holders
    assert pick(replicas, "k2", threshold=4).id == "a"  # nobody holds it: least loaded
    assert pick(replicas, None, threshold=4).id == "a"  # the base model: least loaded


def test_a_saturated_holder_is_passed_over() -> None:
    replicas = [replica("a", 0), replica("b", 1, "k1")]
    assert pick(replicas, "k1", threshold=1).id == "a"


def test_ties_go_to_the_older_replica_and_none_without_replicas() -> None:
    assert pick([replica("new", 0, order=5), replica("old", 0, order=1)], None, threshold=1).id == "old"
    assert pick([], "k1", threshold=1) is None
