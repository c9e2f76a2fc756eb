"""Decoding constrained to a set of choices (SamplingParams.choices, a classification adapter's labels) on the native
engine with the tiny Llama: the answer is always one of the choices, step by step the masked greedy choice of plain
transformers, with prefixes and multi-token choices; sampling stays within them; logprobs are over the allowed
tokens, renormalised; beam search picks among them; invalid choices are refused naming the field; the field crosses
the engine process's wire format."""

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import TINY_MODEL
from functions.engine.native import EngineConfig, NativeEngine
from functions.engine.protocol import (
    AdapterRef,
    Completion,
    EngineError,
    GenerationRequest,
    SamplingParams,
    collect,
    request_from_dict,
    request_to_dict,
)
from functions.engine.sampling import ChoiceTrie
from functions.prompts import encode_chat, encode_text
from lora_helpers import build_lora

QUESTION = "What is the capital of France?"
LABELS = ("positive", "negative", "neutral")


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_lora(tiny_model_dir, tmp_path_factory.mktemp("choices") / "a", seed=5)


@pytest.fixture(scope="module")
def hf(tiny_model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture
def engine(sqlite_platform: object) -> Iterator[NativeEngine]:
    engine = NativeEngine(TINY_MODEL, config=EngineConfig(dtype="fp32", adapter_slots=2, kv_cache_bytes=16 * 2**20))
    yield engine
    engine.close()


def chat(engine: NativeEngine, text: str = QUESTION) -> tuple[int, ...]:
    return encode_chat(engine.tokenizer, [{"role": "user", "content": text}])


def run(
    engine: NativeEngine, prompt: tuple[int, ...] | str, adapter: AdapterRef | None = None, **kw: Any
) -> Completion:
    params = SamplingParams(**({"max_new_tokens": 16, "temperature": 0.0} | kw))
    return asyncio.run(collect(engine.generate(GenerationRequest(prompt, params, adapter))))


def next_logits(hf: Any, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf(torch.tensor([ids])).logits[0, -1]


def masked_greedy(hf: Any, tokenizer: Any, prompt: tuple[int, ...], choices: tuple[str, ...]) -> str:
    """The reference: at each step the likeliest token of those that continue a choice (or end one), by plain
    transformers over the whole sequence so far."""
    paths = [encode_text(tokenizer, c) for c in choices]
    generated: list[int] = []
    while True:
        allowed = {p[len(generated)] for p in paths if p[: len(generated)] == generated and len(p) > len(generated)}
        if generated in paths:
            allowed.add(tokenizer.eos_token_id)
        logits = next_logits(hf, list(prompt) + generated)
        token = max(allowed, key=lambda t: float(logits[t]))
        if token == tokenizer.eos_token_id:
            return tokenizer.decode(generated)
        generated.append(token)


def test_the_trie_keeps_a_prefix_choice_and_its_longer_one_open() -> None:
    eos = 0
    trie = ChoiceTrie([[5], [5, 6, 7], [8, 9]], eos)
    assert sorted(trie.allowed([])) == [5, 8]
    assert sorted(trie.allowed([5])) == [0, 6]  # "5" is a whole choice; "5 6 7" goes on
    assert trie.allowed([5, 6]) == [7]
    assert trie.allowed([5, 6, 7]) == [0]
    assert trie.allowed([8, 9]) == [0]


def test_greedy_answers_a_choice_where_the_model_would_say_something_else(engine: NativeEngine, hf: Any) -> None:
    prompt = chat(engine)
    free = run(engine, prompt)
    assert free.text not in LABELS and free.finish_reason == "length"  # the random model rambles on
    answer = run(engine, prompt, choices=LABELS)
    assert answer.text in LABELS and answer.finish_reason == "stop"
    assert answer.text == masked_greedy(hf, engine.tokenizer, prompt, LABELS)
    assert answer.completion_tokens == len(encode_text(engine.tokenizer, answer.text))


def test_multi_token_choices_and_a_choice_that_is_a_prefix_of_another(engine: NativeEngine, hf: Any) -> None:
    tokenizer = engine.tokenizer
    prompt = chat(engine, "How was the film?")
    short = "positive"
    outcomes = set()
    for suffix in (" review", " feedback", " news", " outlook", " energy", " result", " vibes", " note"):
        choices = (short, short + suffix)
        assert len(encode_text(tokenizer, choices[1])) > 1  # a multi-token choice
        # the guard: at token level too the short choice is a prefix of the long one (both paths stay open)
        assert encode_text(tokenizer, choices[1])[: len(encode_text(tokenizer, short))] == encode_text(tokenizer, short)
        answer = run(engine, prompt, choices=choices)
        assert answer.text in choices and answer.finish_reason == "stop"
        assert answer.text == masked_greedy(hf, tokenizer, prompt, choices)
        outcomes.add("short" if answer.text == short else "long")
    assert outcomes == {"short", "long"}  # both ends of the shared path were taken by some choice set


def test_sampling_with_a_seed_stays_within_the_choices(engine: NativeEngine) -> None:
    prompt = chat(engine)
    answers = [run(engine, prompt, temperature=1.5, seed=seed, choices=LABELS).text for seed in range(12)]
    assert set(answers) <= set(LABELS)
    assert len(set(answers)) > 1  # it samples: a flat enough model picks more than one label over 12 seeds
    again = [run(engine, prompt, temperature=1.5, seed=seed, choices=LABELS).text for seed in range(12)]
    assert again == answers  # same seed, same answer
    filtered = run(engine, prompt, temperature=0.9, top_k=50, top_p=0.5, repetition_penalty=1.3, seed=1, choices=LABELS)
    assert filtered.text in LABELS


def test_first_token_logprobs_over_two_labels_sum_to_one(engine: NativeEngine, hf: Any) -> None:
    tokenizer = engine.tokenizer
    labels = ("yes", "no")
    firsts = [encode_text(tokenizer, label)[0] for label in labels]
    assert firsts[0] != firsts[1]
    prompt = chat(engine, "Is Paris in France?")
    answer = run(engine, prompt, choices=labels, logprobs=True, top_logprobs=5)
    assert answer.text in labels
    first = answer.logprobs[0]
    assert len(first.top) == 2  # the masked tokens are no alternatives
    by_label = {token: logprob for token, logprob in first.top}
    assert set(by_label) == {tokenizer.decode([t]) for t in firsts}
    assert sum(torch.tensor(list(by_label.values())).exp().tolist()) == pytest.approx(1.0, abs=1e-5)
    assert first.logprob == max(by_label.values())
    reference = torch.log_softmax(next_logits(hf, list(prompt))[firsts], -1)  # the two labels, renormalised
    assert [by_label[tokenizer.decode([t])] for t in firsts] == pytest.approx(reference.tolist(), abs=1e-4)
    assert len(answer.logprobs) == 1  # one token per label here (end-of-sequence has none, as ever)


def test_an_adapter_request_and_plain_text_prompts_are_constrained_too(engine: NativeEngine, adapter_dir: Path) -> None:
    ref = AdapterRef("ad_choices", adapter_dir, TINY_MODEL)
    for prompt in (chat(engine), "Review: great film.\nSentiment:"):
        answer = run(engine, prompt, ref, choices=LABELS, min_new_tokens=8)  # min_new_tokens yields to the choice
        assert answer.text in LABELS and answer.finish_reason == "stop"
    cut = run(engine, chat(engine), ref, choices=("very negative indeed",), max_new_tokens=1)
    assert cut.finish_reason == "length" and "very negative indeed".startswith(cut.text)


def test_beam_search_picks_among_the_choices(engine: NativeEngine, hf: Any) -> None:
    tokenizer = engine.tokenizer
    choices = ("positive", "positive review", "very negative indeed")
    prompt = chat(engine, "How was the film?")
    answer = run(engine, prompt, num_beams=4, choices=choices)
    assert answer.text in choices and answer.finish_reason == "stop"

    def score(choice: str) -> float:
        """Sum of the renormalised logprobs along the choice and its end, per token (the beams' length norm)."""
        paths = [encode_text(tokenizer, c) for c in choices]
        tokens = encode_text(tokenizer, choice) + [tokenizer.eos_token_id]
        total = 0.0
        for n, token in enumerate(tokens):
            done = tokens[:n]
            allowed = sorted({p[n] for p in paths if p[:n] == done and len(p) > n})
            if done in paths:
                allowed.append(tokenizer.eos_token_id)
            logits = next_logits(hf, list(prompt) + done)
            total += float(torch.log_softmax(logits[allowed], -1)[allowed.index(token)])
        return total / len(tokens)

    assert answer.text == max(choices, key=score)  # 4 beams hold every path: the search is exact here


def test_invalid_choices_are_refused_naming_the_field(engine: NativeEngine) -> None:
    for choices in (("yes", ""), tuple(f"label {i}" for i in range(65))):
        with pytest.raises(EngineError) as refused:
            run(engine, "hi", choices=choices)
        assert refused.value.field == "choices", choices
    assert run(engine, "hi", choices=tuple(f"label {i}" for i in range(64))).text.startswith("label ")


def test_choices_cross_the_engine_process_wire_format() -> None:
    request = GenerationRequest((1, 2, 3), SamplingParams(choices=("yes", "no"), logprobs=True, top_logprobs=2))
    again = request_from_dict(request_to_dict(request))
    assert again == request and again.params.choices == ("yes", "no")


def test_choices_cross_the_engine_process_http_api(engine: NativeEngine, tiny_model_dir: Path) -> None:
    """The engine process's HTTP API (server.py) behind its client (remote.py), as the API uses them."""
    import threading

    import uvicorn

    from conftest import free_port, wait_for
    from functions.engine.remote import RemoteEngine
    from functions.engine.server import create_engine_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_engine_app(engine), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 30, "the engine server did not start")
        remote = RemoteEngine(TINY_MODEL, f"http://127.0.0.1:{port}", engine.context_length, tiny_model_dir)
        prompt = chat(engine)
        params = SamplingParams(max_new_tokens=16, temperature=0.0, choices=LABELS, logprobs=True, top_logprobs=5)
        answer = asyncio.run(collect(remote.generate(GenerationRequest(prompt, params))))
        assert answer.text == run(engine, prompt, choices=LABELS).text and answer.text in LABELS
        assert len(answer.logprobs[0].top) == len({encode_text(engine.tokenizer, label)[0] for label in LABELS})
        with pytest.raises(EngineError) as refused:
            refusal = GenerationRequest(prompt, SamplingParams(choices=("",)))
            asyncio.run(collect(remote.generate(refusal)))
        assert refused.value.field == "choices"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
