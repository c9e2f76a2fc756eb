"""Private deployments under LORAPLEX_RUNTIME=modal: each deployment config its own container pool on Modal's
autoscaler, its accelerator picking the GPU; min/max replicas, cooldown and threshold applied live (create, PATCH,
stop, standby) without a redeploy; Stopped refuses, Standby wakes on a request; preloaded adapters loaded at
container start; statuses derived from what the containers report; and metering from the containers themselves,
billed for the time a killed container ran (up to its last heartbeat) and never twice.

Driven through the real API (the app `web` builds) with the `openai` SDK, on SQLite and PostgreSQL where the
database's semantics matter (metering). Modal's lookup, autoscaler and scheduling are the in-process stand-in of
tests/modal_standin.py; the serving class, its container bodies and the engine (the tiny model) are real."""

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

modal = pytest.importorskip("modal")

from modal_standin import StandInModal, install, serve  # noqa: E402

import app.modal_app as modal_app  # noqa: E402
from conftest import TINY_MODEL, Platform, make_tenant, wait_for  # noqa: E402
from credit_helpers import SECRET, credit, refused_402, spend, stripe_headers, topup  # noqa: E402
from lora_helpers import build_lora  # noqa: E402

HELLO: list[Any] = [{"role": "user", "content": "Say hi to Ann"}]
pytestmark = pytest.mark.filterwarnings("ignore:The .* function is executing locally:UserWarning")
HEARTBEAT = 2.0  # seconds (LORAPLEX_ENGINE_HEALTH_INTERVAL): a container silent 3 of them is closed
FAST_ENV = {
    "LORAPLEX_RUNTIME": "modal",
    "LORAPLEX_DEPLOYMENT_TICK_SECONDS": "0.1",
    "LORAPLEX_DEPLOYMENT_METERING_SECONDS": "0.5",
    "LORAPLEX_ENGINE_HEALTH_INTERVAL": str(HEARTBEAT),
    "LORAPLEX_SHARED_REQUESTS_PER_SECOND": "0",
}


def _standin(monkeypatch: pytest.MonkeyPatch) -> Iterator[StandInModal]:
    from app.settings import get_settings

    for key, value in FAST_ENV.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    standin = install(monkeypatch)
    yield standin
    standin.close()


@pytest.fixture
def standin(sqlite_platform: Platform, monkeypatch: pytest.MonkeyPatch) -> Iterator[StandInModal]:
    yield from _standin(monkeypatch)


@pytest.fixture
def client(standin: StandInModal) -> Iterator[httpx.Client]:
    # The real entry point: the API with Modal's pools wired in, over real HTTP.
    with serve(modal_app.web.local()) as url, httpx.Client(base_url=url, timeout=120) as c:
        yield c


@pytest.fixture
def headers(client: Any) -> dict[str, str]:
    return make_tenant("acme")[1]


def sdk(client: Any, headers: dict[str, str], name: str) -> openai.OpenAI:
    key = headers["Authorization"].removeprefix("Bearer ")
    return openai.OpenAI(
        base_url=f"{str(client.base_url).rstrip('/')}/v1/deployments/{name}", api_key=key, max_retries=0
    )


def create(client: Any, headers: dict[str, str], name: str, **config: Any) -> dict[str, Any]:
    r = client.post("/v1/deployments", headers=headers, json={"name": name, "base_model": TINY_MODEL} | config)
    assert r.status_code == 201, r.text
    return dict(r.json())


def status_of(client: Any, headers: dict[str, str], name: str, status: str, timeout: float = 60) -> dict[str, Any]:
    def now() -> dict[str, Any]:
        return dict(client.get(f"/v1/deployments/{name}", headers=headers).json())

    return wait_for(lambda: (d := now())["status"] == status and d, timeout, f"{name} never became {status}: {now()}")


