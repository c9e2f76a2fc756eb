"""The classification-head technique (task "classification", Predibase's category output): the base model with a
LoRA on its linear layers reads the prompt as an encoder, and a head over the final hidden state of the prompt's
last token (the chat template's assistant header ends it, as at inference) picks one of the labels, trained with
cross-entropy over the label set. Free of jobs and databases, like functions/trainer.py, whose run set-up it shares.

Model: transformers' AutoModelForSequenceClassification on the base model's weights (its `score` [labels, hidden]
reads the last position that is not padding, so batches are right-padded), wrapped in a PEFT LoRA of task SEQ_CLS,
which trains `score` in full (modules_to_save) beside the LoRA. The head starts as the LM's own output embedding rows
of each label's first completion token: at step 0 its logits are the LM's logits at those tokens, so it predicts
what constrained decoding would. Those first tokens must differ between labels (ValueError otherwise).

A version's files (`ClassifierRun.save`, the kept step, and every Trainer checkpoint, hence every `repo/N@k`) are
the servable layout, any LoRA version's plus the head:

    adapter_config.json          task_type CAUSAL_LM, no modules_to_save (what adapter_check and the engines serve)
    adapter_model.safetensors    base_model.model.model.layers.N.(self_attn|mlp).X.lora_A/B.weight
    classifier_head.safetensors  weight [labels, hidden] fp32, token_ids [labels] int64 (each label's first token)
    classifier_head.json         {"labels": [...], "token_ids": [...]} in the head's row order

The native engine applies the head at a request's first token (functions/engine/heads.py), so with the labels as
choices the answer is the head's argmax and the first token's logprobs its log-softmax; vLLM refuses such an adapter.
"""

import copy
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from functions.adapter_check import HEAD_FILE, HEAD_LABELS_FILE, LORA_KEY, WEIGHTS_FILE
from functions.base_models import ensure_local, load_tokenizer
from functions.evaluate import EvalResult, char_error_rate, classification_report
from functions.finetune_config import FinetuneConfig
from functions.prompts import IGNORE_INDEX, Tokenized, encode_text, pad_multiple, padded_length
from functions.trainer import (
    TrainingRun,
    new_lora,
    prepare_run,
    recompute_long_rows,
    steps_per_epoch,
    training_arguments,
)

SCORE_KEY = "base_model.model.score.weight"  # the head in PEFT's SEQ_CLS state dict (modules_to_save)


@dataclass
class ClassifierRun(TrainingRun):
    """A classification-head run: `save` writes the servable layout above."""

    kind: str = "classification"

    def save(self, target: Path) -> None:
        self.trainer.save_version(target)


@dataclass(frozen=True)
class _Row:
    prompt: list[int]  # the prompt's ids, ending with the assistant header
    target: int | None  # the label's index; None for an evaluation row whose answer is none of the labels
    reference: str  # the reference completion as text, stripped


def build_classifier(
    config: FinetuneConfig,
    examples: list[Tokenized],
    labels: dict[str, list[int]],
    workdir: Path,
    init_from: Path | None = None,
    checkpoints: bool = False,
    precision: str | None = None,
) -> ClassifierRun:
    """A Trainer of the classification head and its LoRA over `examples` (train.py's rows: prompt, then the label's
    completion), with build_trainer's contract. `labels`: each label's completion token ids, in the head's row
    order. `init_from`: a version or checkpoint to start from (its LoRA; its head rows where they score the same
    tokens). Raises ValueError for labels whose first tokens are not distinct (or not the first tokens serving's
    choices begin with), training rows whose completion is none of the labels, or a full fine-tuning config;
    BaseModelUnavailable when the weights cannot be had."""
    from transformers import PrinterCallback, Trainer

    if config.kind != "lora":
        raise ValueError("task 'classification' trains a LoRA adapter with a classification head; use adapter 'lora'")
    token_ids = head_tokens(labels)
    bf16 = prepare_run(config, precision)
    tokenizer = load_tokenizer(config.base_model)
    served = {label: encode_text(tokenizer, label)[:1] for label in labels}  # a choice's first token at inference
    mismatch = [label for label, first in zip(labels, token_ids, strict=True) if served[label] != [first]]
    if mismatch:
        raise ValueError(f"label {mismatch[0]!r} begins with another token in training than in serving's choices")
    rows = _rows(tokenizer, examples, labels)
    unknown = [row.reference for row in rows if row.target is None]
    if unknown or not rows:
        problem = f"completion {unknown[0]!r} is none of the labels" if unknown else "rows have no prompt"
        raise ValueError(f"task 'classification': training {problem} ({list(labels)})")
    model = _classifier_model(config, bf16, init_from, token_ids, tokenizer.pad_token_id)
    args = training_arguments(config, workdir, bf16, checkpoints, max(len(row.prompt) for row in rows))
    features = [{"input_ids": row.prompt, "label_index": row.target} for row in rows]
    trainer = _classifier_trainer(Trainer)(
        model=model,
        args=args,
        train_dataset=features,
        data_collator=_Collator(tokenizer.pad_token_id, pad_multiple(bf16)),
    )
    trainer.head_labels, trainer.head_tokens = list(labels), token_ids
    trainer.remove_callback(PrinterCallback)  # metrics go to the database, not stdout
    return ClassifierRun(trainer, tokenizer, steps_per_epoch(args, len(features)), bf16)


