"""Defaults derived from the dataset ("auto"), truncation told on the job, the completion-only loss, and the
published version being the best evaluated step (functions/auto_config.py, completion_loss.py, train.py)."""

from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from conftest import TINY_MODEL, Platform
from finetune_helpers import SENTIMENT, ready_dataset, refusal, train
from functions import auto_config
from functions.base_models import load_model
from functions.completion_loss import CHUNK_POSITIONS, completion_loss
from functions.evaluate import EvalResult
from functions.finetune_config import FinetuneConfig
from functions.prompts import IGNORE_INDEX

SENTIMENT_TRAIN = [row for row in SENTIMENT if "split" not in row]  # no evaluation split


def config(**fields: Any) -> FinetuneConfig:
    """A config for the bundled 135M model (the rules read only its catalog entry: no weights are loaded)."""
    return FinetuneConfig.model_validate({"base_model": "smollm2-135m", "dataset": "d", "repo": "r"} | fields)


def profile(rows: int, prompt: int = 20, completion: int = 3, evaluation_rows: int = 0) -> auto_config.Profile:
    return auto_config.Profile([(prompt, completion)] * rows, evaluation_rows, classification=False)


# ---- the rules -------------------------------------------------------------------------------------------


def test_auto_values_follow_the_dataset() -> None:
    small = auto_config.resolve(config(), profile(400, prompt=50, completion=3))
    # 400 rows, 40 held out for evaluation: 45 steps of 8 an epoch, 5 epochs for about 225 steps.
    assert small.auto == {
        "task": "completion",
        "max_seq_length": 64,
        "effective_batch_size": 8,
        "epochs": 5,
        "learning_rate": 1e-3,
        "eval_steps": 45,
    }
    assert small.config.values().epochs == 5 and small.warnings == []
    # A classification dataset: batches of 4, one epoch of 90 steps for about 100.
    labels = auto_config.Profile([(50, 1)] * 400, 0, classification=True)
    assert {k: auto_config.resolve(config(), labels).auto[k] for k in ("effective_batch_size", "epochs")} == {
        "effective_batch_size": 4,
        "epochs": 1,
    }
    # Rows of 400 tokens: 5 epochs would train on 720k tokens; TARGET_TOKENS (150k) makes it 1 (144k an epoch).
    long_rows = auto_config.resolve(config(), profile(400, prompt=397, completion=3))
    assert (long_rows.auto["epochs"], long_rows.auto["eval_steps"]) == (1, 9)
    large = auto_config.resolve(config(), profile(20_000, prompt=100, completion=2100))
    assert large.auto["effective_batch_size"] == 16 and large.auto["epochs"] == 1
    assert large.auto["max_seq_length"] == 2048  # the cap: rows of 2,200 tokens are cut, and the job is told so
    assert large.truncation.rows_cut == 20_000 and large.truncation.completion_tokens_lost == 20_000 * 152
    assert "20000 of 20000 training rows are cut" in large.warnings[0]
    # What the user set is kept; full fine-tuning takes a learning rate 20x below LoRA's.
    mine = auto_config.resolve(config(epochs=3, learning_rate=3e-4), profile(400))
    assert (mine.config.epochs, mine.config.learning_rate) == (3, 3e-4) and "epochs" not in mine.auto
    assert auto_config.resolve(config(adapter="none"), profile(400)).auto["learning_rate"] == pytest.approx(5e-5)
    # train_steps decides the job's length; evaluations are spread over it.
    steps = auto_config.resolve(config(train_steps=50), profile(400))
    assert "epochs" not in steps.auto and steps.auto["eval_steps"] == 10


def test_truncation_counts_what_it_cuts_and_refuses_past_its_share() -> None:
    rows = [(10, 5)] * 8 + [(30, 10), (60, 10)]  # (prompt, completion) tokens
    cut = auto_config.Truncation.of(rows, 35)
    assert (cut.rows_cut, cut.rows_dropped, cut.completion_tokens, cut.completion_tokens_lost) == (2, 1, 60, 15)
    assert cut.tokens == 8 * 15 + 35  # the dropped row trains on nothing
    assert cut.lost_share == pytest.approx(0.25)
    assert "max_seq_length: 35 tokens would cut 2 of 10 training rows" in (cut.refusal() or "")
    assert auto_config.Truncation.of(rows, 70).refusal() is None


