"""Greedy generation with the reference model, one request at a time, with MTP drafts alongside.

Like the official generate.py: a prefill at start_pos 0, then one-token decodes. The MTP block is run the way a
speculative decoder would use it: at position i it gets the main model's final streams at i and the token at i+1,
and drafts the token at i+2 (spec §10); the drafts are recorded and compared with what the main model generates.
"""

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from parity.reference.model import Transformer


@dataclass
class Generation:
    prompt: torch.Tensor  # [n] int64
    tokens: list[int] = field(default_factory=list)  # greedy tokens at positions n, n+1, ...
    logits: list[torch.Tensor] = field(default_factory=list)  # [vocab] fp32 that chose each token
    mtp_drafts: list[int] = field(default_factory=list)  # drafts for positions n+1, n+2, ...


def greedy_generate(
    model: Transformer,
    prompt: torch.Tensor,
    decode_steps: int,
    mtp: bool = True,
    prefill_len: int | None = None,
    forced: list[int] | None = None,
    scope: Callable[[str, int, int], object] | None = None,
) -> Generation:
    """Prefill `prompt` ([n] int64) and decode `decode_steps` tokens greedily (batch 1).

    `prefill_len` prefills only the first tokens and feeds the rest of the prompt one decode at a time (the
    schedule of a chunked engine run); `forced` emits these tokens instead of the greedy ones (teacher forcing).
    The logits of every emitted token are kept. `scope(kind, start_pos, n_tokens)` may return a context manager
    each forward runs in (kind "main" or "mtp"; the dump tags of `parity run`)."""
    gen = Generation(prompt=prompt)
    device = model.embed.weight.device
    ids = prompt.to(device)
    n = len(prompt) if prefill_len is None else prefill_len
    mtp_block = model.mtp[0] if mtp and len(model.mtp) else None
    sequence = ids.tolist()

    def emit(logits) -> int:
        token = int(logits.argmax()) if forced is None else forced[len(gen.tokens)]
        gen.tokens.append(token)
        gen.logits.append(logits)
        sequence.append(token)
        return token

    def within(kind, pos, n):
        ctx = scope(kind, pos, n) if scope is not None else None
        return ctx if ctx is not None else nullcontext()

    def step(input_ids, pos):
        # input_ids: [1, s] at positions pos.. ; returns the main streams
        end = pos + input_ids.shape[1]
        with within("main", pos, input_ids.shape[1]):
            h = model.forward_streams(input_ids, pos)
            if end >= len(prompt):
                emit(model.logits(h)[0])
        if mtp_block is not None:
            next_ids = torch.tensor(sequence[pos + 1 : end + 1], device=device)[None]
            with within("mtp", pos, input_ids.shape[1]):
                draft = int(mtp_block(h, pos, next_ids)[0].argmax())
            if end >= len(prompt):
                gen.mtp_drafts.append(draft)
        return end

    pos = step(ids[None, :n], 0)
    while pos < len(prompt):
        pos = step(ids[None, pos : pos + 1], pos)
    for _ in range(decode_steps):
        pos = step(torch.tensor([[sequence[pos]]], device=device), pos)
    return gen
