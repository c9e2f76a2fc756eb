"""Adapters in and out: check an uploaded PEFT directory, unpack archives safely, publish a version, export one.

An adapter is served as plain LoRA on the base model's linear layers, by the native engine
(functions/engine/native.py) or by vLLM (functions/engine/vllm_engine.py). So an import is checked against exactly
what serving needs, from the files alone (nothing is loaded into a model): `adapter_config.json` says LORA without
variants that change the forward pass, holds only keys PEFT's LoraConfig knows, each of the type PEFT declares, with
a rank the engines serve and an alpha and dropout in range; every tensor in `adapter_model.safetensors` is a
lora_A/lora_B pair of a linear layer the base model has, with the shapes the base model's config implies, and finite
values. Pickled weights are refused outright.

Publishing is shared with training (functions/train.py): an import takes the repo's next version number from
the repo row's counter (one UPDATE, which serializes concurrent publishers), a training job publishes the number
it took when it started (its checkpoints are already saved under it), and the version row goes in before any
file is moved, so the unique (repo, version) index guards the directory; the files are renamed into place in the
same transaction. A full fine-tuning publishes a whole model directory the same way (kind "full").
"""

import dataclasses
import functools
import gzip
import io
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
import types
import typing
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import volume
from app.db import session_scope
from app.models import AdapterVersion, Repo
from app.settings import get_settings
from functions.base_models import BaseModelUnavailable, ensure_local
from functions.catalog import get_model
from functions.finetune_config import FinetuneConfig, linear_modules

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
STORED_FILES = (CONFIG_FILE, WEIGHTS_FILE)  # what an import keeps and an export hands out
CHECKPOINTS_DIR = "checkpoints"  # inside a version's directory (app/volume.py)
# Formats whose loading unpickles, so merely loading one can run code of the uploader's choosing.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
FLOAT_DTYPES = ("F32", "F16", "BF16")
MAX_ARCHIVE_MEMBERS = 1000  # a PEFT directory has a handful of files; thousands of entries is an attack
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")  # under self_attn; the rest under mlp
# The key PEFT writes for the LoRA of one linear layer, e.g.
# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight
# (and for DoRA, base_model.model.model.layers.3.self_attn.q_proj.lora_magnitude_vector)
LORA_KEY = re.compile(  # \Z, not $: "$" also matches before a final newline
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_(A\.weight|B\.weight|magnitude_vector)\Z"
)
# LoraConfig fields that turn plain LoRA into something else; a served adapter must leave them unset.
VARIANT_FIELDS = {
    "use_qalora": "QALoRA",
    "use_bdlora": "BD-LoRA",
    "lora_bias": "a bias on lora_B",
    "alora_invocation_tokens": "activated LoRA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "trainable_token_indices": "trained token embeddings (trainable_token_indices)",
    "target_parameters": "LoRA on parameters rather than linear layers (target_parameters)",
    "layer_replication": "layer replication",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "megatron_config": "Megatron parallel layers",
    "fan_in_fan_out": "transposed (Conv1D) weights",
}
# Fine-tuning's own bound on lora_alpha, so that whatever training made imports again after an export. With r >= 1
# it caps the LoRA scale (alpha / r, or alpha / sqrt(r) for rsLoRA) there; an alpha of 1e30 makes every output inf.
MAX_LORA_ALPHA = next(m.le for m in FinetuneConfig.model_fields["lora_alpha"].metadata if hasattr(m, "le"))
# PEFT annotates lora_alpha as int but uses it as a float scale, and adapters in the wild carry 16.0.
JSON_TYPE_OVERRIDES: dict[str, set[type]] = {"lora_alpha": {int, float}}
JSON_TYPE_NAMES = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "an object",
    type(None): "null",
}


class AdapterRejected(ValueError):
    """An upload that cannot become an adapter version. `field` names the form field, file or key at fault;
    `status` is the HTTP status it deserves (413 for an upload over the size limit, else 422)."""

    def __init__(self, message: str, field: str, *, status: int = 422) -> None:
        super().__init__(message)
        self.message, self.field, self.status = message, field, status


@dataclass(frozen=True)
class AdapterInfo:
    rank: int
    alpha: float
    target_modules: list[str]
    adapter_type: str  # "lora"


