"""The classification-head technique (task "classification", functions/classifier_head.py) on the tiny Llama: the head
starts as the LM's rows of the labels' first tokens; training lowers its cross-entropy; a version's and a checkpoint's
files are the servable LoRA layout plus the head; the native engine answers a request on it, with the labels as
choices, with the head's argmax and first-token log-softmax as plain transformers computes them, while the other rows
of its batch are unchanged; vLLM refuses such an adapter; bad heads and labels are refused."""

import asyncio
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY_MODEL, Platform, _make_platform
from functions.adapter_check import HEAD_FILE, HEAD_LABELS_FILE, LORA_KEY, WEIGHTS_FILE
from functions.base_models import load_tokenizer
from functions.classifier_head import build_classifier, evaluate_classifier, head_tokens
from functions.datasets import Example
from functions.engine.heads import read_head
from functions.engine.native import EngineConfig, NativeEngine
from functions.engine.protocol import AdapterRef, Completion, EngineError, GenerationRequest, SamplingParams, collect
from functions.evaluate import EvalResult
from functions.finetune_config import FinetuneConfig
from functions.prompts import Tokenized, encode_chat, example_ids, tokenize_example
from lora_helpers import build_lora

LABELS = ("positive", "negative", "mixed feelings")  # the last one is two tokens
ROWS = [
    ("I love this movie!", "positive"),
    ("The customer service was terrible.", "negative"),
    ("Parts were good, parts were dull.", "mixed feelings"),
    ("Best concert of my life.", "positive"),
    ("My order arrived broken.", "negative"),
    ("Not sure how I feel about it.", "mixed feelings"),
]
STEPS = 6


