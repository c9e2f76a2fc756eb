"""Evaluation of a causal LM on held-out examples: the metrics users read on a fine-tuning job.

- loss, perplexity and token accuracy: one teacher-forced pass over each example, on completion tokens only;
- sequence accuracy and character error rate: the greedy answer to each prompt against the reference
  completion (rows without a prompt, as in continued pretraining, have no answer to compare and are skipped); in a
  conversation that learns several turns, the last learned turn is the answer, everything before it the prompt;
- for a classification dataset (functions/datasets.detect_labels), the answer is one of the labels, chosen as
  constrained decoding chooses it at inference, with accuracy per class and the confusion matrix.
"""

import math
from dataclasses import dataclass
from typing import Any

from functions.prompts import IGNORE_INDEX, Tokenized, pad_multiple, padded_length

GENERATION_ROWS = 32  # greedy answers are the slow part: compare at most this many rows
CLASSIFICATION_ROWS = 256  # a label is a few tokens, so a classification evaluation answers many more rows
MAX_ANSWER_TOKENS = 128
OTHER = "(other)"  # the confusion matrix column of answers that are none of the labels


@dataclass(frozen=True)
class EvalResult:
    loss: float
    perplexity: float | None  # None for preference tuning (functions/dpo.py), whose loss is not per token
    token_accuracy: float | None
    sequence_accuracy: float | None  # None when no row has a prompt
    char_error_rate: float | None
    rows: int
    classification: dict | None = None  # classification_report(), for classification datasets
    # Preference tuning: mean implicit rewards, their margin, the share of rows where chosen wins (functions/dpo.py)
    chosen_reward: float | None = None
    rejected_reward: float | None = None
    reward_margin: float | None = None
    reward_accuracy: float | None = None
    # Reinforcement fine-tuning (method "grpo"): the held-out prompts' mean reward and its spread, their greedy
    # completions' mean length in tokens, each reward's mean/spread/failures, sample completions (functions/grpo.py)
    reward: float | None = None
    reward_std: float | None = None
    kl: float | None = None
    completion_length: float | None = None
    rewards: dict | None = None
    samples: list | None = None


