"""The native batched engine on the real SmolLM2-135M: exact greedy tokens against transformers + PEFT for a
batch that mixes 8 adapters and the base model (with requests joining mid-decode and prompts prefilled in
chunks), sampling, stop sequences, logprobs, admission control, the adapter cache and refusals."""

import asyncio
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from functions.engine.native import EngineConfig, NativeEngine
from functions.engine.protocol import (
    AdapterRef,
    EngineBusy,
    EngineError,
    GenerationRequest,
    SamplingParams,
    collect,
)
from functions.prompts import encode_chat

BASE = "smollm2-135m"
NEW_TOKENS = 64
TOPICS = ["tea", "rivers", "chess", "volcanoes", "bread", "owls", "kites", "glaciers", "jazz", "maps"]


@pytest.fixture(scope="module")
def adapters(bundled_model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """8 LoRA adapters with random (non-zero) weights, rank 8 on different module sets."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    targets = [["q_proj", "k_proj", "v_proj", "o_proj"], ["q_proj", "v_proj"], ["gate_proj", "up_proj", "down_proj"]]
    paths = []
    for i in range(8):
        torch.manual_seed(100 + i)
        model = AutoModelForCausalLM.from_pretrained(bundled_model, dtype=torch.float32)
        config = LoraConfig(r=8 if i % 2 else 4, lora_alpha=16, target_modules=targets[i % 3], use_rslora=i == 5)
        peft_model = get_peft_model(model, config)
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                torch.nn.init.normal_(param, std=0.03)
        peft_model.save_pretrained(root / f"a{i}")
        paths.append(root / f"a{i}")
    return paths


@pytest.fixture(scope="module")
def engine(bundled_model: Path) -> Iterator[NativeEngine]:
    # fp32 (the exactness contract), 4 adapter slots for 8 adapters (loads and evictions during the batch),
    # prefill in chunks of 16 tokens (every prompt is split)
    config = EngineConfig(dtype="fp32", adapter_slots=4, max_lora_rank=8, kv_cache_bytes=64 * 2**20, prefill_chunk=16)
    engine = NativeEngine(BASE, bundled_model, config)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def run() -> Iterator[Callable[[Any], Any]]:
    loop = asyncio.new_event_loop()
    yield loop.run_until_complete
    loop.close()


def prompt(engine: NativeEngine, topic: str) -> tuple[int, ...]:
    """A chat request's prompt, as the API sends it: the chat template's token ids."""
    return encode_chat(engine.tokenizer, [{"role": "user", "content": f"Tell me three facts about {topic}."}])


def ref(path: Path, i: int) -> AdapterRef:
    return AdapterRef(f"adapter-{i}", path, BASE)


def greedy(n: int = NEW_TOKENS, **fields: Any) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, min_new_tokens=n, temperature=0, **fields)


def transformers_greedy(model_dir: Path, prompt_ids: tuple[int, ...], adapter: Path | None) -> list[int]:
    """What the engine must reproduce: transformers generate, with PEFT for an adapter, in fp32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
        )
    return out[0, ids.shape[1] :].tolist()


def test_mixed_batch_matches_transformers_and_peft_token_for_token(
    engine: NativeEngine, adapters: list[Path], bundled_model: Path, run: Callable[[Any], Any]
) -> None:
    # 10 requests: the base model twice and 8 adapters; two adapters are asked twice (one segment of 2 tokens)
    plan: list[int | None] = [None, 0, 1, 2, 3, None, 4, 5, 6, 7, 0, 3]
    requests = [
        GenerationRequest(prompt(engine, TOPICS[i % len(TOPICS)]), greedy(), None if a is None else ref(adapters[a], a))
        for i, a in enumerate(plan)
    ]

    async def staggered() -> list[str]:
        tasks = []
        for i, request in enumerate(requests):
            tasks.append(asyncio.ensure_future(_text(engine, request)))
            if i in (3, 7):  # later requests join while the first ones are decoding
                await asyncio.sleep(0.5)
        return await asyncio.gather(*tasks)

    results = run(staggered())
    assert engine.stats()["steps"] > NEW_TOKENS  # they did not all run in lockstep
    for request, a, text in zip(requests, plan, results, strict=True):
        expected = transformers_greedy(bundled_model, request.prompt, None if a is None else adapters[a])
        assert text == engine.tokenizer.decode(expected, skip_special_tokens=True), f"adapter {a}"
    # adapters changed the output (the comparison above is not base against base)
    assert results[1] != results[0]


