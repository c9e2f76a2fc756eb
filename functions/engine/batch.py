"""The native engine's requests and how one step lays them out for the model's forward pass.

A Seq is one request inside the engine: what the caller asked, and the engine thread's state of it (tokens so far,
positions cached, its cache blocks and adapter slot, its beams), set up when it is admitted (`start`).

`lay_out` picks what one step computes over the running requests (a decode token for each one past its prompt;
prompt chunks of the others, `prefill_chunk` tokens in all) and lays those tokens out as llama.LlamaModel.forward
takes them: one flat batch of T tokens, prefill chunks first, then decode tokens sorted by adapter slot so that
one adapter's tokens form one segment.

A request for n > 1 answers is n Seqs: the first (the leader) holds the request's place in the queue and its
`followers` the others. They are admitted together; the prompt's cache blocks are allocated once and shared (each
answer's slots are the prompt's then its own), the leader alone prefills them, and the logits of the prompt's last
token are sampled once per answer, each with its own generator. From there each answer decodes as a request of
its own; the prompt's blocks go back to the cache with the last answer to finish (SharedBlocks).
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from functions.engine.beams import BeamSearch
from functions.engine.grammar import JsonConstraint
from functions.engine.heads import ClassifierHead
from functions.engine.kv_cache import KVCache
from functions.engine.llama import Sequences
from functions.engine.lora_pool import LoraPool, Segments
from functions.engine.protocol import GenerationRequest
from functions.engine.sampling import ChoiceTrie


@dataclass(eq=False)
class SharedBlocks:
    """Cache blocks that several Seqs read (the prompt of a request with n > 1): freed when `holders` reaches 0."""

    blocks: list[int]
    slots: torch.Tensor  # [prompt tokens]: the cache slot of each prompt position
    holders: int


@dataclass(eq=False)
class Seq:
    request: GenerationRequest
    prompt_ids: list[int]
    adapter_config: dict | None
    sink: Callable[[tuple], None]
    choices: ChoiceTrie | None = None  # the request's choices (SamplingParams.choices), as token sequences
    index: int = 0  # which answer of the request (n > 1) this is
    leader: "Seq | None" = None  # a follower's leader, whose prefill of the prompt it shares
    followers: list["Seq"] = field(default_factory=list)  # a leader's other answers (n > 1)
    grammar: JsonConstraint | None = None  # its JSON schema's grammar (SamplingParams.json_schema), at its position
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # set by the caller's side; the engine drops the request before its next step
    # engine-thread state
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    computed: int = 0  # positions whose keys and values are in the cache
    slot: int = -1  # adapter slot; -1 = the base model alone
    blocks: list[int] = field(default_factory=list)
    prompt_blocks: SharedBlocks | None = None  # n > 1: the prompt's blocks, shared by the answers
    beam_slots: list[torch.Tensor] = field(default_factory=list)  # cache slot of each position, per beam
    beam: BeamSearch | None = None  # beam search (num_beams > 1)
    generator: torch.Generator | None = None
    started: float = 0.0  # admitted
    first_token_at: float = 0.0

    @property
    def generated(self) -> int:
        return self.beam.generated if self.beam else len(self.tokens) - len(self.prompt_ids)

    @property
    def members(self) -> list["Seq"]:
        """The request's answers: itself and its followers (n > 1)."""
        return [self, *self.followers]

    @property
    def adapter_key(self) -> str | None:
        return self.request.adapter.key if self.request.adapter else None

    def start(self, kv: KVCache, context_length: int, eos: int, device: torch.device) -> bool:
        """Admit the request: its cache room (one per beam, for its whole length), its beam search and its sampling
        generator. False, holding nothing, when the cache has no room for it now."""
        params = self.request.params
        total = min(len(self.prompt_ids) + params.max_new_tokens, context_length)
        if self.followers:
            return self._start_answers(kv, total, device)
        rooms = [kv.allocate(total) for _ in range(params.num_beams)]
        allocated = [room for room in rooms if room is not None]
        if len(allocated) < len(rooms):
            for blocks, _ in allocated:
                kv.release(blocks)
            return False
        self.blocks = [block for blocks, _ in allocated for block in blocks]
        self.beam_slots = [slots for _, slots in allocated]
        if params.num_beams > 1:
            min_new = 0 if self.choices is not None else params.min_new_tokens  # a choice's end is its own
            self.beam = BeamSearch(params.num_beams, eos, params.max_new_tokens, min_new)
        self._begin(device)
        return True

    def _start_answers(self, kv: KVCache, total: int, device: torch.device) -> bool:
        """n > 1: the prompt's blocks once, shared by every answer, and each answer's own blocks for the `total` -
        prompt positions it generates. All or nothing, like `start`."""
        prompt_len = len(self.prompt_ids)
        members = self.members
        prompt = kv.allocate(prompt_len)
        rooms = [kv.allocate(total - prompt_len) for _ in members] if prompt is not None else []
        owned = [room for room in rooms if room is not None]
        if prompt is None or len(owned) < len(members):
            for blocks, _ in owned + ([prompt] if prompt is not None else []):
                kv.release(blocks)
            return False
        shared = SharedBlocks(prompt[0], prompt[1], holders=len(members))
        for member, (blocks, slots) in zip(members, owned, strict=True):
            member.blocks, member.prompt_blocks = blocks, shared
            member.beam_slots = [torch.cat([shared.slots, slots])]
            member._begin(device)
        return True

    def _begin(self, device: torch.device) -> None:
        """Its tokens so far (the prompt) and its sampling generator; answer i of n seeds with seed + i."""
        params = self.request.params
        self.tokens = list(self.prompt_ids)
        if not params.greedy or params.repetition_penalty != 1.0:
            self.generator = torch.Generator(device)
            seed = params.seed_of(self.index)
            self.generator.manual_seed(seed if seed is not None else torch.seed())
        self.started = time.monotonic()


