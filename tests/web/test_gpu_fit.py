"""GPUs a runtime cannot provide or a model does not fit (SQLite and PostgreSQL): a deployment or a fine-tuning job
that names one is refused with a 422 naming `accelerator` (or `base_model` when no GPU would do), before anything is
created or billed; and which GPU a job trains on when it names none (functions/accelerators.py)."""

from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.db import session_scope
from app.errors import Invalid
from app.models import Deployment
from app.settings import get_settings
from conftest import TINY_MODEL, Platform, make_tenant
from functions import accelerators

LLAMA_8B, GEMMA_9B, PHI_MINI, LLAMA_70B = (
    "llama-3-1-8b-instruct",
    "gemma-2-9b-it",
    "phi-3-5-mini-instruct",
    "llama-3-3-70b-instruct",
)
JOB = {"dataset": "greetings", "repo": "greet"}


@pytest.fixture
def modal_runtime(platform: Platform, monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings as in the Modal containers (only the checks read them: no Modal call is made by these tests)."""
    monkeypatch.setenv("LORAPLEX_RUNTIME", "modal")
    get_settings.cache_clear()


def refused(r: Any, param: str, words: str) -> None:
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"]) == (param, "invalid_value"), error
    assert words in error["message"], error


def nothing_created(client: TestClient, headers: dict[str, str]) -> None:
    assert client.get("/v1/deployments", headers=headers).json() == []
    assert client.get("/v1/finetuning/jobs", headers=headers).json() == []
    assert client.get("/v1/usage", headers=headers).json()["records"] == []


def test_the_estimates_and_the_gpu_a_job_trains_on(sqlite_platform: Platform) -> None:
    # bf16 weights: 8.03e9 params x 2 bytes = 15.0 GiB; served with 20% + 2 GiB; trained (LoRA) with 30% + 4 GiB.
    assert accelerators.serving_need(LLAMA_8B).gib == pytest.approx(8.03e9 * 2 / 2**30 * 1.2 + 2)
    assert accelerators.training_need(LLAMA_8B, "lora").gib == pytest.approx(8.03e9 * 2 / 2**30 * 1.3 + 4)
    assert accelerators.training_need(PHI_MINI, "full").gib == pytest.approx(3.82e9 * 16 / 2**30 + 4)
    assert accelerators.GPU_MEMORY_GIB == {"a10g": 24, "l40s": 48, "a100-80gb": 80, "h100": 80}
    # Up to 16B parameters the tier starts at an A10G and moves up only for a job it cannot hold.
    assert accelerators.training_gpu("smollm2-135m", "lora", None) == "a10g"
    assert accelerators.training_gpu(LLAMA_8B, "lora", None) == "a10g"  # 23.4 GiB of 24
    assert accelerators.training_gpu(GEMMA_9B, "lora", None) == "l40s"  # 26.4 GiB
    assert accelerators.training_gpu(PHI_MINI, "full", None) == "a100-80gb"  # 61 GiB of fp32 state
    assert accelerators.training_gpu(LLAMA_70B, "lora", None) is None  # 175 GiB: no single GPU
    assert accelerators.training_gpu(LLAMA_8B, "lora", "h100") == "h100"  # the job's own choice stands
    # The deployments' GPU names are the same ones.
    from functions.deployments.config import ACCELERATORS

    assert set(ACCELERATORS) - {"cpu"} == set(accelerators.GPUS)


def test_training_gpus_need_the_modal_runtime(client: TestClient, alice: dict[str, str]) -> None:
    r = client.post("/v1/finetuning/jobs", headers=alice, json=JOB | {"base_model": TINY_MODEL, "accelerator": "h100"})
    refused(r, "accelerator", "GPU of the Modal runtime (LORAPLEX_RUNTIME=modal)")
    r = client.post("/v1/finetuning/jobs", headers=alice, json=JOB | {"base_model": TINY_MODEL, "accelerator": "tpu"})
    refused(r, "accelerator", "unknown accelerator 'tpu'; one of a10g, l40s, a100-80gb, h100")
    r = client.post("/v1/finetuning/jobs", headers=alice, json=JOB | {"base_model": TINY_MODEL, "accelerator": "cpu"})
    refused(r, "accelerator", "unknown accelerator 'cpu'")
    nothing_created(client, alice)


def test_training_jobs_that_no_gpu_or_not_the_named_one_holds(
    client: TestClient, alice: dict[str, str], modal_runtime: None
) -> None:
    r = client.post("/v1/finetuning/jobs", headers=alice, json=JOB | {"base_model": LLAMA_70B})
    refused(r, "base_model", "no single GPU offered holds it (the largest has 80 GiB")
    assert "LoRA training of llama-3-3-70b-instruct on bf16 weights (131.5 GiB" in r.json()["error"]["message"]
    full = JOB | {"base_model": PHI_MINI, "adapter": "none"}
    r = client.post("/v1/finetuning/jobs", headers=alice, json=full | {"accelerator": "l40s"})
    refused(r, "accelerator", "needs about 60.9 GiB; l40s has 48 GiB: choose a100-80gb (80 GiB)")
    r = client.post("/v1/finetuning/jobs", headers=alice, json=JOB | {"base_model": GEMMA_9B, "accelerator": "A10G"})
    refused(r, "accelerator", "a10g has 24 GiB: choose l40s (48 GiB)")  # names are read case-blind, like Modal's
    nothing_created(client, alice)
    # A GPU that holds the job passes every check: the next refusal is the (missing) dataset's.
    r = client.post("/v1/finetuning/jobs", headers=alice, json=full | {"accelerator": "a100-80gb"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "dataset", r.text


def test_deployments_on_a_gpu_their_model_does_not_fit(
    client: TestClient, alice: dict[str, str], modal_runtime: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = client.post(
        "/v1/deployments", headers=alice, json={"name": "big", "base_model": LLAMA_70B, "accelerator": "a100-80gb"}
    )
    refused(r, "accelerator", "llama-3-3-70b-instruct served in bf16 (131.5 GiB of weights")
    assert "no single GPU offered holds it" in r.json()["error"]["message"]
    # Served in fp32 (LORAPLEX_ENGINE_DTYPE), an 8B model outgrows an A10G.
    monkeypatch.setenv("LORAPLEX_ENGINE_DTYPE", "fp32")
    get_settings.cache_clear()
    r = client.post(
        "/v1/deployments", headers=alice, json={"name": "mid", "base_model": LLAMA_8B, "accelerator": "a10g"}
    )
    refused(r, "accelerator", "needs about 37.9 GiB; a10g has 24 GiB: choose l40s (48 GiB)")
    nothing_created(client, alice)


def test_an_update_to_a_gpu_the_model_does_not_fit(
    platform: Platform, modal_runtime: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """check_update (PATCH) merges the new accelerator with the deployment's base model and refuses the same way."""
    from functions.deployments.config import DeploymentUpdate, check_platform, check_update

    tenant_id, _ = make_tenant("carol")
    deployment = Deployment(
        tenant_id=tenant_id, name="d", base_model=LLAMA_8B, accelerator="l40s", min_replicas=0, max_replicas=1
    )
    with session_scope() as s:
        check_platform(s, tenant_id, "a10g", 1, base_model=LLAMA_8B)  # in bf16: 19.9 GiB of 24
    monkeypatch.setenv("LORAPLEX_ENGINE_DTYPE", "fp32")
    get_settings.cache_clear()
    with session_scope() as s:
        with pytest.raises(Invalid) as refusal:
            check_update(s, tenant_id, deployment, DeploymentUpdate(accelerator="a10g", max_replicas=2))
        assert check_update(s, tenant_id, deployment, DeploymentUpdate(max_replicas=2)) == {"max_replicas": 2}
    assert refusal.value.field == "accelerator"
    assert "needs about 37.9 GiB; a10g has 24 GiB: choose l40s" in refusal.value.message
