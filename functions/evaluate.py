"""Evaluation of a causal LM on held-out examples: the metrics users read on a fine-tuning job.

- loss, perplexity and token accuracy: one teacher-forced pass over each example, on completion tokens only;
- sequence accuracy and character error rate: the greedy answer to each prompt against the reference
  completion (rows without a prompt, as in continued pretraining, have no answer to compare and are skipped);
- for a classification dataset (functions/datasets.detect_labels), accuracy per class and the confusion matrix
  of those greedy answers.
"""

import math
from dataclasses import dataclass
from typing import Any

from functions.prompts import IGNORE_INDEX, Tokenized

GENERATION_ROWS = 32  # greedy answers are the slow part: compare at most this many rows
CLASSIFICATION_ROWS = 256  # a label is a few tokens, so a classification evaluation answers many more rows
MAX_ANSWER_TOKENS = 128
OTHER = "(other)"  # the confusion matrix column of answers that are none of the labels


@dataclass(frozen=True)
class EvalResult:
    loss: float
    perplexity: float
    token_accuracy: float
    sequence_accuracy: float | None  # None when no row has a prompt
    char_error_rate: float | None
    rows: int
    classification: dict | None = None  # classification_report(), for classification datasets


def evaluate(
    model: Any,
    tokenizer: Any,
    examples: list[Tokenized],
    batch_size: int = 8,
    bf16: bool = False,
    labels: list[str] | None = None,
) -> EvalResult:
    """`labels`: the label set of a classification dataset, which adds `classification` to the result."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device.type
    try:
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss, token_accuracy = _teacher_forced(model, tokenizer, examples, batch_size)
            limit = CLASSIFICATION_ROWS if labels else GENERATION_ROWS
            answers = _greedy_answers(model, tokenizer, examples[:limit], batch_size)
    finally:
        model.train(was_training)
    sequence_accuracy = cer = report = None
    if answers:
        sequence_accuracy = sum(pred.strip() == ref.strip() for pred, ref in answers) / len(answers)
        cer = sum(char_error_rate(pred.strip(), ref.strip()) for pred, ref in answers) / len(answers)
        if labels:
            report = classification_report(answers, labels)
    perplexity = math.exp(min(loss, 50.0))
    return EvalResult(loss, perplexity, token_accuracy, sequence_accuracy, cer, len(examples), report)


def classification_report(answers: list[tuple[str, str]], labels: list[str]) -> dict:
    """Accuracy overall and per class, and the confusion matrix, of (answer, reference) pairs.

    Classes are the training labels, then any reference label the training split lacks. The matrix has one row
    per reference class and one column per answered class, plus OTHER for answers that are no class at all.
    A class without evaluation rows has accuracy None.
    """
    pairs = [(answer.strip(), reference.strip()) for answer, reference in answers]
    classes = list(labels) + sorted({ref for _, ref in pairs} - set(labels))
    column = {label: i for i, label in enumerate(classes)}
    counts = [[0] * (len(classes) + 1) for _ in classes]  # [reference class, answered class or OTHER]
    for answer, reference in pairs:
        counts[column[reference]][column.get(answer, len(classes))] += 1
    per_class = {}
    for i, label in enumerate(classes):
        support = sum(counts[i])
        per_class[label] = {"accuracy": counts[i][i] / support if support else None, "support": support}
    return {
        "labels": classes,
        "accuracy": sum(counts[i][i] for i in range(len(classes))) / len(pairs),
        "per_class": per_class,
        "confusion_matrix": {"rows": classes, "columns": [*classes, OTHER], "counts": counts},
    }


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
