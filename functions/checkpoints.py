"""Checkpoints (`repo/N@k`), the version references users pass (`repo/N`, `repo/N@k`), and continuing from one.

Saving: while a job trains, the Trainer writes checkpoint-<step>/ to the worker's local disk (functions/trainer.py);
`save` copies its weights (adapter, or whole model plus tokenizer) to
volume/adapters/<tenant>/<repo>/<N>/checkpoints/<k>/ and the optimizer, scheduler, RNG and trainer state to that
directory's resume/ subfolder, renames it into place, and only then records the row, so a recorded checkpoint
is always complete. Only the newest checkpoint keeps its resume state: the one before drops it once the next is
recorded, and the last drops it when the job ends.

Resuming: a retried job (its worker died and the lease expired, or the attempt failed) copies its last checkpoint
back into a local Trainer checkpoint directory (`prepare_resume`); the Trainer continues from there with the same
step, optimizer moments, learning-rate schedule and data order.
"""

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app import events, volume
from app.db import session_scope
from app.errors import Invalid
from app.models import Checkpoint
from functions import repos
from functions.adapter_check import HEAD_LABELS_FILE, stored_config
from functions.catalog import linear_modules
from functions.finetune_config import FinetuneConfig
from functions.repos import CHECKPOINTS_DIR, Weights

RESUME_DIR = "resume"  # inside a checkpoint's directory: what only resuming needs
# with the head's labels of a classification-head checkpoint (its head itself is a .safetensors file)
WEIGHT_CONFIGS = ("adapter_config.json", "config.json", "generation_config.json", HEAD_LABELS_FILE)
SKIPPED_FILES = ("README.md",)  # PEFT's model card, which names a server path
# LoRA settings that decide what the saved weights compute: a continued adapter must keep them.
SHAPE_FIELDS = ("rank", "lora_alpha", "use_rslora", "use_dora", "target_modules")


@dataclass(frozen=True)
class TrainingTarget:
    """The job being trained, as checkpoints need it."""

    job_id: str
    tenant_id: str
    repo_id: str
    repo_name: str
    version: int
    base_model: str
    kind: str  # lora | full

    def checkpoint_name(self, number: int) -> str:
        return f"{self.repo_name}/{self.version}@{number}"


@dataclass(frozen=True)
class ResumePoint:
    name: str  # "repo/3@2"
    step: int  # optimizer steps already done
    trainer_dir: Path  # local Trainer checkpoint directory, for Trainer.train(resume_from_checkpoint=...)