def test_tiny_datasets_explain_their_defaults() -> None:
    resolved = auto_config.resolve(config(), profile(6))
    [warning] = resolved.warnings
    assert "6 rows are too few to hold out an evaluation split" in warning
    assert "publishes its last step" in warning


# ---- through the API -------------------------------------------------------------------------------------


def test_a_job_records_the_values_it_used_and_what_truncation_cost(client: TestClient, alice: dict[str, str]) -> None:
    ready_dataset(client, alice, SENTIMENT_TRAIN, "sentiment")
    job = train(client, alice, dataset="sentiment", repo="auto", train_steps=2)
    summary = job["summary"]
    assert set(summary["auto"]) == {"task", "max_seq_length", "effective_batch_size", "learning_rate", "eval_steps"}
    for name, value in summary["auto"].items():
        assert job["config"][name] == value  # the job's config holds the values it trained with, not "auto"
    assert summary["truncation"]["rows_cut"] == 0 and summary["truncation"]["rows"] == 6
    assert "too few to hold out" in summary["warnings"][0]  # 6 rows, no evaluation split
    assert summary["kept"] == {"step": 2, "metric": None}  # nothing evaluated: the last step is published

    # A max_seq_length that would cut the labels off most rows is refused before any compute, naming it.
    error = refusal(client, alice, dataset="sentiment", repo="cut", max_seq_length=16)
    assert error["param"] == "max_seq_length"
    assert "would cut 6 of 6 training rows" in error["message"]


# ---- the loss --------------------------------------------------------------------------------------------


def test_the_completion_loss_matches_the_full_logits_loss_and_its_gradients(sqlite_platform: Platform) -> None:
    torch.manual_seed(0)
    model = load_model(TINY_MODEL, "float32")
    ids = torch.randint(5, 100, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 6:] = ids[0, 6:]
    labels[1, 4:9] = ids[1, 4:9]

    full = model(input_ids=ids, attention_mask=mask, labels=labels).loss  # transformers' mean over label tokens
    full.backward()
    expected = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()

    result = completion_loss(model, ids, mask, labels, first_logits=True)
    (result.loss_sum / result.count).backward()
    assert result.count == 11 and float(result.loss_sum / result.count) == pytest.approx(float(full), rel=1e-5)
    got = [p.grad for p in model.parameters() if p.grad is not None]
    assert max(float((a - b).abs().max()) for a, b in zip(got, expected, strict=True)) < 1e-5
    logits = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(result.first_logits, torch.stack([logits[0, 5], logits[1, 3]]), atol=1e-5)
    assert CHUNK_POSITIONS >= 256  # chunks hold many positions: the loop is short on real rows


# ---- the version kept ------------------------------------------------------------------------------------


class _SavedStep:
    """The Trainer side of the kept weights: save() writes which step's weights these are."""

    def __init__(self) -> None:
        self.step = 0

    def save(self, target: Path) -> None:
        target.mkdir(parents=True)
        (target / "step").write_text(str(self.step))


def _accuracy(value: float, loss: float) -> EvalResult:
    report = {"accuracy": value}
    return EvalResult(loss, 1.0, 0.5, value, 0.0, 40, classification=report)


