"""Classification heads in the native engine: the serving half of the task "classification" technique
(functions/classifier_head.py trains it).

An adapter directory with a head (adapter_check.HEAD_FILE) holds `weight` [labels, D] and `token_ids` [labels], each
label's first completion token. For a request on such an adapter, the logits of its first generated token get, at
each head token id, the head's score: the last prompt position's final hidden state (after the final norm, where the
LM head reads it) · weight[i]. The other tokens keep the LM's logits. With the labels as choices (web/inference.py
asks for them on every labelled version) the first step may only take those tokens, so the answer is the head's
argmax and the first token's logprobs, renormalised over them, are the head's log-softmax; the rest of the label
follows from the choices' trie.

The head is read with the adapter on the loader thread (adapter_manager.py), lives in the adapter's pool slot
(lora_pool.LoraPool.heads) and is applied by llama.LlamaModel.forward to the rows lay_out marks
(llama.Sequences.heads): a request's last prefill chunk, when its slot has a head. A step without such a row does
no extra work.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from functions.adapter_check import HEAD_FILE
from functions.engine.protocol import EngineError


@dataclass(frozen=True)
class ClassifierHead:
    weight: torch.Tensor  # [labels, D] fp32: scores are computed in fp32 from the final hidden state
    token_ids: torch.Tensor  # [labels] int64: where in the vocabulary each label's score goes

    def to(self, device: torch.device) -> "ClassifierHead":
        return ClassifierHead(self.weight.to(device), self.token_ids.to(device))


def read_head(path: Path, hidden: int, vocab: int) -> ClassifierHead | None:
    """The head of the adapter at `path`, checked against the base model (hidden size, vocabulary), or None when it
    has none. Raises EngineError (the request's 'model') for a head the engine cannot apply."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = path / HEAD_FILE
    if not file.exists():
        return None

    def refuse(problem: str) -> EngineError:
        return EngineError(f"this adapter's classification head ({HEAD_FILE}) cannot be served: {problem}", "model")

    try:
        tensors = load_file(str(file))
    except SafetensorError as exc:
        raise refuse(f"not a readable safetensors file ({exc})") from None
    if set(tensors) != {"weight", "token_ids"}:
        raise refuse(f"expected the tensors 'weight' and 'token_ids', found {sorted(tensors)}")
    weight, token_ids = tensors["weight"], tensors["token_ids"]
    labels = weight.shape[0] if weight.dim() == 2 else -1
    if not weight.is_floating_point() or tuple(weight.shape) != (labels, hidden) or labels < 1:
        raise refuse(f"weight {weight.dtype} {list(weight.shape)}, expected [labels, {hidden}] floats")
    if not bool(torch.isfinite(weight).all()):
        raise refuse("weight is not finite (NaN or Inf)")
    if token_ids.is_floating_point() or tuple(token_ids.shape) != (labels,):
        raise refuse(f"token_ids {token_ids.dtype} {list(token_ids.shape)}, expected [{labels}] integers")
    ids = token_ids.tolist()
    if len(set(ids)) != len(ids) or not all(0 <= i < vocab for i in ids):
        raise refuse(f"token_ids {ids} must be distinct tokens of the vocabulary (0 to {vocab - 1})")
    return ClassifierHead(weight.float().contiguous(), token_ids.long())
