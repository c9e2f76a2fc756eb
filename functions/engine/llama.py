"""A batched forward pass of a Llama-family decoder over a paged KV cache, with per-segment LoRA.

One call computes one engine step: a flat list of T tokens from many sequences (prefill chunks first, then one
decode token per running sequence), each sequence with its own adapter or none. Shapes:

    hidden      [T, D]                      D = hidden size
    qkv         [T, (H + 2 * KVH) * Dh]     fused q, k, v projections (one GEMM for the whole batch)
    kv cache    [slots, KVH, Dh] per layer  slot = block * block_size + offset (see kv_cache.py)

The base weights are applied once per step for the whole batch. LoRA deltas are added per segment of tokens
that share an adapter (lora_pool.LoraPool.apply); a request's first token on an adapter with a classification head
gets the head's scores (heads.py). The arithmetic follows transformers' Llama and PEFT's LoRA
step by step (fp32 RMSNorm, the same rotary embedding, `base(x) + B(A(x)) * scaling`), so greedy decoding in
fp32 gives the tokens transformers + PEFT give.
"""

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from functions.engine.heads import ClassifierHead
from functions.engine.lora_pool import LoraPool, Segments

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")


@dataclass
class Layer:
    ln1: torch.Tensor  # [D]
    qkv: torch.Tensor  # [(H + 2 KVH) Dh, D]
    qkv_bias: torch.Tensor | None
    o: torch.Tensor  # [D, H Dh]
    ln2: torch.Tensor  # [D]
    gate_up: torch.Tensor  # [2 I, D]
    down: torch.Tensor  # [D, I]


@dataclass
class Sequences:
    """Where each sequence's tokens sit in this step's flat batch, and where its keys and values go."""

    prefill: list[tuple[int, int, int, torch.Tensor]]  # (flat start, n tokens, cached before, slot table [ctx])
    decode_start: int  # flat index of the first decode token; decode tokens run to T
    decode_slots: torch.Tensor | None  # [B, Lmax] cache slots to attend to (padding points at slot 0)
    decode_mask: torch.Tensor | None  # [B, 1, 1, Lmax] True where a key exists
    write_slots: torch.Tensor  # [T] cache slot of each token's key and value
    # (row of logit_rows, head): a request's first token on an adapter with a classification head (heads.py)
    heads: list[tuple[int, ClassifierHead]] = field(default_factory=list)


