"""Next-token choice for one step's batch: greedy rows in one argmax, the rest row by row.

The order of logit processing follows transformers' generate (repetition penalty, temperature, top-k, top-p),
so the same seed gives the same tokens run after run.

A row whose request names `choices` (SamplingParams.choices) first has every token masked but those that continue
one of its choices (ChoiceTrie), or only end-of-sequence once it spelled a whole one; greedy, sampling and logprobs
then see the masked logits, so the logprobs are over the allowed tokens, renormalised. Rows without choices take
the same path as before, with no extra work.

A row whose request names a JSON schema (SamplingParams.json_schema) is masked the same way, by its grammar
(grammar.py: the tokens that keep the JSON valid, only end-of-sequence once it is complete), the batch's grammar
rows' masks computed together; min_new_tokens does not apply to them either (the schema decides the end).

OpenAI's presence_penalty, frequency_penalty and logit_bias (`adjust`) come after the repetition penalty, before
the greedy choice or the temperature; like it, they take a row off the one-argmax path. The logprobs stay the
model's own (as vLLM's by default), not the adjusted scores."""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from functions.engine.grammar import JsonConstraint, allowed_tokens
from functions.engine.protocol import SamplingParams
from functions.prompts import encode_text


@dataclass
class _Node:
    children: dict[int, "_Node"] = field(default_factory=dict)
    end: bool = False  # a whole choice ends here: end-of-sequence is allowed
    allowed: list[int] = field(default_factory=list)  # children's tokens, plus eos where `end`; set once built


class ChoiceTrie:
    """The token sequences of a request's choices, as a trie: which tokens may follow what was generated. A choice
    that is a prefix of another keeps both paths open (end-of-sequence and the longer choice's next token)."""

    def __init__(self, sequences: Sequence[Sequence[int]], eos: int) -> None:
        self.root = _Node()
        for tokens in sequences:
            node = self.root
            for token in tokens:
                node = node.children.setdefault(token, _Node())
            node.end = True
        stack = [self.root]
        while stack:
            node = stack.pop()
            node.allowed = list(node.children) + ([eos] if node.end else [])
            stack.extend(node.children.values())

    @classmethod
    def of(cls, tokenizer: Any, choices: Sequence[str], eos: int) -> "ChoiceTrie":
        """Each choice as training encodes a completion after the chat template's assistant header."""
        return cls([encode_text(tokenizer, choice) for choice in choices], eos)

    def allowed(self, generated: Sequence[int]) -> list[int]:
        """The tokens that may follow `generated` (the tokens generated so far, all on one path of the trie)."""
        node = self.root
        for token in generated:
            node = node.children[token]
        return node.allowed


@dataclass
class RowState:
    """What sampling needs of one sequence."""

    params: SamplingParams
    tokens: list[int]  # prompt + generated so far (the repetition penalty looks at both)
    generated: int
    generator: torch.Generator | None
    eos: int
    choices: ChoiceTrie | None = None  # the request's choices, when it names any
    grammar: JsonConstraint | None = None  # the request's JSON schema's grammar, when it names one

    @property
    def constrained(self) -> bool:
        """Whether a mask decides the row's end (choices or a schema): min_new_tokens does not apply."""
        return self.choices is not None or self.grammar is not None

    def allowed(self) -> list[int]:
        assert self.choices is not None
        return self.choices.allowed(self.tokens[len(self.tokens) - self.generated :])


@dataclass
class Choice:
    token: int
    logprob: float | None = None  # log-probability of the token under the model (raw logits)
    top: list[tuple[int, float]] | None = None