def streamed(api: openai.OpenAI, model: str = TINY_MODEL, max_tokens: int = 6) -> list[str]:
    pieces = []
    for chunk in api.chat.completions.create(
        model=model, messages=HELLO, max_tokens=max_tokens, temperature=0, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    return pieces


def calls_for(standin: StandInModal, deployment_id: str) -> list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    return [c for c in standin.autoscaler_calls if c[1]["deployment"] == deployment_id]


def transitions(client: Any, headers: dict[str, str], name: str) -> list[dict[str, Any]]:
    return list(client.get(f"/v1/deployments/{name}/transitions", headers=headers).json())


# ---- the pool and its autoscaler -------------------------------------------------------------------------------


def test_a_deployment_is_its_own_pool_on_its_gpu_with_the_autoscaler_set_live(
    client: Any, headers: dict[str, str], standin: StandInModal
) -> None:
    d = create(client, headers, "prod", accelerator="l40s", min_replicas=1, max_replicas=3, cooldown_time=120,
               scale_up_threshold=4)  # fmt: skip
    options, params, settings = wait_for(lambda: calls_for(standin, d["id"]), 10, "no autoscaler call")[0]
    assert options == {"gpu": "L40S", "max_inputs": modal_app.SERVE_MAX_INPUTS, "target_inputs": 4}
    assert params | {} == {"base_model": TINY_MODEL, "model_dir": "", "deployment": d["id"], "config_version": 1,
                           "accelerator": "l40s", "engine": "native"}  # fmt: skip
    assert settings == {"min_containers": 1, "max_containers": 3, "scaledown_window": 120, "buffer_containers": None}

    ready = status_of(client, headers, "prod", "Ready")  # min_containers=1: one container kept up, it said ready
    [container] = standin.up()
    assert ready["replicas"] == 1 and ready["live"]["replicas"][0]["state"] == "ready"
    assert any(t["to_status"] == "Ready" and "ready after" in t["reason"] for t in transitions(client, headers, "prod"))

    assert streamed(sdk(client, headers, "prod"))  # streamed from the deployment's own container
    assert container.served == 1 and standin.up() == [container]

    def requests_seen() -> int:
        series = client.get("/v1/deployments/prod/metrics", headers=headers).json()
        return sum(point["requests"] for point in series["points"])

    wait_for(lambda: requests_seen() == 1, 10, "the health figures did not count the request")

    r = client.patch("/v1/deployments/prod", headers=headers,
                     json={"min_replicas": 0, "max_replicas": 2, "cooldown_time": 9000})  # fmt: skip
    assert r.status_code == 200, r.text
    wait_for(lambda: len(calls_for(standin, d["id"])) == 2, 10, "the PATCH did not reach the autoscaler")
    assert calls_for(standin, d["id"])[-1][2] == {
        "min_containers": 0, "max_containers": 2, "scaledown_window": 3600, "buffer_containers": None  # clamped
    }  # fmt: skip
    assert standin.lookups == [("loraplex", "Inference")]  # one lookup of the deployed class: no redeploy

    r = client.patch("/v1/deployments/prod", headers=headers, json={"scale_up_threshold": 8})
    assert r.status_code == 200, r.text
    wait_for(lambda: len(calls_for(standin, d["id"])) == 4, 10, "the threshold did not reach the pool")
    released, new = calls_for(standin, d["id"])[2:]
    assert released[0]["target_inputs"] == 4 and released[2]["min_containers"] == 0  # the old variant let go
    assert released[2]["scaledown_window"] == 2
    assert new[0]["target_inputs"] == 8 and new[2]["max_containers"] == 2


def test_a_second_web_container_records_nothing_twice(
    client: Any, headers: dict[str, str], standin: StandInModal
) -> None:
    """Modal runs the web function in many containers: only the one holding the pools' lease sets the autoscaler
    and records transitions; another one serves reads from the same rows."""
    from app.modal_pools import ModalPools
    from functions.deployments.modal_runtime import PoolRuntime

    d = create(client, headers, "twice", accelerator="a10g", min_replicas=1)
    status_of(client, headers, "twice", "Ready")
    calls_before, transitions_before = len(calls_for(standin, d["id"])), transitions(client, headers, "twice")

    other = PoolRuntime(ModalPools(modal_app.APP_NAME, modal_app.SERVE_CLASS, modal_app.SERVE_MAX_INPUTS),
                        holder="web-container-2")  # fmt: skip
    for _ in range(5):
        other.tick()
    assert not other.lease.held  # the first container holds it
    assert other.describe(d["id"])["replicas"][0]["state"] == "ready"  # it reads the same container rows
    assert len(calls_for(standin, d["id"])) == calls_before  # it set no autoscaler
    assert transitions(client, headers, "twice") == transitions_before  # and recorded no transition


def test_standby_wakes_on_a_request_and_stopped_refuses(
    client: Any, headers: dict[str, str], standin: StandInModal
) -> None:
    d = create(client, headers, "lazy", accelerator="a10g")  # min_replicas 0: no container until a request
    status_of(client, headers, "lazy", "Standby")
    assert standin.up() == []
    api = sdk(client, headers, "lazy")
    assert streamed(api)  # the platform started a container for it
    status_of(client, headers, "lazy", "Ready")
    [container] = standin.up()
    assert container.options["gpu"] == "A10G"

    assert standin.scale_down() == 1  # idle past its window: the platform stops it, its @modal.exit reports it
    status_of(client, headers, "lazy", "Standby")
    reasons = [t["reason"] for t in transitions(client, headers, "lazy")]
    assert any("stopped: the container exited" in reason for reason in reasons), reasons

    r = client.post("/v1/deployments/lazy/stop", headers=headers)
    assert r.status_code == 200
    status_of(client, headers, "lazy", "Stopped")
    with pytest.raises(openai.ConflictError, match="Stopped"):
        streamed(api)
    assert len(standin.containers) == 1  # refused before reaching the pool
    assert calls_for(standin, d["id"])[-1][2]["min_containers"] == 0
    assert calls_for(standin, d["id"])[-1][2]["scaledown_window"] == 2

    assert client.post("/v1/deployments/lazy/standby", headers=headers).status_code == 200
    status_of(client, headers, "lazy", "Standby")
    assert streamed(api)
    status_of(client, headers, "lazy", "Ready")


@pytest.fixture
def paying(sqlite_platform: Platform, monkeypatch: pytest.MonkeyPatch) -> Iterator[StandInModal]:
    """The stand-in, with the lease holder's credit check quick and Stripe's webhooks signed with SECRET."""
    monkeypatch.setenv("LORAPLEX_CREDIT_CHECK_SECONDS", "0.2")
    monkeypatch.setenv("LORAPLEX_STRIPE_WEBHOOK_SECRET", SECRET)
    yield from _standin(monkeypatch)


def test_a_pool_whose_tenant_cannot_pay_keeps_no_container_until_a_top_up(paying: StandInModal) -> None:
    standin = paying
    with serve(modal_app.web.local()) as url, httpx.Client(base_url=url, timeout=120) as client:
        tenant_id, headers = make_tenant("acme")
        d = create(client, headers, "held", accelerator="a10g", min_replicas=1)
        status_of(client, headers, "held", "Ready")
        assert len(standin.up()) == 1

        # No credit left and no card: the pool keeps no container (set live on Modal's autoscaler), and once the
        # platform lets the idle one go the deployment waits in Standby, saying why.
        spend(tenant_id, credit(tenant_id))
        wait_for(lambda: calls_for(standin, d["id"])[-1][2]["min_containers"] == 0, 30, "the pool still keeps one")
        assert standin.scale_down() == 1
        held = status_of(client, headers, "held", "Standby")
        assert held["suspended_reason"].startswith("no credit left and no payment method in good standing")
        assert any(
            (t["from_status"], t["to_status"], t["reason"]) == ("Ready", "Standby", held["suspended_reason"])
            for t in transitions(client, headers, "held")
        ), transitions(client, headers, "held")

        # A request that would wake it, and a new deployment, are refused with the way out; no container starts.
        with pytest.raises(openai.APIStatusError) as refused:
            streamed(sdk(client, headers, "held"))
        assert refused.value.status_code == 402 and "POST /v1/billing/checkout" in str(refused.value)
        refused_402(
            client.post(
                "/v1/deployments",
                headers=headers,
                json={"name": "other", "base_model": TINY_MODEL, "accelerator": "a10g"},
            )
        )
        assert standin.up() == []

        # A top-up through Stripe's signed webhook: back as configured, one container kept again.
        payload = topup(tenant_id, cents=2000)
        r = client.post("/v1/stripe/webhook", content=payload, headers=stripe_headers(payload))
        assert r.status_code == 200, r.text
        back = status_of(client, headers, "held", "Ready")
        assert back["suspended_reason"] is None and len(standin.up()) == 1
        assert calls_for(standin, d["id"])[-1][2]["min_containers"] == 1
        assert streamed(sdk(client, headers, "held"))


def test_a_container_that_fails_to_start_errors_the_deployment_until_its_config_changes(
    client: Any, headers: dict[str, str], standin: StandInModal
) -> None:
    # vLLM is not installed here: a container asked to serve with it fails in its @modal.enter, and says so.
    create(client, headers, "broken", accelerator="a10g", min_replicas=1, engine="vllm")
    errored = status_of(client, headers, "broken", "Errored")
    assert "failed to start" in errored["status_reason"] and "vllm" in errored["status_reason"]
    with pytest.raises(openai.InternalServerError, match="Errored"):
        streamed(sdk(client, headers, "broken"))

    r = client.patch("/v1/deployments/broken", headers=headers, json={"engine": "native"})
    assert r.status_code == 200 and r.json()["status"] == "Standby", r.text
    status_of(client, headers, "broken", "Ready")  # a new pool for config 2, on the native engine
    [container] = standin.up()
    assert container.parameters["config_version"] == 2 and container.parameters["engine"] == "native"


def test_a_deleted_deployment_lets_its_pool_go_and_is_deleted_once_its_containers_stopped(
    client: Any, headers: dict[str, str], standin: StandInModal
) -> None:
    d = create(client, headers, "gone", accelerator="a10g", min_replicas=1)
    status_of(client, headers, "gone", "Ready")
    r = client.delete("/v1/deployments/gone", headers=headers, params={"wait": 0})
    assert r.status_code == 202, r.text  # its container is still up
    wait_for(lambda: calls_for(standin, d["id"])[-1][2]["min_containers"] == 0, 10, "the pool was not let go")
    assert calls_for(standin, d["id"])[-1][2]["scaledown_window"] == 2
    assert standin.scale_down() == 1  # idle past the shortest window: Modal stops it, its @modal.exit reports it
    deleted = wait_for(
        lambda: next(
            (
                x
                for x in client.get("/v1/deployments?include_deleted=true", headers=headers).json()
                if x["id"] == d["id"] and x["status"] == "Deleted"
            ),
            None,
        ),  # fmt: skip
        30,
        "never Deleted",
    )
    assert deleted["replicas"] == 0


def test_preloaded_adapters_load_at_container_start(
    client: Any, headers: dict[str, str], standin: StandInModal, tiny_model_dir: Path, tmp_path: Path
) -> None:
    lora = build_lora(tiny_model_dir, tmp_path / "lora")
    files = [("files", (n, (lora / n).read_bytes())) for n in ("adapter_config.json", "adapter_model.safetensors")]
    assert client.post("/v1/repos/tone/versions", headers=headers, files=files,
                       data={"base_model": TINY_MODEL}).status_code == 201  # fmt: skip
    create(client, headers, "tuned", accelerator="a10g", min_replicas=1, preloaded_adapters=["tone"])
    status_of(client, headers, "tuned", "Ready")
    [container] = standin.up()
    engine = container.instance.container.engine
    assert engine.stats()["resident_adapters"] == 1  # loaded before the container said it was ready
    loads = engine.stats()["adapter_loads"]
    assert streamed(sdk(client, headers, "tuned"), model="tone/1")
    assert engine.stats()["adapter_loads"] == loads  # the request found it loaded


@pytest.mark.parametrize(
    ("accelerator", "words"), [("cpu", "the Modal runtime serves on a10g"), ("h100", "enterprise terms")]
)
def test_an_accelerator_the_runtime_cannot_provide_is_refused_before_anything_is_created(
    client: Any, headers: dict[str, str], standin: StandInModal, accelerator: str, words: str
) -> None:
    body = {"name": "big", "base_model": TINY_MODEL, "accelerator": accelerator}
    r = client.post("/v1/deployments", headers=headers, json=body)
    assert r.status_code == 422 and r.json()["error"]["param"] == "accelerator", r.text
    assert words in r.json()["error"]["message"]
    assert client.get("/v1/deployments", headers=headers).json() == []
    assert standin.autoscaler_calls == [] and standin.containers == []


def test_gpu_names_are_modals_for_every_gpu_accelerator() -> None:
    from app.modal_pools import GPUS
    from functions.deployments.config import ACCELERATORS

    assert set(GPUS) == set(ACCELERATORS) - {"cpu"}
    assert GPUS == {"a10g": "A10G", "l40s": "L40S", "a100-80gb": "A100-80GB", "h100": "H100"}


# ---- metering from the containers --------------------------------------------------------------------------


@pytest.fixture
def db_standin(platform: Platform, monkeypatch: pytest.MonkeyPatch) -> Iterator[StandInModal]:
    """The stand-in over a platform on SQLite, then on PostgreSQL (the compare-and-set metering is SQL)."""
    yield from _standin(monkeypatch)


def replica_rows(deployment_id: str) -> list[Any]:
    from sqlalchemy import select

    from app.db import session_scope
    from app.models import ReplicaRecord

    with session_scope() as s:
        rows = s.scalars(select(ReplicaRecord).where(ReplicaRecord.deployment_id == deployment_id)).all()
        s.expunge_all()
        return list(rows)


def replica_usage(deployment_id: str) -> list[Any]:
    from sqlalchemy import select

    from app.db import session_scope
    from app.models import UsageRecord

    with session_scope() as s:
        rows = s.scalars(
            select(UsageRecord).where(UsageRecord.reference == deployment_id, UsageRecord.kind == "deployment")
        ).all()
        s.expunge_all()
        return list(rows)


def test_a_container_killed_mid_request_is_billed_for_the_time_it_ran_and_never_twice(
    db_standin: StandInModal,
) -> None:
    from billing.prices import DEFAULT
    from functions.deployments import containers

    standin = db_standin
    with serve(modal_app.web.local()) as url, httpx.Client(base_url=url, timeout=120) as client:
        headers = make_tenant("acme")[1]
        d = create(client, headers, "metered", accelerator="a10g", min_replicas=1)
        status_of(client, headers, "metered", "Ready")
        [container] = standin.up()
        [row] = replica_rows(d["id"])
        assert (row.runtime, row.state, row.accelerator, row.process) == ("modal", "ready", "a10g", row.process)

        # It ran (and beat) a while before the request; it dies under the request, before the answer is complete.
        wait_for(lambda: replica_rows(d["id"])[0].heartbeat_at > row.ready_at, 30, "no heartbeat after ready")
        api = sdk(client, headers, "metered")
        stream = api.completions.create(model=TINY_MODEL, prompt="Count:", max_tokens=1500, stream=True,
                                        extra_body={"min_tokens": 1500})  # fmt: skip
        first = next(iter(stream))
        assert first.choices
        standin.kill(container)
        with pytest.raises(openai.APIError, match="serving container went away"):
            for _ in stream:
                pass

        # Its row is closed by the API's loop once it has been silent 3 heartbeats: failed, stopped at its last one.
        dead = wait_for(lambda: [r for r in replica_rows(d["id"]) if r.state == "failed"], 30, "not closed")[0]
        assert "stopped reporting" in dead.reason
        assert dead.stopped_at == dead.heartbeat_at == dead.metered_until
        ran_ms = (dead.heartbeat_at - dead.ready_at) / timedelta(milliseconds=1)
        usage = [u for u in replica_usage(d["id"]) if u.idempotency_key.startswith(f"replica:{dead.id}:")]
        assert usage and all(u.accelerator == "a10g" and u.technique == "replica" for u in usage)
        assert abs(sum(u.compute_ms for u in usage) - ran_ms) <= len(usage)  # whole ms per record
        assert sum(u.amount_micro_usd for u in usage) == sum(
            DEFAULT.deployment("a10g", u.compute_ms) for u in usage
        )  # priced by its GPU type

        # Never twice: closing and metering again, from any process, adds nothing.
        assert dead.id not in containers.close_silent(3 * HEARTBEAT)
        assert containers.meter(dead.id, dead.heartbeat_at) == 0
        assert containers.meter(dead.id, dead.heartbeat_at + timedelta(hours=1)) == 0  # closed: no time after
        assert len([u for u in replica_usage(d["id"]) if dead.id in u.idempotency_key]) == len(usage)

        # min_replicas=1: Modal replaced it; the replacement reports itself and is billed on its own row.
        wait_for(lambda: len(replica_rows(d["id"])) == 2, 60, "no replacement container")
        status_of(client, headers, "metered", "Ready")
        assert len(standin.up()) == 1
    # The app stopped: the replacement's @modal.exit closed its row and billed it up to its stop, once.
    standin.close()
    rows = {r.state for r in replica_rows(d["id"])}
    assert rows == {"failed", "stopped"}
    stopped = next(r for r in replica_rows(d["id"]) if r.state == "stopped")
    assert stopped.metered_until == stopped.stopped_at
    assert len({u.idempotency_key for u in replica_usage(d["id"])}) == len(replica_usage(d["id"]))


def test_writers_racing_for_one_period_bill_every_millisecond_once(db_standin: StandInModal) -> None:
    # A heartbeat and the container's exit (or an API process closing it) meter the same row at once: whoever loses
    # the compare-and-set bills what is left after the winner's period, so the row ends metered up to the latest
    # `until` and the ledger holds each millisecond once.
    import threading

    from functions.deployments import containers

    with serve(modal_app.web.local()) as url, httpx.Client(base_url=url, timeout=120) as client:
        headers = make_tenant("acme")[1]
        d = create(client, headers, "raced", accelerator="a10g", min_replicas=0)
        report = containers.ContainerReport(d["id"], "race", "a10g", 1, every=3600, meter_every=3600).started()
        report.ready()
        ready_at = replica_rows(d["id"])[0].ready_at
        writers = 8
        gate = threading.Barrier(writers)

        def bill(seconds: int) -> None:
            gate.wait()
            containers.meter(report.replica_id, ready_at + timedelta(seconds=seconds))

        threads = [threading.Thread(target=bill, args=(i + 1,)) for i in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        report.halt()

        [row] = replica_rows(d["id"])
        assert row.metered_until == ready_at + timedelta(seconds=writers)
        usage = replica_usage(d["id"])
        assert sum(u.compute_ms for u in usage) == writers * 1000
        assert len({u.idempotency_key for u in usage}) == len(usage)