class Refused(Invalid):
    """A continue_from_version that cannot work; `field` names the config field at fault."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message, field=field, code="invalid_value")


# ---- continuing from a version or checkpoint -------------------------------------------------------------


def continuation(session: Session, tenant_id: str, config: FinetuneConfig) -> tuple[FinetuneConfig, Weights | None]:
    """The config to train with and the weights to start from. Without continue_from_version: (config, None).
    With it, the source must be the tenant's, of the same base model and kind; a LoRA source's settings carry
    over, and one set to another value is refused (Refused names the field)."""
    if config.continue_from_version is None:
        return config, None
    source = repos.find(session, tenant_id, config.continue_from_version)
    if source is None:
        raise Refused(
            f"continue_from_version: {config.continue_from_version!r} is not one of your versions or checkpoints",
            "continue_from_version",
        )
    if source.base_model != config.base_model:
        raise Refused(
            f"continue_from_version: {source.name} was trained on {source.base_model!r}, not {config.base_model!r}",
            "continue_from_version",
        )
    given = config.model_dump(exclude_unset=True)  # what the user set, so that defaults do not count as choices
    wanted_adapter = "none" if source.kind == "full" else "lora"
    if "adapter" in given and given["adapter"] != wanted_adapter:
        what = "a full model" if source.kind == "full" else "a LoRA adapter"
        raise Refused(
            f"adapter: {source.name} is {what}; continue it with adapter {wanted_adapter!r} (or leave adapter unset)",
            "adapter",
        )
    merged = _continue_full(given, source) if source.kind == "full" else _continue_lora(given, source, config)
    return FinetuneConfig.model_validate(merged), source


def _continue_full(given: dict[str, Any], source: Weights) -> dict[str, Any]:
    if given.get("method") == "dpo":
        raise Refused(
            f"continue_from_version: {source.name} is a full model; method 'dpo' trains a LoRA adapter",
            "continue_from_version",
        )
    for name in SHAPE_FIELDS + ("lora_dropout",):
        if name in given:
            raise Refused(f"{name}: {source.name} is a full model; LoRA settings do not apply", name)
    return given | {"adapter": "none"}


def _continue_lora(given: dict[str, Any], source: Weights, config: FinetuneConfig) -> dict[str, Any]:
    inherited = _lora_settings(source.path, config.base_model)
    for name in SHAPE_FIELDS:
        if name in given and _comparable(name, given[name]) != _comparable(name, inherited[name]):
            raise Refused(
                f"{name}: {given[name]!r} conflicts with {source.name}, trained with {name} {inherited[name]!r}; "
                f"leave {name} unset to keep it",
                name,
            )
    if "lora_dropout" in given:  # a training choice, not part of the weights: the new value applies
        inherited.pop("lora_dropout")
    return given | inherited | {"adapter": "lora"}


def _lora_settings(path: Path, base_model: str) -> dict[str, Any]:
    saved = stored_config(path)
    order = linear_modules(base_model)
    targets = sorted(saved["target_modules"], key=lambda m: order.index(m) if m in order else len(order))
    return {
        "rank": int(saved["r"]),
        "lora_alpha": round(saved["lora_alpha"]),
        "lora_dropout": float(saved.get("lora_dropout") or 0.0),
        "use_rslora": bool(saved.get("use_rslora")),
        "use_dora": bool(saved.get("use_dora")),
        "target_modules": targets,
    }


def _comparable(name: str, value: Any) -> Any:
    return sorted(value) if name == "target_modules" and value is not None else value


# ---- saving ----------------------------------------------------------------------------------------------


def save(target: TrainingTarget, trainer_dir: Path, step: int, epoch: float, tokenizer: Any) -> str:
    """Copy the Trainer checkpoint `trainer_dir` to the volume as the job's next checkpoint, record it, and drop
    the resume state of the one before. Returns its name, 'repo/N@k'."""
    with session_scope() as s:
        number = (s.scalar(select(func.max(Checkpoint.number)).where(Checkpoint.job_id == target.job_id)) or 0) + 1
    final = volume.checkpoint_dir(target.tenant_id, target.repo_name, target.version, number)
    with volume.atomic_dir(final) as staged:  # renamed into place whole, or not at all
        _copy_trainer_checkpoint(trainer_dir, staged)
        if target.kind == "full":  # a full checkpoint is a model directory of its own, servable as it is
            tokenizer.save_pretrained(staged)
    volume.durable_write_done()  # on Modal: committed, so a retry in another container finds it
    with session_scope() as s:
        checkpoint = Checkpoint(
            job_id=target.job_id,
            repo_id=target.repo_id,
            version=target.version,
            number=number,
            step=step,
            epoch=epoch,
            kind=target.kind,
            base_model=target.base_model,
        )
        s.add(checkpoint)
        s.flush()  # its id, the event's subject
        events.publish(s, target.tenant_id, "finetune.checkpoint.created", checkpoint.id)
    if number > 1:  # only now: a worker dying before the row above still finds the previous resume state
        previous = volume.checkpoint_dir(target.tenant_id, target.repo_name, target.version, number - 1)
        shutil.rmtree(previous / RESUME_DIR, ignore_errors=True)
    return target.checkpoint_name(number)


def _copy_trainer_checkpoint(source: Path, dest: Path) -> None:
    """Weights and their configs at the top (what serving, downloads and continue_from_version read), the rest
    of the Trainer's checkpoint (optimizer, scheduler, RNG, trainer state, arguments) under resume/."""
    (dest / RESUME_DIR).mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if not path.is_file() or path.name in SKIPPED_FILES:
            continue
        weights = path.name in WEIGHT_CONFIGS or path.name.endswith((".safetensors", ".safetensors.index.json"))
        shutil.copy2(path, (dest if weights else dest / RESUME_DIR) / path.name)


def drop_resume_state(target: TrainingTarget) -> None:
    """Remove what only resuming needs (the optimizer state is twice the trained weights) once the job has ended;
    the checkpoints' weights stay, servable and continuable."""
    root = volume.adapter_dir(target.tenant_id, target.repo_name, target.version) / CHECKPOINTS_DIR
    for resume in root.glob(f"*/{RESUME_DIR}"):
        shutil.rmtree(resume, ignore_errors=True)


# ---- resuming --------------------------------------------------------------------------------------------


def prepare_resume(target: TrainingTarget, workdir: Path) -> ResumePoint | None:
    """The job's last checkpoint copied into a local Trainer checkpoint directory, or None to start from step 0
    (no checkpoint yet, or its resume state is gone)."""
    with session_scope() as s:
        last = s.scalar(
            select(Checkpoint).where(Checkpoint.job_id == target.job_id).order_by(Checkpoint.number.desc()).limit(1)
        )
        if last is None:
            return None
        number, step = last.number, last.step
    saved = volume.checkpoint_dir(target.tenant_id, target.repo_name, target.version, number)
    if not (saved / RESUME_DIR / "trainer_state.json").is_file():
        return None
    local = workdir / "trainer" / f"checkpoint-{step}"
    local.mkdir(parents=True, exist_ok=True)
    for folder in (saved, saved / RESUME_DIR):
        for path in folder.iterdir():
            if path.is_file():
                shutil.copy2(path, local / path.name)
    return ResumePoint(target.checkpoint_name(number), step, local)