@dataclass
class Trained:
    before: EvalResult  # the untrained head on the training rows
    after: EvalResult  # after STEPS steps
    version: Path  # ClassifierRun.save's files
    checkpoint: Path  # the Trainer's checkpoint at the last step
    labels: dict[str, list[int]]
    examples: list[Tokenized]
    answers: list[str]  # the trained head's answer to each row, as evaluate_classifier gives it


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Platform]:
    """One platform for the module (the tiny model on its volume), so the trained version is shared. One torch
    thread: the tiny model's ops are too small to share, and on a busy 2-core machine two threads wait on each other
    (6 steps: 18 s with two, under 1 s with one, measured here). fp32 even where the CPU has native bf16 (which
    trains on bf16 base weights): these tests compare the head with the fp32 LM exactly; the bf16 path is trained
    through the API in test_train_full_and_classification.py."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORAPLEX_TRAIN_THREADS", "1")
        patch.setenv("LORAPLEX_TRAIN_PRECISION", "fp32")
        yield from _make_platform(tmp_path_factory.mktemp("classifier"), "sqlite", patch, tiny_model_dir)
    torch.set_num_threads(threads)


def config(**fields: Any) -> FinetuneConfig:
    values = {
        "base_model": TINY_MODEL,
        "dataset": "d",
        "repo": "r",
        "task": "classification",
        "learning_rate": 3e-3,
        "effective_batch_size": 3,
        "max_seq_length": 128,
        "eval_steps": None,
        "train_steps": STEPS,
        "warmup_ratio": 0.0,
        "lr_scheduler": "constant",
    }
    return FinetuneConfig.model_validate(values | fields)


def dataset(tokenizer: Any) -> tuple[list[Tokenized], dict[str, list[int]]]:
    """Rows and labels as functions/train.py makes them."""
    examples = [
        tokenize_example(Example(i, "train", prompt=prompt, completion=label), tokenizer, True, 128)
        for i, (prompt, label) in enumerate(ROWS)
    ]
    labels = {
        label: example_ids(Example(0, "train", prompt="", completion=label), tokenizer, True)[1] for label in LABELS
    }
    return examples, labels


@pytest.fixture(scope="module")
def trained(volume: Platform, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    tokenizer = load_tokenizer(TINY_MODEL)
    examples, labels = dataset(tokenizer)
    workdir = tmp_path_factory.mktemp("run")
    # LoRA dropout 0.05: the trajectory test_a_few_steps_lower_the_cross_entropy's thresholds were set on.
    run = build_classifier(
        config(checkpoint_every=STEPS, lora_dropout=0.05), examples, labels, workdir, checkpoints=True
    )
    before = evaluate_classifier(run.trainer.model, tokenizer, examples, labels)
    run.trainer.train()
    after = evaluate_classifier(run.trainer.model, tokenizer, examples, labels)
    run.save(workdir / "version")
    answers = [head_answer(run.trainer.model, e) for e in examples]
    checkpoint = workdir / "trainer" / f"checkpoint-{STEPS}"
    return Trained(before, after, workdir / "version", checkpoint, labels, examples, answers)


def prompt_of(example: Tokenized) -> list[int]:
    k = next(i for i, label in enumerate(example.labels) if label >= 0)
    return example.input_ids[:k]


def head_answer(model: Any, example: Tokenized) -> str:
    with torch.inference_mode():
        ids = torch.tensor([prompt_of(example)], device=next(model.parameters()).device)
        return LABELS[int(model(input_ids=ids).logits[0].argmax())]


# ---- training --------------------------------------------------------------------------------------------


def test_the_head_starts_as_the_lm_at_the_labels_first_tokens(volume: Platform, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(TINY_MODEL)
    examples, labels = dataset(tokenizer)
    run = build_classifier(config(), examples, labels, tmp_path)
    firsts = head_tokens(labels)
    assert firsts == [labels[label][0] for label in LABELS]
    lm = AutoModelForCausalLM.from_pretrained(volume.data_dir / "volume" / "base_models" / TINY_MODEL).eval()
    score = run.trainer.model.base_model.model.score.modules_to_save["default"].weight
    assert torch.equal(score.cpu(), lm.lm_head.weight[firsts])  # the LM's own rows (tied to the embeddings here)

    answers = []
    with torch.inference_mode():
        for example in examples:
            ids = torch.tensor([prompt_of(example)])
            lm_logits = lm(ids).logits[0, -1, firsts]  # the LM at its first completion token, over the labels
            head_logits = run.trainer.model(input_ids=ids.to(score.device)).logits[0].cpu()
            assert head_logits.tolist() == pytest.approx(lm_logits.tolist(), abs=1e-5)
            answers.append(LABELS[int(lm_logits.argmax())])  # what constrained decoding's first token picks
    # evaluate_classifier answers the same, batched (right-padded), against each row's label
    result = evaluate_classifier(run.trainer.model, tokenizer, examples, labels, batch_size=4)
    right = sum(answer == label for answer, (_, label) in zip(answers, ROWS, strict=True))
    assert result.sequence_accuracy == pytest.approx(right / len(ROWS))
    report = result.classification
    assert report is not None and report["labels"] == list(LABELS) and result.rows == len(ROWS)
    for label in LABELS:
        answered = [a for a, (_, ref) in zip(answers, ROWS, strict=True) if ref == label]
        assert report["per_class"][label]["accuracy"] == pytest.approx(answered.count(label) / len(answered))


def test_a_few_steps_lower_the_cross_entropy(trained: Trained) -> None:
    before, after = trained.before, trained.after
    assert after.loss < before.loss - 0.1, (before.loss, after.loss)
    assert after.classification is not None and after.sequence_accuracy is not None
    assert after.sequence_accuracy == after.token_accuracy == after.classification["accuracy"] >= 2 / 3
    assert before.sequence_accuracy is not None and after.sequence_accuracy > before.sequence_accuracy
    assert after.char_error_rate is not None and before.char_error_rate is not None
    assert after.char_error_rate < before.char_error_rate


def test_a_version_and_a_checkpoint_are_a_servable_lora_plus_the_head(trained: Trained) -> None:
    for root in (trained.version, trained.checkpoint):
        assert {WEIGHTS_FILE, "adapter_config.json", HEAD_FILE, HEAD_LABELS_FILE} <= {p.name for p in root.iterdir()}
        adapter = json.loads((root / "adapter_config.json").read_text())
        assert adapter["task_type"] == "CAUSAL_LM" and not adapter["modules_to_save"]
        assert all(LORA_KEY.match(key) for key in load_file(root / WEIGHTS_FILE))
        head = load_file(root / HEAD_FILE)
        assert head["weight"].shape == (3, 64) and head["token_ids"].tolist() == head_tokens(trained.labels)
        assert json.loads((root / HEAD_LABELS_FILE).read_text()) == {
            "labels": list(LABELS),
            "token_ids": head_tokens(trained.labels),
        }
    # the checkpoint is the last step's weights: the version's
    assert load_file(trained.checkpoint / HEAD_FILE)["weight"].equal(load_file(trained.version / HEAD_FILE)["weight"])


def test_a_run_resumes_from_its_checkpoint_and_continues_from_a_version(trained: Trained, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(TINY_MODEL)
    resumed = build_classifier(config(), trained.examples, trained.labels, tmp_path / "a", checkpoints=True)
    resumed.trainer.train(resume_from_checkpoint=str(trained.checkpoint))  # at its last step already: loads, no step
    again = evaluate_classifier(resumed.trainer.model, tokenizer, trained.examples, trained.labels)
    assert again.loss == pytest.approx(trained.after.loss, abs=1e-5)
    continued = build_classifier(config(), trained.examples, trained.labels, tmp_path / "b", init_from=trained.version)
    start = evaluate_classifier(continued.trainer.model, tokenizer, trained.examples, trained.labels)
    assert start.loss == pytest.approx(trained.after.loss, abs=1e-5)


def test_labels_a_head_cannot_tell_apart_and_full_fine_tuning_are_refused(volume: Platform, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'mixed' and 'mixed feelings' begin with the same token"):
        head_tokens({"mixed": [35781, 2], "mixed feelings": [35781, 4401, 2]})
    tokenizer = load_tokenizer(TINY_MODEL)
    examples, labels = dataset(tokenizer)
    with pytest.raises(ValueError, match="use adapter 'lora'"):
        build_classifier(config(adapter="none"), examples, labels, tmp_path)


def test_the_head_rows_come_from_an_untied_lm_head(tmp_path: Path, smollm_tokenizer_dir: Path) -> None:
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

    from functions.classifier_head import _output_rows

    torch.manual_seed(1)
    untied = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=300,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            tie_word_embeddings=False,
        )
    )
    untied.save_pretrained(tmp_path)
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=2, pad_token_id=0)
    rows = _output_rows(tmp_path, classifier, [7, 250])
    assert torch.equal(rows, untied.lm_head.weight[[7, 250]])
    assert not torch.equal(rows, untied.model.embed_tokens.weight[[7, 250]])


# ---- serving ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(volume: Platform) -> Iterator[NativeEngine]:
    engine_config = EngineConfig(dtype="fp32", adapter_slots=3, kv_cache_bytes=16 * 2**20, threads=1)
    engine = NativeEngine(TINY_MODEL, config=engine_config)
    yield engine
    engine.close()


def ask(engine: NativeEngine, prompt: tuple[int, ...], adapter: AdapterRef | None = None, **kw: Any) -> Any:
    params = SamplingParams(**({"max_new_tokens": 8, "temperature": 0.0, "logprobs": True, "top_logprobs": 5} | kw))
    return collect(engine.generate(GenerationRequest(prompt, params, adapter)))


def head_reference(version: Path, tiny: Path, prompt: tuple[int, ...]) -> torch.Tensor:
    """The head's log-softmax [labels] on `prompt`, by plain transformers + PEFT: the LoRA'd model's final hidden
    state at the prompt's last token, times the head's weight."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32), version).eval()
    with torch.inference_mode():
        hidden = model.base_model.model.model(input_ids=torch.tensor([prompt])).last_hidden_state[0, -1]
    return torch.log_softmax(hidden @ load_file(version / HEAD_FILE)["weight"].T, -1)


