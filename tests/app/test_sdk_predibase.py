"""The Predibase-style surface of the SDK (loraplex/) against a real `loraplex serve` process with the tiny model:
repos, adapters created blocking (and failing with the job's error), read and downloaded, private deployments
created, generated on (whole and streamed, by deployment name and by base model) and deleted; refusals named as the
API names them. The same flow from a wheel installed without the server: test_sdk_wheel.py."""

import functools
import http.server
import json
import os
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError
from served import served_platform

from conftest import TINY_MODEL, make_tenant, require_sandbox, wait_for
from deployment_helpers import FAST_ENV
from loraplex import DeploymentConfig, DPOConfig, GRPOConfig, JobFailedError, Loraplex, LoraplexError, SFTConfig

ROWS = [{"prompt": f"Say hi to {n}", "completion": f"Hi {n}!"} for n in ("Ann", "Bo", "Cy", "Di", "Ed", "Flo")]
CONFIG = SFTConfig(base_model=TINY_MODEL, epochs=1, rank=4, effective_batch_size=2)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def server_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[str]:
    env = FAST_ENV | {"LORAPLEX_IMPORT_ALLOW_LOOPBACK": "true"}  # test_a_dataset_comes_from_a_url's local site
    with served_platform(tmp_path_factory.mktemp("served"), request.param, tiny_model_dir, env) as url:
        yield url


def test_a_dataset_comes_from_a_url(pb: Loraplex, tmp_path: Path) -> None:
    """pb.datasets.from_url over http on loopback (the served platform allows it, as tests do): the same dataset as
    the upload of the same file; a missing file is a 404 naming url, with nothing created."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "more.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "site"))
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{site.server_address[1]}"
        imported = pb.datasets.from_url(f"{url}/more.jsonl", base_model=TINY_MODEL)
        assert (imported.name, imported.status) == ("more", "ready")
        assert imported.stats == pb.datasets.get("greetings").stats
        with pytest.raises(LoraplexError) as missing:
            pb.datasets.from_url(f"{url}/gone.jsonl", base_model=TINY_MODEL)
        assert (missing.value.status, missing.value.param) == (404, "url")
        assert [d.name for d in pb.datasets.list()] == ["greetings", "more"]
    finally:
        site.shutdown()


@pytest.fixture
def pb(server_url: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Loraplex]:
    """A new tenant's client, with the dataset `greetings` uploaded."""
    key = make_tenant(request.node.originalname)[1]["Authorization"].removeprefix("Bearer ")
    with Loraplex(api_key=key, base_url=server_url, backoff_seconds=0.05) as client:
        path = tmp_path / "greetings.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in ROWS))
        assert client.datasets.from_file(path, base_model=TINY_MODEL).status == "ready"
        yield client