@dataclass(frozen=True)
class Published:
    id: str
    version: int
    path: Path


# ---- checking ------------------------------------------------------------------------------------------


def check_peft_dir(path: Path, base_model: str) -> AdapterInfo:
    """Check that `path` holds a LoRA adapter the platform can serve on `base_model`; raise AdapterRejected
    naming the file and key at fault otherwise."""
    for found in sorted(p for p in path.rglob("*") if p.is_file()):
        if found.suffix.lower() in PICKLE_SUFFIXES:
            raise AdapterRejected(
                f"{found.name}: pickle-based files (.bin, .pt, .pth, .pkl, .ckpt) are refused, because loading one "
                f"can run arbitrary code; upload only {CONFIG_FILE} and {WEIGHTS_FILE} "
                "(PEFT's save_pretrained writes safetensors by default)",
                found.name,
            )
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    for required in (config_path, weights_path):
        if not required.is_file():
            raise AdapterRejected(
                f"{required.name}: missing; a PEFT adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE}",
                required.name,
            )
    config = _read_adapter_config(config_path)
    modules = _check_lora_config(config, base_model)
    rank, alpha = config["r"], config["lora_alpha"]
    base = _base_config(base_model)
    _check_tensors(weights_path, base, base_model, modules, rank, dora=bool(config.get("use_dora")))
    order = linear_modules(base_model)
    return AdapterInfo(
        rank=rank, alpha=float(alpha), target_modules=sorted(modules, key=order.index), adapter_type="lora"
    )


def stored_rank(path: Path) -> int:
    """The rank of an adapter on the volume (a version's or a checkpoint's directory), as the engines read it."""
    return int(_read_adapter_config(path / CONFIG_FILE)["r"])


def _read_adapter_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterRejected(f"{CONFIG_FILE}: not valid JSON ({exc})", CONFIG_FILE) from None
    if not isinstance(config, dict):
        raise AdapterRejected(f"{CONFIG_FILE}: expected a JSON object", CONFIG_FILE)
    return config


@functools.cache
def _lora_config_fields() -> dict[str, set[type] | None]:
    """Every key the installed PEFT's LoraConfig has, with the JSON types (as json.loads gives them) its annotation
    allows at the top level; None: any. Derived from PEFT rather than listed, so that an adapter this PEFT saved
    always passes. VARIANT_FIELDS of newer PEFT versions are known too: left unset (falsy), they are plain LoRA."""
    from peft import LoraConfig

    hints = typing.get_type_hints(LoraConfig)
    fields: dict[str, set[type] | None] = dict.fromkeys(VARIANT_FIELDS)
    for field in dataclasses.fields(LoraConfig):
        fields[field.name] = JSON_TYPE_OVERRIDES.get(field.name) or _json_types(hints[field.name])
    return fields