def evaluate(
    model: Any,
    tokenizer: Any,
    examples: list[Tokenized],
    batch_size: int = 8,
    bf16: bool = False,
    labels: dict[str, list[int]] | None = None,
) -> EvalResult:
    """`labels`: a classification dataset's labels with each one's completion token ids (as training sees them);
    its rows are answered as inference answers them, from the labels only (constrained decoding), and the result
    gets `classification`."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device.type
    multiple = pad_multiple(bf16)
    try:
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            if labels:
                loss, token_accuracy, answers = _classified(model, tokenizer, examples, labels, batch_size, multiple)
            else:
                loss, token_accuracy, _ = _teacher_forced(model, tokenizer, examples, batch_size, multiple)
                answers = _greedy_answers(model, tokenizer, examples[:GENERATION_ROWS], batch_size)
    finally:
        model.train(was_training)
    sequence_accuracy = cer = report = None
    if answers:
        sequence_accuracy = sum(pred.strip() == ref.strip() for pred, ref in answers) / len(answers)
        cer = sum(char_error_rate(pred.strip(), ref.strip()) for pred, ref in answers) / len(answers)
        if labels:
            report = classification_report(answers, list(labels))
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


def _teacher_forced(
    model: Any,
    tokenizer: Any,
    examples: list[Tokenized],
    batch_size: int,
    multiple: int | None,
    first_logits: bool = False,
) -> tuple[float, float, list[Any]]:
    """(loss per completion token, token accuracy, and with `first_logits` each row's logits [vocab] at its first
    completion token) over `examples`."""
    import torch

    from functions.completion_loss import completion_loss

    device = next(model.parameters()).device
    total_loss, correct, counted = 0.0, 0, 0
    # Batches of similar lengths pad less (spam's 40 evaluation rows: 150 to 800 tokens); firsts go back in order.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    firsts: list[Any] = [None] * len(examples)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids, mask, labels = _batch(tokenizer, [examples[i] for i in rows], multiple)
        result = completion_loss(model, ids.to(device), mask.to(device), labels.to(device), first_logits)
        total_loss += float(result.loss_sum)
        correct += result.correct
        counted += result.count
        if result.first_logits is not None:
            for i, logits in zip(rows, torch.unbind(result.first_logits.cpu()), strict=True):
                firsts[i] = logits
    return total_loss / max(counted, 1), correct / max(counted, 1), firsts if first_logits else []


def _batch(tokenizer: Any, batch: list[Tokenized], multiple: int | None) -> tuple[Any, Any, Any]:
    """input_ids, attention_mask, labels: [batch, seq], right-padded to a multiple of `multiple` tokens."""
    import torch

    width = padded_length(max(len(e.input_ids) for e in batch), multiple)
    ids = torch.full((len(batch), width), tokenizer.pad_token_id)
    labels = torch.full((len(batch), width), IGNORE_INDEX)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.input_ids)] = 1
    return ids, mask, labels


def _classified(
    model: Any,
    tokenizer: Any,
    examples: list[Tokenized],
    labels: dict[str, list[int]],
    batch_size: int,
    multiple: int | None,
) -> tuple[float, float, list[tuple[str, str]]]:
    """Loss and token accuracy on the reference completions, and (answer, reference) with the answer chosen among
    the labels, as constrained decoding chooses at inference. When the labels' first tokens differ, the answer is
    the label whose first token the model rates highest: one teacher-forced pass answers every row. Otherwise each
    label's whole completion is scored (its summed log-probability) on up to CLASSIFICATION_ROWS rows."""
    import torch

    firsts = {ids[0] for ids in labels.values()}
    distinct = len(firsts) == len(labels)
    loss, token_accuracy, first_logits = _teacher_forced(
        model, tokenizer, examples, batch_size, multiple, first_logits=distinct
    )
    prompted = [e for e in examples if e.labels and e.labels[0] == IGNORE_INDEX]
    references = [tokenizer.decode(e.input_ids[_prompt_length(e) :], skip_special_tokens=True) for e in prompted]
    if distinct:
        names = list(labels)
        first_ids = torch.tensor([labels[name][0] for name in names])
        rows = [logits for e, logits in zip(examples, first_logits, strict=True) if e.labels[0] == IGNORE_INDEX]
        answers = [names[int(logits[first_ids].argmax())] for logits in rows]
        return loss, token_accuracy, list(zip(answers, references, strict=True))
    prompted, references = prompted[:CLASSIFICATION_ROWS], references[:CLASSIFICATION_ROWS]
    scores = {name: _completion_scores(model, tokenizer, prompted, ids, multiple) for name, ids in labels.items()}
    answers = [max(scores, key=lambda name: scores[name][i]) for i in range(len(prompted))]
    return loss, token_accuracy, list(zip(answers, references, strict=True))


def _completion_scores(
    model: Any, tokenizer: Any, examples: list[Tokenized], completion: list[int], multiple: int | None
) -> list[float]:
    """Each example's prompt followed by `completion`: the completion's summed log-probability."""
    from functions.completion_loss import completion_loss

    device = next(model.parameters()).device
    scores: list[float] = []
    for example in examples:  # one row at a time: the summed loss of a batch cannot be split per row
        prompt = example.input_ids[: _prompt_length(example)]
        row = Tokenized(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion, len(prompt) + len(completion))
        ids, mask, labels = _batch(tokenizer, [row], multiple)
        scores.append(-float(completion_loss(model, ids.to(device), mask.to(device), labels.to(device)).loss_sum))
    return scores


def _greedy_answers(model: Any, tokenizer: Any, examples: list[Tokenized], batch_size: int) -> list[tuple[str, str]]:
    """(greedy answer, reference) for each example that has a prompt."""
    import torch

    device = next(model.parameters()).device
    pairs = []
    prompted = [e for e in examples if e.labels and e.labels[0] == IGNORE_INDEX]
    for start in range(0, len(prompted), batch_size):
        batch = prompted[start : start + batch_size]
        spans = [_last_answer(e) for e in batch]
        prompts = [e.input_ids[:start] for e, (start, _) in zip(batch, spans, strict=True)]
        references = [e.input_ids[start:end] for e, (start, end) in zip(batch, spans, strict=True)]
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


def _last_answer(example: Tokenized) -> tuple[int, int]:
    """[start, end) of the example's last run of learned tokens: its completion, or a conversation's last learned
    turn (one that learns several is answered at its last, given the turns before it)."""
    learned = [label != IGNORE_INDEX for label in example.labels]
    end = len(learned) - learned[::-1].index(True) if True in learned else len(learned)
    start = end
    while start > 0 and learned[start - 1]:
        start -= 1
    return start, end


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
