"""The KV cache: preallocated once within a memory budget, handed out in blocks of token slots.

Per layer, keys and values are [num_blocks * block_size, KVH, Dh]; a sequence owns a list of blocks, and its
position p lives in slot blocks[p // block_size] * block_size + p % block_size. A request reserves the blocks
for its prompt plus max_new_tokens when it is admitted, so a running request never runs out of room; a request
that does not fit waits in the queue (admission control) until running ones finish.

Block 0 is never handed out: padded attention rows point at its slot 0 (llama.Sequences.decode_slots), and a
masked key still meets its value in the softmax-weighted sum (0 × NaN is NaN). Kept at zero, it cannot carry
what a request with a numerically broken adapter left in a block it freed into another request's output.
"""

import torch


class KVCache:
    def __init__(
        self,
        layers: int,
        kv_heads: int,
        head_dim: int,
        budget_bytes: int,
        dtype: torch.dtype,
        device: torch.device,
        block_size: int = 16,
    ) -> None:
        self.block_size = block_size
        self.bytes_per_token = layers * 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
        self.num_blocks = max(1, budget_bytes // (self.bytes_per_token * block_size))  # blocks requests can hold
        slots = (self.num_blocks + 1) * block_size  # + the padding block
        self.k = [torch.zeros(slots, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(slots, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(layers)]
        self.device = device
        self._free = list(range(self.num_blocks, 0, -1))  # 1..num_blocks, lowest handed out first

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def used_fraction(self) -> float:
        return 1 - len(self._free) / self.num_blocks

    def allocate(self, tokens: int) -> tuple[list[int], torch.Tensor] | None:
        """Blocks for `tokens` positions and the slot of each position ([tokens]), or None when full."""
        needed = -(-tokens // self.block_size)
        if needed > len(self._free):
            return None
        blocks = [self._free.pop() for _ in range(needed)]
        offsets = torch.arange(self.block_size, device=self.device)
        slots = (torch.tensor(blocks, device=self.device)[:, None] * self.block_size + offsets).reshape(-1)
        return blocks, slots[:tokens]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(blocks)
