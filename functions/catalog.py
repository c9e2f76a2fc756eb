"""Base models users can fine-tune and serve, and the linear layers of each a LoRA may wrap. The parameter count
sets the price tier."""

import json
from dataclasses import dataclass

from app import volume

B = 1_000_000_000
LOCAL_CARD = "loraplex_model.json"  # written beside a model directory placed on the volume by hand or by tests
# Linear layers a LoRA can wrap, by architecture family: Llama, Mistral, Qwen and Gemma share names; Phi-3 fuses
# q/k/v and gate/up. The attention ones sit under a decoder layer's self_attn, the rest under its mlp.
LLAMA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PHI3_MODULES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")


@dataclass(frozen=True)
class BaseModel:
    name: str  # what users type: base_model="smollm2-135m"
    hf_id: str  # where the weights come from when a network exists
    params: int  # parameter count
    context_length: int  # tokens
    bundled: bool = False  # ships with the install (no network needed)
    local: bool = False  # found on the volume (custom or test weights)


CATALOG: dict[str, BaseModel] = {
    m.name: m
    for m in [
        BaseModel("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", 134_515_008, 8192, bundled=True),
        BaseModel("llama-3-1-8b-instruct", "meta-llama/Llama-3.1-8B-Instruct", int(8.03 * B), 131_072),
        BaseModel("mistral-7b-instruct-v0-3", "mistralai/Mistral-7B-Instruct-v0.3", int(7.25 * B), 32_768),
        BaseModel("qwen2-5-7b-instruct", "Qwen/Qwen2.5-7B-Instruct", int(7.62 * B), 32_768),
        BaseModel("gemma-2-9b-it", "google/gemma-2-9b-it", int(9.24 * B), 8192),
        BaseModel("phi-3-5-mini-instruct", "microsoft/Phi-3.5-mini-instruct", int(3.82 * B), 131_072),
        BaseModel("llama-3-3-70b-instruct", "meta-llama/Llama-3.3-70B-Instruct", int(70.6 * B), 131_072),
    ]
}


class UnknownBaseModel(KeyError):
    pass


def list_models() -> list[BaseModel]:
    """The catalog plus models placed on the volume (each with a loraplex_model.json card)."""
    found = dict(CATALOG)
    models_dir = volume.root() / "base_models"
    if models_dir.is_dir():
        for card in models_dir.glob(f"*/{LOCAL_CARD}"):
            meta = json.loads(card.read_text())
            name = card.parent.name
            if name not in found:
                found[name] = BaseModel(name, "", int(meta["params"]), int(meta["context_length"]), local=True)
    return sorted(found.values(), key=lambda m: (not (m.bundled or m.local), m.params))


def get_model(name: str) -> BaseModel:
    for model in list_models():
        if model.name == name:
            return model
    raise UnknownBaseModel(name)


def linear_modules(base_model: str) -> tuple[str, ...]:
    """The linear layers of `base_model` a LoRA may target, in the order a decoder layer runs them."""
    return PHI3_MODULES if base_model.startswith("phi-3") else LLAMA_MODULES
