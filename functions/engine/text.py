"""Generated token ids to text deltas: incomplete characters and possible starts of a stop sequence are held
back until the next tokens decide them."""

from typing import Any


class TextStream:
    def __init__(self, tokenizer: Any, stops: tuple[str, ...]) -> None:
        self.tokenizer, self.stops = tokenizer, tuple(s for s in stops if s)
        self.ids: list[int] = []
        self.sent = ""  # text already handed out
        self.stopped = False  # a stop sequence was found: nothing more is sent

    def push(self, token: int) -> str:
        """Add one generated token; return the text that can be sent now."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""  # half of a multi-byte character: wait for the rest
        cut = _first_stop(text, self.stops)
        if cut is not None:
            self.stopped = True
            text = text[:cut]
        else:
            text = text[: len(text) - _partial_stop(text, self.stops)]
        return self._advance(text)

    def finish(self) -> str:
        """Generation ended: send what was held back (an incomplete character, the start of a stop)."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = _first_stop(text, self.stops)
        if cut is not None:
            self.stopped = True
            text = text[:cut]
        return self._advance(text)

    def _advance(self, text: str) -> str:
        if len(text) <= len(self.sent):
            return ""
        new, self.sent = text[len(self.sent) :], text
        return new


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for s in stops if (i := text.find(s)) >= 0]
    return min(hits) if hits else None


def _partial_stop(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the beginning of a stop sequence."""
    return max((n for s in stops for n in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:n])), default=0)
