"""Beam search for one request: its beams decode side by side in the engine's batch, like separate requests
that share a prompt and an adapter.

Each step takes the live beams' next-token log-probabilities, keeps the `width` best continuations, and sets
ended ones (end of sequence) aside, scored by sum of log-probabilities ÷ length (length penalty 1, as
transformers' default). It stops when no live beam can beat the worst of `width` ended ones, or at max_new_tokens.
"""

from dataclasses import dataclass, field

import torch


@dataclass
class BeamSearch:
    width: int
    eos: int
    max_new: int
    min_new: int = 0
    beams: list[list[int]] = field(default_factory=lambda: [[]])  # generated tokens of each live beam
    scores: list[float] = field(default_factory=lambda: [0.0])  # their summed log-probabilities
    finished: list[tuple[float, list[int]]] = field(default_factory=list)  # (normalized score, tokens)

    @property
    def generated(self) -> int:
        return len(self.beams[0])

    def step(self, logits: torch.Tensor) -> list[int]:
        """logits: [live beams, V]. Returns the parent beam of each new live beam."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        if self.generated < self.min_new:
            logprobs[:, self.eos] = -float("inf")
        total = logprobs + torch.tensor(self.scores)[:, None]
        values, flat = total.view(-1).topk(2 * self.width)
        vocab = logits.shape[-1]
        parents, beams, scores = [], [], []
        for rank, (value, index) in enumerate(zip(values.tolist(), flat.tolist(), strict=True)):
            parent, token = divmod(index, vocab)
            if token == self.eos:
                if rank < self.width:  # an ended beam counts only if it ranks among the best `width`
                    self._end(value, self.beams[parent] + [token])
                continue
            parents.append(parent)
            beams.append(self.beams[parent] + [token])
            scores.append(value)
            if len(beams) == self.width:
                break
        self.beams, self.scores = beams, scores
        if self.generated >= self.max_new:
            for score, tokens in zip(scores, beams, strict=True):
                self._end(score, tokens)
        return parents

    def _end(self, score: float, tokens: list[int]) -> None:
        self.finished.append((score / len(tokens), tokens))
        self.finished.sort(key=lambda f: f[0], reverse=True)
        del self.finished[self.width :]

    @property
    def done(self) -> bool:
        if self.generated >= self.max_new or not self.beams:
            return True
        if len(self.finished) < self.width:
            return False
        return max(self.scores) / self.generated <= self.finished[-1][0]

    def best(self) -> list[int]:
        candidates = self.finished or [(s / max(1, len(b)), b) for s, b in zip(self.scores, self.beams, strict=True)]
        return max(candidates, key=lambda f: f[0])[1]