def head_tokens(labels: dict[str, list[int]]) -> list[int]:
    """Each label's first completion token, in order; ValueError unless they are distinct (the head scores a label
    at its first token, where serving reads it)."""
    if len(labels) < 2:
        raise ValueError(f"a classification head needs at least two labels, got {list(labels)}")
    seen: dict[int, str] = {}
    for label, ids in labels.items():
        if not ids:
            raise ValueError(f"label {label!r} has no completion tokens")
        if ids[0] in seen:
            raise ValueError(
                f"task 'classification': labels {seen[ids[0]]!r} and {label!r} begin with the same token "
                f"(id {ids[0]}), and a classification head tells labels apart by their first token; use task "
                "'completion', or labels that differ in their first token"
            )
        seen[ids[0]] = label
    return list(seen)


def evaluate_classifier(
    model: Any,
    tokenizer: Any,
    examples: list[Tokenized],
    labels: dict[str, list[int]],
    batch_size: int = 8,
    bf16: bool = False,
) -> EvalResult:
    """The head's answers on `examples` (those with a prompt): loss = mean cross-entropy over the rows whose reference
    is a label, sequence and token accuracy = accuracy, character error rate between answer and reference label,
    and `classification` (functions/evaluate.classification_report)."""
    import torch
    import torch.nn.functional as F

    names = list(labels)
    head_tokens(labels)
    rows = _rows(tokenizer, examples, labels)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum, counted = 0.0, 0
    answers: list[tuple[str, str]] = []
    collate = _Collator(tokenizer.pad_token_id, pad_multiple(bf16))
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            for start in range(0, len(rows), batch_size):
                batch = rows[start : start + batch_size]
                inputs = collate([{"input_ids": row.prompt, "label_index": row.target or 0} for row in batch])
                logits = model(
                    input_ids=inputs["input_ids"].to(device), attention_mask=inputs["attention_mask"].to(device)
                ).logits.float()  # [batch, labels]
                known = [i for i, row in enumerate(batch) if row.target is not None]
                if known:
                    targets = torch.tensor([batch[i].target for i in known], device=device)
                    loss_sum += float(F.cross_entropy(logits[known], targets, reduction="sum"))
                    counted += len(known)
                answers += [(names[int(i)], row.reference) for i, row in zip(logits.argmax(-1), batch, strict=True)]
    finally:
        model.train(was_training)
    loss = loss_sum / max(counted, 1)
    if not answers:
        return EvalResult(loss, math.exp(min(loss, 50.0)), 0.0, None, None, len(examples))
    accuracy = sum(answer == reference for answer, reference in answers) / len(answers)
    cer = sum(char_error_rate(answer, reference) for answer, reference in answers) / len(answers)
    report = classification_report(answers, names)
    return EvalResult(loss, math.exp(min(loss, 50.0)), accuracy, accuracy, cer, len(examples), report)


# ---- the model ---------------------------------------------------------------------------------------------


def _classifier_model(
    config: FinetuneConfig, bf16: bool, init_from: Path | None, token_ids: list[int], pad_token_id: int
) -> Any:
    """The base model as a sequence classifier with a new LoRA (or `init_from`'s), its head from the LM's rows."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base_dir = ensure_local(config.base_model)
    # Frozen base weights in bf16 where the hardware runs it (as build_trainer); the trained weights are fp32 below.
    model = AutoModelForSequenceClassification.from_pretrained(
        base_dir,
        num_labels=len(token_ids),
        pad_token_id=pad_token_id,
        dtype=torch.bfloat16 if bf16 else torch.float32,
    )
    with torch.no_grad():
        model.score.weight.copy_(_output_rows(base_dir, model, token_ids))
    # A continued version's shape (rank, alpha, modules, variants) carries over.
    lora = LoraConfig.from_pretrained(str(init_from)) if init_from is not None else new_lora(config, "SEQ_CLS")
    lora.task_type, lora.modules_to_save, lora.inference_mode = "SEQ_CLS", None, False  # SEQ_CLS trains `score`
    lora.lora_dropout = config.lora_dropout  # a training choice, not part of the weights
    peft_model = get_peft_model(model, lora)
    for param in peft_model.parameters():
        if param.requires_grad:  # the head's trained copy too: AdamW on bf16 weights would round its updates away
            param.data = param.data.float()
    if init_from is not None:
        _load_version(peft_model, init_from, token_ids)
    return peft_model


def _output_rows(base_dir: Path, model: Any, token_ids: list[int]) -> Any:
    """The LM head's rows [labels, hidden] of `token_ids`, fp32: the input embeddings where they are tied, else read
    from the base model's files (the sequence classifier does not load lm_head)."""
    import torch
    from safetensors import safe_open

    ids = torch.tensor(token_ids)
    if model.config.get_text_config().tie_word_embeddings:
        return model.get_input_embeddings().weight.detach()[ids].float()
    name = "lm_head.weight"
    index = base_dir / "model.safetensors.index.json"
    file = json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors"
    with safe_open(str(base_dir / file), framework="pt") as weights:
        rows = weights.get_slice(name)
        return torch.cat([rows[i : i + 1] for i in token_ids]).float()


