"""The vLLM engine: vLLM's async engine (`AsyncLLM`) behind our `Engine` protocol, LoRA adapters per request.

vLLM lives in its own environment (`scripts/setup_vllm.sh` → `.venv-vllm`): it pins a torch and a transformers
that differ from Loraplex's, so nothing here imports it at module level.

vLLM runs its engine core in a separate process started with `spawn`: the program that creates a `VLLMEngine`
must guard its entry point with `if __name__ == "__main__":` (pytest and uvicorn entry points already do).
All requests must come from one event loop: vLLM's output-handler task lives on the loop of the first request.
On a CPU, vLLM's KV cache is a fixed allocation (`kv_cache_gib`); it does not size itself from free memory.
"""

import contextlib
import json
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

from functions.adapter_check import HEAD_FILE, Unservable, served_config
from functions.catalog import get_model, linear_modules
from functions.engine.protocol import (
    Delta,
    Engine,
    EngineBusy,
    EngineError,
    EngineUnavailable,
    GenerationRequest,
    TokenLogprob,
    check_request,
    check_vocabulary,
)
from functions.prompts import encode_text

GiB = 1024**3
# An adapter trained with a classification head (task "classification") answers from the head's scores at its first
# token (functions/engine/heads.py); vLLM computes its logits itself and cannot apply one.
CLASSIFIER_HEAD_REFUSED = (
    "this adapter cannot be served by vLLM: it was trained with a classification head (task 'classification'), "
    "whose scores vLLM cannot apply to its logits; serve it on the native engine (LORAPLEX_ENGINE=native)"
)