def test_adapters_are_created_read_and_downloaded(
    pb: Loraplex, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    quote = pb.finetuning.jobs.quote(CONFIG, dataset="greetings", repo="greet")
    assert quote.can_start and quote.refusal is None and quote.estimate["tokens"] > 0
    assert quote.config["rank"] == 4 and "learning_rate" in quote.auto and pb.repos.list() == []  # nothing created
    created = pb.repos.create("greet", description="greeters")
    assert (created.versions, pb.repos.get("greet").description) == ([], "greeters")
    adapter = pb.adapters.create(config=CONFIG, dataset="greetings", repo="greet", description="says hi")
    assert "completed: adapter greet/1, 3 steps" in capsys.readouterr().out  # the progress, then how it ended
    assert (adapter.name, adapter.repo, adapter.version, adapter.status) == ("greet/1", "greet", 1, "completed")
    assert adapter.base_model == TINY_MODEL and adapter.config["rank"] == 4 and adapter.rank == 4  # type: ignore[attr-defined]
    assert [m["step"] for m in adapter.metrics if m["kind"] == "train"] == [1, 2, 3]
    assert adapter.summary["steps_done"] == 3 and adapter.prompt_template is None and adapter.description == "says hi"
    assert adapter.render_prompt({"prompt": "Say hi to Ann"}) == "Say hi to Ann"  # no template: the row's prompt
    assert pb.adapters.get("greet") == adapter  # the repo alone: its latest version

    with pytest.raises(LoraplexError) as taken:
        pb.repos.create("greet")  # exists now; exists_ok=True uses it
    assert (taken.value.status, taken.value.param) == (409, "name")
    assert [v["name"] for v in pb.repos.create("greet", exists_ok=True).versions] == ["greet/1"]
    assert pb.repos.get("greet").versions[0]["description"] == "says hi"

    target = pb.adapters.download("greet/1", dest=tmp_path / "mine.tar.gz")
    with tarfile.open(target) as tar:
        assert {"greet-1/adapter_config.json", "greet-1/adapter_model.safetensors"} <= set(tar.getnames())
    with pytest.raises(LoraplexError) as missing:
        pb.adapters.download("greet/7", dest=tmp_path)
    assert (missing.value.status, missing.value.code) == (404, "adapter_not_found")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["greetings.jsonl", "mine.tar.gz"]  # nothing half-written
    for unknown in ("greet/7", "nope/1"):
        with pytest.raises(LoraplexError) as exc:
            pb.adapters.get(unknown)
        assert exc.value.status == 404


def test_a_templated_adapter_renders_its_prompts(pb: Loraplex, tmp_path: Path) -> None:
    """A dataset of any columns trains through a prompt template; the adapter renders inference prompts with it."""
    path = tmp_path / "tickets.csv"
    rows = [f"Parcel {n} damaged,shipping\n" if n % 2 else f"Invoice {n} wrong,billing\n" for n in range(6)]
    path.write_text("ticket,team\n" + "".join(rows))
    assert pb.datasets.from_file(path, base_model=TINY_MODEL).status == "ready"
    template = "Route this ticket: {ticket}"
    config = CONFIG.model_copy(update={"prompt_template": template, "completion_column": "team"})
    adapter = pb.adapters.create(config=config, dataset="tickets", repo="router", show_progress=False)
    assert adapter.prompt_template == template and adapter.config["completion_column"] == "team"
    assert adapter.render_prompt({"ticket": "Late parcel", "team": "?"}) == "Route this ticket: Late parcel"
    with pytest.raises(ValidationError, match="prompt_template"):
        SFTConfig(base_model=TINY_MODEL, prompt_template="Route {ticket!r}")  # checked here, as the server does


def test_a_dpo_adapter_from_the_sdk_and_the_cli(pb: Loraplex, server_url: str, tmp_path: Path) -> None:
    """Preference tuning: DPOConfig through the SDK, then `finetune start --method dpo` through the CLI."""
    path = tmp_path / "prefs.jsonl"
    pairs = [{"prompt": f"Say hi to {n}", "chosen": f"Hi {n}!", "rejected": "No."} for n in ("Ann", "Bo", "Cy", "Di")]
    path.write_text("\n".join(json.dumps(r) for r in pairs))
    assert pb.datasets.from_file(path, base_model=TINY_MODEL).status == "ready"
    config = DPOConfig(base_model=TINY_MODEL, train_steps=2, effective_batch_size=2, rank=4, beta=0.2)
    assert config.request_fields()["method"] == "dpo"
    adapter = pb.adapters.create(config=config, dataset="prefs", repo="polite", show_progress=False)
    assert adapter.status == "completed" and adapter.config["method"] == "dpo" and adapter.config["beta"] == 0.2
    train = [m for m in adapter.metrics if m["kind"] == "train"]
    assert [m["step"] for m in train] == [1, 2] and all(m["reward_accuracy"] is not None for m in train)
    with pytest.raises(ValidationError, match="beta"):
        SFTConfig(base_model=TINY_MODEL, beta=0.1)  # type: ignore[call-arg]  # a DPO field: refused for SFT
    with pytest.raises(LoraplexError) as refused:  # an SFT job on a preference dataset: the server names method
        pb.finetuning.jobs.create(config=CONFIG, dataset="prefs", repo="polite")
    assert (refused.value.status, refused.value.param) == (422, "method")

    env = os.environ | {"LORAPLEX_API_URL": server_url, "LORAPLEX_API_KEY": pb.api_key or ""}
    start = subprocess.run(
        [sys.executable, "-m", "app.cli", "finetune", "start", "--dataset", "prefs", "--repo", "polite",
         "--base-model", TINY_MODEL, "--method", "dpo", "--beta", "0.3", "--train-steps", "1", "--watch"],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert start.returncode == 0, start.stdout + start.stderr
    assert "completed: adapter polite/2, 1 steps" in start.stdout, start.stdout
    assert pb.adapters.get("polite/2").config["beta"] == 0.3


def test_a_grpo_adapter_from_the_sdk_and_the_cli(pb: Loraplex, server_url: str, tmp_path: Path) -> None:
    """Reinforcement fine-tuning: GRPOConfig with a grader and a Python reward function through the SDK, then
    `finetune start --method grpo --reward-functions @file` through the CLI."""
    require_sandbox()
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"Say {w}", "completion": w}) for w in ("red", "blue", "gold")))
    assert pb.datasets.from_file(path, base_model=TINY_MODEL).status == "ready"
    short = "def reward_fn(prompt, completion, example):\n    return 1.0 if len(completion) < 20 else 0.0\n"
    graders = [
        {"type": "string_check", "operation": "contains", "column": "completion", "name": "says"},
        {"type": "python", "source": short, "name": "short", "weight": 0.5},
    ]
    config = GRPOConfig(base_model=TINY_MODEL, train_steps=1, effective_batch_size=2, num_generations=2,
                        max_completion_length=6, rank=4, reward_functions=graders)  # fmt: skip
    assert config.request_fields()["method"] == "grpo"
    adapter = pb.adapters.create(config=config, dataset="prompts", repo="sayer", show_progress=False)
    assert adapter.status == "completed" and adapter.config["reward_functions"][1]["source"] == short
    [step] = [m for m in adapter.metrics if m["kind"] == "train"]
    assert step["reward"] is not None and set(step["rewards"]["graders"]) == {"says", "short"}
    with pytest.raises(ValidationError, match="reward_functions"):
        GRPOConfig(base_model=TINY_MODEL)
    with pytest.raises(ValidationError, match="num_generations"):
        SFTConfig(base_model=TINY_MODEL, num_generations=2)  # type: ignore[call-arg]  # a GRPO field

    rewards = tmp_path / "rewards.json"
    rewards.write_text(json.dumps(graders))
    env = os.environ | {"LORAPLEX_API_URL": server_url, "LORAPLEX_API_KEY": pb.api_key or ""}
    start = subprocess.run(
        [sys.executable, "-m", "app.cli", "finetune", "start", "--dataset", "prompts", "--repo", "sayer",
         "--base-model", TINY_MODEL, "--method", "grpo", "--reward-functions", f"@{rewards}", "--num-generations",
         "2", "--max-completion-length", "6", "--effective-batch-size", "2", "--train-steps", "1", "--watch"],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert start.returncode == 0, start.stdout + start.stderr
    assert "completed: adapter sayer/2, 1 steps" in start.stdout, start.stdout
    assert pb.adapters.get("sayer/2").config["num_generations"] == 2


def test_refusals_come_before_any_work_and_a_failed_job_raises(pb: Loraplex) -> None:
    with pytest.raises(ValidationError, match="rank"):
        SFTConfig(base_model=TINY_MODEL, rank=0)  # checked here, before any request
    with pytest.raises(ValidationError, match="epoch"):
        SFTConfig(base_model=TINY_MODEL, epoch=3)  # type: ignore[call-arg]  # a misspelt field is refused
    with pytest.raises(LoraplexError) as refused:  # what only the server knows: its answer, naming the field
        pb.finetuning.jobs.create(config={"base_model": TINY_MODEL, "target_modules": ["nope"]}, dataset="greetings",
                                  repo="greet")  # fmt: skip
    assert (refused.value.status, refused.value.param) == (422, "target_modules")
    assert pb.finetuning.jobs.list() == []

    # adapters.create blocks until the job ends; a cancelled one raises with the job.
    outcome: dict[str, object] = {}

    def create() -> None:
        try:
            pb.adapters.create(config=CONFIG, dataset="greetings", repo="doomed", show_progress=False)
        except JobFailedError as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=create)
    worker.start()
    job = wait_for(lambda: next(iter(pb.finetuning.jobs.list()), None), 30, "the job was not created")
    assert pb.finetuning.jobs.cancel(job.id).status == "cancelled"
    worker.join(timeout=60)
    error = outcome["error"]
    assert isinstance(error, JobFailedError) and error.job["status"] == "cancelled", outcome
    assert str(error) == f"fine-tuning job {job.id} cancelled: cancelled on request"
    assert pb.finetuning.jobs.watch(job.id, show_progress=False).status == "cancelled"


