"""OpenAI's sampling fields in the native engine, on the tiny Llama: presence_penalty, frequency_penalty and
logit_bias change exactly the logits they name (against greedy decoding computed by hand from transformers' logits),
rows without them in the same batch are unchanged, and n > 1 answers decode side by side in one batch over one
prefill of the prompt, whose cache blocks they share."""

import asyncio
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import TINY_MODEL
from functions.engine.batch import Seq
from functions.engine.kv_cache import KVCache
from functions.engine.native import EngineConfig, NativeEngine
from functions.engine.protocol import Delta, EngineError, GenerationRequest, SamplingParams

PROMPT = "The cat sat on the"
STEPS = 12


@pytest.fixture
def engine(sqlite_platform: object) -> Iterator[NativeEngine]:
    engine = NativeEngine(TINY_MODEL, config=EngineConfig(dtype="fp32", adapter_slots=2, kv_cache_bytes=16 * 2**20))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def hf(tiny_model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def by_hand(
    hf: Any,
    engine: NativeEngine,
    presence: float = 0.0,
    frequency: float = 0.0,
    bias: dict[int, float] | None = None,
) -> list[int]:
    """Greedy decoding of PROMPT, OpenAI's definitions applied in plain Python to transformers' logits: each token
    generated so far loses presence once and frequency per time it was generated; bias is added."""
    tokens = engine.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    out: list[int] = []
    for _ in range(STEPS):
        with torch.inference_mode():
            logits = hf(torch.tensor([tokens])).logits[0, -1].tolist()
        for token, count in Counter(out).items():
            logits[token] -= presence + frequency * count
        for token, value in (bias or {}).items():
            logits[token] += value
        best = max(range(len(logits)), key=logits.__getitem__)
        out.append(best)
        tokens.append(best)
        if best == engine.eos:
            break
    return out


def text_of(engine: NativeEngine, ids: list[int]) -> str:
    return engine.tokenizer.decode(ids, skip_special_tokens=True)


def greedy(**kw: Any) -> SamplingParams:
    return SamplingParams(max_new_tokens=STEPS, temperature=0.0, **kw)


async def answers(engine: NativeEngine, params: SamplingParams, prompt: str = PROMPT) -> list[str]:
    """Each answer's text, by index (n of them), checking each ends once with its own counts."""
    texts: dict[int, list[str]] = {}
    ends: list[Delta] = []
    async for delta in engine.generate(GenerationRequest(prompt, params)):
        texts.setdefault(delta.index, []).append(delta.text)
        if delta.finish_reason is not None:
            ends.append(delta)
    assert sorted(d.index for d in ends) == list(range(params.n))
    assert all(d.prompt_tokens == engine.count_tokens(prompt) for d in ends)
    return ["".join(texts[i]) for i in range(params.n)]


def one(engine: NativeEngine, params: SamplingParams) -> str:
    return asyncio.run(answers(engine, params))[0]


# --- penalties and logit_bias ---------------------------------------------------------------------------------


def test_logit_bias_forces_or_bans_a_token(engine: NativeEngine, hf: Any) -> None:
    forced = engine.tokenizer.encode(" dog", add_special_tokens=False)[0]
    assert one(engine, greedy(logit_bias=((forced, 100.0),))) == text_of(engine, [forced] * STEPS)
    plain = by_hand(hf, engine)
    banned = {plain[0]: -100.0, plain[1]: -100.0}
    want = by_hand(hf, engine, bias=banned)
    assert plain[0] not in want and plain[1] not in want
    assert one(engine, greedy(logit_bias=tuple(banned.items()))) == text_of(engine, want)


@pytest.mark.parametrize(("presence", "frequency"), [(0.0, 2.0), (1.5, 0.0), (0.7, 0.9), (0.0, -1.0)])
def test_penalties_follow_openais_definition(engine: NativeEngine, hf: Any, presence: float, frequency: float) -> None:
    plain, want = by_hand(hf, engine), by_hand(hf, engine, presence, frequency)
    if presence > 0 or frequency > 0:
        assert want != plain  # the tiny model repeats itself: a penalty must show
    got = one(engine, greedy(presence_penalty=presence, frequency_penalty=frequency))
    assert got == text_of(engine, want)


def test_rows_with_and_without_the_fields_share_a_batch(engine: NativeEngine, hf: Any) -> None:
    """Free rows decode what they decode alone; adjusted rows what the hand computation says, in the same steps."""
    plain = by_hand(hf, engine)
    penalized = by_hand(hf, engine, 0.5, 1.0, {plain[0]: -100.0})
    adjusted = greedy(presence_penalty=0.5, frequency_penalty=1.0, logit_bias=((plain[0], -100.0),))

    async def mixed() -> list[list[str]]:
        return await asyncio.gather(*(answers(engine, p) for p in (greedy(), adjusted, greedy(), adjusted)))

    steps = engine.steps
    got = asyncio.run(mixed())
    assert [g[0] for g in got] == [text_of(engine, ids) for ids in (plain, penalized, plain, penalized)]
    assert engine.steps - steps <= STEPS + 3  # one batch, not one request after another


def test_bad_fields_are_refused_before_anything_is_queued(engine: NativeEngine, hf: Any) -> None:
    cases = [
        (greedy(logit_bias=((engine.model.vocab, 1.0),)), "logit_bias"),
        (greedy(logit_bias=((-1, 1.0),)), "logit_bias"),
        (greedy(logit_bias=((5, 101.0),)), "logit_bias"),
        (greedy(logit_bias=tuple((i, 1.0) for i in range(301))), "logit_bias"),
        (greedy(presence_penalty=2.5), "presence_penalty"),
        (greedy(frequency_penalty=-2.01), "frequency_penalty"),
        (greedy(n=9), "n"),
        (greedy(n=0), "n"),
        (greedy(n=2, num_beams=2), "n"),
        (greedy(num_beams=2, logit_bias=((5, 1.0),)), "num_beams"),
    ]
    for params, field in cases:
        with pytest.raises(EngineError) as refused:
            one(engine, params)
        assert refused.value.field == field, params
    assert engine.stats()["waiting"] == 0 and engine.stats()["requests"] == 0
    assert one(engine, greedy()) == text_of(engine, by_hand(hf, engine))  # and it goes on serving


# --- n > 1 ---------------------------------------------------------------------------------------------------


def test_n_answers_decode_in_one_batch_in_a_single_requests_steps(engine: NativeEngine) -> None:
    sampled = SamplingParams(max_new_tokens=STEPS, min_new_tokens=STEPS, temperature=1.0, seed=3)
    steps = engine.steps
    alone = asyncio.run(answers(engine, sampled))
    one_request = engine.steps - steps
    steps = engine.steps
    several = asyncio.run(answers(engine, replace(sampled, n=4)))
    assert engine.steps - steps == one_request == STEPS  # one prefill step, then one decode step per token
    assert several[0] == alone[0]  # answer 0 samples with the seed itself
    assert len(set(several)) == 4  # each answer its own generator
    assert engine.kv.used_fraction == 0  # the shared prompt blocks went back with the last answer


def test_n_answers_are_reproducible_and_answer_i_samples_with_seed_plus_i(engine: NativeEngine) -> None:
    params = SamplingParams(max_new_tokens=STEPS, temperature=1.0, seed=40, n=3)
    first, again = asyncio.run(answers(engine, params)), asyncio.run(answers(engine, params))
    assert first == again
    assert len(set(first)) == 3
    alone = SamplingParams(max_new_tokens=STEPS, temperature=1.0, seed=42)
    assert first[2] == asyncio.run(answers(engine, alone))[0]


def test_greedy_n_answers_are_identical(engine: NativeEngine, hf: Any) -> None:
    got = asyncio.run(answers(engine, greedy(n=3)))
    assert got == [text_of(engine, by_hand(hf, engine))] * 3


def test_n_answers_each_apply_their_own_penalties(engine: NativeEngine, hf: Any) -> None:
    want = text_of(engine, by_hand(hf, engine, 0.0, 2.0))
    assert asyncio.run(answers(engine, greedy(n=2, frequency_penalty=2.0))) == [want, want]


def test_n_answers_share_the_prompts_cache_blocks() -> None:
    """Admission allocates the prompt's blocks once: 40 prompt tokens (3 blocks of 16) and 4 answers of 8 tokens
    (1 block each) hold 7 blocks, where 4 copies of the prompt would hold 12; all come back with the last answer."""
    kv = KVCache(1, 1, 4, budget_bytes=64 * 16 * 2 * 4 * 4, dtype=torch.float32, device=torch.device("cpu"))
    free = len(kv._free)
    request = GenerationRequest(tuple(range(1, 41)), SamplingParams(max_new_tokens=8, n=4, seed=1))
    leader = Seq(request, list(range(1, 41)), None, sink=lambda item: None)
    leader.followers = [
        Seq(request, leader.prompt_ids, None, sink=lambda item: None, index=i, leader=leader) for i in range(1, 4)
    ]
    assert leader.start(kv, 2048, 0, torch.device("cpu"))
    assert free - len(kv._free) == 7
    prompt_slots = leader.beam_slots[0][:40]
    for member in leader.members:
        assert torch.equal(member.beam_slots[0][:40], prompt_slots)  # one copy of the prompt, read by all
        assert member.beam_slots[0].shape == (48,)
    own = [set(m.beam_slots[0][40:].tolist()) for m in leader.members]
    assert all(not (a & b) for i, a in enumerate(own) for b in own[i + 1 :])  # each answer writes its own slots
    assert len({m.generator.initial_seed() for m in leader.members if m.generator}) == 4