async def _text(engine: NativeEngine, request: GenerationRequest) -> str:
    completion = await collect(engine.generate(request))
    assert completion.completion_tokens == NEW_TOKENS
    return completion.text


def test_beam_search_matches_transformers_beside_other_requests(
    engine: NativeEngine, adapters: list[Path], bundled_model: Path, run: Callable[[Any], Any]
) -> None:
    from transformers import AutoModelForCausalLM

    prompts = [prompt(engine, topic) for topic in ("maps", "jazz")]
    beams = [GenerationRequest(p, SamplingParams(max_new_tokens=20, temperature=0, num_beams=3)) for p in prompts]
    others = [GenerationRequest(prompts[0], greedy(30), ref(adapters[1], 1))]  # decoding in the same batch

    async def together() -> list[Any]:
        return await asyncio.gather(*[collect(engine.generate(r)) for r in beams + others])

    results = run(together())
    model = AutoModelForCausalLM.from_pretrained(bundled_model, dtype=torch.float32)
    for prompt_ids, result in zip(prompts, results, strict=False):
        ids = torch.tensor([prompt_ids])
        with torch.inference_mode():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, num_beams=3, do_sample=False
            )
        assert result.text == engine.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert results[-1].completion_tokens == 30


def test_dora_adapters_are_served_as_peft_computes_them(
    engine: NativeEngine, adapters: list[Path], bundled_model: Path, tmp_path: Path, run: Callable[[Any], Any]
) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_pretrained(bundled_model, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "up_proj"], use_dora=True)
    peft_model = get_peft_model(model, config)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.01)
        if "magnitude" in name:  # away from its initial ||W||, so the magnitudes matter
            param.data *= 1 + torch.randn_like(param) * 0.02
    peft_model.save_pretrained(tmp_path / "dora")
    dora = AdapterRef("dora", tmp_path / "dora", BASE)
    kites = prompt(engine, "kites")
    # two DoRA requests (one segment of two tokens), beside a plain adapter and the base model
    requests = [GenerationRequest(kites, greedy(), a) for a in (dora, ref(adapters[0], 0), dora, None)]

    async def together() -> list[Any]:
        return await asyncio.gather(*[collect(engine.generate(r)) for r in requests])

    results = run(together())
    tokens = transformers_greedy(bundled_model, kites, tmp_path / "dora")
    expected = engine.tokenizer.decode(tokens, skip_special_tokens=True)
    assert results[0].text == results[2].text == expected
    assert expected != results[3].text


def test_sampling_is_reproducible_with_a_seed(engine: NativeEngine, run: Callable[[Any], Any]) -> None:
    def sample(seed: int) -> str:
        params = SamplingParams(max_new_tokens=24, temperature=0.9, top_p=0.9, top_k=50, seed=seed)
        return run(collect(engine.generate(GenerationRequest(prompt(engine, "tea"), params)))).text

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_repetition_penalty_min_tokens_stop_and_logprobs(engine: NativeEngine, run: Callable[[Any], Any]) -> None:
    rivers = prompt(engine, "rivers")
    plain = run(collect(engine.generate(GenerationRequest(rivers, greedy(20)))))
    penalized = run(collect(engine.generate(GenerationRequest(rivers, greedy(20, repetition_penalty=1.5)))))
    assert penalized.text != plain.text

    stop = plain.text.split()[3]
    stopped = run(collect(engine.generate(GenerationRequest(rivers, greedy(20, stop=(stop,))))))
    assert stopped.finish_reason == "stop"
    assert stopped.text == plain.text[: plain.text.index(stop)]

    short = SamplingParams(max_new_tokens=3, temperature=0, logprobs=True, top_logprobs=3)
    scored = run(collect(engine.generate(GenerationRequest(rivers, short))))
    assert scored.finish_reason == "length" and scored.completion_tokens == 3
    assert "".join(lp.token for lp in scored.logprobs) == scored.text
    for lp in scored.logprobs:
        assert lp.logprob <= 0 and len(lp.top) == 3
        assert lp.top[0] == (lp.token, pytest.approx(lp.logprob))  # greedy: the chosen token is the likeliest