def choose(logits: torch.Tensor, rows: list[RowState]) -> list[Choice]:
    """logits: [B, V] fp32, one row per entry of `rows`."""
    simple = [
        r.params.greedy
        and r.params.repetition_penalty == 1.0
        and not r.params.adjusts_logits
        and (r.generated >= r.params.min_new_tokens or r.constrained)
        for r in rows
    ]
    if any(r.choices is not None for r in rows):
        logits = mask_choices(logits, [r.allowed() if r.choices is not None else None for r in rows])
    if any(r.grammar is not None for r in rows):
        logits = mask_grammars(logits, rows)
    greedy = logits.argmax(-1).tolist() if any(simple) else []
    choices = []
    for i, row in enumerate(rows):
        token = greedy[i] if simple[i] else _sample(logits[i], row)
        choice = Choice(token)
        if row.params.logprobs or row.params.top_logprobs:
            logprobs = torch.log_softmax(logits[i], -1)
            choice.logprob = float(logprobs[token])
            if row.params.top_logprobs:
                values, ids = logprobs.topk(row.params.top_logprobs)
                top = zip(ids.tolist(), values.tolist(), strict=True)
                # a masked token (-inf: not one of the row's choices) is no alternative, and no JSON number
                choice.top = [(t, v) for t, v in top if v != -float("inf")]
        choices.append(choice)
    return choices


def mask_choices(logits: torch.Tensor, allowed: Sequence[list[int] | None]) -> torch.Tensor:
    """A copy of logits [B, V] where, in each row with a list of allowed tokens, every other token is -inf (rows
    with None are left as they are)."""
    masked = logits.clone()
    for i, tokens in enumerate(allowed):
        if tokens is not None:
            keep = torch.tensor(tokens, dtype=torch.long, device=logits.device)
            masked[i].fill_(-float("inf"))
            masked[i, keep] = logits[i, keep]
    return masked


def mask_grammars(logits: torch.Tensor, rows: Sequence[RowState]) -> torch.Tensor:
    """A copy of logits [B, V] where, in each row with a grammar, every token it does not allow next is -inf."""
    index = [i for i, r in enumerate(rows) if r.grammar is not None]
    keep = allowed_tokens([r.grammar for r in rows if r.grammar is not None], logits.shape[-1])  # [len(index), V]
    masked = logits.clone()
    picked = torch.tensor(index, dtype=torch.long, device=logits.device)
    masked[picked] = torch.where(keep.to(logits.device), logits[picked], -float("inf"))
    return masked


def _sample(row_logits: torch.Tensor, row: RowState) -> int:
    params = row.params
    scores = row_logits.clone()
    if row.generated < params.min_new_tokens and not row.constrained:  # a choice's or a schema's end is its own
        scores[row.eos] = -float("inf")
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(row.tokens)), device=scores.device)
        picked = scores[seen]
        scores[seen] = torch.where(picked < 0, picked * params.repetition_penalty, picked / params.repetition_penalty)
    if params.adjusts_logits:
        scores = adjust(scores, row)
    if params.greedy:
        return int(scores.argmax())
    scores = scores / params.temperature
    if params.top_k:
        kth = scores.topk(min(params.top_k, scores.shape[-1])).values[-1]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if params.top_p < 1.0:
        ordered, order = scores.sort()  # ascending, as transformers' TopPLogitsWarper
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - params.top_p
        drop[-1] = False  # keep at least the most likely token
        scores = scores.masked_fill(drop.scatter(0, order, drop), -float("inf"))
    probs = scores.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=row.generator))


def adjust(scores: torch.Tensor, row: RowState) -> torch.Tensor:
    """OpenAI's penalties and logit_bias on one row's scores [V] (in place): each token generated so far loses
    presence_penalty once and frequency_penalty per time it was generated; logit_bias adds its bias to its token."""
    params = row.params
    generated = row.tokens[len(row.tokens) - row.generated :]
    if generated and (params.presence_penalty or params.frequency_penalty):
        ids, counts = torch.tensor(generated, device=scores.device).unique(return_counts=True)
        scores[ids] -= params.frequency_penalty * counts.to(scores.dtype) + params.presence_penalty
    if params.logit_bias:
        ids = torch.tensor([token for token, _ in params.logit_bias], device=scores.device)
        bias = torch.tensor([value for _, value in params.logit_bias], dtype=scores.dtype, device=scores.device)
        scores.index_add_(0, ids, bias)
    return scores
