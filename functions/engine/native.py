"""The native engine: continuous batching of many adapters over one base model (what LoRAX does).

One engine thread owns the model and runs steps. Between two steps it takes in new requests, drops finished
and cancelled ones, and admits waiting requests whose adapter is resident and whose KV cache room is free.
A step holds one decode token for every running request plus prefill chunks of new requests, at most
`prefill_chunk` prompt tokens per step, so a long prompt never stalls the running ones for long.

Callers get an async iterator of Deltas (`generate`); tokens cross from the engine thread to the caller's
event loop with `call_soon_threadsafe`. Which adapters are resident, loading or pinned is the adapter manager's
(adapter_manager.py): adapters are read on its loader thread and copied into a pool slot between steps, so loading
one does not stall running requests.
"""

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from functions.engine.adapter_manager import AdapterManager
from functions.engine.beams import BeamSearch
from functions.engine.kv_cache import KVCache
from functions.engine.llama import LlamaModel, Sequences
from functions.engine.lora_pool import LoraPool, Segments
from functions.engine.protocol import (
    Delta,
    EngineBusy,
    EngineError,
    GenerationRequest,
    RequestFailed,
    TokenLogprob,
    check_request,
)
from functions.engine.sampling import Choice, RowState, choose
from functions.engine.text import TextStream
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


@dataclass(eq=False)
class _Seq:
    request: GenerationRequest
    prompt_ids: list[int]
    adapter_config: dict | None
    sink: Callable[[tuple], None]
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # set by the caller's side; the engine drops the request before its next step
    # engine-thread state
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    computed: int = 0  # positions whose keys and values are in the cache
    slot: int = -1  # adapter slot; -1 = the base model alone
    blocks: list[int] = field(default_factory=list)
    beam_slots: list[torch.Tensor] = field(default_factory=list)  # cache slot of each position, per beam
    beam: BeamSearch | None = None  # beam search (num_beams > 1)
    generator: torch.Generator | None = None
    started: float = 0.0  # admitted
    first_token_at: float = 0.0

    @property
    def generated(self) -> int:
        return self.beam.generated if self.beam else len(self.tokens) - len(self.prompt_ids)

    @property
    def adapter_key(self) -> str | None:
        return self.request.adapter.key if self.request.adapter else None


def resolve_dtype(name: str) -> torch.dtype:
    """auto: bf16 where the hardware runs it natively, as training decides (functions/precision.py)."""
    return torch.bfloat16 if use_bf16({"float32": "fp32", "bfloat16": "bf16"}.get(name, name)) else torch.float32


