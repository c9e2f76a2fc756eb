"""The native engine on the tiny Llama, one request at a time, against plain transformers + PEFT: same greedy
tokens per adapter, LRU eviction of adapter slots, stops, seeds, errors, streaming. The adapters are small random
LoRAs built here (no training). Batching itself is tested on the real model in test_native_engine.py."""

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import torch

from conftest import TINY_MODEL
from functions.engine.native import EngineConfig, NativeEngine
from functions.engine.protocol import (
    AdapterRef,
    Completion,
    Delta,
    EngineError,
    GenerationRequest,
    SamplingParams,
    collect,
)
from lora_helpers import build_lora

NEW_TOKENS = 32
Reference = Callable[[str | None, str], list[int]]  # (adapter name or None, prompt) -> new token ids
PROMPTS = {
    "A": "The cat sat on the",
    "B": "Once upon a time, in a land far away,",
    "C": "def add(a, b):",
    None: "Write a short poem about the sea.",
}


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: build_lora(tiny_model_dir, root / name, seed) for name, seed in (("A", 1), ("B", 2), ("C", 3))}


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, adapter_dirs: dict[str, Path]) -> Iterator[Reference]:
    """reference(adapter name or None, prompt) -> the new token ids of plain `generate(do_sample=False)`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    cache: dict[tuple[str | None, str], list[int]] = {}

    def run(adapter: str | None, prompt: str) -> list[int]:
        if (adapter, prompt) not in cache:
            model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
            if adapter is not None:
                model = PeftModel.from_pretrained(model, adapter_dirs[adapter])
            model.eval()
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.inference_mode():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=NEW_TOKENS,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
            cache[(adapter, prompt)] = out[0, ids.shape[1] :].tolist()
        return cache[(adapter, prompt)]

    yield run


@pytest.fixture
def engine(sqlite_platform: object) -> Iterator[NativeEngine]:
    engine = NativeEngine(TINY_MODEL, config=EngineConfig(dtype="fp32", adapter_slots=2, kv_cache_bytes=16 * 2**20))
    yield engine
    engine.close()


@pytest.fixture
def refs(adapter_dirs: dict[str, Path]) -> dict[str | None, AdapterRef | None]:
    return {None: None} | {
        name: AdapterRef(f"ad_{name}", path, base_model=TINY_MODEL) for name, path in adapter_dirs.items()
    }


def greedy(max_new_tokens: int = NEW_TOKENS, **kw: object) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, **kw)  # type: ignore[arg-type]


def run(engine: NativeEngine, prompt: str, adapter: AdapterRef | None, params: SamplingParams) -> Completion:
    return asyncio.run(collect(engine.generate(GenerationRequest(prompt, params, adapter))))


def deltas_of(engine: NativeEngine, request: GenerationRequest) -> list[Delta]:
    async def all_of(stream: AsyncIterator[Delta]) -> list[Delta]:
        return [delta async for delta in stream]

    return asyncio.run(all_of(engine.generate(request)))


def expected_text(engine: NativeEngine, ids: list[int]) -> str:
    return engine.tokenizer.decode(ids, skip_special_tokens=True)


# --- greedy decoding equals plain transformers + PEFT -------------------------------------------------------


def test_reference_adapters_really_differ(reference: Reference, engine: NativeEngine) -> None:
    """Guard for the comparisons below: each adapter changes the output, so a wrong adapter would be caught."""
    prompt = PROMPTS["A"]
    outputs = {name: tuple(reference(name, prompt)) for name in (None, "A", "B", "C")}
    assert len(set(outputs.values())) == 4, outputs
    assert all(len(ids) == NEW_TOKENS for ids in outputs.values())


def test_greedy_matches_transformers_across_adapters_and_eviction(
    engine: NativeEngine, refs: dict[str | None, AdapterRef | None], reference: Reference
) -> None:
    # A, base, B, A, C (evicts B), B (reloaded, evicts A), A (reloaded, evicts C), base, C (reloaded)
    order: list[str | None] = ["A", None, "B", "A", "C", "B", "A", None, "C"]
    resident_after: list[list[str]] = []
    for name in order:
        for prompt_name in (name, "A"):  # the adapter's own prompt and a shared one
            prompt = PROMPTS[prompt_name]
            want = reference(name, prompt)
            got = run(engine, prompt, refs[name], greedy())
            assert got.text == expected_text(engine, want), (name, prompt)
            assert got.completion_tokens == len(want) == NEW_TOKENS
            assert got.prompt_tokens == engine.count_tokens(prompt)
            assert got.finish_reason == "length"
        resident_after.append(list(engine.lora.resident))
    assert resident_after == [
        ["ad_A"],
        ["ad_A"],
        ["ad_A", "ad_B"],
        ["ad_B", "ad_A"],
        ["ad_A", "ad_C"],
        ["ad_C", "ad_B"],
        ["ad_B", "ad_A"],
        ["ad_B", "ad_A"],
        ["ad_A", "ad_C"],
    ]
    assert sorted(engine.lora.resident.values()) == [0, 1]  # two slots, reused in place


def test_base_model_output_unchanged_after_adapters_loaded(
    engine: NativeEngine, refs: dict[str | None, AdapterRef | None], reference: Reference
) -> None:
    prompt = PROMPTS[None]
    want = expected_text(engine, reference(None, prompt))
    before = run(engine, prompt, None, greedy())
    assert before.text == want
    for name in ("A", "B", "C"):
        assert run(engine, prompt, refs[name], greedy()).text != want
        after = run(engine, prompt, None, greedy())
        assert after.text == want
        assert after.completion_tokens == NEW_TOKENS


# --- stops, lengths, seeds -----------------------------------------------------------------------------------


def test_stop_sequence_cuts_text_and_finishes_with_stop(
    engine: NativeEngine, refs: dict[str | None, AdapterRef | None], reference: Reference
) -> None:
    prompt = PROMPTS["B"]
    full = expected_text(engine, reference("B", prompt))
    words = full.split()
    assert len(set(words)) >= 2, full
    stop = " " + next(w for w in words if w != words[0])  # the first word that differs from the opening one
    cut = full.find(stop)
    assert cut > 0
    got = run(engine, prompt, refs["B"], greedy(stop=("never-there", stop)))
    assert got.text == full[:cut]
    assert stop not in got.text
    assert got.finish_reason == "stop"
    assert 0 < got.completion_tokens < NEW_TOKENS


@pytest.mark.parametrize("adapter", ["A", "B", "C"])
def test_stop_sequence_spanning_tokens_is_not_leaked(
    engine: NativeEngine, refs: dict[str | None, AdapterRef | None], reference: Reference, adapter: str
) -> None:
    """A stop sequence made of several tokens: its first tokens must not be streamed before it is complete."""
    prompt = PROMPTS[adapter]
    want = reference(adapter, prompt)
    full = expected_text(engine, want)
    stop = expected_text(engine, want[2:5]).strip()  # three tokens, found only once the third one is out
    assert len(engine.tokenizer(stop, add_special_tokens=False)["input_ids"]) > 1
    cut = full.find(stop)
    deltas = deltas_of(engine, GenerationRequest(prompt, greedy(stop=(stop,)), refs[adapter]))
    assert "".join(d.text for d in deltas) == full[:cut]
    assert deltas[-1].finish_reason == "stop"


def test_stop_sequence_never_completed_releases_its_start(
    engine: NativeEngine, refs: dict[str | None, AdapterRef | None], reference: Reference
) -> None:
    """Text held back because it might begin a stop sequence is sent when generation ends without it."""
    prompt = PROMPTS["B"]
    full = expected_text(engine, reference("B", prompt))
    got = run(engine, prompt, refs["B"], greedy(stop=(full[-3:] + "\u2603",)))
    assert (got.text, got.finish_reason) == (full, "length")


def test_incomplete_characters_at_the_end_are_not_dropped(engine: NativeEngine, reference: Reference) -> None:
    """The base model repeats the last prompt token: here half of an emoji, so every generated token is a stray
    byte. The text is what the tokenizer decodes (replacement characters), as plain transformers gives it."""
    prompt = "I love \U0001f600"
    want = reference(None, prompt)
    got = run(engine, prompt, None, greedy())
    assert got.completion_tokens == NEW_TOKENS
    assert got.text == expected_text(engine, want) != ""


def test_max_new_tokens_reached_finishes_with_length(
    engine: NativeEngine, refs: dict[str | None, AdapterRef | None], reference: Reference
) -> None:
    prompt = PROMPTS["C"]
    for limit in (1, 7):
        got = run(engine, prompt, refs["C"], greedy(max_new_tokens=limit))
        assert got.finish_reason == "length"
        assert got.completion_tokens == limit
        assert got.text == expected_text(engine, reference("C", prompt)[:limit])


def test_seed_makes_sampling_reproducible(engine: NativeEngine, refs: dict[str | None, AdapterRef | None]) -> None:
    def sample(seed: int, adapter: str | None = "A") -> str:
        params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=seed)
        return run(engine, PROMPTS["A"], refs[adapter], params).text

    assert sample(1234) == sample(1234)
    assert sample(7, None) == sample(7, None)
    texts = {sample(seed) for seed in (1, 2, 3, 4)}
    assert len(texts) >= 2, texts


# --- refusals ------------------------------------------------------------------------------------------------


def test_prompt_longer_than_context_raises_and_engine_recovers(
    engine: NativeEngine, refs: dict[str | None, AdapterRef | None], reference: Reference
) -> None:
    long_prompt = "hello " * 3000
    assert engine.count_tokens(long_prompt) > engine.context_length == 2048
    with pytest.raises(EngineError, match="context"):
        run(engine, long_prompt, refs["A"], greedy())
    got = run(engine, PROMPTS["A"], refs["A"], greedy())
    assert got.text == expected_text(engine, reference("A", PROMPTS["A"]))


def test_adapter_of_another_base_model_raises_and_engine_recovers(
    engine: NativeEngine, adapter_dirs: dict[str, Path], refs: dict[str | None, AdapterRef | None], reference: Reference
) -> None:
    foreign = AdapterRef("ad_foreign", adapter_dirs["B"], base_model="smollm2-135m")
    with pytest.raises(EngineError, match="smollm2-135m"):
        run(engine, PROMPTS["B"], foreign, greedy())
    assert "ad_foreign" not in engine.lora.resident
    for name in ("B", None):
        got = run(engine, PROMPTS["B"], refs[name], greedy())
        assert got.text == expected_text(engine, reference(name, PROMPTS["B"]))


# --- streaming -----------------------------------------------------------------------------------------------


def test_streaming_deltas_concatenate_to_the_full_text(
    engine: NativeEngine, refs: dict[str | None, AdapterRef | None]
) -> None:
    for name in ("A", None):
        params = greedy()
        deltas = deltas_of(engine, GenerationRequest(PROMPTS["A"], params, refs[name]))
        full = run(engine, PROMPTS["A"], refs[name], params)
        texts = [d.text for d in deltas if d.text]
        assert len(texts) > 1
        assert "".join(texts) == full.text
        assert all(d.finish_reason is None for d in deltas[:-1])
        last = deltas[-1]
        assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == (
            full.finish_reason,
            full.prompt_tokens,
            full.completion_tokens,
        )
