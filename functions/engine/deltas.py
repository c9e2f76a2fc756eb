"""One request's items from the native engine's thread, turned into the Deltas its caller reads.

The engine thread sends, through the request's sink and in this order:

    ("token", token id, Choice or None)             the sampling Choice rides along when logprobs were asked for
    ("end", finish reason, queue ms, first token ms)
    ("error", exception)                            EngineError before the first token; RequestFailed at any time

Text is held back while it may be half a character or the start of a stop sequence (text.TextStream). A stop
sequence ends the request here, on the caller's side, before the engine's end item.
"""

from typing import Any

from functions.engine.protocol import Delta, FinishReason, TokenLogprob
from functions.engine.sampling import Choice
from functions.engine.text import TextStream


class DeltaStream:
    def __init__(self, tokenizer: Any, eos: int, stops: tuple[str, ...], prompt_tokens: int) -> None:
        self.tokenizer, self.eos, self.prompt_tokens = tokenizer, eos, prompt_tokens
        self.text = TextStream(tokenizer, stops)
        self.pending: list[TokenLogprob] = []  # logprobs of the tokens whose text has not been sent yet
        self.end_token: TokenLogprob | None = None  # the end-of-sequence token's, when logprobs were asked
        self.done = False  # the last Delta has been made: the request has ended

    def take(self, item: tuple) -> Delta | None:
        """The Delta one item makes, if any (text may be held back). Raises the request's error."""
        if item[0] == "error":
            raise item[1]
        if item[0] == "end":
            _, finish, queue_ms, first_ms = item
            tail = self.text.finish()
            self.done = True
            return self._delta(tail, "stop" if self.text.stopped else finish, queue_ms, first_ms)
        _, token, choice = item
        if token == self.eos:
            if choice is not None:
                self.end_token = self._token_logprob(choice)
            return None  # the end item follows
        piece = self.text.push(token)
        if choice is not None:
            self.pending.append(self._token_logprob(choice))
        if self.text.stopped:  # a stop sequence ended it
            self.done = True
            return self._delta(piece, "stop")
        if piece:  # token counts so far ride along: a client that leaves mid-stream is charged for them
            return self._delta(piece)
        return None

    def _delta(
        self, piece: str, finish_reason: FinishReason | None = None, queue_ms: float = 0.0, first_token_ms: float = 0.0
    ) -> Delta:
        delta = Delta(
            piece,
            finish_reason=finish_reason,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=len(self.text.ids),
            logprobs=tuple(self.pending),
            queue_ms=queue_ms,
            first_token_ms=first_token_ms,
            end_token=self.end_token if finish_reason is not None else None,
        )
        self.pending = []
        return delta

    def _token_logprob(self, choice: Choice) -> TokenLogprob:
        decode = self.tokenizer.decode
        top = choice.top or []  # [(token id, logprob)]
        texts = tuple((decode([t]), lp) for t, lp in top)
        ids = tuple(t for t, _ in top)
        return TokenLogprob(decode([choice.token]), choice.logprob or 0.0, texts, choice.token, ids)
