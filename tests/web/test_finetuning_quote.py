"""POST /v1/finetuning/jobs/quote: the price and resolved config of a job without starting it, computed as
POST /v1/finetuning/jobs computes them (one function), with what the tenant's credit says."""

from typing import Any

from fastapi.testclient import TestClient

from conftest import TINY_MODEL, make_tenant
from credit_helpers import credit, spend
from finetune_helpers import ready_dataset

ROWS = [{"prompt": f"Say hi to {n}", "completion": f"Hi {n}!"} for n in ("Ann", "Bo", "Cy", "Di", "Ed", "Flo")]
CONFIG = {"base_model": TINY_MODEL, "dataset": "greetings", "repo": "greet", "epochs": 2}


def quote(client: TestClient, headers: dict[str, str], **change: Any) -> Any:
    return client.post("/v1/finetuning/jobs/quote", headers=headers, json=CONFIG | change)


def test_a_quote_prices_and_resolves_as_the_job_does_and_starts_nothing(client: TestClient) -> None:
    _, headers = make_tenant("quoter")
    ready_dataset(client, headers, ROWS, "greetings")
    r = quote(client, headers)
    assert r.status_code == 200, r.text
    quoted = r.json()
    assert quoted["can_start"] is True and quoted["refusal"] is None
    assert quoted["estimate"]["tokens"] > 0 and quoted["estimate"]["cost"]["micro_usd"] > 0
    assert quoted["config"]["epochs"] == 2 and quoted["config"]["learning_rate"] != "auto"
    assert set(quoted["auto"]) == {"task", "learning_rate", "effective_batch_size", "max_seq_length", "eval_steps"}
    assert quoted["truncation"]["rows"] == len(ROWS)
    assert [w.split(":")[0] for w in quoted["warnings"]] == ["no evaluation"]  # 6 rows: none held out
    assert client.get("/v1/finetuning/jobs", headers=headers).json() == []  # nothing started
    assert client.get("/v1/repos", headers=headers).json() == []  # no repo made for it

    job = client.post("/v1/finetuning/jobs", headers=headers, json=CONFIG)
    assert job.status_code == 201, job.text
    assert job.json()["estimate"] == quoted["estimate"]
    assert job.json()["config"] == quoted["config"]
    summary = job.json()["summary"]
    assert (summary["auto"], summary["warnings"], summary["truncation"]) == (
        quoted["auto"],
        quoted["warnings"],
        quoted["truncation"],
    )


def test_a_quote_refuses_a_config_as_the_job_route_does(client: TestClient) -> None:
    _, headers = make_tenant("quoter")
    for change, status, param in [
        ({"rank": 0}, 422, "rank"),
        ({"turbo": True}, 422, "turbo"),
        ({"dataset": "nope"}, 404, "dataset"),
        ({"max_seq_length": 4096}, 422, "max_seq_length"),
    ]:
        r = quote(client, headers, **change)
        assert r.status_code == status, (change, r.text)
        assert r.json()["error"]["param"] == param, r.text
        assert r.json() == client.post("/v1/finetuning/jobs", headers=headers, json=CONFIG | change).json()


def test_without_credit_the_quote_says_what_the_402_says(client: TestClient) -> None:
    tenant_id, headers = make_tenant("broke")
    ready_dataset(client, headers, ROWS, "greetings")
    spend(tenant_id, credit(tenant_id))
    quoted = quote(client, headers).json()
    assert quoted["can_start"] is False and quoted["estimate"]["cost"]["micro_usd"] > 0
    refused = client.post("/v1/finetuning/jobs", headers=headers, json=CONFIG)
    assert refused.status_code == 402, refused.text
    assert quoted["refusal"] == refused.json()["error"]["message"]
    assert quoted["refusal"].startswith("no credit left")
