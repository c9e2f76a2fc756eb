"""The serving engine protocol: one base model, many adapters, requests in and text deltas out."""

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol


@dataclass(frozen=True)
class AdapterRef:
    key: str  # stable id of the adapter version; users never see it
    path: Path  # PEFT directory on the volume
    base_model: str


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filtering
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str  # already rendered (chat template applied by the caller)
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: AdapterRef | None = None  # None: the base model alone


FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Delta:
    """A piece of generated text; the last one carries finish_reason and token counts."""

    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


class EngineError(ValueError):
    """A request the engine refuses (too long, adapter of another base model); the message says why."""


class Engine(Protocol):
    base_model: str
    context_length: int

    def count_tokens(self, text: str) -> int: ...

    def stream(self, request: GenerationRequest, cancelled: "CancelFlag | None" = None) -> Iterator[Delta]: ...


class CancelFlag(Protocol):
    def is_set(self) -> bool: ...


def request_from_dict(data: dict) -> GenerationRequest:
    """The inverse of dataclasses.asdict(request), for engines reached over RPC (Modal)."""
    params = dict(data.get("params") or {})
    params["stop"] = tuple(params.get("stop", ()))
    adapter = data.get("adapter")
    return GenerationRequest(
        prompt=data["prompt"],
        params=SamplingParams(**params),
        adapter=AdapterRef(adapter["key"], Path(adapter["path"]), adapter["base_model"]) if adapter else None,
    )


def collect(deltas: Iterator[Delta]) -> Completion:
    """Run a stream to its end and join it into one completion."""
    text, last = [], Delta("")
    for delta in deltas:
        text.append(delta.text)
        last = delta
    return Completion("".join(text), last.finish_reason or "stop", last.prompt_tokens, last.completion_tokens)
