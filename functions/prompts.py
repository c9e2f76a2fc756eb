"""Turning dataset rows and chat requests into token ids, the same way for counting, training and serving.

User text is text: a message, a prompt or a dataset row that spells a special token ("<|im_start|>") is encoded as
those characters, never as the control token, so nobody can forge chat turns inside their own text. Only the chat
template puts control tokens into a sequence: it is rendered with a mark in place of each message's content, and
the contents are encoded as plain text where the marks stand.

A training example is a sequence of pieces, each learned (loss) or context (no loss): a conversation learns every
assistant turn whose weight is 1 (the default), each with the template's end of its turn, and nothing else. With the
chat template, a prompt/completion row becomes one user turn and one assistant turn, exactly as /v1/chat/completions
will present it at inference time. A turn's piece is where the rendering of the conversation up to its end goes past
the rendering up to its start with the generation prompt, so a reply is learned after exactly the tokens the model
will be given at inference.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from functions.datasets import Example

IGNORE_INDEX = -100  # label value the loss skips
# Batches that compute in bf16 are padded to a multiple of this many tokens. On a CPU with native bf16, oneDNN
# caches a kernel per matmul shape: one shape per row length grew a spam job's worker by ~70 MB a step (2.6 GB
# after 12 steps of 8 emails); padded to 32 it stayed at 1.6 GB and ran 13% faster (kernels reused), 64 was slower,
# 16 still grew. In fp32 padding only costs: scripts/bench_training.py (fp32, the sample's short rows) ran at 110.5
# tokens/s padded to 32 and 149.6 unpadded.
PAD_MULTIPLE = 32


def pad_multiple(bf16: bool) -> int | None:
    """What a batch's width is a multiple of (None: its longest row), for a run computing in bf16 or not."""
    return PAD_MULTIPLE if bf16 else None


