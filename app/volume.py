"""The volume: one directory tree for datasets, adapters and base-model weights.

Layout (the same on a Modal Volume):
    datasets/<tenant_id>/<dataset_id>.<jsonl|csv>
    adapters/<tenant_id>/<repo>/<version>/      PEFT directory (adapter_config.json, adapter_model.safetensors),
                                                or a full model (model.safetensors, config.json, tokenizer)
        checkpoints/<k>/                        checkpoint k of the version, in the same format; the last one of a
            resume/                             job still training also keeps the Trainer's optimizer, scheduler and
                                                RNG state, to resume from after its worker died
    base_models/<name>/                         transformers directory (config.json, model.safetensors, tokenizer)
    merged_adapters/<tenant_id>/<recipe hash>/  a per-request merge of adapters (functions/adapter_merge.py), PEFT
Every write lands under a temporary name first and is renamed into place, so a reader never sees half a file.
"""

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from app.settings import get_settings

# Run after a write other machines must see before the handler ends (a checkpoint that a retry elsewhere resumes
# from). The Modal app installs Volume.commit while it runs a handler; on a local directory every write is
# visible at once.
_after_durable_write: list[Callable[[], None]] = []


@contextmanager
def committing_with(hook: Callable[[], None]) -> Iterator[None]:
    """Call `hook` after each durable write made inside the block."""
    _after_durable_write.append(hook)
    try:
        yield
    finally:
        _after_durable_write.remove(hook)


def durable_write_done() -> None:
    for hook in list(_after_durable_write):
        hook()


def root() -> Path:
    path = get_settings().volume_dir
    path.mkdir(parents=True, exist_ok=True)
    return path


def dataset_path(tenant_id: str, dataset_id: str, file_format: str) -> Path:
    return root() / "datasets" / tenant_id / f"{dataset_id}.{file_format}"


def adapter_dir(tenant_id: str, repo: str, version: int) -> Path:
    return root() / "adapters" / tenant_id / repo / str(version)


def checkpoint_dir(tenant_id: str, repo: str, version: int, number: int) -> Path:
    return adapter_dir(tenant_id, repo, version) / "checkpoints" / str(number)


def base_model_dir(name: str) -> Path:
    return root() / "base_models" / name


def merged_adapter_dir(tenant_id: str, recipe_hash: str) -> Path:
    return root() / "merged_adapters" / tenant_id / recipe_hash


@contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it into place only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, final)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; rename it into place only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        if final.exists():  # a retried handler wrote it before: replace with the fresh copy
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
