"""The native engine: continuous batching of many adapters over one base model (what LoRAX does).

One engine thread owns the model and runs steps. Between two steps it takes in new requests, drops finished
and cancelled ones, and admits waiting requests whose adapter is resident and whose KV cache room is free.
A step holds one decode token for every running request plus prefill chunks of new requests, at most
`prefill_chunk` prompt tokens per step, so a long prompt never stalls the running ones for long (its layout:
batch.py). Callers get an async iterator of Deltas (`generate`, deltas.py); tokens cross from the engine thread
to the caller's event loop with `call_soon_threadsafe`. Adapters are read on the adapter manager's loader thread
and copied into a pool slot between steps (adapter_manager.py), so loading one does not stall running requests.
"""

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from functions.engine.adapter_manager import AdapterManager
from functions.engine.batch import Seq, Step, lay_out, probe_step, units
from functions.engine.deltas import DeltaStream
from functions.engine.grammar import SchemaGrammars
from functions.engine.kv_cache import KVCache
from functions.engine.llama import LlamaModel
from functions.engine.lora_pool import LoraPool
from functions.engine.protocol import (
    AdapterFault,
    Delta,
    Engine,
    EngineBusy,
    EngineError,
    EngineUnavailable,
    GenerationRequest,
    RequestFailed,
    check_request,
    check_vocabulary,
)
from functions.engine.sampling import Choice, ChoiceTrie, RowState, choose
from functions.precision import use_bf16
from functions.prompts import encode_text

GiB = 1024**3


class EngineBroken(RuntimeError):
    """The engine cannot compute any more (a step failed for every request and the bare model fails too)."""


@dataclass(frozen=True)
class EngineConfig:
    dtype: str = "auto"  # auto: bf16 where the hardware runs it natively (GPUs, AVX512-BF16/AMX CPUs), else fp32
    adapter_slots: int = 32  # adapters resident at once (LRU; one in use is pinned)
    max_lora_rank: int = 16
    kv_cache_bytes: int = 1 * GiB
    max_batch: int = 128  # running requests
    max_waiting: int = 512  # queued requests before new ones get EngineBusy (429)
    prefill_chunk: int = 256  # prompt tokens per step
    threads: int | None = None  # torch threads; all cores when None
    stall_seconds: float = 30.0  # no progress this long with requests queued: the engine reports itself unhealthy


def resolve_dtype(name: str) -> torch.dtype:
    """auto: bf16 where the hardware runs it natively, as training decides (functions/precision.py)."""
    return torch.bfloat16 if use_bf16({"float32": "fp32", "bfloat16": "bf16"}.get(name, name)) else torch.float32