@dataclass
class Step:
    """One step's inputs, on the engine's device, and which request each part belongs to."""

    prefill: list[tuple[Seq, int]]  # (request, prompt tokens it computes in this step)
    decode: list[tuple[Seq, int]]  # (request, beam or -1): one token each
    sampled: list[tuple[Seq, int]]  # (request, beam or -1) of each logits row
    tokens: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    sequences: Sequences
    segments: Segments
    logit_rows: torch.Tensor  # [len(sampled)]: the flat rows whose logits are computed
    # (follower, prompt length): answers (n > 1) sampled from their leader's last prompt row in this step
    shared: list[tuple[Seq, int]] = field(default_factory=list)


def lay_out(batch: list[Seq], prefill_chunk: int, lora: LoraPool, device: torch.device) -> Step:
    """The step over `batch` (running requests), whose adapters are in `lora`'s slots. Nothing of a request's state
    moves here: the caller advances `computed` once the forward pass has succeeded."""
    prefill, decode = [], []
    budget = prefill_chunk
    for seq in batch:
        if seq.generated > 0:
            decode += [(seq, j) for j in range(len(seq.beam.beams))] if seq.beam else [(seq, -1)]
        elif seq.leader is not None:
            continue  # its first token comes from its leader's prefill (below)
        elif budget > 0:
            n = min(len(seq.tokens) - seq.computed, budget)
            prefill.append((seq, n))
            budget -= n
    decode.sort(key=lambda row: row[0].slot)  # tokens of one adapter side by side: one segment each

    tokens: list[int] = []
    positions: list[torch.Tensor] = []
    write: list[torch.Tensor] = []
    runs: list[tuple[int, int, int]] = []  # (adapter slot, flat start, length)
    attention: list[tuple[int, int, int, torch.Tensor]] = []
    logit_rows: list[int] = []
    sampled: list[tuple[Seq, int]] = []
    heads: list[tuple[int, ClassifierHead]] = []  # (logits row, head): first tokens on a classification adapter
    shared: list[tuple[Seq, int]] = []
    running = {seq for seq in batch if seq.leader is not None}  # followers in this step
    for seq, n in prefill:
        start = len(tokens)
        tokens += seq.tokens[seq.computed : seq.computed + n]
        positions.append(torch.arange(seq.computed, seq.computed + n))
        slots = seq.beam_slots[0]
        write.append(slots[seq.computed : seq.computed + n])
        attention.append((start, n, seq.computed, slots[: seq.computed + n]))
        if seq.slot >= 0:
            runs.append((seq.slot, start, n))
        if seq.computed + n == len(seq.tokens):
            logit_rows.append(start + n - 1)
            sampled.append((seq, 0 if seq.beam else -1))
            head = lora.heads[seq.slot] if seq.slot >= 0 else None
            if head is not None:  # the prompt's last token: its logits give the first generated token
                heads.append((len(logit_rows) - 1, head))
            for follower in (f for f in seq.followers if f in running):  # n > 1: the same row, sampled again
                logit_rows.append(start + n - 1)
                sampled.append((follower, -1))
                shared.append((follower, seq.computed + n))
                if head is not None:
                    heads.append((len(logit_rows) - 1, head))
    decode_start = len(tokens)
    decode_slots = decode_mask = None
    if decode:
        lengths = [seq.computed + 1 for seq, _ in decode]
        tokens += [seq.beam.beams[j][-1] if seq.beam else seq.tokens[-1] for seq, j in decode]
        positions.append(torch.tensor([seq.computed for seq, _ in decode]))
        slot_rows = [seq.beam_slots[max(j, 0)] for seq, j in decode]
        write.append(torch.stack([s[n - 1] for s, n in zip(slot_rows, lengths, strict=True)]))
        decode_slots = torch.nn.utils.rnn.pad_sequence(
            [s[:n] for s, n in zip(slot_rows, lengths, strict=True)], batch_first=True
        )
        decode_mask = (torch.arange(decode_slots.shape[1]) < torch.tensor(lengths)[:, None])[:, None, None, :]
        for i, (seq, _) in enumerate(decode):
            if seq.slot < 0:
                continue
            if runs and runs[-1][0] == seq.slot and runs[-1][1] + runs[-1][2] == decode_start + i:
                runs[-1] = (seq.slot, runs[-1][1], runs[-1][2] + 1)
            else:
                runs.append((seq.slot, decode_start + i, 1))
        logit_rows += range(decode_start, decode_start + len(decode))
        sampled += decode

    sequences = Sequences(
        prefill=[(start, n, cached, slots.to(device)) for start, n, cached, slots in attention],
        decode_start=decode_start,
        decode_slots=None if decode_slots is None else decode_slots.to(device),
        decode_mask=None if decode_mask is None else decode_mask.to(device),
        write_slots=torch.cat(write).to(device),
        heads=heads,
    )
    return Step(
        prefill,
        decode,
        sampled,
        torch.tensor(tokens, dtype=torch.long, device=device),
        torch.cat(positions).to(device),
        sequences,
        Segments.build(runs, lora.dtype, device),
        torch.tensor(logit_rows, dtype=torch.long, device=device),
        shared,
    )


def units(batch: list[Seq]) -> list[list[Seq]]:
    """`batch` in the units that can step alone: a request's answers (n > 1) together, the others one by one (a
    follower cannot step before its leader's prefill has given it its first token)."""
    groups: dict[Seq, list[Seq]] = {}
    for seq in batch:
        groups.setdefault(seq.leader or seq, []).append(seq)
    return list(groups.values())


def probe_step(token: int, slots: torch.Tensor, device: torch.device) -> Step:
    """One token through the bare model at position 0, its key and value written to `slots` (a borrowed block):
    whether the model still computes at all."""
    return Step(
        [],
        [],
        [],
        torch.tensor([token], dtype=torch.long, device=device),
        torch.zeros(1, dtype=torch.long, device=device),
        Sequences([(0, 1, 0, slots)], 1, None, None, slots),
        Segments([], []),
        torch.zeros(1, dtype=torch.long, device=device),
    )
