"""JSON Schema → per-step token masks for structured output (SamplingParams.json_schema), on the native engine.

The grammar library is llguidance (Microsoft's, behind Guidance; vLLM and SGLang ship it as a structured-output
backend): a Rust core in one wheel with no Python dependencies, so it cannot move our torch or transformers (xgrammar
pulls in triton; outlines-core builds a whole-vocabulary index per schema up front). It compiles a JSON Schema
lazily against the tokenizer (about a millisecond for the schemas measured here; the tokenizer itself is converted
once, about a second), computes a step's mask in tens of microseconds, and says which keywords it cannot enforce
(`not`, `if`, ...) instead of ignoring them: such a schema is refused with the field `response_format`.

Shapes: a mask is one bit per token of the logits' vocabulary, packed 32 to an int32 word ([rows, ceil(V / 32)]),
as llguidance writes it; `allowed_tokens` unpacks it to [rows, V] bool.

One job: the compiled schemas (an LRU of matchers in their start state, per engine: `SchemaGrammars`), a request's
position in its grammar (`JsonConstraint`), and a batch's masks. Sampling applies them (sampling.py).
"""

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch
import torch

from functions.engine.protocol import EngineError

# The JSON's layout is fixed (", " and ": " separators, no free whitespace): a model cannot spend its tokens on
# blank space, and a small model cannot loop on it until max_tokens.
COMPILE_OPTIONS = {"whitespace_flexible": False}
CACHE_SIZE = 128  # compiled schemas kept per engine (least recently used dropped)
_BIT = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8)  # [8]: bit b of a mask byte is token 8k + b


def check_schema(schema: str) -> None:
    """Whether llguidance can enforce `schema` (canonical JSON text), without a tokenizer: the vLLM engine's check,
    whose own guided decoding then enforces it. EngineError naming response_format when not."""
    error = llguidance.LLMatcher.validate_grammar(_grammar(schema))
    if error:
        raise EngineError(f"response_format: the JSON schema cannot be enforced: {error}", "response_format")


class JsonConstraint:
    """One request's position in its schema's grammar: which tokens may come next, and the tokens it took."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher

    def advance(self, token: int) -> None:
        """Take the sampled token (one the mask allowed, so this cannot fail unless the grammar library broke)."""
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the JSON grammar refused token {token}: {self.matcher.get_error()}")


class SchemaGrammars:
    """The schemas compiled against one engine's tokenizer, least recently used dropped beyond `capacity`. Thread
    safe: requests are prepared on callers' threads, masks computed on the engine thread."""

    def __init__(self, tokenizer: Any, vocab_size: int, capacity: int = CACHE_SIZE) -> None:
        self.tokenizer, self.vocab_size, self.capacity = tokenizer, vocab_size, capacity
        self._lock = threading.Lock()
        self._tokenizer: llguidance.LLTokenizer | None = None  # converted on first use (about a second)
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()  # schema -> matcher at its start

    def cached(self, schema: str) -> bool:
        with self._lock:
            return schema in self._compiled

    def start(self, schema: str) -> JsonConstraint:
        """A request's constraint at the start of `schema`'s grammar, compiled on first use (may take a while for a
        large schema: call it off the event loop then). EngineError naming response_format when it cannot be."""
        with self._lock:
            start = self._compiled.get(schema)
            if start is not None:
                self._compiled.move_to_end(schema)
                return JsonConstraint(start.deep_copy())
            if self._tokenizer is None:
                self._tokenizer = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size)
            lltokenizer = self._tokenizer
        start = llguidance.LLMatcher(lltokenizer, _grammar(schema), log_level=0)
        if start.is_error():
            raise EngineError(
                f"response_format: the JSON schema cannot be enforced: {start.get_error()}", "response_format"
            )
        with self._lock:
            self._compiled[schema] = start
            self._compiled.move_to_end(schema)
            while len(self._compiled) > self.capacity:
                self._compiled.popitem(last=False)
        return JsonConstraint(start.deep_copy())


_executor: llguidance.LLExecutor | None = None  # llguidance's thread pool for a batch's masks


def allowed_tokens(constraints: Sequence[JsonConstraint], vocab_size: int) -> torch.Tensor:
    """[len(constraints), vocab_size] bool: the tokens each constraint allows next (computed in parallel)."""
    global _executor
    if _executor is None:
        _executor = llguidance.LLExecutor()
    words = llguidance.torch.allocate_token_bitmask(len(constraints), vocab_size)  # [rows, ceil(V / 32)] int32
    pairs = [(c.matcher, i) for i, c in enumerate(constraints)]
    llguidance.torch.fill_next_token_bitmask_par(_executor, pairs, words)
    masks = words.view(torch.uint8)  # [rows, 4 * words]: little-endian, so byte k holds tokens 8k … 8k + 7
    bits = (masks[:, :, None] & _BIT).ne(0)  # [rows, 4 * words, 8]
    return bits.reshape(len(constraints), -1)[:, :vocab_size]


def _grammar(schema: str) -> str:
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=COMPILE_OPTIONS)  # type: ignore[arg-type]
    except ValueError as exc:  # not a JSON object
        raise EngineError(f"response_format: the JSON schema is not a JSON object: {exc}", "response_format") from None