def _classifier_trainer(trainer_class: type) -> type:
    """A Trainer whose loss is the head's cross-entropy, and whose checkpoints are the servable layout."""
    import torch.nn.functional as F

    class ClassifierTrainer(trainer_class):
        loss_is_scaled_for_ga = False  # a micro-batch's mean: the Trainer divides it by the accumulation steps
        head_labels: list[str]
        head_tokens: list[int]

        def compute_loss(
            self, model: Any, inputs: dict, return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            recompute_long_rows(self, inputs["input_ids"])
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            loss = F.cross_entropy(logits.float(), inputs["label_index"])  # logits: [batch, labels]
            return (loss, logits) if return_outputs else loss

        def save_version(self, target: Path) -> None:
            _save_version(self.model, target, self.head_labels, self.head_tokens)

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            """A checkpoint-<step>/ is a version's files (the optimizer and trainer state go beside them)."""
            self.save_version(Path(output_dir or self.args.output_dir))

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
            _load_version(model or self.model, Path(resume_from_checkpoint), self.head_tokens)

    return ClassifierTrainer


class _Collator:
    """input_ids and attention_mask [batch, seq], right-padded to a multiple of `multiple` (the head reads the
    last position that is not padding), and label_index [batch]."""

    def __init__(self, pad_token_id: int, multiple: int | None) -> None:
        self.pad_token_id, self.multiple = pad_token_id, multiple

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = padded_length(max(len(f["input_ids"]) for f in features), self.multiple)
        ids = torch.full((len(features), width), self.pad_token_id)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
            mask[i, : len(f["input_ids"])] = 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "label_index": torch.tensor([f["label_index"] for f in features]),
        }


def _rows(tokenizer: Any, examples: list[Tokenized], labels: dict[str, list[int]]) -> list[_Row]:
    """Each example with a prompt as the head reads it: its prompt, its label's index, its reference text. A completion
    cut short by max_seq_length still names its label when it begins that label's tokens."""
    names, completions = list(labels), list(labels.values())
    rows = []
    for example in examples:
        k = next((i for i, label in enumerate(example.labels) if label != IGNORE_INDEX), len(example.labels))
        if k == 0:
            continue  # no prompt to read (plain text rows); classification datasets have prompts
        prompt, completion = example.input_ids[:k], example.input_ids[k:]
        if prompt[-1] == tokenizer.pad_token_id:
            raise ValueError("a prompt ends with the padding token, where the head could not find its last token")
        reference = tokenizer.decode(completion, skip_special_tokens=True).strip()
        target = names.index(reference) if reference in names else None
        if target is None and completion:
            target = next((i for i, ids in enumerate(completions) if ids[: len(completion)] == completion), None)
        rows.append(_Row(prompt, target, reference))
    return rows


# ---- the version's files -----------------------------------------------------------------------------------


def _save_version(model: Any, target: Path, labels: Sequence[str], token_ids: list[int]) -> None:
    """Write the servable layout (module docstring) of a SEQ_CLS PEFT model into `target`."""
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = get_peft_model_state_dict(model)
    head = state.pop(SCORE_KEY)
    stray = [key for key in state if not LORA_KEY.match(key)]
    if stray:  # a PEFT whose layout changed: fail here, not in serving
        raise RuntimeError(f"unexpected weights in the classifier's state dict: {stray[:3]}")
    config = copy.deepcopy(model.peft_config["default"])
    config.task_type, config.modules_to_save, config.inference_mode = "CAUSAL_LM", None, True
    target.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(target))
    lora = {key: tensor.detach().cpu().contiguous() for key, tensor in state.items()}
    save_file(lora, str(target / WEIGHTS_FILE), metadata={"format": "pt"})
    save_file(
        {"weight": head.detach().float().cpu().contiguous(), "token_ids": torch.tensor(token_ids, dtype=torch.long)},
        str(target / HEAD_FILE),
        metadata={"format": "pt"},
    )
    (target / HEAD_LABELS_FILE).write_text(json.dumps({"labels": list(labels), "token_ids": token_ids}) + "\n")


def _load_version(model: Any, source: Path, token_ids: list[int]) -> None:
    """Load a version's (or checkpoint's) LoRA into a SEQ_CLS PEFT model, and its head's rows of `token_ids` when it
    has a head scoring all of them (else the head keeps its rows)."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(source / WEIGHTS_FILE))
    if (source / HEAD_FILE).exists():
        head = load_file(str(source / HEAD_FILE))
        saved = head["token_ids"].tolist()
        if set(token_ids) <= set(saved):
            state[SCORE_KEY] = head["weight"][torch.tensor([saved.index(t) for t in token_ids])]
    result: Any = set_peft_model_state_dict(model, state)  # torch's load result (PEFT types it loosely)
    if result.unexpected_keys:
        raise ValueError(f"{source.name}: weights this model does not have: {result.unexpected_keys[:3]}")
