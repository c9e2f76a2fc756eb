"""Request bodies of the OpenAI-compatible API (plus LoRAX's top_k and repetition_penalty)."""

from typing import Literal

from pydantic import BaseModel, Field, field_validator

from functions.engine.protocol import SamplingParams

DEFAULT_MAX_TOKENS = 512


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model: str = Field(description="A base model name, 'repo/version', or 'repo' for its latest version.")
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0, description="LoRAX extension; 0 disables top-k.")
    repetition_penalty: float = Field(default=1.0, gt=0, le=10, description="LoRAX extension.")
    stop: str | list[str] | None = None
    seed: int | None = None
    min_tokens: int = Field(default=0, ge=0, description="vLLM extension: end-of-sequence is held off until then.")
    num_beams: int = Field(default=1, ge=1, le=8, description="Loraplex extension: beam search width (greedy).")
    n: int = Field(default=1, ge=1, le=1, description="Only one choice per request.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    def logprob_request(self) -> tuple[bool, int]:
        """(per-token logprobs wanted, alternatives per token)."""
        return False, 0

    def sampling(self, max_tokens: int | None) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        logprobs, top = self.logprob_request()
        return SamplingParams(
            max_new_tokens=max_tokens or DEFAULT_MAX_TOKENS,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            stop=stop,
            seed=self.seed,
            min_new_tokens=self.min_tokens,
            num_beams=self.num_beams,
            logprobs=logprobs,
            top_logprobs=top,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def logprob_request(self) -> tuple[bool, int]:
        return self.logprobs, (self.top_logprobs or 0) if self.logprobs else 0

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=5, description="Legacy: alternatives per token.")

    def logprob_request(self) -> tuple[bool, int]:
        return self.logprobs is not None, self.logprobs or 0

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("send exactly one prompt per request")
        return value

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens
