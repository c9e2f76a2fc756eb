"""Next-token choice for one step's batch: greedy rows in one argmax, the rest row by row.

The order of logit processing follows transformers' generate (repetition penalty, temperature, top-k, top-p),
so the same seed gives the same tokens run after run."""

from dataclasses import dataclass

import torch

from functions.engine.protocol import SamplingParams


@dataclass
class RowState:
    """What sampling needs of one sequence."""

    params: SamplingParams
    tokens: list[int]  # prompt + generated so far (the repetition penalty looks at both)
    generated: int
    generator: torch.Generator | None
    eos: int


@dataclass
class Choice:
    token: int
    logprob: float | None = None  # log-probability of the token under the model (raw logits)
    top: list[tuple[int, float]] | None = None


def choose(logits: torch.Tensor, rows: list[RowState]) -> list[Choice]:
    """logits: [B, V] fp32, one row per entry of `rows`."""
    simple = [
        r.params.greedy and r.params.repetition_penalty == 1.0 and r.generated >= r.params.min_new_tokens for r in rows
    ]
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
                choice.top = list(zip(ids.tolist(), values.tolist(), strict=True))
        choices.append(choice)
    return choices


def _sample(row_logits: torch.Tensor, row: RowState) -> int:
    params = row.params
    scores = row_logits.clone()
    if row.generated < params.min_new_tokens:
        scores[row.eos] = -float("inf")
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(row.tokens)), device=scores.device)
        picked = scores[seen]
        scores[seen] = torch.where(picked < 0, picked * params.repetition_penalty, picked / params.repetition_penalty)
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
