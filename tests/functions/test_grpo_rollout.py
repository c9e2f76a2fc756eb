"""A GRPO step's completions from the native engine (functions/grpo_rollout.py), on the tiny Llama with a LoRA whose
B is not zero: greedy answers token for token those of transformers + PEFT on the same weights, the weights handed
over per step (a changed adapter changes the answers at the next step), seeded sampling, grouped prompts, and the
files cleaned up."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import TINY_MODEL
from functions.grpo_rollout import EngineRollout
from lora_helpers import build_lora

PROMPTS = ["The cat sat on the", "Once upon a time,", "def add(a, b):"]
NEW_TOKENS = 12


@pytest.fixture
def model(tiny_model_dir: Path, tmp_path: Path) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = build_lora(tiny_model_dir, tmp_path / "lora", seed=3)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter, is_trainable=True)


@pytest.fixture
def rollout(sqlite_platform: object, tmp_path: Path) -> Iterator[EngineRollout]:
    rollout = EngineRollout(TINY_MODEL, bf16=False, max_rank=8, sequences=8, workdir=tmp_path / "job", seed=42)
    yield rollout
    rollout.close()


@pytest.fixture
def prompt_ids(tiny_model_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


def reference(model: Any, ids: list[int], eos: int) -> list[int]:
    """transformers + PEFT's greedy answer, up to and with the first end-of-sequence token."""
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos, pad_token_id=eos,
        )[0, len(ids) :].tolist()  # fmt: skip
    return out[: out.index(eos) + 1] if eos in out else out


def test_the_engine_is_used_on_a_cpu_for_a_llama(model: Any) -> None:
    assert EngineRollout.usable(model)


def test_greedy_answers_are_those_of_transformers_and_follow_the_weights_each_step(
    model: Any, rollout: EngineRollout, prompt_ids: list[list[int]]
) -> None:
    eos = rollout.engine.eos
    expected = [reference(model, ids, eos) for ids in prompt_ids]
    assert rollout.greedy(model, 0, prompt_ids, NEW_TOKENS) == expected

    with torch.no_grad():  # an optimizer step: the adapter's B changes
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.mul_(-3.0)
    changed = [reference(model, ids, eos) for ids in prompt_ids]
    assert changed != expected  # the new weights answer differently ...
    assert rollout.greedy(model, 0, prompt_ids, NEW_TOKENS) == expected  # ... same step: the weights handed over
    assert rollout.greedy(model, 1, prompt_ids, NEW_TOKENS) == changed  # next step: the new weights
    saved = sorted(p.name for p in (rollout.dir).iterdir())
    assert saved == ["step-1"]  # the last step's files are gone once the next is saved


def test_sampling_groups_a_prompts_repeats_and_is_seeded_per_step(
    model: Any, rollout: EngineRollout, prompt_ids: list[list[int]]
) -> None:
    eos = rollout.engine.eos
    rows = [ids for ids in prompt_ids[:2] for _ in range(4)]  # as TRL hands a step over: each prompt 4 times in a row
    first = rollout.sample(model, 0, rows, NEW_TOKENS, temperature=1.0)
    assert len(first) == len(rows)
    for completion in first:  # each ends with the end-of-sequence token, or runs to the limit
        assert completion and (completion[-1] == eos or len(completion) == NEW_TOKENS)
        assert eos not in completion[:-1] and len(completion) <= NEW_TOKENS
    assert len({tuple(c) for c in first[:4]}) > 1  # a group's completions differ: something to learn from
    assert rollout.sample(model, 0, rows, NEW_TOKENS, temperature=1.0) == first  # same step, same draws
    assert rollout.sample(model, 1, rows, NEW_TOKENS, temperature=1.0) != first  # the next step draws anew


def test_an_evaluation_larger_than_a_step_is_answered_and_close_removes_the_files(
    model: Any, sqlite_platform: object, tmp_path: Path, prompt_ids: list[list[int]]
) -> None:
    rollout = EngineRollout(TINY_MODEL, bf16=False, max_rank=8, sequences=2, workdir=tmp_path / "job2", seed=1)
    assert len(rollout.greedy(model, 0, prompt_ids * 3, 4)) == 9  # more prompts than a step's sequences
    assert (rollout.dir / "step-0" / "adapter_model.safetensors").exists()
    rollout.close()
    assert not rollout.dir.exists()


def test_a_run_continued_from_an_adapter_of_another_rank_hands_that_adapter_over(
    tiny_model_dir: Path, sqlite_platform: object, tmp_path: Path
) -> None:
    """continue_from_version keeps the saved adapter's shape (rank 8 here, over the config's rank 4): the engine is
    sized for the adapter the run trains, not the config's rank."""
    from functions.finetune_config import FinetuneConfig
    from functions.grpo import PromptRow, build_grpo_trainer

    saved = build_lora(tiny_model_dir, tmp_path / "v1", seed=5, r=8)
    config = FinetuneConfig.model_validate(
        {"base_model": TINY_MODEL, "dataset": "d", "repo": "r", "method": "grpo", "rank": 4, "task": "completion",
         "reward_functions": [{"type": "exact_match", "column": "completion"}], "effective_batch_size": 2,
         "epochs": 1, "learning_rate": 1e-4, "max_seq_length": 64, "eval_steps": None}
    )  # fmt: skip
    rows = [PromptRow(i, i + 1, "train", p, {"prompt": p, "completion": "x"}) for i, p in enumerate(PROMPTS)]
    run = build_grpo_trainer(config, rows, tmp_path / "job", precision="fp32", init_from=saved)
    try:
        assert run.rollout is not None
        [answer] = run.rollout.greedy(run.trainer.model, 0, [[1, 2, 3]], 4)  # refused before (rank 8 over a max of 4)
        assert 0 < len(answer) <= 4
    finally:
        run.close()