class NativeEngine:
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

        self._intake: deque[_Seq] = deque()
        self._waiting: list[_Seq] = []
        self._running: list[_Seq] = []
        self._wake = threading.Condition()
        self.adapters = AdapterManager(self.lora, base_model, m.num_layers, self._notify)
        self.counters = {"requests": 0, "generated_tokens": 0, "prompt_tokens": 0, "steps": 0}
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
            "requests": self.counters["requests"],
            "generated_tokens": self.counters["generated_tokens"],
            "prompt_tokens": self.counters["prompt_tokens"],
            "adapter_loads": self.adapters.loads,
            "steps": self.counters["steps"],
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

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        seq = self._prepare(request)
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[tuple] = asyncio.Queue()

        def sink(item: tuple) -> None:
            try:
                loop.call_soon_threadsafe(items.put_nowait, item)
            except RuntimeError:  # the caller's event loop is gone; nobody is listening
                seq.cancelled = True

        seq.sink = sink
        self._submit(seq)
        text = TextStream(self.tokenizer, request.params.stop)
        pending: list[TokenLogprob] = []
        try:
            while True:
                item = await items.get()
                if item[0] == "error":
                    raise item[1]  # EngineError before the first token; RequestFailed at any time
                if item[0] == "end":
                    _, finish, queue_ms, first_ms = item
                    tail = text.finish()
                    yield Delta(
                        tail,
                        finish_reason="stop" if text.stopped else finish,
                        prompt_tokens=len(seq.prompt_ids),
                        completion_tokens=len(text.ids),
                        logprobs=tuple(pending),
                        queue_ms=queue_ms,
                        first_token_ms=first_ms,
                    )
                    return
                _, token, choice = item
                if token == self.eos:
                    continue  # the end item follows
                piece = text.push(token)
                if choice is not None:
                    pending.append(self._token_logprob(choice))
                if text.stopped:  # a stop sequence ended it: free the slot now, report the end
                    seq.cancelled = True
                    yield Delta(
                        piece,
                        finish_reason="stop",
                        prompt_tokens=len(seq.prompt_ids),
                        completion_tokens=len(text.ids),
                        logprobs=tuple(pending),
                    )
                    return
                if piece:  # token counts so far ride along: a client that leaves mid-stream is charged for them
                    yield Delta(
                        piece,
                        prompt_tokens=len(seq.prompt_ids),
                        completion_tokens=len(text.ids),
                        logprobs=tuple(pending),
                    )
                    pending = []
        finally:
            seq.cancelled = True  # the caller went away, or the request ended: either way its slot is free
            self._notify()

    def _token_logprob(self, choice: Choice) -> TokenLogprob:
        decode = self.tokenizer.decode
        top = tuple((decode([t]), lp) for t, lp in choice.top or [])
        return TokenLogprob(decode([choice.token]), choice.logprob or 0.0, top)

    def _prepare(self, request: GenerationRequest) -> _Seq:
        """Refuse what can never run, before anything is queued."""
        params = request.params
        ids = request.prompt_ids(self.tokenizer)
        check_request(ids, params, self.context_length)
        if not 1 <= params.num_beams <= 8:
            raise EngineError("num_beams must be between 1 and 8", "num_beams")
        total = min(len(ids) + params.max_new_tokens, self.context_length) * params.num_beams
        if total > self.kv.capacity_tokens:
            raise EngineError(f"prompt + max_tokens ({total}) exceeds this engine's KV cache", "max_tokens")
        config = self.adapters.check(request.adapter) if request.adapter is not None else None
        return _Seq(request, ids, config, sink=lambda item: None)

    def _submit(self, seq: _Seq) -> None:
        with self._wake:
            if self._broken or self._closed:
                raise RequestFailed(f"the engine is restarting: {self._broken or 'closed'}", "engine_restarting", 503)
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
        for seq in batch:
            try:
                self._step([seq])
            except Exception as exc:  # noqa: BLE001 - this request's fault, or the engine's: the probe decides
                failed += 1
                self._fail(seq, RequestFailed(f"generation failed: {type(exc).__name__}: {exc}"))
        self._progress_at = time.monotonic()
        if failed == len(batch) and not self._probe():
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
                    logits = self.model.forward(
                        torch.tensor([self.eos], dtype=torch.long, device=self.device),
                        torch.zeros(1, dtype=torch.long, device=self.device),
                        Sequences([(0, 1, 0, slots)], 1, None, None, slots),
                        Segments([], []),
                        self.lora,
                        self.kv.k,
                        self.kv.v,
                        torch.zeros(1, dtype=torch.long, device=self.device),
                    )
                    if bool(torch.isfinite(logits).all()):
                        return True
                except Exception:  # noqa: BLE001 - a failed probe is the answer
                    pass
            return False
        finally:
            self.kv.release(blocks)

    def _break_down(self, reason: str) -> None:
        """Fail every request the engine holds with the reason, and refuse new ones: the engine is replaced."""
        self._broken = reason
        failure = RequestFailed(f"the engine failed and is restarting: {reason}", "engine_restarting", 503)
        with self._wake:
            while self._intake:
                self._waiting.append(self._intake.popleft())
        for seq in [*self._running, *self._waiting]:
            seq.sink(("error", failure))
            self._release(seq)
        self._running, self._waiting = [], []

    def _fail(self, seq: _Seq, error: Exception) -> None:
        """End one running request with an error; its cache blocks and adapter slot are free at once."""
        self._release(seq)
        if seq in self._running:
            self._running.remove(seq)
        seq.sink(("error", error))

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

    def _admit_one(self, seq: _Seq) -> str:
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
        params = seq.request.params
        total = min(len(seq.prompt_ids) + params.max_new_tokens, self.context_length)
        rooms = [self.kv.allocate(total) for _ in range(params.num_beams)]  # one room per beam
        if any(room is None for room in rooms):
            for room in rooms:
                if room is not None:
                    self.kv.release(room[0])
            return "full"
        seq.blocks = [block for room in rooms for block in room[0]]  # type: ignore[index]
        seq.beam_slots = [room[1] for room in rooms]  # type: ignore[index]
        if params.num_beams > 1:
            seq.beam = BeamSearch(params.num_beams, self.eos, params.max_new_tokens, params.min_new_tokens)
        seq.slot = slot
        if slot >= 0:
            self.adapters.pin(slot)
        seq.tokens = list(seq.prompt_ids)
        seed = seq.request.params.seed
        if not seq.request.params.greedy or seq.request.params.repetition_penalty != 1.0:
            seq.generator = torch.Generator(self.device)
            seq.generator.manual_seed(seed if seed is not None else torch.seed())
        seq.started = time.monotonic()
        self._waiting.remove(seq)
        self._running.append(seq)
        self.counters["requests"] += 1
        self.counters["prompt_tokens"] += len(seq.prompt_ids)
        self._progress_at = seq.started
        return "started"

    def _step(self, batch: list[_Seq]) -> None:
        """One forward pass over `batch` (running requests), then each request's next token. Nothing of a request's
        state moves before the forward pass has succeeded (the cache writes it made are rewritten alike by a retry);
        a fault in one request's logits or sampling fails that request alone."""
        prefill, decode = [], []
        budget = self.config.prefill_chunk
        for seq in batch:
            if seq.generated > 0:
                decode += [(seq, j) for j in range(len(seq.beam.beams))] if seq.beam else [(seq, -1)]
            elif budget > 0:
                n = min(len(seq.tokens) - seq.computed, budget)
                prefill.append((seq, n))
                budget -= n
        decode.sort(key=lambda row: row[0].slot)  # tokens of one adapter side by side: one segment each

        tokens: list[int] = []
        positions: list[torch.Tensor] = []
        write: list[torch.Tensor] = []
        runs: list[tuple[int, int, int]] = []
        attention: list[tuple[int, int, int, torch.Tensor]] = []
        logit_rows: list[int] = []
        sampled: list[tuple[_Seq, int]] = []  # (request, beam or -1) of each logits row
        for seq, n in prefill:
            start = len(tokens)
            tokens += seq.tokens[seq.computed : seq.computed + n]
            positions.append(torch.arange(seq.computed, seq.computed + n))
            slots = seq.beam_slots[0]
            write.append(slots[seq.computed : seq.computed + n])
            attention.append((start, n, seq.computed, slots[: seq.computed + n]))
            if seq.slot >= 0:
                runs.append((seq.slot, start, n))
            if seq.computed + n == len(seq.tokens):
                logit_rows.append(start + n - 1)
                sampled.append((seq, 0 if seq.beam else -1))
        decode_start = len(tokens)
        decode_slots = decode_mask = None
        if decode:
            lengths = [seq.computed + 1 for seq, _ in decode]
            tokens += [seq.beam.beams[j][-1] if seq.beam else seq.tokens[-1] for seq, j in decode]
            positions.append(torch.tensor([seq.computed for seq, _ in decode]))
            slot_rows = [seq.beam_slots[max(j, 0)] for seq, j in decode]
            write.append(torch.stack([s[n - 1] for s, n in zip(slot_rows, lengths, strict=True)]))
            decode_slots = torch.nn.utils.rnn.pad_sequence(
                [s[:n] for s, n in zip(slot_rows, lengths, strict=True)], batch_first=True
            )
            decode_mask = (torch.arange(decode_slots.shape[1]) < torch.tensor(lengths)[:, None])[:, None, None, :]
            for i, (seq, _) in enumerate(decode):
                if seq.slot < 0:
                    continue
                if runs and runs[-1][0] == seq.slot and runs[-1][1] + runs[-1][2] == decode_start + i:
                    runs[-1] = (seq.slot, runs[-1][1], runs[-1][2] + 1)
                else:
                    runs.append((seq.slot, decode_start + i, 1))
            logit_rows += range(decode_start, decode_start + len(decode))
            sampled += decode

        device = self.device
        seqs = Sequences(
            prefill=[(start, n, cached, slots.to(device)) for start, n, cached, slots in attention],
            decode_start=decode_start,
            decode_slots=None if decode_slots is None else decode_slots.to(device),
            decode_mask=None if decode_mask is None else decode_mask.to(device),
            write_slots=torch.cat(write).to(device),
        )
        logits = self.model.forward(
            torch.tensor(tokens, dtype=torch.long, device=device),
            torch.cat(positions).to(device),
            seqs,
            Segments.build(runs, self.lora.dtype, device),
            self.lora,
            self.kv.k,
            self.kv.v,
            torch.tensor(logit_rows, dtype=torch.long, device=device),
        )
        for seq, n in prefill:
            seq.computed += n
        for seq in {seq for seq, _ in decode}:
            seq.computed += 1
        self.counters["steps"] += 1
        finite = torch.isfinite(logits).all(-1).tolist()  # a NaN/Inf row: that request's adapter (or input) broke
        for seq in {seq for (seq, _), ok in zip(sampled, finite, strict=True) if not ok}:
            self._fail(seq, self._numeric_fault(seq))
        plain = [i for i, (seq, beam) in enumerate(sampled) if beam < 0 and finite[i]]
        self._emit_samples(logits[plain], [sampled[i][0] for i in plain])
        beams: dict[_Seq, list[int]] = {}
        for i, (seq, j) in enumerate(sampled):
            if j >= 0 and seq in self._running:
                beams.setdefault(seq, []).append(i)
        for seq, rows in beams.items():
            try:
                self._advance_beams(seq, logits[rows])
            except Exception as exc:  # noqa: BLE001 - this request's fault alone
                self._fail(seq, RequestFailed(f"beam search failed: {type(exc).__name__}: {exc}"))

    def _numeric_fault(self, seq: _Seq) -> RequestFailed:
        if seq.slot >= 0:  # the base model is shared and was finite for the other requests: the adapter is at fault
            message = "the adapter's output is not finite (NaN or Inf): its weights are numerically broken"
            return RequestFailed(message, "adapter_numeric_fault", 422)
        return RequestFailed("the model's output is not finite (NaN or Inf)", "numeric_fault", 500)

    def _emit_samples(self, logits: torch.Tensor, seqs: list[_Seq]) -> None:
        """logits: [len(seqs), V]: the next token of each request (not beam search). Sampling that raises for the
        batch is redone row by row, and a row that raises alone fails its request alone."""
        if not seqs:
            return
        states = [RowState(s.request.params, s.tokens, s.generated, s.generator, self.eos) for s in seqs]
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

    def _advance_beams(self, seq: _Seq, logits: torch.Tensor) -> None:
        """One beam-search step; the keys and values of each kept beam's parent are copied into its slots."""
        beam = seq.beam
        assert beam is not None
        parents = beam.step(logits)
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

    def _finish(self, seq: _Seq, reason: str) -> None:
        queue_ms = (seq.started - seq.submitted) * 1000
        first_ms = ((seq.first_token_at or seq.started) - seq.submitted) * 1000
        self._release(seq)
        self._running.remove(seq)
        seq.sink(("end", reason, queue_ms, first_ms))  # last: whoever reads the end sees the engine without it

    def _release(self, seq: _Seq) -> None:
        self.kv.release(seq.blocks)
        seq.blocks = []
        if seq.slot >= 0:
            self.adapters.unpin(seq.slot)
            seq.slot = -1
