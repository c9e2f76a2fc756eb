"""The Predibase-style SDK flow, as a user's script runs it: `python sdk_flow.py URL KEY BASE_MODEL DATASET OUT_DIR`.
tests/app/test_sdk_wheel.py runs it with the python of a fresh virtual environment where only the wheel (httpx and
pydantic) is installed, so it imports nothing but the SDK and the standard library. It prints one JSON line of what
it saw; an assertion failing exits non-zero with its message."""

import json
import sys
import tarfile
import time

from loraplex import Loraplex, SFTConfig


def main(url: str, key: str, base_model: str, dataset_file: str, out_dir: str) -> dict[str, object]:
    started = time.monotonic()
    timings: dict[str, float] = {}

    def took(step: str) -> None:
        timings[step] = round(time.monotonic() - started - sum(timings.values()), 1)

    pb = Loraplex(api_key=key, base_url=url)
    dataset = pb.datasets.from_file(dataset_file, name="greetings", base_model=base_model)
    assert (dataset.status, dataset.stats["train_rows"]) == ("ready", 6), dataset
    assert pb.datasets.get("greetings").stats == dataset.stats
    repo = pb.repos.create("greet", description="Greets people by name", exists_ok=True)
    took("dataset")

    # Blocking, its progress printed, answering the adapter.
    config = SFTConfig(base_model=base_model, epochs=1, rank=4, effective_batch_size=2)
    trained = pb.adapters.create(config=config, dataset=dataset, repo=repo, description="first try")
    assert (trained.name, trained.status, trained.config["rank"]) == ("greet/1", "completed", 4), trained
    took("adapters.create")

    # Not blocking: queued, read back, cancelled.
    job = pb.finetuning.jobs.create(config=config.model_copy(update={"seed": 7}), dataset="greetings", repo="greet")
    assert job.status == "queued" and job.config["seed"] == 7, job
    assert pb.finetuning.jobs.get(job.id).id == job.id
    assert pb.finetuning.jobs.cancel(job.id).status == "cancelled"
    took("jobs")

    adapter = pb.adapters.get("greet/1")
    assert (adapter.base_model, adapter.status, adapter.version) == (base_model, "completed", 1), adapter
    assert adapter.config["rank"] == 4 and adapter.config["epochs"] == 1, adapter.config
    steps = [m["step"] for m in adapter.metrics if m["kind"] == "train"]
    assert steps == [1, 2, 3], adapter.metrics
    assert adapter.job_id is not None and pb.adapters.get("greet").name == "greet/1"  # a repo alone: its latest

    archive = pb.adapters.download("greet/1", dest=out_dir)
    with tarfile.open(archive) as tar:
        names = sorted(tar.getnames())
    assert "greet-1/adapter_config.json" in names, names
    took("get and download")

    client = pb.deployments.client(base_model)  # a base model's name: the shared endpoints
    reply = client.generate("Say hi to Ann", adapter_id="greet/1", max_new_tokens=5, temperature=0)
    assert reply.details is not None and 1 <= reply.details.generated_tokens <= 5, reply
    streamed = list(client.generate_stream("Say hi to Ann", adapter_id="greet/1", max_new_tokens=5, temperature=0))
    assert streamed[-1].generated_text == reply.generated_text, (streamed[-1], reply)
    assert "".join(s.token.text for s in streamed if not s.token.special) == reply.generated_text
    took("generate")
    modules = sorted({name.split(".")[0] for name in sys.modules})
    return {
        "adapter": adapter.name,
        "generated_text": reply.generated_text,
        "tokens": len(streamed),
        "archive": sorted(names),
        "modules": modules,
        "seconds": timings,
    }


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:6])))