def test_the_native_engine_answers_with_the_head(
    trained: Trained, engine: NativeEngine, tiny_model_dir: Path, tmp_path: Path
) -> None:
    tokenizer = engine.tokenizer
    ref = AdapterRef("cls_head", trained.version, TINY_MODEL)
    firsts = head_tokens(trained.labels)
    for (text, _), expected in zip(ROWS, trained.answers, strict=True):
        prompt = encode_chat(tokenizer, [{"role": "user", "content": text}])
        reference = head_reference(trained.version, tiny_model_dir, prompt)
        answer: Completion = asyncio.run(ask(engine, prompt, ref, choices=LABELS))
        assert answer.text == LABELS[int(reference.argmax())] == expected and answer.finish_reason == "stop"
        first = dict(answer.logprobs[0].top)  # every label's first token, its logprob the head's log-softmax
        assert [first[tokenizer.decode([t])] for t in firsts] == pytest.approx(reference.tolist(), abs=1e-4)
    # The head decides: the LoRA'd LM alone (the same files without the head) rates the labels otherwise.
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in (WEIGHTS_FILE, "adapter_config.json"):
        (plain / name).write_bytes((trained.version / name).read_bytes())
    prompt = encode_chat(tokenizer, [{"role": "user", "content": ROWS[0][0]}])
    without = asyncio.run(ask(engine, prompt, AdapterRef("cls_plain", plain, TINY_MODEL), choices=LABELS))
    with_head = asyncio.run(ask(engine, prompt, ref, choices=LABELS))
    assert dict(without.logprobs[0].top) != pytest.approx(dict(with_head.logprobs[0].top), abs=1e-3)


