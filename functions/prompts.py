"""Turning dataset rows and chat requests into token ids, the same way for counting, training and serving.

A training example is split into a prompt part (no loss) and a completion part (loss). With the chat
template, a prompt/completion row becomes one user turn and one assistant turn, exactly as
/v1/chat/completions will present it at inference time.
"""

from dataclasses import dataclass
from typing import Any

from functions.datasets import Example

IGNORE_INDEX = -100  # label value the loss skips


@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens
    full_length: int  # tokens before truncation to max_seq_length


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The text the model sees for a chat request, ending where the assistant's reply begins."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def split_example(example: Example, tokenizer: Any, apply_chat_template: bool) -> tuple[str, str]:
    """(prompt text, completion text) for one example."""
    if example.text is not None:  # continued pretraining: every token is learned
        return "", example.text + tokenizer.eos_token
    if example.messages is not None:
        messages = list(example.messages)
    else:
        messages = [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": example.completion}]
    if not apply_chat_template:
        prompt = "\n".join(m["content"] for m in messages[:-1]) + "\n"
        return prompt, messages[-1]["content"] + tokenizer.eos_token
    prompt = chat_prompt(tokenizer, messages[:-1])
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):  # a template that rewrites earlier turns: fall back to appending
        return prompt, messages[-1]["content"] + tokenizer.eos_token
    return prompt, full[len(prompt) :]


def tokenize_example(example: Example, tokenizer: Any, apply_chat_template: bool, max_seq_length: int) -> Tokenized:
    prompt, completion = split_example(example, tokenizer, apply_chat_template)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    input_ids = (prompt_ids + completion_ids)[:max_seq_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_seq_length]
    return Tokenized(input_ids, labels, len(prompt_ids) + len(completion_ids))