def _json_types(annotation: Any) -> set[type]:
    """Optional[list[str]] -> {list, NoneType}; a str enum (PeftType) -> {str}; a nested config dataclass -> {dict}."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return set().union(*map(_json_types, typing.get_args(annotation)))
    if origin is typing.Literal:
        return {type(value) for value in typing.get_args(annotation)}
    kind = origin or annotation
    if kind is float:
        return {float, int}
    if kind in (list, tuple, set):
        return {list}
    if kind is dict or dataclasses.is_dataclass(kind):
        return {dict}
    if isinstance(kind, type) and issubclass(kind, str):
        return {str}
    return {kind}  # bool, int, NoneType


def _check_lora_config(config: dict[str, Any], base_model: str) -> set[str]:
    """The config's own checks; returns the target modules."""

    def reject(key: str, problem: str) -> AdapterRejected:
        return AdapterRejected(f"{CONFIG_FILE}: {key}: {problem}", CONFIG_FILE)

    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise reject(
            "peft_type",
            f"{peft_type!r} is not accepted; the serving engine serves LoRA adapters only (peft_type 'LORA')",
        )
    # PEFT itself ignores keys it does not know; here one is refused, since what it was meant to change would
    # silently not happen in serving.
    known = _lora_config_fields()
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise reject(", ".join(unknown), f"not a LoraConfig field; the known fields are {sorted(known)}")
    for key, value in config.items():
        json_types = known[key]
        if json_types is not None and type(value) not in json_types:  # type(): True is no integer here
            expected = " or ".join(sorted({JSON_TYPE_NAMES[t] for t in json_types}))
            raise reject(key, f"expected {expected}, got {value!r}")
    for key, what in VARIANT_FIELDS.items():
        if config.get(key):  # unset, null, false, {} and [] all mean plain LoRA
            raise reject(key, f"{what} is not supported; the serving engine serves plain LoRA only")
    if config.get("bias", "none") != "none":
        raise reject("bias", f"{config['bias']!r} trains the base model's biases; only 'none' can be served")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise reject("task_type", f"{config['task_type']!r}; adapters are served for text generation (CAUSAL_LM)")
    # Types are checked above; these are the ranges (written so that NaN and infinity, which json.loads reads from
    # NaN and Infinity, fail them too) and the keys PEFT would default but an adapter must state.
    rank, max_rank = config.get("r"), get_settings().max_lora_rank
    if not isinstance(rank, int) or not 1 <= rank <= max_rank:
        raise reject(
            "r",
            f"the rank must be an integer from 1 to {max_rank} (the largest served, LORAPLEX_MAX_LORA_RANK), "
            f"got {rank!r}",
        )
    alpha = config.get("lora_alpha")
    if not isinstance(alpha, int | float) or not 0 < alpha <= MAX_LORA_ALPHA:
        raise reject("lora_alpha", f"must be a number above 0 and at most {MAX_LORA_ALPHA}, got {alpha!r}")
    dropout = config.get("lora_dropout", 0.0)
    if not 0 <= dropout < 1:
        raise reject("lora_dropout", f"must be at least 0 and below 1, got {dropout!r}")
    targets = config.get("target_modules")
    if isinstance(targets, str):  # PEFT reads a string as a regular expression over module paths
        raise reject("target_modules", f"a pattern ({targets!r}) is not accepted; list the module names")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise reject("target_modules", "expected a non-empty list of module names")
    allowed = linear_modules(base_model)
    unknown = sorted(set(targets) - set(allowed))
    if unknown:
        raise reject("target_modules", f"{unknown} not in {base_model}; its linear layers are {list(allowed)}")
    return set(targets)


def _base_config(base_model: str) -> Any:
    from transformers import AutoConfig

    try:
        get_model(base_model)
    except KeyError:
        raise AdapterRejected(f"base_model: unknown base model {base_model!r}", "base_model") from None
    try:
        config = AutoConfig.from_pretrained(ensure_local(base_model))
    except BaseModelUnavailable as exc:
        raise AdapterRejected(f"base_model: {exc}", "base_model") from None
    return config.get_text_config()


def _linear_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear layer a LoRA may wrap, from the base model's config."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads  # Gemma's head_dim is not hidden / heads
    inter = config.intermediate_size
    q, kv = heads * head_dim, kv_heads * head_dim
    return {
        "q_proj": (hidden, q),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (q, hidden),
        "qkv_proj": (hidden, q + 2 * kv),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "gate_up_proj": (hidden, 2 * inter),
        "down_proj": (inter, hidden),
    }