class LlamaModel:
    def __init__(self, hf_model: Any, dtype: torch.dtype, device: torch.device) -> None:
        config = hf_model.config
        if config.model_type not in SUPPORTED_TYPES:
            raise ValueError(
                f"the native engine runs {', '.join(SUPPORTED_TYPES)} models, not {config.model_type!r}; use vLLM"
            )
        self.config = config
        self.dtype, self.device = dtype, device
        # fp32 follows transformers op for op (greedy tokens match it exactly); bf16 takes fused, faster kernels
        self.exact = dtype == torch.float32
        self.hidden = config.hidden_size
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or self.hidden // self.heads
        self.intermediate = config.intermediate_size
        self.eps = config.rms_norm_eps
        self.vocab = config.vocab_size
        self.q_size, self.kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim

        def own(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(device=device, dtype=dtype).contiguous()

        inner = hf_model.model
        self.embed = own(inner.embed_tokens.weight)
        self.norm = own(inner.norm.weight)
        tied = hf_model.lm_head.weight.data_ptr() == inner.embed_tokens.weight.data_ptr()
        self.lm_head = self.embed if tied else own(hf_model.lm_head.weight)
        self.rotary = inner.rotary_emb.to(device)  # transformers' own module: every rope variant, exactly
        self.layers = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            bias = attn.q_proj.bias
            self.layers.append(
                Layer(
                    ln1=own(layer.input_layernorm.weight),
                    qkv=own(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])),
                    qkv_bias=None
                    if bias is None
                    else own(torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])),
                    o=own(attn.o_proj.weight),
                    ln2=own(layer.post_attention_layernorm.weight),
                    gate_up=own(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])),
                    down=own(mlp.down_proj.weight),
                )
            )
        # Module output widths LoRA deltas are added to, per fused group (lora_pool keeps the same order).
        self.group_shapes = {
            "qkv": (self.hidden, [("q_proj", self.q_size), ("k_proj", self.kv_size), ("v_proj", self.kv_size)]),
            "o": (self.q_size, [("o_proj", self.hidden)]),
            "gate_up": (self.hidden, [("gate_proj", self.intermediate), ("up_proj", self.intermediate)]),
            "down": (self.intermediate, [("down_proj", self.hidden)]),
        }

    def module_weight(self, layer: int, module: str) -> torch.Tensor:
        """A projection's base weight [out, in], as a view into the fused weights."""
        w, q, kv, inter = self.layers[layer], self.q_size, self.kv_size, self.intermediate
        views = {
            "q_proj": w.qkv[:q],
            "k_proj": w.qkv[q : q + kv],
            "v_proj": w.qkv[q + kv :],
            "o_proj": w.o,
            "gate_proj": w.gate_up[:inter],
            "up_proj": w.gate_up[inter:],
            "down_proj": w.down,
        }
        return views[module]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def weight_bytes_per_token(self) -> int:
        """Bytes of weights a batch-1 decode step reads (every layer, the final norm and the LM head)."""
        tensors = [self.norm, self.lm_head]
        for layer in self.layers:
            tensors += [layer.ln1, layer.qkv, layer.o, layer.ln2, layer.gate_up, layer.down]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if not self.exact:
            return F.rms_norm(x, (self.hidden,), weight, self.eps)  # one fused kernel
        # transformers' LlamaRMSNorm: the variance in fp32, the weight applied in the model's dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(x.dtype)

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,  # [T] token ids
        positions: torch.Tensor,  # [T] position of each token in its sequence
        seqs: Sequences,
        segments: Segments,
        lora: LoraPool,
        k_cache: list[torch.Tensor],
        v_cache: list[torch.Tensor],
        logit_rows: torch.Tensor,  # [B'] flat indices whose next-token logits are wanted
    ) -> torch.Tensor:  # [B', V] fp32 logits
        h = F.embedding(tokens, self.embed)
        cos, sin = self.rotary(h.unsqueeze(0), positions.unsqueeze(0))  # [1, T, Dh] each
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # [T, 1, Dh]
        n_tokens = tokens.shape[0]
        for i, layer in enumerate(self.layers):
            x = self._rms(h, layer.ln1)
            qkv = F.linear(x, layer.qkv, layer.qkv_bias)
            lora.apply(i, "qkv", x, qkv, segments)
            qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
            qk = _rope(qk.view(n_tokens, self.heads + self.kv_heads, self.head_dim), cos, sin)  # q and k at once
            q, k = qk[:, : self.heads], qk[:, self.heads :]
            v = v.view(n_tokens, self.kv_heads, self.head_dim)
            k_cache[i].index_copy_(0, seqs.write_slots, k)
            v_cache[i].index_copy_(0, seqs.write_slots, v)
            attn = self._attention(q, k, v, seqs, k_cache[i], v_cache[i])  # [T, H Dh]
            o = F.linear(attn, layer.o)
            lora.apply(i, "o", attn, o, segments)
            h = h + o
            x = self._rms(h, layer.ln2)
            gate_up = F.linear(x, layer.gate_up)
            lora.apply(i, "gate_up", x, gate_up, segments)
            gate, up = gate_up.chunk(2, dim=-1)
            act = F.silu(gate) * up
            down = F.linear(act, layer.down)
            lora.apply(i, "down", act, down, segments)
            h = h + down
        h = self._rms(h.index_select(0, logit_rows), self.norm)
        logits = F.linear(h, self.lm_head).float()
        for row, head in seqs.heads:  # the head's scores at its labels' first tokens, from the same hidden state
            logits[row, head.token_ids] = F.linear(h[row].float(), head.weight)
        return logits

    def _attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: Sequences, kc: torch.Tensor, vc: torch.Tensor
    ) -> torch.Tensor:
        outputs = []
        for start, n, cached, slots in seqs.prefill:
            qs = q[start : start + n].transpose(0, 1).unsqueeze(0)  # [1, H, n, Dh]
            if cached == 0:  # the whole sequence is in this chunk: plain causal attention over it
                ks = k[start : start + n].transpose(0, 1).unsqueeze(0)
                vs = v[start : start + n].transpose(0, 1).unsqueeze(0)
                out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
            else:  # a later chunk: attend to the cached prefix too, causally within the chunk
                ks = kc.index_select(0, slots).transpose(0, 1).unsqueeze(0)  # [1, KVH, cached + n, Dh]
                vs = vc.index_select(0, slots).transpose(0, 1).unsqueeze(0)
                mask = torch.ones(n, cached + n, dtype=torch.bool, device=q.device).tril(cached)
                out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=True)
            outputs.append(out[0].transpose(0, 1).reshape(n, -1))
        if seqs.decode_slots is not None and seqs.decode_mask is not None:  # both set when the step decodes
            b, lmax = seqs.decode_slots.shape
            flat = seqs.decode_slots.reshape(-1)
            ks = kc.index_select(0, flat).view(b, lmax, self.kv_heads, self.head_dim).transpose(1, 2)
            vs = vc.index_select(0, flat).view(b, lmax, self.kv_heads, self.head_dim).transpose(1, 2)
            if self.exact:
                qs = q[seqs.decode_start :].unsqueeze(2)  # [B, H, 1, Dh]
                out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=seqs.decode_mask, enable_gqa=True)
            else:  # two batched matmuls: far faster than the CPU flash kernel for one query per sequence
                group = self.heads // self.kv_heads
                qs = q[seqs.decode_start :].reshape(b, self.kv_heads, group, self.head_dim)
                scores = torch.matmul(qs, ks.transpose(2, 3)).float() * self.head_dim**-0.5  # [B, KVH, G, L]
                scores = scores.masked_fill(~seqs.decode_mask, float("-inf"))
                out = torch.matmul(scores.softmax(-1).to(vs.dtype), vs)  # [B, KVH, G, Dh]
            outputs.append(out.reshape(b, -1))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)
