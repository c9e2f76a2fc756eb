"""A GRPO job's completions from our native engine (functions/engine/native.py) with the adapter as it is at that
step, in place of TRL's `generate` on the PEFT model: a step's completions (effective_batch_size prompts x
num_generations) come several times faster on a CPU (scripts/bench_grpo_generation.py has the figures), and so do the
evaluations' greedy answers.

Used where it was measured: training on a CPU, a base model the engine runs (llama, mistral, qwen2). Elsewhere (a
GPU, other architectures) TRL's own `generate` stays; nothing was measured there.

How a step hands its weights over: the adapter is saved under workdir/rollout/step-<global step> (a few MB) and its
requests name that directory; the engine reads it on its loader thread into a slot, as it loads a deployment's
adapter. Evaluations at a step and the next step's generation see the same weights, so they share one save. The
engine is a second copy of the base weights (at the training precision) for the job's lifetime.

Completions are token ids, as TRL scores them: the sampled tokens (the engine reports each one's id with its
logprob) and the end-of-turn token when the answer ended there (TRL keeps it: the model learns where to stop).
Sampling is seeded per step and prompt from the job's seed, so a resumed run draws as the first one did.
"""

import asyncio
import itertools
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from functions.engine.llama import SUPPORTED_TYPES
from functions.engine.protocol import AdapterRef, GenerationRequest, SamplingParams


class EngineRollout:
    def __init__(self, base_model: str, bf16: bool, max_rank: int, sequences: int, workdir: Path, seed: int) -> None:
        from app.settings import get_settings
        from functions.engine import engine_config
        from functions.engine.native import NativeEngine

        config = replace(
            engine_config(get_settings()),
            dtype="bfloat16" if bf16 else "float32",
            adapter_slots=2,  # this step's adapter and, while it loads, the last one
            max_lora_rank=max_rank,
            max_batch=max(sequences, 1),
            max_waiting=2**31,  # the queue bound protects a shared server; this engine is the job's alone
            threads=None,  # the training run set them
        )
        self.engine = NativeEngine(base_model, config=config, background=True)
        self.base_model, self.seed = base_model, seed
        self.dir = workdir / "rollout"
        self._saved: tuple[int, AdapterRef] | None = None  # (global step, its adapter)

    @staticmethod
    def usable(model: Any) -> bool:
        """Whether completions for this model come from the engine: a CPU run of an architecture it serves."""
        return model.device.type == "cpu" and model.config.model_type in SUPPORTED_TYPES

    def sample(
        self, model: Any, step: int, prompt_ids: Sequence[Sequence[int]], max_tokens: int, temperature: float
    ) -> list[list[int]]:
        """A completion's token ids for each of `prompt_ids` (a prompt repeated k times in a row is one request with
        n = k: its prompt is computed once)."""
        adapter = self._adapter(model, step)
        groups = [(list(ids), len(list(run))) for ids, run in itertools.groupby(map(tuple, prompt_ids))]
        requests = [
            GenerationRequest(
                tuple(ids),
                SamplingParams(
                    max_new_tokens=max_tokens, temperature=temperature, n=n, logprobs=True, seed=self._seed(step, i)
                ),
                adapter,
            )
            for i, (ids, n) in enumerate(groups)
        ]
        return [c for answers in asyncio.run(self._all(requests)) for c in answers]

    def greedy(self, model: Any, step: int, prompt_ids: Sequence[Sequence[int]], max_tokens: int) -> list[list[int]]:
        """The greedy completion's token ids of each prompt (an evaluation's)."""
        adapter = self._adapter(model, step)
        params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0, logprobs=True)
        answers = asyncio.run(self._all([GenerationRequest(tuple(ids), params, adapter) for ids in prompt_ids]))
        return [a[0] for a in answers]

    def close(self) -> None:
        self.engine.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _adapter(self, model: Any, step: int) -> AdapterRef:
        """The adapter as it is at `step`, saved once per step; the last step's directory is removed (the engine
        holds its weights in a slot, and no request names it again)."""
        if self._saved is None or self._saved[0] != step:
            if self._saved is not None:
                shutil.rmtree(self._saved[1].path, ignore_errors=True)
            target = self.dir / f"step-{step}"
            shutil.rmtree(target, ignore_errors=True)  # a resumed run's leftover
            model.save_pretrained(target, selected_adapters=["default"])
            self._saved = (step, AdapterRef(f"{self.dir}:{step}", target, self.base_model))
        return self._saved[1]

    def _seed(self, step: int, request: int) -> int:
        return (self.seed * 1_000_003 + step * 10_007 + request) % 2**31

    async def _all(self, requests: list[GenerationRequest]) -> list[list[list[int]]]:
        return list(await asyncio.gather(*(self._answers(r) for r in requests)))

    async def _answers(self, request: GenerationRequest) -> list[list[int]]:
        """Each of the request's n answers as token ids, with the end-of-sequence token when it ended there."""
        answers: list[list[int]] = [[] for _ in range(request.params.n)]
        async for delta in self.engine.generate(request):
            answers[delta.index].extend(lp.id for lp in delta.logprobs)
            if delta.end_token is not None:
                answers[delta.index].append(delta.end_token.id)
        return answers
