"""Evaluation of a causal LM on held-out examples: the metrics users read on a fine-tuning job.

- loss, perplexity and token accuracy: one teacher-forced pass over each example, on completion tokens only;
- sequence accuracy and character error rate: the greedy answer to each prompt against the reference
  completion (rows without a prompt, as in continued pretraining, have no answer to compare and are skipped).
"""

import math
from dataclasses import dataclass
from typing import Any

from functions.prompts import IGNORE_INDEX, Tokenized

GENERATION_ROWS = 32  # greedy answers are the slow part: compare at most this many rows
MAX_ANSWER_TOKENS = 128


@dataclass(frozen=True)
class EvalResult:
    loss: float
    perplexity: float
    token_accuracy: float
    sequence_accuracy: float | None  # None when no row has a prompt
    char_error_rate: float | None
    rows: int


def evaluate(
    model: Any, tokenizer: Any, examples: list[Tokenized], batch_size: int = 8, bf16: bool = False
) -> EvalResult:
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device.type
    try:
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss, token_accuracy = _teacher_forced(model, tokenizer, examples, batch_size)
            answers = _greedy_answers(model, tokenizer, examples[:GENERATION_ROWS], batch_size)
    finally:
        model.train(was_training)
    sequence_accuracy = cer = None
    if answers:
        sequence_accuracy = sum(pred.strip() == ref.strip() for pred, ref in answers) / len(answers)
        cer = sum(char_error_rate(pred.strip(), ref.strip()) for pred, ref in answers) / len(answers)
    return EvalResult(loss, math.exp(min(loss, 50.0)), token_accuracy, sequence_accuracy, cer, len(examples))


def _teacher_forced(model: Any, tokenizer: Any, examples: list[Tokenized], batch_size: int) -> tuple[float, float]:
    import torch

    device = next(model.parameters()).device
    total_loss, correct, counted = 0.0, 0, 0
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        width = max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)  # [batch, seq], right-padded
        labels = torch.full((len(batch), width), IGNORE_INDEX)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, e in enumerate(batch):
            ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
            labels[i, : len(e.labels)] = torch.tensor(e.labels)
            mask[i, : len(e.input_ids)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()  # [b, seq, vocab]
        predicted, target = logits[:, :-1], labels[:, 1:].to(device)  # position t predicts token t+1
        keep = target != IGNORE_INDEX
        total_loss += torch.nn.functional.cross_entropy(predicted[keep], target[keep], reduction="sum").item()
        correct += (predicted.argmax(-1)[keep] == target[keep]).sum().item()
        counted += int(keep.sum().item())
    return total_loss / max(counted, 1), correct / max(counted, 1)


def _greedy_answers(model: Any, tokenizer: Any, examples: list[Tokenized], batch_size: int) -> list[tuple[str, str]]:
    """(greedy answer, reference) for each example that has a prompt."""
    import torch

    device = next(model.parameters()).device
    pairs = []
    prompted = [e for e in examples if e.labels and e.labels[0] == IGNORE_INDEX]
    for start in range(0, len(prompted), batch_size):
        batch = prompted[start : start + batch_size]
        prompts = [e.input_ids[: _prompt_length(e)] for e in batch]
        references = [e.input_ids[_prompt_length(e) :] for e in batch]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)  # [batch, seq], left-padded for generation
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        new_tokens = min(MAX_ANSWER_TOKENS, max(len(r) for r in references) + 2)
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        for i, ref in enumerate(references):
            answer = tokenizer.decode(out[i, width:], skip_special_tokens=True)
            pairs.append((answer, tokenizer.decode(ref, skip_special_tokens=True)))
    return pairs


def _prompt_length(example: Tokenized) -> int:
    return next((i for i, label in enumerate(example.labels) if label != IGNORE_INDEX), len(example.labels))


def char_error_rate(predicted: str, reference: str) -> float:
    """Levenshtein distance (insertions, deletions, substitutions) divided by the reference length."""
    if not reference:
        return float(bool(predicted))
    previous = list(range(len(reference) + 1))
    for i, p in enumerate(predicted, 1):
        current = [i]
        for j, r in enumerate(reference, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (p != r)))
        previous = current
    return previous[-1] / len(reference)
