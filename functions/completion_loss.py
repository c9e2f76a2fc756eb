"""Cross-entropy on completion tokens only, without ever holding the [batch, seq, vocab] logits.

A causal LM's forward computes logits at every position: for SmolLM2's 49,152-token vocabulary that is 4 x 1024 x
49,152 fp32 values (800 MB) per micro-batch, plus as much again for their gradient, although only the completion
positions carry a loss (a classification row: 2-3 of its 300 tokens). Here the decoder runs alone, its hidden
states are gathered at the positions that predict a label, and the LM head and the loss run over those positions
in chunks of CHUNK_POSITIONS; in training each chunk is recomputed in the backward pass (activation
checkpointing) rather than kept, so the logits alive at any moment are one chunk's: [CHUNK_POSITIONS, vocab].

transformers' `logits_to_keep` keeps positions too, but one set for the whole batch (their union over rows) and
all of them at once; none of PEFT, TRL or transformers chunks the head over positions for a plain Trainer.
"""

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from functions.prompts import IGNORE_INDEX

CHUNK_POSITIONS = 1024  # logits of this many positions at a time: 1024 x 49,152 fp32 = 200 MB


@dataclass
class CompletionLoss:
    loss_sum: torch.Tensor  # summed over the label positions (a scalar with grad when training)
    correct: int  # label positions whose most likely token is the label
    count: int  # label positions
    first_logits: torch.Tensor | None = None  # [rows, vocab] at each row's first label position, when asked


def completion_loss(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    first_logits: bool = False,
) -> CompletionLoss:
    """input_ids, attention_mask, labels: [batch, seq], right-padded; labels IGNORE_INDEX where no loss.
    `first_logits`: also return the logits that predict each row's first label token (classification answers)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a PEFT wrapper
    hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [b, s, h]
    targets = labels[:, 1:]  # position t predicts token t+1
    keep = targets != IGNORE_INDEX  # [b, s-1]
    states, wanted = hidden[:, :-1][keep], targets[keep]  # [n, h], [n]
    head = base.get_output_embeddings()
    total = states.new_zeros((), dtype=torch.float32)
    correct = 0
    for start in range(0, len(wanted), CHUNK_POSITIONS):
        chunk, chunk_targets = states[start : start + CHUNK_POSITIONS], wanted[start : start + CHUNK_POSITIONS]
        if torch.is_grad_enabled():
            loss, hits = checkpoint(_chunk_loss, head, chunk, chunk_targets, use_reentrant=False)
        else:
            loss, hits = _chunk_loss(head, chunk, chunk_targets)
        total = total + loss
        correct += int(hits)
    result = CompletionLoss(total, correct, int(wanted.numel()))
    if first_logits:
        first = keep.int().argmax(-1)  # [b]: each row's first label position (rows have at least one)
        rows = torch.arange(len(first), device=first.device)
        result.first_logits = head(hidden[rows, first]).float()  # [b, vocab]
    return result


def _chunk_loss(head: Any, states: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(states).float()  # [chunk, vocab]
    loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    return loss, (logits.detach().argmax(-1) == targets).sum()
