"""Preference tuning (method "dpo"): TRL's DPOTrainer over a LoRA adapter, and its evaluation.

The rows come tokenized by functions/preference.py (as SFT rows are: the same chat template, ends of turn and
special-token safety), so TRL's own dataset preparation is skipped and its collator pads them. The reference model
is the policy with the adapter off (TRL computes its log-probabilities under `disable_adapter()`), so no second copy
of the weights is held; continuing from a version, TRL copies that adapter (a few MB) as the frozen reference.

Evaluation runs DPOTrainer's own loss over the evaluation pairs, one pair a pass on a CPU (so its means are over
rows, not over batch means): the DPO loss, the chosen and rejected implicit rewards (beta x the log-probability
ratio to the reference), their margin, and the share of pairs whose chosen answer out-rewards the rejected one.
Before training the adapter is zero, the rewards are 0 and the loss is ln 2 (0.693).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from functions.base_models import load_model, load_tokenizer
from functions.evaluate import EvalResult
from functions.finetune_config import FinetuneConfig
from functions.preference import PreferencePair
from functions.prompts import pad_multiple
from functions.trainer import MICRO_BATCH, TrainingRun, new_lora, prepare_run, steps_per_epoch, training_arguments

# TRL's metric names -> our metrics rows' columns (app/models.py JobMetric)
REWARD_METRICS = {
    "rewards/chosen": "chosen_reward",
    "rewards/rejected": "rejected_reward",
    "rewards/margins": "reward_margin",
    "rewards/accuracies": "reward_accuracy",
}


@dataclass
class PreferenceRun(TrainingRun):
    def save(self, target: Path) -> None:
        """The trained adapter only: a continued run's reference copy ("ref") is not part of the version."""
        self.trainer.model.save_pretrained(target, selected_adapters=["default"])


def build_dpo_trainer(
    config: FinetuneConfig,
    pairs: list[PreferencePair],
    workdir: Path,
    precision: str | None = None,
    init_from: Path | None = None,
    checkpoints: bool = False,
) -> PreferenceRun:
    """A DPOTrainer for `pairs`; raises BaseModelUnavailable when the weights cannot be had."""
    import torch
    from datasets import Dataset  # type: ignore[import-untyped]
    from peft import LoraConfig, PeftModel
    from transformers import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
            return dataset  # tokenized by functions/preference.py

    bf16 = prepare_run(config, precision)
    tokenizer = load_tokenizer(config.base_model)
    model = load_model(config.base_model, "bfloat16" if bf16 else "float32")
    peft_config = None
    if init_from is not None:  # the saved adapter's shape carries over; it is also the reference
        saved = LoraConfig.from_pretrained(str(init_from))
        saved.lora_dropout = config.lora_dropout
        model = PeftModel.from_pretrained(model, init_from, config=saved, is_trainable=True)
    else:
        peft_config = new_lora(config, "CAUSAL_LM")
    cuda = torch.cuda.is_available()
    args = training_arguments(
        config,
        workdir,
        bf16,
        checkpoints,
        arguments=DPOConfig,
        beta=config.dpo_beta,
        max_length=config.values().max_seq_length,
        pad_to_multiple_of=pad_multiple(bf16),
        per_device_eval_batch_size=MICRO_BATCH if cuda else 1,
        train_sampling_strategy="random",  # the pairs have no "input_ids" to group by length
        **_no_recompute(DPOConfig),  # TRL's default recomputes activations; a pair of short rows keeps them
        disable_dropout=False,  # lora_dropout is the user's (0 by default); the frozen base model has none
        precompute_ref_log_probs=False,
        dataset_num_proc=None,
    )
    trainer = PretokenizedDPOTrainer(
        model=model,
        ref_model=None,
        args=args,
        train_dataset=Dataset.from_list([pair.feature() for pair in pairs]),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.remove_callback(PrinterCallback)  # metrics go to the database, not stdout
    return PreferenceRun(trainer, tokenizer, steps_per_epoch(args, len(pairs)), bf16, config.kind)


def _no_recompute(arguments: type) -> dict[str, Any]:
    """Activations kept, not recomputed, under the option's name of this transformers (renamed in 5.2x)."""
    if "activation_checkpointing" in getattr(arguments, "__dataclass_fields__", {}):
        return {"activation_checkpointing": False, "gradient_checkpointing": None}  # the old name: an unset alias
    return {"gradient_checkpointing": False}


def evaluate_pairs(trainer: Any, pairs: list[PreferencePair]) -> EvalResult:
    """DPOTrainer's loss and rewards over `pairs` (its evaluation loop, with the adapter as it is now)."""
    from datasets import Dataset

    training = trainer.model.training
    metrics = trainer.evaluate(Dataset.from_list([pair.feature() for pair in pairs]))
    if training:  # evaluated mid-step: TRL reads the mode when it logs the step's training metrics next
        trainer.model.train()
    rewards = {ours: float(metrics[f"eval_{theirs}"]) for theirs, ours in REWARD_METRICS.items()}
    return EvalResult(
        loss=float(metrics["eval_loss"]),
        perplexity=None,
        token_accuracy=None,
        sequence_accuracy=None,
        char_error_rate=None,
        rows=len(pairs),
        chosen_reward=rewards["chosen_reward"],
        rejected_reward=rewards["rejected_reward"],
        reward_margin=rewards["reward_margin"],
        reward_accuracy=rewards["reward_accuracy"],
    )
