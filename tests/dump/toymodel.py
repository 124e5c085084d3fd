"""A tiny decoder with a KV-style cache, planted faults and a dump-tagging runner, for the dump/compare tests.

The model is small and CPU-fast but has what the harness must handle: layer blocks with sub-modules
(`layers.<i>.attn`, `layers.<i>.ffn`), a decode path that reads state written by prefill, tuple outputs, and
batched `[b, s, d]` activations. A `Fault` plants a known bug at one layer and phase.
"""

from dataclasses import dataclass

import torch
from torch import nn

from parity import dump

# awkward sizes on purpose: nothing is a power of two
DIM, VOCAB, N_LAYERS = 24, 37, 5


@dataclass(frozen=True)
class Fault:
    """A planted bug: `kind` at layer `layer`, active only in `phase` ("prefill" or "decode").

    kinds: "ffn-scale" (the FFN output is scaled, as by a dropped/doubled scale factor), "attn-count" (the running
    mean divides by an off-by-one count, as by a wrong position offset), "slot-scale" (slot i of the batch is scaled
    by 1 + i * 1e-3, a slot-dependent op), "mate-leak" (each slot adds a bit of the next slot, a batch-mate leak).
    """

    layer: int
    phase: str
    kind: str = "ffn-scale"


class Linear(nn.Linear):
    """A batch-invariant linear: each row reduces on its own, in the same order, whatever the batch holds.

    torch's CPU GEMM picks kernels by row count, so a row's result can change with its batch-mates (the harness
    finds this: 5 identical rows give a different last row). The toy must be slot-invariant when no fault is
    planted, so it multiplies and reduces per row instead.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x.unsqueeze(-2) * self.weight).sum(-1)  # [..., out]
        return y if self.bias is None else y + self.bias


class ToyAttention(nn.Module):
    """Causal running mean of projected values with a cache: decode steps read the sum that prefill left."""

    def __init__(self):
        super().__init__()
        self.wv = Linear(DIM, DIM, bias=False)
        self.wo = Linear(DIM, DIM, bias=False)
        self.off_by_one = False
        self.reset()

    def reset(self) -> None:
        self.cache_sum, self.cache_len = None, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [b, s, d] -> [b, s, d]
        s = x.shape[1]
        v = self.wv(x)
        csum = v.cumsum(1) + (0 if self.cache_sum is None else self.cache_sum)  # [b, s, d]
        count = self.cache_len + torch.arange(1, s + 1, dtype=x.dtype) + (1 if self.off_by_one else 0)  # [s]
        self.cache_sum, self.cache_len = csum[:, -1:].detach(), self.cache_len + s
        return self.wo(csum / count.view(1, s, 1))


class ToyFFN(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = Linear(DIM, 2 * DIM - 5)
        self.w2 = Linear(2 * DIM - 5, DIM)
        self.scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(torch.nn.functional.gelu(self.w1(x))) * self.scale


class ToyBlock(nn.Module):
    """Returns `(hidden, residual_norm)`: a tuple, as many real decoder layers do."""

    def __init__(self, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attn, self.ffn = ToyAttention(), ToyFFN()
        self.slot_fault: str | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.norm1(x))
        x = x + self.ffn(self.norm2(x))
        if self.slot_fault == "slot-scale":
            x = x * (1 + 1e-3 * torch.arange(x.shape[0], dtype=x.dtype)).view(-1, 1, 1)
        elif self.slot_fault == "mate-leak":
            x = x + 1e-3 * x.roll(1, dims=0)
        return x, x.norm(dim=-1)


class ToyLM(nn.Module):
    def __init__(self, seed: int = 0, fault: Fault | None = None):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(ToyBlock(i) for i in range(N_LAYERS))
        self.norm = nn.LayerNorm(DIM)
        self.head = Linear(DIM, VOCAB, bias=False)
        self.fault = fault

    def reset(self) -> None:
        for layer in self.layers:
            layer.attn.reset()

    def forward(self, tokens: torch.Tensor, decode: bool = False) -> torch.Tensor:
        # tokens: [b, s] -> logits [b, s, vocab]
        x = self.embed(tokens).to(self.head.weight.dtype)
        for i, layer in enumerate(self.layers):
            self._arm(layer, i, decode)
            x, _ = layer(x)
        return self.head(self.norm(x))

    def _arm(self, layer: ToyBlock, i: int, decode: bool) -> None:
        f = self.fault
        on = f is not None and f.layer == i and f.phase == ("decode" if decode else "prefill")
        layer.ffn.scale = 1.5 if on and f.kind == "ffn-scale" else 1.0
        layer.attn.off_by_one = on and f.kind == "attn-count"
        layer.slot_fault = f.kind if on and f.kind in ("slot-scale", "mate-leak") else None


def prompts(batch: int = 3, seq: int = 7, decode_steps: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt tokens `[b, s]` and teacher-forced decode tokens `[steps, b, 1]` (fixed, so both runs see the same)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g), torch.randint(
        0, VOCAB, (decode_steps, batch, 1), generator=g
    )


@torch.no_grad()
def run(
    model: ToyLM,
    tokens: torch.Tensor,
    decode_tokens: torch.Tensor,
    config: dump.DumpConfig,
    requests: list[str] | None = None,
) -> list[torch.Tensor]:
    """Prefill then decode with dump tags (`batch` layout); returns the logits of every step."""
    model.reset()
    handle = dump.install(model, config)
    b = tokens.shape[0]
    try:
        with dump.tags(impl=type(model).__name__):
            with dump.phase("prefill", step=0, batch=b, requests=requests):
                logits = [model(tokens)]
            for step, tok in enumerate(decode_tokens, start=1):
                with dump.phase("decode", step=step, batch=b, requests=requests):
                    logits.append(model(tok, decode=True))
    finally:
        handle.remove()
    return logits
