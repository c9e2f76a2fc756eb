"""Reinforcement fine-tuning (method "grpo") through the real API, worker and TRL's GRPOTrainer on the tiny model:
a job with a built-in grader and a Python reward function (run in the sandbox) end to end with its reward metrics,
the version it publishes served by /v1/chat/completions, its price (the RFT rate on prompt and generated tokens),
hostile reward functions scored as failures, and the refusals before any compute."""

import math

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.db import session_scope
from app.models import UsageRecord
from conftest import TINY_MODEL, require_sandbox
from finetune_helpers import finish, metrics, ready_dataset, refusal, start_job

WORDS = ["red", "green", "blue", "cyan", "pink", "gold", "gray", "navy", "teal", "lime", "rose", "sand"]
# Prompts with a reference answer; the last two rows are the evaluation split.
ROWS = [{"prompt": f"Say {w}", "completion": w} for w in WORDS[:10]] + [
    {"prompt": f"Say {w}", "completion": w, "split": "evaluation"} for w in WORDS[10:]
]
SHORT = "def reward_fn(prompt, completion, example):\n    return 1.0 if len(completion) < 20 else 0.0\n"
GRADERS = [
    {"type": "text_similarity", "name": "close", "column": "completion"},
    {"type": "python", "name": "short", "source": SHORT, "weight": 0.5},
]
GRPO = {"method": "grpo", "num_generations": 2, "max_completion_length": 8, "effective_batch_size": 2}


@pytest.fixture(autouse=True)
def _sandbox() -> None:
    require_sandbox()


def test_a_grpo_job_end_to_end(client: TestClient, alice: dict[str, str]) -> None:
    ready_dataset(client, alice, ROWS, "words")
    config = {"dataset": "words", "repo": "sayer", "reward_functions": GRADERS, "epochs": 1, "eval_steps": 2} | GRPO
    quote = client.post("/v1/finetuning/jobs/quote", headers=alice, json={"base_model": TINY_MODEL} | config).json()
    assert quote["config"]["method"] == "grpo" and quote["auto"]["learning_rate"] == 2e-4
    job = start_job(client, alice, **config)
    # Estimated at the RFT rate ($10 per 1M tokens up to 16B) on (prompt + max_completion_length) x num_generations
    # per train row and epoch.
    from functions.base_models import load_tokenizer
    from functions.finetune_config import FinetuneConfig
    from functions.grpo import PromptRow, counted

    settings = FinetuneConfig.model_validate({"base_model": TINY_MODEL} | config)
    rows = [PromptRow(i, i + 1, "train", r["prompt"], r) for i, r in enumerate(ROWS[:10])]
    prompt_tokens = sum(r.prompt_tokens for r in counted(rows, load_tokenizer(TINY_MODEL), settings))
    tokens = (prompt_tokens + 8 * 10) * 2
    assert job["estimate"]["tokens"] == quote["estimate"]["tokens"] == tokens
    assert job["estimate"]["cost"]["micro_usd"] == math.ceil(tokens * 10_000_000 / 1_000_000)
    assert job["config"]["reward_functions"][1]["source"] == SHORT  # kept with the job, versioned with it

    job = finish(client, alice, job["id"], timeout=300)
    assert job["status"] == "completed", job
    assert job["adapter"] == "sayer/1" and job["total_steps"] == 5  # 10 prompts, 2 a step

    train = metrics(client, alice, job["id"])
    assert [m["step"] for m in train] == [1, 2, 3, 4, 5]
    for m in train:
        assert m["reward"] is not None and m["reward_std"] is not None and m["kl"] is not None
        assert 0 < m["completion_length"] <= 8
        graders = m["rewards"]["graders"]
        assert set(graders) == {"close", "short"} and 0 <= graders["close"]["mean"] <= 1
        # the total is the weighted sum of the rewards
        assert m["reward"] == pytest.approx(graders["close"]["mean"] + 0.5 * graders["short"]["mean"], abs=1e-5)
        assert m["rewards"]["failures"] == {}
    evals = metrics(client, alice, job["id"], "eval")
    assert [m["step"] for m in evals] == [0, 2, 4, 5]
    for m in evals:
        assert m["loss"] == pytest.approx(-m["reward"])
        assert len(m["samples"]) == 2 and {s["prompt"] for s in m["samples"]} == {"Say rose", "Say sand"}
        assert set(m["samples"][0]["scores"]) == {"close", "short"}
    assert job["summary"]["kept"]["metric"] == "reward"

    # Charged at the RFT rate on the tokens TRL processed, recorded as grpo_lora.
    with session_scope() as s:
        usage = s.scalars(select(UsageRecord).where(UsageRecord.reference == job["id"])).one()
    assert usage.technique == "grpo_lora" and 0 < usage.input_tokens <= tokens
    assert usage.amount_micro_usd == job["charge"]["micro_usd"] == math.ceil(usage.input_tokens * 10)

    r = client.post(
        "/v1/chat/completions",
        headers=alice,
        json={"model": "sayer/1", "messages": [{"role": "user", "content": "Say red"}], "max_tokens": 4},
    )
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "sayer/1" and r.json()["usage"]["completion_tokens"] > 0


HOSTILE = """
import time

def reward_fn(prompt, completion, example):
    if example["completion"] == "red":
        time.sleep(100)
    raise RuntimeError("no")
"""