def test_refusals_are_clear_and_the_engine_keeps_serving(
    engine: NativeEngine, adapters: list[Path], tmp_path: Path, run: Callable[[Any], Any]
) -> None:
    def refuse(request: GenerationRequest) -> EngineError:
        with pytest.raises(EngineError) as info:
            run(collect(engine.generate(request)))
        return info.value

    too_long = "word " * (engine.context_length + 10)
    assert refuse(GenerationRequest(too_long)).field == "prompt"
    other_base = AdapterRef("x", adapters[0], "llama-3-1-8b-instruct")
    assert "trained on 'llama-3-1-8b-instruct'" in str(refuse(GenerationRequest("hi", greedy(4), other_base)))
    missing = AdapterRef("missing", tmp_path / "nothing", BASE)
    assert "missing" in str(refuse(GenerationRequest("hi", greedy(4), missing)))
    big = tmp_path / "big"
    shutil.copytree(adapters[1], big)
    config = json.loads((big / "adapter_config.json").read_text())
    (big / "adapter_config.json").write_text(json.dumps(config | {"r": 64, "modules_to_save": ["lm_head"]}))
    message = str(refuse(GenerationRequest("hi", greedy(4), AdapterRef("big", big, BASE))))
    assert "rank 64" in message and "modules_to_save" in message
    assert refuse(GenerationRequest("hi", SamplingParams(top_p=0))).field == "temperature"
    assert refuse(GenerationRequest("hi", SamplingParams(max_new_tokens=0))).field == "max_tokens"
    assert refuse(GenerationRequest("hi", SamplingParams(top_logprobs=99))).field == "top_logprobs"
    assert refuse(GenerationRequest("hi", SamplingParams(num_beams=9))).field == "num_beams"
    # still serving, nothing left behind
    assert run(collect(engine.generate(GenerationRequest("hi", greedy(4))))).completion_tokens == 4
    assert engine.stats()["running"] == 0 and engine.stats()["kv_used_fraction"] == 0


def test_closing_a_stream_frees_its_slot_at_once(engine: NativeEngine, run: Callable[[Any], Any]) -> None:
    async def leave_early() -> None:
        stream = engine.generate(GenerationRequest(prompt(engine, "owls"), greedy(500)))
        async for _ in stream:
            break
        await stream.aclose()
        for _ in range(100):
            if engine.stats()["running"] == 0:
                return
            await asyncio.sleep(0.02)

    run(leave_early())
    assert engine.stats()["running"] == 0 and engine.stats()["kv_used_fraction"] == 0


def test_admission_control_queues_requests_when_the_cache_is_full(bundled_model: Path) -> None:
    fp32_bytes_per_token = 30 * 2 * 3 * 64 * 4  # layers x (k, v) x kv heads x head dim x 4 bytes
    config = EngineConfig(dtype="fp32", kv_cache_bytes=192 * fp32_bytes_per_token, max_waiting=6)  # 12 blocks
    small = NativeEngine(BASE, bundled_model, config)
    try:

        async def burst() -> list[Any]:  # 4 blocks each: three run at a time, the others wait, all complete
            streams = [small.generate(GenerationRequest(f"Count to {i}:", greedy(55))) for i in range(6)]
            return await asyncio.gather(*[_last(s) for s in streams])

        finals = asyncio.run(burst())
        assert all(f.completion_tokens == 55 for f in finals)
        waited = sorted(f.queue_ms for f in finals)
        assert waited[0] < 200 < waited[-1]

        async def overflow() -> list[BaseException | None]:
            long = [small.generate(GenerationRequest("Hello", greedy(70))) for _ in range(2)]  # 10 of 12 blocks
            await asyncio.gather(*[anext(s) for s in long])
            short = [small.generate(GenerationRequest("hi", greedy(20))) for _ in range(8)]
            firsts = [asyncio.ensure_future(anext(s)) for s in short]
            await asyncio.wait(firsts, timeout=60)
            for s in long + short:
                await s.aclose()
            return [f.exception() for f in firsts]

        errors = asyncio.run(overflow())
        busy = [e for e in errors if isinstance(e, EngineBusy)]
        # six wait (one of them may be admitted before the last ones arrive); the rest are refused, not lost
        assert len(busy) in (1, 2) and all(b.retry_after > 0 for b in busy)
        assert errors.count(None) == 8 - len(busy)
    finally:
        small.close()


async def _last(stream: Any) -> Any:
    last = None
    async for delta in stream:
        last = delta
    return last
