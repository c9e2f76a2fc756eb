"""The simple engine: transformers `generate` on one base model, PEFT adapters swapped per request.

One request runs at a time (a lock around the model); adapters are loaded on first use and the least
recently used one is unloaded when more than `adapter_slots` are resident. The batched multi-adapter
engine replaces this behind the same protocol.
"""

import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from functions.base_models import load_model, load_tokenizer
from functions.catalog import get_model
from functions.engine.protocol import CancelFlag, Delta, EngineError, GenerationRequest

_DONE = object()


class HFEngine:
    def __init__(self, base_model: str, adapter_slots: int = 8) -> None:
        import torch

        self.base_model = base_model
        self.context_length = get_model(base_model).context_length
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = load_tokenizer(base_model)
        self.model: Any = load_model(base_model, "bfloat16" if self.device == "cuda" else "float32").to(self.device)
        self.model.eval()
        self.adapter_slots = adapter_slots
        self._resident: OrderedDict[str, None] = OrderedDict()  # adapter keys, least recently used first
        self._lock = threading.Lock()

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def stream(self, request: GenerationRequest, cancelled: CancelFlag | None = None) -> Iterator[Delta]:
        prompt_ids = self.tokenizer(request.prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        prompt_len = int(prompt_ids.shape[1])
        if prompt_len >= self.context_length:
            raise EngineError(f"the prompt has {prompt_len} tokens; this model's context is {self.context_length}")
        if request.adapter is not None and request.adapter.base_model != self.base_model:
            raise EngineError(f"adapter was trained on {request.adapter.base_model!r}, not {self.base_model!r}")
        max_new = min(request.params.max_new_tokens, self.context_length - prompt_len)
        with self._lock:
            yield from self._generate(prompt_ids, max_new, request, cancelled)

    # ---- internals -------------------------------------------------------------------------------------

    def _generate(self, prompt_ids: Any, max_new: int, request: GenerationRequest, cancelled: CancelFlag | None):  # type: ignore[no-untyped-def]
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        params = request.params
        model = self._activate(request.adapter)
        tokens: queue.Queue[Any] = queue.Queue()
        stop_now = threading.Event()

        class Streamer(BaseStreamer):
            first = True

            def put(self, value: Any) -> None:
                if self.first:  # generate() first hands over the prompt itself
                    self.first = False
                    return
                for token in value.reshape(-1).tolist():
                    tokens.put(token)

            def end(self) -> None:
                tokens.put(_DONE)

        class Stop(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                halt = stop_now.is_set() or (cancelled is not None and cancelled.is_set())
                return torch.full((input_ids.shape[0],), halt, dtype=torch.bool, device=input_ids.device)

        kwargs: dict[str, Any] = {
            "input_ids": prompt_ids.to(self.device),
            "attention_mask": torch.ones_like(prompt_ids).to(self.device),
            "max_new_tokens": max_new,
            "do_sample": not params.greedy,
            "repetition_penalty": params.repetition_penalty,
            "streamer": Streamer(),
            "stopping_criteria": StoppingCriteriaList([Stop()]),
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if not params.greedy:
            kwargs |= {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k or None}
        failure: list[BaseException] = []

        def work() -> None:
            try:
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                with torch.inference_mode(), self._adapter_context(model, request):
                    model.generate(**kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer below
                failure.append(exc)
                tokens.put(_DONE)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        generated: list[int] = []
        sent = ""
        finish = "length"
        try:
            while (token := tokens.get()) is not _DONE:
                generated.append(token)
                if token == self.tokenizer.eos_token_id:
                    finish = "stop"
                    continue
                text = self.tokenizer.decode(generated, skip_special_tokens=True)
                if text.endswith("\ufffd"):
                    continue  # half of a multi-byte character: wait for the rest
                cut = _first_stop(text, params.stop)
                if cut is not None:
                    text, finish = text[:cut], "stop"
                    stop_now.set()
                else:  # an end that may begin a stop sequence waits until the next tokens decide
                    text = text[: len(text) - _partial_stop(text, params.stop)]
                if len(text) > len(sent):
                    yield Delta(text[len(sent) :])
                    sent = text
                if stop_now.is_set():
                    break
            else:  # generation ended: send what was held back (an incomplete character, the start of a stop)
                text = self.tokenizer.decode(generated, skip_special_tokens=True)
                cut = _first_stop(text, params.stop)
                if cut is not None:
                    text, finish = text[:cut], "stop"
                if len(text) > len(sent) and not failure:
                    yield Delta(text[len(sent) :])
        finally:
            stop_now.set()  # also reached when the consumer goes away mid-stream: free the model at once
            thread.join()
        if failure:
            raise failure[0]
        yield Delta("", finish_reason=finish, prompt_tokens=int(prompt_ids.shape[1]), completion_tokens=len(generated))  # type: ignore[arg-type]

    def _activate(self, adapter: Any) -> Any:
        """Load the adapter if needed (evicting the least recently used) and return the model to call."""
        if adapter is None:
            return self.model
        from peft import PeftModel

        if adapter.key in self._resident:
            self._resident.move_to_end(adapter.key)
        else:
            if not isinstance(self.model, PeftModel):
                self.model = PeftModel.from_pretrained(self.model, adapter.path, adapter_name=adapter.key)
            else:
                self.model.load_adapter(adapter.path, adapter_name=adapter.key)
            self.model.eval()
            self._resident[adapter.key] = None
            while len(self._resident) > self.adapter_slots:
                old, _ = self._resident.popitem(last=False)
                self.model.delete_adapter(old)
        self.model.set_adapter(adapter.key)
        return self.model

    def _adapter_context(self, model: Any, request: GenerationRequest) -> Any:
        from contextlib import nullcontext

        from peft import PeftModel

        if request.adapter is None and isinstance(model, PeftModel):
            return model.disable_adapter()  # base-model request on a model that carries adapters
        return nullcontext()


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for s in stops if s and (i := text.find(s)) >= 0]
    return min(hits) if hits else None


def _partial_stop(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the beginning of a stop sequence."""
    return max((n for s in stops for n in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:n])), default=0)