def test_hostile_reward_functions_fail_their_items_not_the_job(client: TestClient, alice: dict[str, str]) -> None:
    rows = [ROWS[0], ROWS[1], ROWS[-1]]  # red and green to train on (red's function sleeps), sand to evaluate
    ready_dataset(client, alice, rows, "few")
    graders = [
        {"type": "python", "name": "hostile", "source": HOSTILE},
        {"type": "exact_match", "column": "completion"},
    ]
    job = start_job(client, alice, dataset="few", repo="tough", reward_functions=graders, train_steps=1, **GRPO)
    job = finish(client, alice, job["id"], timeout=300)
    assert job["status"] == "completed", job
    [step] = metrics(client, alice, job["id"])
    assert step["rewards"]["failures"] == {"hostile: timeout": 2, "hostile: exception": 2}
    assert step["rewards"]["graders"]["hostile"]["mean"] == 0.0  # failures score 0.0
    evals = metrics(client, alice, job["id"], "eval")
    assert evals[-1]["rewards"]["failures"] == {"hostile: exception": 1}
    assert evals[-1]["samples"][0]["scores"]["hostile"] == "exception"


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"method": "grpo"}, "reward_functions"),
        ({"method": "grpo", "reward_functions": []}, "reward_functions"),
        ({"method": "grpo", "reward_functions": [{"type": "python", "source": "def reward_fn(:"}]}, "reward_functions"),
        (
            {"method": "grpo", "reward_functions": [{"type": "python", "source": "def reward_fn(text):\n  return 1"}]},
            "reward_functions",
        ),
        ({"method": "grpo", "num_generations": 1, "reward_functions": GRADERS[:1]}, "num_generations"),
        ({"method": "grpo", "adapter": "none", "reward_functions": GRADERS[:1]}, "adapter"),
        ({"method": "grpo", "base_model": "llama-3-3-70b-instruct", "reward_functions": GRADERS[:1]}, "base_model"),
        ({"num_generations": 4}, "num_generations"),  # a GRPO field with method "sft"
    ],
)
def test_bad_grpo_configs_are_refused(client: TestClient, alice: dict[str, str], config: dict, field: str) -> None:
    r = client.post(
        "/v1/finetuning/jobs", headers=alice, json={"base_model": TINY_MODEL, "dataset": "d", "repo": "r"} | config
    )
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == field or error["message"].startswith(f"{field}"), error


def test_datasets_that_do_not_fit_grpo_are_refused(client: TestClient, alice: dict[str, str]) -> None:
    ready_dataset(client, alice, ROWS, "words")
    ready_dataset(client, alice, [{"text": f"Say {w}"} for w in WORDS], "plain")
    error = refusal(client, alice, dataset="plain", repo="r", reward_functions=GRADERS, **GRPO)
    assert error["param"] == "dataset" and "'prompt' column" in error["message"]
    reads_answer = [{"type": "numeric", "name": "number", "column": "answer"}]
    error = refusal(client, alice, dataset="words", repo="r", reward_functions=reads_answer, **GRPO)
    assert error["param"] == "dataset" and "grader 'number' reads column 'answer'" in error["message"]
    error = refusal(client, alice, dataset="words", repo="r", evaluation_dataset="plain", reward_functions=GRADERS,
                    **GRPO)  # fmt: skip
    assert error["param"] == "evaluation_dataset"


def test_a_grpo_job_resumes_after_a_dead_worker_and_cancels(
    client: TestClient, alice: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first attempt dies at step 3, after checkpoint 1 (step 2): the retry resumes there and each step's row is
    written once. A job cancelled while training stops at its next step and publishes nothing."""
    import functions.train_progress
    from app.settings import get_settings

    monkeypatch.setenv("LORAPLEX_RETRY_BASE_SECONDS", "0")
    get_settings.cache_clear()
    ready_dataset(client, alice, ROWS, "words")
    config = {"dataset": "words", "reward_functions": GRADERS[:1], "train_steps": 4, "checkpoint_every": 2} | GRPO
    log_step = functions.train_progress.Progress.log

    def dies_at_step_3(self: functions.train_progress.Progress, step: int, logs: dict) -> None:
        if self.attempt == 1 and step == 3:
            raise RuntimeError("worker died")  # as a SIGKILL would, minus the lease wait
        log_step(self, step, logs)

    monkeypatch.setattr(functions.train_progress.Progress, "log", dies_at_step_3)
    job = finish(client, alice, start_job(client, alice, repo="resumed", **config)["id"], timeout=300)
    assert job["status"] == "completed" and job["attempts"] == 2, job
    assert job["summary"]["resumed_from"] == {"checkpoint": "resumed/1@1", "step": 2, "attempt": 2}
    rows = metrics(client, alice, job["id"])
    assert [m["step"] for m in rows] == [1, 2, 3, 4] and all(m["reward"] is not None for m in rows)

    def cancelled_at_step_1(self: functions.train_progress.Progress, step: int, logs: dict) -> None:
        log_step(self, step, logs)
        client.post(f"/v1/finetuning/jobs/{self.job_id}/cancel", headers=alice)

    monkeypatch.setattr(functions.train_progress.Progress, "log", cancelled_at_step_1)
    job = finish(client, alice, start_job(client, alice, repo="stopped", **config)["id"], timeout=300)
    assert job["status"] == "cancelled" and job["adapter"] is None, job
    assert [m["step"] for m in metrics(client, alice, job["id"])] == [1, 2]  # seen at the end of the next step