def padded_length(tokens: int, multiple: int | None) -> int:
    """The width a batch whose longest row has `tokens` tokens is padded to."""
    return -(-tokens // multiple) * multiple if multiple else tokens


# Where message i's content stands in a rendered template: private-use characters no template writes. The tabs
# around it show whether the template trims contents (see _render).
_MARK = "\ue000{}\ue001"
_PADDED_MARK = re.compile("(\t?)\ue000(\\d+)\ue001(\t?)")
_BARE_MARK = re.compile("\ue000(\\d+)\ue001")


@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens
    full_length: int  # tokens before truncation to max_seq_length

    @property
    def tokens(self) -> int:
        """Tokens processed per pass over the row."""
        return len(self.input_ids)


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Text as plain tokens: the spelling of a special token in it is characters, not a control token."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def encode_chat(tokenizer: Any, messages: Sequence[dict[str, str]]) -> tuple[int, ...]:
    """The token ids the model sees for a chat request, ending where the assistant's reply begins (a
    GenerationRequest's prompt)."""
    return tuple(_encode(tokenizer, *_render(tokenizer, messages, add_generation_prompt=True)))


# One piece of a training example: its token ids, and whether they are learned.
Piece = tuple[list[int], bool]


def example_pieces(example: Example, tokenizer: Any, apply_chat_template: bool) -> list[Piece]:
    """The example's token ids in order, in pieces alternating context and learned (none empty)."""
    eos = [tokenizer.eos_token_id]
    if example.text is not None:  # continued pretraining: every token is learned
        return [(encode_text(tokenizer, example.text) + eos, True)]
    if example.messages is not None:
        messages, learned = list(example.messages), list(example.learned())
    elif example.prompt is not None and example.completion is not None:
        messages = [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": example.completion}]
        learned = [False, True]
    else:
        raise ValueError("an example has text, messages, or a prompt and a completion")  # validation made sure
    if not apply_chat_template:
        return _merged(_plain_pieces(tokenizer, messages, learned))
    return _merged(_template_pieces(tokenizer, messages, learned))


def example_ids(example: Example, tokenizer: Any, apply_chat_template: bool) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids): the ids before the example's first learned token, and the rest (for a row that
    learns one reply at its end, that reply; tokenize_example labels a conversation's later context)."""
    pieces = example_pieces(example, tokenizer, apply_chat_template)
    first = next((n for n, (_, learned) in enumerate(pieces) if learned), len(pieces))
    return [i for ids, _ in pieces[:first] for i in ids], [i for ids, _ in pieces[first:] for i in ids]


def length_runs(pieces: list[Piece]) -> tuple[int, ...]:
    """The token counts of the pieces, starting with context: (context, learned, context, learned, ...), so a
    prompt/completion row's is (prompt tokens, completion tokens) and a text row's (0, tokens)."""
    runs = [] if pieces and not pieces[0][1] else [0]
    return (*runs, *(len(ids) for ids, _ in pieces))


def tokenize_example(example: Example, tokenizer: Any, apply_chat_template: bool, max_seq_length: int) -> Tokenized:
    pieces = example_pieces(example, tokenizer, apply_chat_template)
    input_ids = [i for ids, _ in pieces for i in ids]
    labels = [i if learned else IGNORE_INDEX for ids, learned in pieces for i in ids]
    return Tokenized(input_ids[:max_seq_length], labels[:max_seq_length], len(input_ids))


def _plain_pieces(tokenizer: Any, messages: list[dict[str, str]], learned: list[bool]) -> list[Piece]:
    """Without a chat template: the contents of the messages before a reply one a line, then the reply and eos."""
    pieces: list[Piece] = []
    context: list[str] = []
    for message, learn in zip(messages, learned, strict=True):
        if message["role"] != "assistant":
            context.append(message["content"])
            continue
        if context:
            pieces.append((encode_text(tokenizer, "\n".join(context) + "\n"), False))
            context = []
        pieces.append((encode_text(tokenizer, message["content"]) + [tokenizer.eos_token_id], learn))
    if context:
        pieces.append((encode_text(tokenizer, "\n".join(context) + "\n"), False))
    return pieces


def _template_pieces(tokenizer: Any, messages: list[dict[str, str]], learned: list[bool]) -> list[Piece]:
    """With the chat template: the rendering of the whole conversation, cut where each learned turn begins and ends
    (_turn_spans), each piece encoded with _encode."""
    full, contents = _render(tokenizer, messages, add_generation_prompt=False)
    spans = _turn_spans(tokenizer, messages, learned, full)
    if spans is None:  # a template that rewrites earlier turns
        if sum(learned) == 1 and learned[-1]:  # one reply, at the end: appended to the generation prompt
            prompt, _ = _render(tokenizer, messages[:-1], add_generation_prompt=True)
            reply = encode_text(tokenizer, contents[-1]) + [tokenizer.eos_token_id]
            return [(_encode(tokenizer, prompt, contents), False), (reply, True)]
        spans = _marked_spans(tokenizer, learned, full)
    pieces: list[Piece] = []
    done = 0
    for start, end in spans:
        pieces += [
            (_encode(tokenizer, full[done:start], contents), False),
            (_encode(tokenizer, full[start:end], contents), True),
        ]
        done = end
    pieces.append((_encode(tokenizer, full[done:], contents), False))
    return pieces


def _turn_spans(
    tokenizer: Any, messages: list[dict[str, str]], learned: list[bool], full: str
) -> list[tuple[int, int]] | None:
    """[start, end) in the marked rendering `full` of each learned turn: from the end of the conversation before it,
    rendered with the generation prompt, to the end of the conversation up to it (its content, the end of its turn).
    None unless both renderings of every learned turn are prefixes of `full`, in order."""
    spans: list[tuple[int, int]] = []
    for i in (i for i, learn in enumerate(learned) if learn):
        prompt, _ = _render(tokenizer, messages[:i], add_generation_prompt=True)
        turn = full if i == len(messages) - 1 else _render(tokenizer, messages[: i + 1], add_generation_prompt=False)[0]
        if not (full.startswith(turn) and turn.startswith(prompt)) or (spans and len(prompt) < spans[-1][1]):
            return None
        spans.append((len(prompt), len(turn)))
    return spans


def _marked_spans(tokenizer: Any, learned: list[bool], full: str) -> list[tuple[int, int]]:
    """[start, end) in `full` of each learned turn as its content's mark and the control token right after it (the
    end of its turn): for templates whose earlier turns render otherwise once the conversation goes on."""
    end_of_turn, _ = _control_tokens(tokenizer)
    spans: list[tuple[int, int]] = []
    for i in (i for i, learn in enumerate(learned) if learn):
        mark = _MARK.format(i)
        start = full.find(mark)
        if start < 0 or (spans and start < spans[-1][1]):
            continue  # a template that drops the content, or shows it twice: learned where it first stands
        found = end_of_turn.match(full, start + len(mark))
        spans.append((start, found.end() if found else start + len(mark)))
    return spans


def _merged(pieces: list[Piece]) -> list[Piece]:
    """The pieces less the empty ones, neighbours of the same kind joined."""
    merged: list[Piece] = []
    for ids, learned in pieces:
        if not ids:
            continue
        if merged and merged[-1][1] == learned:
            merged[-1] = (merged[-1][0] + ids, learned)
        else:
            merged.append((list(ids), learned))
    return merged


def _render(tokenizer: Any, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> tuple[str, list[str]]:
    """The chat template's text with a mark in place of each message's content, and the text each mark stands for.

    The template gets each content as a mark between two tabs: where the tabs come out, it inserts contents as they
    are; where they do not, it trims them (Llama 3, Gemma 2 do), and so that mark stands for the trimmed content."""
    padded = [{**m, "content": "\t" + _MARK.format(i) + "\t"} for i, m in enumerate(messages)]
    rendered = tokenizer.apply_chat_template(padded, add_generation_prompt=add_generation_prompt, tokenize=False)
    contents = [m["content"] for m in messages]

    def unpad(found: re.Match[str]) -> str:
        before, i, after = found[1], int(found[2]), found[3]
        if before and after:
            return _MARK.format(i)
        contents[i] = contents[i].strip()
        return before + _MARK.format(i) + after  # a tab left there is the template's own

    return _PADDED_MARK.sub(unpad, rendered), contents


def _encode(tokenizer: Any, marked: str, contents: list[str]) -> list[int]:
    """The ids of a marked rendering: its control tokens, and the text between two of them (the template's own text
    and the contents where the marks stand) encoded as plain text in one piece, as the tokenizer encodes the text
    between two control tokens of a whole rendering."""
    pattern, ids_of = _control_tokens(tokenizer)
    ids: list[int] = []
    for n, piece in enumerate(pattern.split(marked)):
        if n % 2:
            ids.append(ids_of[piece] if piece in ids_of else ids_of[piece.strip()])  # less the spaces it took
        elif piece:
            ids += encode_text(tokenizer, _BARE_MARK.sub(lambda found: contents[int(found[1])], piece))
    return ids


def _control_tokens(tokenizer: Any) -> tuple[re.Pattern[str], dict[str, int]]:
    """A pattern that finds the tokenizer's special tokens as it does (the longest first, with the spaces beside one
    that takes them: lstrip, rstrip), in one group, and their ids."""
    special = {t.content: (i, t) for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    alternatives = [
        ("\\s*" if t.lstrip else "") + re.escape(content) + ("\\s*" if t.rstrip else "")
        for content, (_, t) in sorted(special.items(), key=lambda item: -len(item[0]))
    ]
    return re.compile(f"({'|'.join(alternatives)})"), {content: i for content, (i, _) in special.items()}