def test_deployments_and_generation(pb: Loraplex) -> None:
    adapter = pb.adapters.create(config=CONFIG, dataset="greetings", repo="greet", show_progress=False)
    config = DeploymentConfig(base_model=TINY_MODEL, min_replicas=0, max_replicas=1, cooldown_time=60)
    created = pb.deployments.create(name="greeter", config=config, description="says hi")
    assert (created.name, created.base_model, created.description) == ("greeter", TINY_MODEL, "says hi")  # type: ignore[attr-defined]
    assert [d.name for d in pb.deployments.list()] == ["greeter"] and pb.deployments.get("greeter").max_replicas == 1  # type: ignore[attr-defined]

    shared, private = pb.deployments.client(TINY_MODEL), pb.deployments.client("greeter")
    for client in (shared, private):  # the base model's shared endpoints, the deployment's replica (woken by this)
        reply = client.generate("Say hi to Ann", adapter_id=adapter.name, max_new_tokens=6, temperature=0)
        assert reply.details is not None and reply.details.generated_tokens == len(reply.details.tokens) <= 6
        streamed = list(client.generate_stream("Say hi to Ann", adapter_id="greet", max_new_tokens=6, temperature=0))
        assert streamed[-1].generated_text == reply.generated_text and streamed[-1].details is not None
        assert [s.token.id for s in streamed] == [t.id for t in reply.details.tokens]
    assert shared._route() == f"/v1/models/{TINY_MODEL}" and private._route() == "/v1/deployments/greeter"

    with pytest.raises(LoraplexError) as unsupported:  # LoRAX's error shape, read the same way
        shared.generate("Hi", typical_p=0.5)
    assert (unsupported.value.status, unsupported.value.param) == (400, "parameters.typical_p")
    with pytest.raises(LoraplexError) as unknown:
        list(shared.generate_stream("Hi", adapter_id="nope/1"))
    assert unknown.value.status == 404 and "nope" in unknown.value.message
    assert pb.deployments.delete("greeter", wait=30).status == "Deleted"
    assert pb.deployments.list() == []