class VLLMEngine(Engine):
    def __init__(
        self,
        base_model: str,
        model_dir: Path,
        *,
        max_loras: int = 8,
        max_lora_rank: int = 16,
        max_model_len: int | None = None,
        dtype: str = "auto",
        max_cpu_loras: int | None = None,
        kv_cache_gib: float = 1.0,
    ) -> None:
        """max_loras: adapters in one batch (vLLM's LoRA slots); max_cpu_loras: adapters kept loaded in memory
        (vLLM's LRU cache, at least max_loras; default max_loras); kv_cache_gib: KV cache size."""
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.base_model = base_model
        self.context_length = max_model_len or _context_length(base_model, model_dir)
        self.max_lora_rank = max_lora_rank
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self._scheduler: dict[str, Any] = {}  # the latest scheduler figures vLLM reported (see _stats_logger)
        args = AsyncEngineArgs(
            model=str(model_dir),
            dtype=dtype,
            max_model_len=self.context_length,
            enable_lora=True,
            max_loras=max_loras,
            max_lora_rank=max_lora_rank,
            max_cpu_loras=max_cpu_loras,
            kv_cache_memory_bytes=int(kv_cache_gib * GiB),
            # No periodic log lines; our stat logger below still turns per-request metrics (queue time) on.
            disable_log_stats=True,
        )
        self._engine = AsyncLLM.from_engine_args(args, stat_loggers=[_stats_logger(self._scheduler)])
        self._lora_ids: dict[str, int] = {}  # adapter key -> vLLM's lora_int_id (stable for the engine's life)
        self._adapter_checked: dict[str, EngineError | None] = {}
        self.counters = {"requests": 0, "generated_tokens": 0, "prompt_tokens": 0}

    # ---- the protocol ---------------------------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        return len(encode_text(self.tokenizer, text))

    def stats(self) -> dict:
        # vLLM's scheduler figures arrive with its outputs, so after an abort they can be one step stale; the
        # frontend's count of unfinished requests is exact and bounds them.
        unfinished = self._engine.get_num_unfinished_requests()
        running = min(int(self._scheduler.get("running", 0)), unfinished)
        return {
            "base_model": self.base_model,
            "engine": "vllm",
            "running": running,
            "waiting": unfinished - running,
            "kv_used_fraction": round(float(self._scheduler.get("kv_used_fraction", 0.0)), 4) if unfinished else 0.0,
            "active_adapters": len(self._scheduler.get("adapters", ())) if unfinished else 0,
            "known_adapters": len(self._lora_ids),
            **self.counters,
        }

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        from vllm.exceptions import GracefulHTTPError, VLLMClientError
        from vllm.inputs import tokens_input
        from vllm.v1.engine.exceptions import EngineDeadError

        submitted = time.monotonic()
        prompt_ids = self._validate(request)
        sampling = self._sampling_params(request, len(prompt_ids))
        lora = self._lora_request(request)
        request_id = uuid.uuid4().hex
        self.counters["requests"] += 1
        self.counters["prompt_tokens"] += len(prompt_ids)
        stream = self._engine.generate(tokens_input(prompt_ids), sampling, request_id, lora_request=lora)
        finished = False
        n = request.params.n
        # vLLM refuses greedy sampling with n > 1; its n greedy answers are one answer, so it is decoded once and sent
        # as each of them. Otherwise vLLM's parallel sampling (each answer a child request, answer i seeded seed + i).
        copies = n if request.params.greedy else 1
        completion_tokens = [0] * n  # per answer
        first_token_ms = 0.0
        pending: list[list[TokenLogprob]] = [[] for _ in range(n)]  # per answer: logprobs of text not sent yet
        try:
            async for out in stream:  # output_kind=DELTA: each RequestOutput holds only what is new, per answer
                for piece in out.outputs:
                    i = piece.index
                    new_tokens = len(piece.token_ids)
                    if new_tokens and not any(completion_tokens):
                        first_token_ms = (time.monotonic() - submitted) * 1000
                    completion_tokens[i] += new_tokens
                    self.counters["generated_tokens"] += new_tokens
                    if request.params.logprobs:
                        pending[i].extend(self._logprobs(piece, request.params.top_logprobs))
                    if piece.finish_reason is not None or (out.finished and n == 1):  # this answer ended
                        end = Delta(
                            piece.text,
                            finish_reason="length" if piece.finish_reason == "length" else "stop",
                            prompt_tokens=len(prompt_ids),
                            completion_tokens=completion_tokens[i],
                            logprobs=tuple(pending[i]),
                            queue_ms=_queue_ms(out.metrics),
                            first_token_ms=first_token_ms,
                        )
                    elif piece.text:  # a token that is half of a character (or may begin a stop) waits for the rest
                        end = Delta(piece.text, logprobs=tuple(pending[i]))
                        pending[i] = []
                    else:
                        continue
                    for copy in range(i, i + copies):
                        yield replace(end, index=copy)
                if out.finished:
                    finished = True
                    return
        except GracefulHTTPError as exc:  # vLLM's admission control: its queue is full
            raise EngineBusy(exc.message, retry_after=1.0) from exc
        except VLLMClientError as exc:  # a request vLLM refuses that our checks let through
            raise EngineError(str(exc), getattr(exc, "parameter", None)) from exc
        except EngineDeadError as exc:  # its engine-core process died: the replica is replaced (healthy() says so)
            raise EngineUnavailable(f"vLLM's engine stopped: {exc}", "engine_restarting") from exc
        finally:
            if not finished:  # the caller went away (or it failed): free its batch slot and KV cache at once
                with contextlib.suppress(EngineDeadError):  # nothing left to free; keep the original error
                    await self._engine.abort(request_id)
            await stream.aclose()

    def healthy(self) -> tuple[bool, str]:
        return (False, "vLLM's engine core is not running") if self._engine.errored else (True, "")

    def close(self) -> None:
        """Stop vLLM's engine-core process. The engine cannot be used afterwards."""
        self._engine.shutdown()
        # Drop it now: AsyncLLM.__del__ shuts down again, which fails noisily when left to interpreter exit.
        del self._engine

    # ---- helpers --------------------------------------------------------------------------------------

    def _validate(self, request: GenerationRequest) -> list[int]:
        """Refuse what can never run, before anything reaches vLLM. Returns the prompt's token ids."""
        params = request.params
        ids = request.prompt_ids(self.tokenizer)
        check_request(ids, params, self.context_length)
        if params.num_beams != 1:
            # vLLM serves beam search through a separate API (LLM.beam_search), not through AsyncLLM.generate.
            raise EngineError("num_beams: beam search is served by the native engine", "num_beams")
        check_vocabulary(params, len(self.tokenizer))  # vLLM would fail the request inside its engine instead
        if request.adapter is not None:
            self._check_adapter(request)
        if params.json_schema is not None:  # refused as the native engine refuses it, naming response_format
            from functions.engine.grammar import check_schema

            check_schema(params.json_schema)
        return ids

    def _check_adapter(self, request: GenerationRequest) -> None:
        """An adapter vLLM cannot load would fail inside its worker; say why here instead (once per adapter)."""
        adapter = request.adapter
        assert adapter is not None
        if adapter.key not in self._adapter_checked:
            modules = linear_modules(self.base_model)  # vLLM serves LoRA on the model's linear layers
            try:
                served_config(adapter.path, adapter.base_model, self.base_model, self.max_lora_rank, modules)
                if (adapter.path / HEAD_FILE).exists():
                    raise Unservable(CLASSIFIER_HEAD_REFUSED)
                self._adapter_checked[adapter.key] = None
            except Unservable as exc:
                self._adapter_checked[adapter.key] = EngineError(str(exc), "model")
        if (problem := self._adapter_checked[adapter.key]) is not None:
            raise problem

    def _sampling_params(self, request: GenerationRequest, prompt_len: int) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        params = request.params
        greedy = params.greedy
        # Choices (a classification adapter's labels): vLLM's structured outputs, a grammar of the choices' texts,
        # which masks the logits before they are sampled and before the logprobs are taken (renormalised over the
        # allowed tokens, as the native engine's). A choice's end is its own: min_tokens yields to it.
        structured = StructuredOutputsParams(choice=list(params.choices)) if params.choices else None
        if params.json_schema is not None:  # structured output: the JSON schema's grammar, the same way
            structured = StructuredOutputsParams(json=json.loads(params.json_schema))
        min_new = 0 if params.choices else params.min_new_tokens
        return SamplingParams(
            temperature=0.0 if greedy else params.temperature,
            top_p=1.0 if greedy else params.top_p,
            top_k=0 if greedy else params.top_k,  # 0: no top-k filtering (as ours)
            repetition_penalty=params.repetition_penalty,
            max_tokens=min(params.max_new_tokens, self.context_length - prompt_len),
            min_tokens=min(min_new, self.context_length - prompt_len),
            structured_outputs=structured,
            stop=list(params.stop) or None,  # vLLM holds back text that may begin a stop and cuts before it
            seed=params.seed,
            n=1 if greedy else params.n,  # greedy answers are all one answer (see generate)
            presence_penalty=params.presence_penalty,  # OpenAI's definitions, over the generated tokens (as ours)
            frequency_penalty=params.frequency_penalty,
            logit_bias=dict(params.logit_bias) or None,
            # vLLM always returns the chosen token's logprob, plus this many alternatives (0: none).
            logprobs=params.top_logprobs if params.logprobs else None,
            output_kind=RequestOutputKind.DELTA,
        )

    def _lora_request(self, request: GenerationRequest) -> Any:
        from vllm.lora.request import LoRARequest

        if request.adapter is None:
            return None
        key = request.adapter.key
        if key not in self._lora_ids:
            self._lora_ids[key] = len(self._lora_ids) + 1  # vLLM needs ids ≥ 1, unique per adapter
        return LoRARequest(lora_name=key, lora_int_id=self._lora_ids[key], lora_path=str(request.adapter.path))

    def _logprobs(self, piece: Any, top_n: int) -> list[TokenLogprob]:
        """vLLM gives, per new token, {token_id: Logprob(logprob, rank, decoded_token)}: the top `top_n` ones
        and the chosen one (also when it is not among them)."""
        result = []
        for token_id, options in zip(piece.token_ids, piece.logprobs or (), strict=False):
            chosen = options[token_id]
            ranked = sorted(  # a token masked out by choices (-inf) is no alternative, and no JSON number
                (
                    item
                    for item in options.items()
                    if item[1].rank is not None and item[1].rank <= top_n and item[1].logprob != -float("inf")
                ),
                key=lambda item: item[1].rank,
            )
            top = tuple((self._token_text(tid, lp), lp.logprob) for tid, lp in ranked)
            ids = tuple(tid for tid, _ in ranked)
            result.append(TokenLogprob(self._token_text(token_id, chosen), chosen.logprob, top, token_id, ids))
        return result

    def _token_text(self, token_id: int, logprob: Any) -> str:
        if logprob.decoded_token is not None:
            return logprob.decoded_token
        return cast(str, self.tokenizer.decode([token_id]))  # one sequence of ids decodes to one string