def _check_tensors(path: Path, base: Any, base_model: str, modules: set[str], rank: int, dora: bool) -> None:
    import torch
    from safetensors import SafetensorError, safe_open

    shapes = _linear_shapes(base)
    layers = int(base.num_hidden_layers)
    halves: dict[tuple[int, str], set[str]] = {}

    def reject(key: str, problem: str) -> AdapterRejected:
        return AdapterRejected(f"{WEIGHTS_FILE}: tensor {key!r}: {problem}", WEIGHTS_FILE)

    try:
        # safe_open reads the JSON header and maps the file; a tensor's data is read once its name, dtype and shape
        # passed.
        with safe_open(path, framework="pt") as weights:
            keys = list(weights.keys())
            if not keys:
                raise AdapterRejected(f"{WEIGHTS_FILE}: holds no tensors", WEIGHTS_FILE)
            for key in keys:
                match = LORA_KEY.match(key)
                if match is None:
                    raise reject(
                        key,
                        "not the LoRA weight of a linear layer (expected "
                        "'base_model.model.model.layers.<n>.<self_attn|mlp>.<module>.lora_A|lora_B.weight')",
                    )
                layer, parent, module, half = int(match[1]), match[2], match[3], match[4][0]  # "A", "B" or "m"
                if half == "m" and not dora:
                    raise reject(key, "a DoRA magnitude vector, but adapter_config.json does not set use_dora")
                if module not in modules:
                    raise reject(key, f"module {module!r} is not among target_modules {sorted(modules)}")
                if parent != ("self_attn" if module in ATTENTION else "mlp"):
                    raise reject(key, f"{base_model} has no {parent}.{module}")
                if layer >= layers:
                    raise reject(key, f"layer {layer} does not exist; {base_model} has {layers} layers")
                tensor = weights.get_slice(key)
                dtype, shape = tensor.get_dtype(), tuple(tensor.get_shape())
                if dtype not in FLOAT_DTYPES:
                    raise reject(key, f"dtype {dtype}; expected one of {list(FLOAT_DTYPES)}")
                in_features, out_features = shapes[module]
                want = {"A": (rank, in_features), "B": (out_features, rank), "m": (out_features,)}[half]
                if shape != want:
                    raise reject(
                        key,
                        f"shape {list(shape)}, expected {list(want)} for rank {rank} on {base_model} "
                        f"({module}: {in_features} -> {out_features}); was the adapter made for another model?",
                    )
                # One NaN or infinity makes the logits of every request in the engine's batch NaN, not only the
                # requests that use this adapter. The shapes are checked first, so this reads only bounded tensors.
                if not torch.isfinite(weights.get_tensor(key)).all():
                    raise reject(key, "holds NaN or infinite values; every weight must be finite")
                halves.setdefault((layer, module), set()).add(half)
    except SafetensorError as exc:
        raise AdapterRejected(f"{WEIGHTS_FILE}: not a readable safetensors file ({exc})", WEIGHTS_FILE) from None
    required = {"A", "B", "m"} if dora else {"A", "B"}
    names = {"A": "lora_A", "B": "lora_B", "m": "DoRA magnitude"}
    for (layer, module), found in sorted(halves.items()):
        if found != required:
            missing = " or ".join(names[h] for h in sorted(required - found))
            raise AdapterRejected(
                f"{WEIGHTS_FILE}: layer {layer} {module} has no {missing} weight; LoRA needs both halves "
                "(and DoRA a magnitude vector)",
                WEIGHTS_FILE,
            )


# ---- receiving uploads ---------------------------------------------------------------------------------


def save_files(uploads: Iterable[tuple[str, IO[bytes]]], dest: Path, limit: int) -> Path:
    """Write uploaded files (name, stream) into `dest`, by their base names, at most `limit` bytes in all."""
    dest.mkdir(parents=True, exist_ok=True)
    total = 0
    for filename, stream in uploads:
        name = PurePosixPath(filename.replace("\\", "/")).name  # a browser may send 'folder/file'
        if not name or name in (".", ".."):
            raise AdapterRejected(f"files: a file without a usable name ({filename!r})", "files")
        target = dest / name
        if target.exists():
            raise AdapterRejected(f"files: {name!r} sent twice", "files")
        total = _copy_limited(stream, target, total, limit, "files")
    return dest


def unpack_archive(stream: IO[bytes], dest: Path, limit: int) -> Path:
    """Unpack a .zip or .tar.gz into `dest` and return the adapter directory inside it (the archive's root, or
    its single top-level folder). Refuses links, absolute paths, '..', and more than `limit` bytes unpacked."""
    dest.mkdir(parents=True, exist_ok=True)
    head = stream.read(4)
    stream.seek(0)
    if head.startswith(b"PK"):
        _unpack_zip(stream, dest, limit)
    elif head.startswith(b"\x1f\x8b"):
        _unpack_tar(stream, dest, limit)
    else:
        raise AdapterRejected("archive: not a .zip or .tar.gz file", "archive")
    return _adapter_root(dest)