def test_the_best_evaluated_step_is_kept_not_the_last(tmp_path: Path) -> None:
    from functions.train_progress import Progress

    progress = Progress.__new__(Progress)  # the selection alone: no job, database or model behind it
    saved = _SavedStep()
    progress.run, progress.kept_dir, progress.labels = saved, tmp_path / "kept", {"a": [1], "b": [2]}
    progress.config = config(early_stopping_patience=2)
    progress.evals, progress.best, progress.kept, progress.kept_step = [], None, None, None
    progress.evals_without_improvement = 0
    stops = []
    # Accuracy climbs, then falls while the loss keeps falling: the step of the best accuracy is kept, and two
    # evaluations without a better one end training.
    for step, (accuracy, loss) in enumerate([(0.5, 2.0), (0.6, 1.0), (0.9, 0.8), (0.7, 0.5), (0.8, 0.4)]):
        saved.step = step
        stops.append(progress._track(step, _accuracy(accuracy, loss)))
    assert progress.kept_step == 2 and (progress.kept_dir / "step").read_text() == "2"
    assert stops == [False, False, False, False, True]
    # Equal accuracy: the lower loss wins; so it does one row of 40 apart, which the evaluation cannot tell from
    # noise (the spam job that kept 39 of 40 at loss 0.135 over 38 of 40 at 0.065 scored 0.915 held out).
    assert Progress.better(_accuracy(0.9, 0.7), _accuracy(0.9, 0.8))
    assert Progress.better(_accuracy(0.95, 0.065), _accuracy(0.975, 0.135))
    assert not Progress.better(_accuracy(0.975, 0.135), _accuracy(0.95, 0.065))
    # Two rows apart near 95% is more than one standard error (1.4 rows): the accuracy decides.
    assert not Progress.better(_accuracy(0.925, 0.05), _accuracy(0.975, 0.135))


def test_only_long_rows_recompute_activations_and_training_is_the_same(
    sqlite_platform: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers.modeling_layers import GradientCheckpointingLayer

    from app.settings import get_settings
    from functions import trainer
    from functions.precision import use_bf16
    from functions.prompts import Tokenized, pad_multiple, padded_length

    ids = list(range(5, 45))
    rows = [
        Tokenized(ids, [IGNORE_INDEX] * 30 + ids[30:], len(ids)),
        Tokenized(ids[:12], [IGNORE_INDEX] * 8 + ids[8:12], 12),
    ]
    tiny = FinetuneConfig.model_validate(
        {"base_model": TINY_MODEL, "dataset": "d", "repo": "r", "train_steps": 2, "effective_batch_size": 2}
        | {"learning_rate": 1e-2, "max_seq_length": 64, "eval_steps": None, "task": "completion", "lora_dropout": 0.0}
    )

    def trained(row_tokens: int) -> tuple[int, set[tuple[int, bool]], list[torch.Tensor]]:
        monkeypatch.setattr(trainer, "CPU_ROW_TOKENS", row_tokens)
        run = trainer.build_trainer(tiny, rows, tmp_path / str(row_tokens))
        micro = run.trainer.args.per_device_train_batch_size
        seen: set[tuple[int, bool]] = set()  # (row tokens, recomputed) at each training forward of a decoder layer

        def note(layer: Any, args: tuple, kwargs: dict) -> None:
            if layer.training:
                hidden = args[0] if args else kwargs["hidden_states"]  # [batch, seq, hidden]
                seen.add((hidden.shape[1], layer.gradient_checkpointing))

        for layer in run.trainer.model.modules():
            if isinstance(layer, GradientCheckpointingLayer):
                layer.register_forward_pre_hook(note, with_kwargs=True)
        run.trainer.train()
        return micro, seen, [p.detach().clone() for n, p in run.trainer.model.named_parameters() if "lora_" in n]

    # 40- and 12-token rows, one a pass (in bf16 padded to 64 and 32 tokens: PAD_MULTIPLE): activations kept.
    single, kept, plain = trained(512)
    # Past 32 tokens, the 40-token row's activations are recomputed in the backward pass; the other's kept.
    also_single, mixed, again = trained(32)
    multiple = pad_multiple(use_bf16(get_settings().training.train_precision))
    long, short = padded_length(40, multiple), padded_length(12, multiple)
    assert (single, kept) == (1, {(long, False), (short, False)})
    assert (also_single, mixed) == (1, {(long, True), (short, False)})
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(plain, again, strict=True))