def _context_length(base_model: str, model_dir: Path) -> int:
    """The catalog's context length, capped by the model's position embeddings (vLLM refuses more)."""
    config = json.loads((model_dir / "config.json").read_text())
    positions = config.get("max_position_embeddings") or config.get("text_config", {}).get("max_position_embeddings")
    catalog = get_model(base_model).context_length
    return min(catalog, int(positions)) if positions else catalog


def _queue_ms(metrics: Any) -> float:
    """Time from entering vLLM's scheduler queue to first being scheduled (engine-core clock), when reported."""
    queued, scheduled = getattr(metrics, "queued_ts", 0.0), getattr(metrics, "scheduled_ts", 0.0)
    return max(0.0, (scheduled - queued) * 1000) if queued and scheduled else 0.0


def _stats_logger(sink: dict[str, Any]) -> Any:
    """A vLLM stat-logger factory that keeps the latest scheduler figures in `sink` (read by `stats()`)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class LatestSchedulerStats(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(
            self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0
        ) -> None:
            if scheduler_stats is not None:
                sink["running"] = scheduler_stats.num_running_reqs
                sink["waiting"] = scheduler_stats.num_waiting_reqs
                sink["kv_used_fraction"] = scheduler_stats.kv_cache_usage
                sink["adapters"] = set(scheduler_stats.running_lora_adapters) | set(
                    scheduler_stats.waiting_lora_adapters
                )

        def log_engine_initialized(self) -> None:
            pass

    return LatestSchedulerStats