class NativeEngine(Engine):
    def __init__(
        self,
        base_model: str,
        model_dir: Path | None = None,
        config: EngineConfig | None = None,
        background: bool = True,
    ) -> None:
        """background=False: the caller runs `run()` itself. The engine process does that on its main thread,
        where torch's OpenMP workers run about a third faster than from a second thread (measured here)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from functions.base_models import ensure_local
        from functions.catalog import get_model

        self.config = config = config or EngineConfig()
        if config.threads:
            torch.set_num_threads(config.threads)
        self.base_model = base_model
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = resolve_dtype(config.dtype)
        model_dir = model_dir or ensure_local(base_model)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.context_length = min(get_model(base_model).context_length, hf.config.max_position_embeddings)
        self.model = LlamaModel(hf, self.dtype, self.device)
        del hf
        self.eos = self.tokenizer.eos_token_id
        m = self.model
        self.kv = KVCache(m.num_layers, m.kv_heads, m.head_dim, config.kv_cache_bytes, self.dtype, self.device)
        self.lora = LoraPool(
            m.group_shapes,
            m.num_layers,
            config.adapter_slots,
            config.max_lora_rank,
            # LoRA in fp32 on CPUs: its small matmuls run about twice as fast there as in bf16 (measured here)
            torch.float32 if self.device.type == "cpu" else self.dtype,
            self.device,
            m.module_weight,
        )

        self._intake: deque[Seq] = deque()
        self._waiting: list[Seq] = []
        self._running: list[Seq] = []
        self._wake = threading.Condition()
        self.adapters = AdapterManager(self.lora, base_model, m.num_layers, self._notify, (m.hidden, m.vocab))
        self.grammars = SchemaGrammars(self.tokenizer, m.vocab)  # JSON schemas compiled for structured output
        self.counters = {"requests": 0, "generated_tokens": 0, "prompt_tokens": 0}
        self.steps = 0
        self._closed = False
        self._broken = ""  # why the engine gave up (a step failed for every request, twice); "" while it serves
        self._progress_at = time.monotonic()  # last time the loop moved a request forward, or found nothing to do
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self.run, name="engine", daemon=True)
            self._thread.start()

    # ---- caller side ----------------------------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        return len(encode_text(self.tokenizer, text))

    def stats(self) -> dict:
        return {
            "base_model": self.base_model,
            "running": len(self._running),
            "waiting": len(self._waiting) + len(self._intake),
            "kv_used_fraction": round(self.kv.used_fraction, 4),
            "kv_capacity_tokens": self.kv.capacity_tokens,
            "resident_adapters": len(self.lora.resident),
            "adapter_slots": self.lora.slots,
            **self.counters,
            "adapter_loads": self.adapters.loads,
            "steps": self.steps,
        }

    def healthy(self) -> tuple[bool, str]:
        """(healthy, why not). Unhealthy once the loop gave up, or while requests are queued and nothing has moved
        for `stall_seconds`: the API replaces such an engine (functions/engine/__init__.py)."""
        if self._broken:
            return False, self._broken
        if self._thread is not None and not self._thread.is_alive() and not self._closed:
            return False, "the engine loop is not running"
        stalled = time.monotonic() - self._progress_at
        queued = len(self._running) + len(self._waiting) + len(self._intake)
        if queued and stalled > self.config.stall_seconds:
            return False, f"no progress for {stalled:.0f} s with {queued} requests in the engine"
        return True, ""

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        seq = self._prepare(request)
        if request.params.json_schema is not None:  # compiled once per schema (cached), off the event loop
            seq.grammar = await asyncio.to_thread(self.grammars.start, request.params.json_schema)
        members = seq.members  # the request's answers (n > 1); most requests have one
        for follower in seq.followers:  # each answer has its own grammar state
            if request.params.json_schema is not None:
                follower.grammar = await asyncio.to_thread(self.grammars.start, request.params.json_schema)
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[tuple[int, tuple]] = asyncio.Queue()  # (answer index, item)

        def sink_of(member: Seq) -> Callable[[tuple], None]:
            def sink(item: tuple) -> None:
                try:
                    loop.call_soon_threadsafe(items.put_nowait, (member.index, item))
                except RuntimeError:  # the caller's event loop is gone; nobody is listening
                    member.cancelled = True

            return sink

        for member in members:
            member.sink = sink_of(member)
        self._submit(seq)
        streams = [DeltaStream(self.tokenizer, self.eos, request.params.stop, len(seq.prompt_ids)) for _ in members]
        try:
            while not all(deltas.done for deltas in streams):
                index, item = await items.get()
                deltas = streams[index]
                if deltas.done:
                    continue  # an answer a stop sequence ended: what the engine sent after it is dropped
                delta = deltas.take(item)
                if deltas.done:  # ended: by a stop sequence (free its slot now), or in the engine
                    members[index].cancelled = True
                if delta is not None:
                    yield replace(delta, index=index) if index else delta
        finally:
            for member in members:  # the caller went away, or the request ended: either way its slots are free
                member.cancelled = True
            self._notify()

    def _prepare(self, request: GenerationRequest) -> Seq:
        """Refuse what can never run, before anything is queued."""
        params = request.params
        ids = request.prompt_ids(self.tokenizer)
        check_request(ids, params, self.context_length)
        check_vocabulary(params, self.model.vocab)
        if not 1 <= params.num_beams <= 8:
            raise EngineError("num_beams must be between 1 and 8", "num_beams")
        length = min(len(ids) + params.max_new_tokens, self.context_length)
        # beams each hold a whole copy; n answers share the prompt and each hold what they generate
        total = length * params.num_beams + (params.n - 1) * (length - len(ids))
        if total > self.kv.capacity_tokens:
            raise EngineError(f"prompt + max_tokens ({total}) exceeds this engine's KV cache", "max_tokens")
        config = self.adapters.check(request.adapter) if request.adapter is not None else None
        choices = ChoiceTrie.of(self.tokenizer, params.choices, self.eos) if params.choices else None
        seq = Seq(request, ids, config, sink=lambda item: None, choices=choices)
        seq.followers = [
            Seq(request, ids, config, sink=lambda item: None, choices=choices, index=i, leader=seq)
            for i in range(1, params.n)
        ]
        return seq

    def _submit(self, seq: Seq) -> None:
        with self._wake:
            if self._broken or self._closed:
                raise EngineUnavailable(f"the engine is restarting: {self._broken or 'closed'}", "engine_restarting")
            if len(self._intake) + len(self._waiting) >= self.config.max_waiting:
                raise EngineBusy("the engine's queue is full", retry_after=1.0)
            self._intake.append(seq)
            if seq.request.adapter is not None:
                self.adapters.prefetch(seq.request.adapter, seq.adapter_config or {})  # the read overlaps a step
            self._wake.notify()

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify()

    def close(self) -> None:
        self._closed = True
        self._notify()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.adapters.close()

    # ---- engine thread --------------------------------------------------------------------------------

    def run(self) -> None:
        """The engine loop, until close(). Raises EngineBroken when a step failed for every request and a probe of
        the bare model failed twice: the engine process then exits and is started afresh (or, on a thread, the
        registry replaces this engine), every request it held having failed with the reason."""
        torch.set_grad_enabled(False)
        while not self._closed:
            with self._wake:
                while self._intake:
                    self._waiting.append(self._intake.popleft())
                if not self._running and not self._waiting:
                    self._progress_at = time.monotonic()  # idle is not stalled
                    self._wake.wait(timeout=1.0)
                    continue
            try:
                self._drop_cancelled()
                self._admit()
                if self._running:
                    self._step_isolated()
                else:
                    with self._wake:
                        self._wake.wait(timeout=0.005)  # waiting on an adapter load or on cache room
            except EngineBroken as exc:
                self._break_down(str(exc))
                raise

    def _step_isolated(self) -> None:
        """One step for every running request. When it raises, each request is stepped alone, so that a fault of
        one request (its adapter, its sampling) fails that request only; a step that fails for every request
        alone is the engine's fault when a one-token probe of the bare model fails too (EngineBroken)."""
        batch = list(self._running)
        try:
            self._step(batch)
            self._progress_at = time.monotonic()
            return
        except Exception as exc:  # noqa: BLE001 - which request is at fault is found below
            first = exc
        failed = 0
        alone = units(batch)  # a request's answers (n > 1) step together
        for unit in alone:
            try:
                self._step(unit)
            except Exception as exc:  # noqa: BLE001 - this request's fault, or the engine's: the probe decides
                failed += 1
                for seq in unit:
                    self._fail(seq, RequestFailed(f"generation failed: {type(exc).__name__}: {exc}"))
        self._progress_at = time.monotonic()
        if failed == len(alone) and not self._probe():
            raise EngineBroken(f"a step failed for every request ({type(first).__name__}: {first})")

    def _probe(self) -> bool:
        """Whether the bare model still computes: one token through it, twice at most (the retry), on a block of
        the cache borrowed for the moment."""
        room = self.kv.allocate(1)
        if room is None:
            return True  # the cache is full of running requests: they stepped, so the model works
        blocks, slots = room
        try:
            for _ in range(2):
                try:
                    if bool(torch.isfinite(self._forward(probe_step(self.eos, slots, self.device))).all()):
                        return True
                except Exception:  # noqa: BLE001 - a failed probe is the answer
                    pass
            return False
        finally:
            self.kv.release(blocks)

    def _break_down(self, reason: str) -> None:
        """Fail every request the engine holds with the reason, and refuse new ones: the engine is replaced."""
        self._broken = reason
        failure = EngineUnavailable(f"the engine failed and is restarting: {reason}", "engine_restarting")
        with self._wake:
            while self._intake:
                self._waiting.append(self._intake.popleft())
        for seq in [*self._running, *self._waiting]:
            seq.sink(("error", failure))
            self._release(seq)
        self._running, self._waiting = [], []

    def _fail(self, seq: Seq, error: Exception) -> None:
        """End one running request with an error; its cache blocks and adapter slot are free at once."""
        self._release(seq)
        if seq in self._running:
            self._running.remove(seq)
        seq.sink(("error", error))
        for follower in seq.followers:  # answers still waiting on its prompt would wait forever
            if follower.generated == 0 and follower in self._running:
                self._fail(follower, error)

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self._waiting if s.cancelled]:
            self._waiting.remove(seq)
        for seq in [s for s in self._running if s.cancelled]:
            self._finish(seq, "stop")

    def _admit(self) -> None:
        for seq in list(self._waiting):
            if len(self._running) >= self.config.max_batch:
                return
            try:
                if self._admit_one(seq) == "full":
                    return  # first come, first served for cache room
            except Exception as exc:  # noqa: BLE001 - a request that cannot start fails alone, holding nothing
                self._release(seq)
                if seq in self._waiting:
                    self._waiting.remove(seq)
                seq.sink(("error", RequestFailed(f"the request could not start: {type(exc).__name__}: {exc}")))

    def _admit_one(self, seq: Seq) -> str:
        """Start one waiting request if its adapter is resident and its cache room is free: "started", "later"
        (its adapter is loading, or failed and the request was answered), or "full" (no cache room)."""
        slot = -1
        if seq.request.adapter is not None:
            resident = self.adapters.slot_for(seq.request.adapter, seq.adapter_config or {})
            if isinstance(resident, EngineError):  # its read failed: answered, forgotten once none waits on it
                seq.sink(("error", resident))
                self._waiting.remove(seq)
                if not any(s.adapter_key == seq.adapter_key for s in self._waiting):
                    self.adapters.forget_failure(seq.request.adapter.key)
                return "later"
            if resident is None:
                return "later"  # loading, or no slot free; later requests may go ahead
            slot = resident
        if not seq.start(self.kv, self.context_length, self.eos, self.device):
            return "full"
        for member in seq.members:  # n > 1: the answers run side by side, each pinning the adapter
            member.slot = slot
            if slot >= 0:
                self.adapters.pin(slot)
        self._waiting.remove(seq)
        self._running += seq.members
        self.counters["requests"] += 1
        self.counters["prompt_tokens"] += len(seq.prompt_ids)
        self._progress_at = seq.started
        return "started"

    def _step(self, batch: list[Seq]) -> None:
        """One forward pass over `batch` (running requests), then each request's next token. Nothing of a request's
        state moves before the forward pass has succeeded (the cache writes it made are rewritten alike by a retry);
        a fault in one request's logits or sampling fails that request alone."""
        step = lay_out(batch, self.config.prefill_chunk, self.lora, self.device)
        logits = self._forward(step)
        for seq, n in step.prefill:
            seq.computed += n
        for seq in {seq for seq, _ in step.decode}:
            seq.computed += 1
        for seq, n in step.shared:  # answers (n > 1) whose prompt their leader computed
            seq.computed = n
        self.steps += 1
        finite = torch.isfinite(logits).all(-1).tolist()  # a NaN/Inf row: that request's adapter (or input) broke
        sampled = step.sampled
        for seq in {seq for (seq, _), ok in zip(sampled, finite, strict=True) if not ok}:
            self._fail(seq, self._numeric_fault(seq))
        plain = [i for i, (seq, beam) in enumerate(sampled) if beam < 0 and finite[i]]
        self._emit_samples(logits[plain], [sampled[i][0] for i in plain])
        beams: dict[Seq, list[int]] = {}
        for i, (seq, j) in enumerate(sampled):
            if j >= 0 and seq in self._running:
                beams.setdefault(seq, []).append(i)
        for seq, rows in beams.items():
            try:
                self._advance_beams(seq, logits[rows])
            except Exception as exc:  # noqa: BLE001 - this request's fault alone
                self._fail(seq, RequestFailed(f"beam search failed: {type(exc).__name__}: {exc}"))

    def _forward(self, step: Step) -> torch.Tensor:
        """The logits [len(step.logit_rows), V] of one step; its keys and values are written to the cache."""
        return self.model.forward(
            step.tokens, step.positions, step.sequences, step.segments, self.lora, self.kv.k, self.kv.v, step.logit_rows
        )

    def _numeric_fault(self, seq: Seq) -> RequestFailed:
        if seq.slot >= 0:  # the base model is shared and was finite for the other requests: the adapter is at fault
            message = "the adapter's output is not finite (NaN or Inf): its weights are numerically broken"
            return AdapterFault(message)
        return RequestFailed("the model's output is not finite (NaN or Inf)", "numeric_fault")

    def _emit_samples(self, logits: torch.Tensor, seqs: list[Seq]) -> None:
        """logits: [len(seqs), V]: the next token of each request (not beam search). Sampling that raises for the
        batch is redone row by row, and a row that raises alone fails its request alone."""
        if not seqs:
            return
        states = [
            RowState(s.request.params, s.tokens, s.generated, s.generator, self.eos, s.choices, s.grammar) for s in seqs
        ]
        try:
            choices: list[Choice | None] = list(choose(logits, states))
        except Exception:  # noqa: BLE001 - find the row at fault
            choices = []
            for i, (seq, state) in enumerate(zip(seqs, states, strict=True)):
                try:
                    choices += choose(logits[i : i + 1], [state])
                except Exception as exc:  # noqa: BLE001 - this request's sampling alone
                    self._fail(seq, RequestFailed(f"sampling failed: {type(exc).__name__}: {exc}"))
                    choices.append(None)
        now = time.monotonic()
        for seq, choice in zip(seqs, choices, strict=True):
            if choice is None:
                continue
            if seq.grammar is not None and choice.token != self.eos:
                try:  # the grammar moves on with the token its mask allowed
                    seq.grammar.advance(choice.token)
                except RuntimeError as exc:
                    self._fail(seq, RequestFailed(f"structured output failed: {exc}"))
                    continue
            if seq.generated == 0:
                seq.first_token_at = now
            seq.tokens.append(choice.token)
            self.counters["generated_tokens"] += 1
            params = seq.request.params
            seq.sink(("token", choice.token, choice if params.logprobs or params.top_logprobs else None))
            if choice.token == self.eos:
                self._finish(seq, "stop")
            elif seq.generated >= params.max_new_tokens or len(seq.tokens) >= self.context_length:
                self._finish(seq, "length")

    def _advance_beams(self, seq: Seq, logits: torch.Tensor) -> None:
        """One beam-search step; the keys and values of each kept beam's parent are copied into its slots."""
        beam = seq.beam
        assert beam is not None
        parents = beam.step(logits, seq.choices)  # rows: the live beams, in order
        self.counters["generated_tokens"] += len(parents)
        if parents != list(range(len(parents))):
            n = seq.computed
            src = torch.cat([seq.beam_slots[p][:n] for p in parents]).to(self.device)
            dst = torch.cat([seq.beam_slots[j][:n] for j in range(len(parents))]).to(self.device)
            for cache in (*self.kv.k, *self.kv.v):
                cache.index_copy_(0, dst, cache.index_select(0, src))  # gathered first: a permutation is safe
        if beam.done or seq.computed + 1 >= self.context_length:
            best = beam.best()
            seq.first_token_at = time.monotonic()
            for token in best:
                seq.sink(("token", token, None))
            self._finish(seq, "stop" if best and best[-1] == self.eos else "length")

    def _finish(self, seq: Seq, reason: str) -> None:
        queue_ms = (seq.started - seq.submitted) * 1000
        first_ms = ((seq.first_token_at or seq.started) - seq.submitted) * 1000
        self._release(seq)
        self._running.remove(seq)
        seq.sink(("end", reason, queue_ms, first_ms))  # last: whoever reads the end sees the engine without it

    def _release(self, seq: Seq) -> None:
        self.kv.release(seq.blocks)
        seq.blocks = []
        if seq.prompt_blocks is not None:  # n > 1: the prompt's blocks go back with the last answer holding them
            seq.prompt_blocks.holders -= 1
            if seq.prompt_blocks.holders == 0:
                self.kv.release(seq.prompt_blocks.blocks)
            seq.prompt_blocks = None
        if seq.slot >= 0:
            self.adapters.unpin(seq.slot)
            seq.slot = -1
