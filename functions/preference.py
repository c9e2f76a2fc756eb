"""Preference rows (data format "preference": a prompt, a chosen and a rejected answer) as preference tuning (method
"dpo") reads them: each answer is tokenized exactly as a prompt/completion row's completion is (functions/prompts.py:
the chat template, the end of the turn, user text never read as control tokens), after the same prompt tokens.

A row's token lengths (what validation keeps, what auto_config reads and what the job is priced on) are
(prompt, chosen, prompt, rejected): the two sequences the trainer processes, each context then learned tokens.
"""

from dataclasses import dataclass
from typing import Any

from functions.datasets import Example
from functions.prompts import example_ids


@dataclass(frozen=True)
class PreferencePair:
    prompt_ids: list[int]
    chosen_ids: list[int]  # the chosen answer and the end of its turn
    rejected_ids: list[int]
    full_length: int  # the longer sequence (prompt and answer) before truncation to max_seq_length

    @property
    def tokens(self) -> int:
        """Tokens processed per pass over the row: prompt and chosen, prompt and rejected."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)

    def feature(self) -> dict[str, list[int]]:
        """The row as TRL's DataCollatorForPreference takes it."""
        return {"prompt_ids": self.prompt_ids, "chosen_ids": self.chosen_ids, "rejected_ids": self.rejected_ids}


def sides(example: Example) -> tuple[Example, Example]:
    """The row as two single-reply rows: the prompt (or its conversation) answered by `chosen`, then by `rejected`."""
    if example.chosen is None or example.rejected is None:
        raise ValueError("not a preference row")  # validation made sure
    if example.messages is not None:

        def answered(text: str) -> Example:
            messages = (*example.messages, {"role": "assistant", "content": text})  # type: ignore[misc]
            return Example(example.line, example.split, messages=messages, weights=(0,) * (len(messages) - 1) + (1,))
    else:

        def answered(text: str) -> Example:
            return Example(example.line, example.split, prompt=example.prompt, completion=text)

    return answered(example.chosen), answered(example.rejected)


def tokenize_pair(example: Example, tokenizer: Any, apply_chat_template: bool, max_seq_length: int) -> PreferencePair:
    """The row's prompt and answers as token ids; each sequence (prompt and one answer) kept within max_seq_length,
    as the trainer's collator would cut it (the prompt first, then the answer)."""
    chosen, rejected = sides(example)
    prompt_ids, chosen_ids = example_ids(chosen, tokenizer, apply_chat_template)
    _, rejected_ids = example_ids(rejected, tokenizer, apply_chat_template)
    full = len(prompt_ids) + max(len(chosen_ids), len(rejected_ids))
    room = max(0, max_seq_length - len(prompt_ids))
    return PreferencePair(prompt_ids[:max_seq_length], chosen_ids[:room], rejected_ids[:room], full)


def pair_runs(example: Example, tokenizer: Any, apply_chat_template: bool = True) -> tuple[int, int, int, int]:
    """(prompt, chosen, prompt, rejected) token counts, untruncated."""
    chosen, rejected = sides(example)
    prompt_ids, chosen_ids = example_ids(chosen, tokenizer, apply_chat_template)
    _, rejected_ids = example_ids(rejected, tokenizer, apply_chat_template)
    return len(prompt_ids), len(chosen_ids), len(prompt_ids), len(rejected_ids)
