"""SamplingParams.choices on the vLLM engine (its structured outputs' choice grammar), on the real SmolLM2-135M: the
answer is one of the choices where the model would answer otherwise, greedy or sampled, and the logprobs are over
the allowed tokens only, renormalised.

Runs in .venv-vllm only (`scripts/setup_vllm.sh`); elsewhere it skips. One engine for the module (~30 s to start).
"""

import asyncio
import math
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

pytest.importorskip("vllm")

from functions.engine.protocol import Completion, EngineError, GenerationRequest, SamplingParams, collect  # noqa: E402
from functions.prompts import encode_chat  # noqa: E402

BASE = "smollm2-135m"
LABELS = ("positive", "negative", "neutral")
T = TypeVar("T")


@pytest.fixture(scope="module")
def model_dir(shared_volume: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from app.settings import get_settings
    from functions.base_models import _convert_bundled_gguf, ensure_local

    shared = shared_volume / "base_models" / BASE
    if not (shared / "config.json").exists():
        _convert_bundled_gguf(shared)
    data_dir = tmp_path_factory.mktemp("vllm-choices")
    (data_dir / "volume" / "base_models").mkdir(parents=True)
    (data_dir / "volume" / "base_models" / BASE).symlink_to(shared)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAPLEX_DATA_DIR", str(data_dir))
        get_settings.cache_clear()
        yield ensure_local(BASE)
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def run() -> Iterator[Callable[[Awaitable[T]], T]]:
    """One event loop for the module: vLLM's output handler task lives on the loop of the first request."""
    loop = asyncio.new_event_loop()
    yield loop.run_until_complete

    async def cancel_the_rest() -> None:
        pending = asyncio.all_tasks() - {asyncio.current_task()}
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    loop.run_until_complete(cancel_the_rest())
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()


@pytest.fixture(scope="module")
def engine(model_dir: Path, run: Callable) -> Iterator[Any]:
    from functions.engine.vllm_engine import VLLMEngine

    engine = VLLMEngine(BASE, model_dir, max_loras=1, max_lora_rank=8, max_model_len=2048, dtype="float32")
    yield engine
    engine.close()
    run(asyncio.sleep(0.1))


def answer(engine: Any, run: Callable, question: str, **kw: Any) -> Completion:
    prompt = encode_chat(engine.tokenizer, [{"role": "user", "content": question}])
    params = SamplingParams(**({"max_new_tokens": 24, "temperature": 0.0} | kw))
    return run(collect(engine.generate(GenerationRequest(prompt, params))))


def test_vllm_answers_only_a_choice(engine: Any, run: Callable) -> None:
    question = "What is the capital of France?"
    free = answer(engine, run, question)
    assert free.text not in LABELS
    greedy = answer(engine, run, question, choices=LABELS, min_new_tokens=8)
    assert greedy.text in LABELS and greedy.finish_reason == "stop"
    sampled = {answer(engine, run, question, choices=LABELS, temperature=1.5, seed=s).text for s in range(6)}
    assert sampled <= set(LABELS)


def test_vllm_logprobs_are_over_the_allowed_tokens(engine: Any, run: Callable) -> None:
    out = answer(
        engine, run, "Is Paris in France? Answer yes or no.", choices=("yes", "no"), logprobs=True, top_logprobs=20
    )
    assert out.text in ("yes", "no")
    first = out.logprobs[0]
    # vLLM's grammar allows any spelling of a choice in tokens ("y" then "es" too): every allowed first token is
    # among the 20, and together they hold all the probability
    assert 2 <= len(first.top) < 20
    assert math.fsum(math.exp(logprob) for _, logprob in first.top) == pytest.approx(1.0, abs=1e-4)
    assert {"yes", "no"} <= {token for token, _ in first.top}


def test_vllm_refuses_invalid_choices(engine: Any, run: Callable) -> None:
    with pytest.raises(EngineError) as refused:
        answer(engine, run, "hi", choices=("yes", ""))
    assert refused.value.field == "choices"
