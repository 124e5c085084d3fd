"""Greedy generation with the reference model, one request at a time, with MTP drafts alongside.

Like the official generate.py: a prefill at start_pos 0, then one-token decodes. The MTP block is run the way a
speculative decoder would use it: at position i it gets the main model's final streams at i and the token at i+1,
and drafts the token at i+2 (spec §10); the drafts are recorded and compared with what the main model generates.
"""

import time
from dataclasses import dataclass, field

import torch

from parity.reference.model import Transformer


@dataclass
class Generation:
    prompt: torch.Tensor  # [n] int64
    tokens: list[int] = field(default_factory=list)  # greedy tokens at positions n, n+1, ...
    logits: list[torch.Tensor] = field(default_factory=list)  # [vocab] fp32 that chose each token
    mtp_drafts: list[int] = field(default_factory=list)  # drafts for positions n+1, n+2, ...
    prefill_s: float = 0.0
    decode_s: list[float] = field(default_factory=list)

    @property
    def mtp_accepted(self) -> int:
        """How many MTP drafts equal the token the main model then generated at that position."""
        return sum(int(d == t) for d, t in zip(self.mtp_drafts, self.tokens[1:]))

    @property
    def mtp_checked(self) -> int:
        return min(len(self.mtp_drafts), len(self.tokens) - 1)


def greedy_generate(model: Transformer, prompt: torch.Tensor, decode_steps: int, mtp: bool = True) -> Generation:
    """Prefill `prompt` ([n] int64) and decode `decode_steps` tokens greedily (batch 1)."""
    gen = Generation(prompt=prompt)
    device = model.embed.weight.device
    ids = prompt.to(device)[None]
    mtp_block = model.mtp[0] if mtp and len(model.mtp) else None

    def step(input_ids, pos, shifted):
        h = model.forward_streams(input_ids, pos)
        logits = model.logits(h)[0]
        token = int(logits.argmax())
        gen.tokens.append(token)
        gen.logits.append(logits)
        if mtp_block is not None:
            next_ids = torch.cat([shifted, torch.tensor([token], device=device)])[None]
            gen.mtp_drafts.append(int(mtp_block(h, pos, next_ids)[0].argmax()))
        return token

    t0 = time.perf_counter()
    token = step(ids, 0, ids[0, 1:])
    gen.prefill_s = time.perf_counter() - t0
    pos = len(prompt)
    empty = torch.empty(0, dtype=torch.long, device=device)
    for _ in range(decode_steps):
        t0 = time.perf_counter()
        token = step(torch.tensor([[token]], device=device), pos, empty)
        gen.decode_s.append(time.perf_counter() - t0)
        pos += 1
    return gen