def _member_path(dest: Path, name: str) -> Path:
    """Where an archive member goes, refusing any name that would land outside `dest`."""
    clean = name.replace("\\", "/")
    parts = PurePosixPath(clean).parts
    if clean.startswith("/") or re.match(r"^[a-zA-Z]:", clean) or ".." in parts:
        raise AdapterRejected(f"archive: member {name!r} points outside the archive", "archive")
    parts = tuple(p for p in parts if p != ".")
    return dest.joinpath(*parts)  # `dest` itself for './', which `tar -C dir .` writes first


def _unpack_tar(stream: IO[bytes], dest: Path, limit: int) -> None:
    total = 0
    try:
        # "r|gz" reads the stream once, front to back: a member is checked before its data is read.
        with tarfile.open(fileobj=stream, mode="r|gz") as archive:
            for count, member in enumerate(archive, start=1):
                if count > MAX_ARCHIVE_MEMBERS:
                    raise AdapterRejected(f"archive: more than {MAX_ARCHIVE_MEMBERS} entries", "archive")
                target = _member_path(dest, member.name)
                if member.isdir():
                    _make_dir(target)
                    continue
                if not member.isfile():  # symlinks, hard links, devices, fifos
                    raise AdapterRejected(
                        f"archive: member {member.name!r} is a link or special file; only plain files are accepted",
                        "archive",
                    )
                if total + member.size > limit:
                    raise _too_large("archive", limit)
                source = archive.extractfile(member)
                if source is None:  # unreachable for a regular file; kept for the type checker
                    raise AdapterRejected(f"archive: member {member.name!r} cannot be read", "archive")
                total = _write_member(source, target, total, limit)
    except (tarfile.TarError, gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise AdapterRejected(f"archive: not a readable .tar.gz ({exc})", "archive") from None


def _unpack_zip(stream: IO[bytes], dest: Path, limit: int) -> None:
    try:
        with zipfile.ZipFile(stream) as archive:
            members = archive.infolist()
            if len(members) > MAX_ARCHIVE_MEMBERS:
                raise AdapterRejected(f"archive: more than {MAX_ARCHIVE_MEMBERS} entries", "archive")
            targets = []
            for info in members:  # every name and type is checked before anything is written
                target = _member_path(dest, info.filename)
                # Unix archivers keep the file type in the high bits; others (and writestr) leave it unset.
                kind = stat.S_IFMT(info.external_attr >> 16)
                if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                    raise AdapterRejected(
                        f"archive: member {info.filename!r} is a link or special file; only plain files are accepted",
                        "archive",
                    )
                targets.append((info, target))
            # The declared sizes are checked up front, and the bytes really written are counted as well, so a
            # member that lies about its size cannot get past the limit either.
            if sum(info.file_size for info in members) > limit:
                raise _too_large("archive", limit)
            total = 0
            for info, target in targets:
                if info.is_dir():
                    _make_dir(target)
                    continue
                with archive.open(info) as source:
                    total = _write_member(source, target, total, limit)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError, zlib.error) as exc:
        # RuntimeError: an encrypted member; NotImplementedError: an unknown compression method.
        raise AdapterRejected(f"archive: not a readable .zip ({exc})", "archive") from None


def _make_dir(target: Path) -> None:
    try:
        target.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise AdapterRejected(f"archive: folder {target.name!r} clashes with a file", "archive") from None