def test_other_rows_of_the_batch_are_unchanged(
    trained: Trained, engine: NativeEngine, tiny_model_dir: Path, tmp_path: Path
) -> None:
    tokenizer = engine.tokenizer
    head = AdapterRef("cls_head", trained.version, TINY_MODEL)
    other = AdapterRef("other", build_lora(tiny_model_dir, tmp_path / "other", seed=3), TINY_MODEL)
    prompts = [encode_chat(tokenizer, [{"role": "user", "content": text}]) for text, _ in ROWS[:2]]
    asks = [
        (prompts[0], head, {"choices": LABELS}),
        (prompts[0], other, {"choices": LABELS}),
        (prompts[0], None, {"choices": LABELS}),
        (prompts[1], None, {}),
        (prompts[1], other, {}),
        (prompts[1], head, {"choices": LABELS}),
    ]

    async def together() -> list[Completion]:
        return list(await asyncio.gather(*(ask(engine, p, a, **kw) for p, a, kw in asks)))

    for adapter in (head, other):  # resident first: a request whose adapter is still loading joins steps later
        asyncio.run(ask(engine, prompts[0], adapter, choices=LABELS, max_new_tokens=1))
    steps = engine.steps
    mixed = asyncio.run(together())
    assert engine.steps - steps <= 8 + 1  # one batch: the longest answer's steps, not one run after another
    for (prompt, adapter, kw), got in zip(asks, mixed, strict=True):
        alone = asyncio.run(ask(engine, prompt, adapter, **kw))
        assert got.text == alone.text
        for a, b in zip(got.logprobs, alone.logprobs, strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert dict(a.top) == pytest.approx(dict(b.top), abs=1e-4)
    # without the head, the base model's first token over the labels is the LM's own, renormalised
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    firsts = head_tokens(trained.labels)
    with torch.inference_mode():
        expected = torch.log_softmax(lm(torch.tensor([prompts[0]])).logits[0, -1, firsts], -1)
    base = dict(mixed[2].logprobs[0].top)
    assert [base[tokenizer.decode([t])] for t in firsts] == pytest.approx(expected.tolist(), abs=1e-4)


def test_vllm_refuses_a_classification_head_adapter(trained: Trained, tiny_model_dir: Path, tmp_path: Path) -> None:
    """VLLMEngine's adapter check, which runs before anything reaches vLLM (no vLLM needed)."""
    from functions.engine.vllm_engine import VLLMEngine

    engine = VLLMEngine.__new__(VLLMEngine)  # its check alone: no vLLM engine is started
    engine.base_model, engine.max_lora_rank, engine._adapter_checked = TINY_MODEL, 16, {}
    prompt = (1, 2, 3)
    with pytest.raises(EngineError) as refused:
        engine._check_adapter(GenerationRequest(prompt, SamplingParams(), AdapterRef("h", trained.version, TINY_MODEL)))
    assert refused.value.field == "model"
    assert "classification head (task 'classification')" in str(refused.value) and "native engine" in str(refused.value)
    plain = build_lora(tiny_model_dir, tmp_path / "plain")
    engine._check_adapter(GenerationRequest(prompt, SamplingParams(), AdapterRef("p", plain, TINY_MODEL)))


def test_a_head_that_does_not_fit_the_model_is_refused(trained: Trained, tmp_path: Path) -> None:
    head = load_file(trained.version / HEAD_FILE)
    assert read_head(trained.version, 64, 49152) is not None
    assert read_head(tmp_path, 64, 49152) is None  # no head: a plain LoRA
    for bad, why in [
        ({"weight": head["weight"][:, :32].contiguous(), "token_ids": head["token_ids"]}, "expected [labels, 64]"),
        ({"weight": head["weight"], "token_ids": head["token_ids"] * 0}, "distinct tokens"),
        ({"weight": head["weight"], "token_ids": head["token_ids"] + 49152}, "distinct tokens"),
        ({"weight": head["weight"] * float("nan"), "token_ids": head["token_ids"]}, "not finite"),
        ({"weight": head["weight"]}, "expected the tensors"),
    ]:
        save_file(bad, tmp_path / HEAD_FILE)
        with pytest.raises(EngineError, match=re.escape(why)) as refused:
            read_head(tmp_path, 64, 49152)
        assert refused.value.field == "model"