def _write_member(source: IO[bytes], target: Path, total: int, limit: int) -> int:
    """Unpack one file; names that collide (twice the same file, a file where a folder is) are refused."""
    try:
        if target.exists():
            raise FileExistsError(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        return _copy_limited(source, target, total, limit, "archive")
    except (FileExistsError, NotADirectoryError, IsADirectoryError):
        raise AdapterRejected(f"archive: {target.name!r} appears twice or clashes with a folder", "archive") from None


def _copy_limited(source: IO[bytes], target: Path, total: int, limit: int, field: str) -> int:
    with target.open("wb") as out:
        while chunk := source.read(1024 * 1024):
            total += len(chunk)
            if total > limit:
                raise _too_large(field, limit)
            out.write(chunk)
    return total


def _too_large(field: str, limit: int) -> AdapterRejected:
    return AdapterRejected(f"{field}: more than {limit} bytes unpacked (LORAPLEX_MAX_UPLOAD_BYTES)", field, status=413)


def _adapter_root(dest: Path) -> Path:
    """The archive's root, or its one top-level folder when that is all it holds (`tar czf a.tgz my-adapter/`).
    Folders and files that archivers add on their own (__MACOSX, .DS_Store) do not count."""
    entries = [p for p in dest.iterdir() if p.name != "__MACOSX" and not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return dest


# ---- publishing ----------------------------------------------------------------------------------------


def get_or_create_repo(session: Session, tenant_id: str, name: str) -> Repo:
    """The tenant's repo of this name, created (and flushed) if it does not exist yet."""
    repo = session.scalar(select(Repo).where(Repo.tenant_id == tenant_id, Repo.name == name))
    if repo is None:
        repo = Repo(tenant_id=tenant_id, name=name)
        session.add(repo)
        session.flush()
    return repo


def allocate_version(session: Session, repo_id: str) -> int:
    """Take the repo's next version number for good. The UPDATE locks the repo row until the caller's transaction
    ends (PostgreSQL) or takes the database's write lock (SQLite), so concurrent takers get distinct numbers."""
    session.execute(
        update(Repo)
        .where(Repo.id == repo_id)
        .values(last_version=Repo.last_version + 1)
        .execution_options(synchronize_session=False)
    )
    number = session.scalar(select(Repo.last_version).where(Repo.id == repo_id))
    if number is None:
        raise RuntimeError(f"repo {repo_id} vanished while taking a version number")
    return number


@dataclass(frozen=True)
class VersionSpec:
    """What the version row records about the files."""

    base_model: str
    adapter_type: str  # lora | none
    rank: int  # 0 for a full model
    target_modules: list[str]
    kind: str = "lora"  # lora | full


def publish_adapter(
    tenant_id: str,
    repo_name: str,
    files_dir: Path,
    *,
    base_model: str,
    adapter_type: str,
    rank: int,
    target_modules: list[str],
    kind: str = "lora",
    version: int | None = None,
    repo_id: str | None = None,
    job_id: str | None = None,
    guard: Callable[[Session], bool] | None = None,
    on_published: Callable[[Session, AdapterVersion], None] | None = None,
) -> Published | None:
    """Save the files of `files_dir` as version `repo/N` and record it, in one transaction.

    N is `version` when given (a training job's number, taken when it started), else the repo's next number.
    The repo is `repo_id`, or the tenant's repo named `repo_name`, created if missing (in the same transaction).
    `guard(session)` runs first and may decline (returns False: nothing is kept, None is returned);
    `on_published(session, version)` runs after the version row exists and writes whatever else must commit
    with it (training: the job row and the usage record). On any failure the directory is removed again; the
    checkpoints saved under the version while it trained stay where they are.
    """
    spec = VersionSpec(base_model, adapter_type, rank, target_modules, kind)
    parent = volume.adapter_dir(tenant_id, repo_name, 0).parent
    parent.mkdir(parents=True, exist_ok=True)
    # Copied beside its final place before the transaction, so only a rename happens while rows are locked.
    staged = Path(tempfile.mkdtemp(dir=parent, prefix=".incoming.", suffix=".tmp"))
    try:
        shutil.copytree(files_dir, staged, dirs_exist_ok=True)
        for _ in range(3):  # another publisher to the same repo may take the same version number first
            try:
                return _publish_once(tenant_id, repo_name, repo_id, staged, spec, version, job_id, guard, on_published)
            except IntegrityError:
                continue
        raise RuntimeError("could not allocate an adapter version after 3 tries")
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _publish_once(
    tenant_id: str,
    repo_name: str,
    repo_id: str | None,
    staged: Path,
    spec: VersionSpec,
    version: int | None,
    job_id: str | None,
    guard: Callable[[Session], bool] | None,
    on_published: Callable[[Session, AdapterVersion], None] | None,
) -> Published | None:
    with session_scope() as s:
        if guard is not None and not guard(s):
            return None
        if repo_id is None:  # a concurrent creator of the same name makes this an IntegrityError: retried
            repo_id = get_or_create_repo(s, tenant_id, repo_name).id
        number = version if version is not None else allocate_version(s, repo_id)
        adapter = AdapterVersion(
            repo_id=repo_id,
            version=number,
            base_model=spec.base_model,
            adapter_type=spec.adapter_type,
            kind=spec.kind,
            rank=spec.rank,
            target_modules=spec.target_modules,
            job_id=job_id,
        )
        s.add(adapter)
        # The row goes in before the files move: the unique (repo, version) index makes a concurrent publisher
        # of the same number wait for this transaction and then fail, so it never touches this directory.
        s.flush()
        final = volume.adapter_dir(tenant_id, repo_name, number)
        moved = False
        try:
            _adopt_checkpoints(final, staged)
            if final.exists():  # left by an attempt that crashed before committing: no row owns it
                shutil.rmtree(final)
            os.replace(staged, final)
            moved = True
            if on_published is not None:
                on_published(s, adapter)
            s.commit()  # here rather than on leaving the block, so a failed commit still takes the files back
        except BaseException:
            # Taken back before the rollback releases the version number, so a publisher that takes the number
            # next never has its directory touched by this one; a retry finds the files staged again.
            if moved:
                try:
                    os.replace(final, staged)
                except OSError:
                    shutil.rmtree(final, ignore_errors=True)
            _return_checkpoints(staged, final)
            raise
        return Published(adapter.id, number, final)


def _adopt_checkpoints(final: Path, staged: Path) -> None:
    """Move the checkpoints a job saved under its version while training into the staged directory, so that
    renaming the staged directory into place keeps them (one rename: they are never copied)."""
    saved = final / CHECKPOINTS_DIR
    if saved.is_dir():
        os.replace(saved, staged / CHECKPOINTS_DIR)


def _return_checkpoints(staged: Path, final: Path) -> None:
    """Undo _adopt_checkpoints after a failed publish: the checkpoints outlive the attempt (the staged directory
    is removed), so a retry or a continued job still finds them."""
    adopted = staged / CHECKPOINTS_DIR
    if adopted.is_dir():
        final.mkdir(parents=True, exist_ok=True)
        os.replace(adopted, final / CHECKPOINTS_DIR)


# ---- exporting -----------------------------------------------------------------------------------------


def export_archive(src: Path, dest: IO[bytes], folder: str, base_model: str, mtime: float) -> None:
    """Write the stored adapter as a .tar.gz of `folder/` holding adapter_config.json and
    adapter_model.safetensors. The weights are the stored bytes; in the config, base_model_name_or_path (which
    PEFT fills with the path the base model was loaded from: a server path) becomes the base model's hub id,
    or its catalog name for a local model. Other stored files (PEFT's README.md names that path too) stay out."""
    try:
        model = get_model(base_model)
        base_ref = model.hf_id or model.name
    except KeyError:  # a local base model removed since: its name is still the best reference
        base_ref = base_model
    config = json.loads((src / CONFIG_FILE).read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base_ref
    config_bytes = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    with tarfile.open(fileobj=dest, mode="w:gz", compresslevel=6) as archive:
        archive.addfile(_tar_entry(f"{folder}/{CONFIG_FILE}", len(config_bytes), mtime), io.BytesIO(config_bytes))
        weights = src / WEIGHTS_FILE
        with weights.open("rb") as data:
            archive.addfile(_tar_entry(f"{folder}/{WEIGHTS_FILE}", weights.stat().st_size, mtime), data)


def export_model_archive(src: Path, dest: IO[bytes], folder: str, mtime: float) -> None:
    """Write a full model (a full fine-tuning's version or checkpoint) as a .tar.gz of `folder/` holding the
    directory's files as stored: safetensors weights, config.json, generation config and tokenizer, loadable with
    AutoModelForCausalLM.from_pretrained. Subfolders (checkpoints, resume state) stay out."""
    # compresslevel 1: safetensors weights barely compress, and a whole model is large
    with tarfile.open(fileobj=dest, mode="w:gz", compresslevel=1) as archive:
        for path in sorted(p for p in src.iterdir() if p.is_file()):
            with path.open("rb") as data:
                archive.addfile(_tar_entry(f"{folder}/{path.name}", path.stat().st_size, mtime), data)


def _tar_entry(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, int(mtime), 0o644  # no owner names or ids of the server
    return info
