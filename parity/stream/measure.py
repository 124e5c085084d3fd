"""A streamed `parity run` measured: peak RSS over the whole run against one layer's weights, the resident weights
and the activations the run holds (`StreamMemory`, printed by `parity run --stream`)."""

import torch

from parity.checkpoint import Checkpoint
from parity.reference.model import Linear, Transformer
from parity.stream import weights
from parity.stream.memory import PeakRSS, StreamMemory, rss


def model_bytes(args) -> tuple[str, int, int, int]:
    """(largest block, its weight bytes, resident weight bytes, buffer bytes) of the reference model for `args`, as
    the model holds them (fp32 norms and head, bf16 wo_a), from a model built on the meta device (no memory)."""
    with torch.device("meta"):
        model = Transformer(args)
    blocks = weights.block_bytes(model)
    name = max(blocks, key=blocks.get)
    # an MTP block's embed/head are the model's own (resident): only the blocks' own parameters stream
    streamed = {
        id(getattr(s.owner, s.leaf))
        for n, b in model.named_modules()
        if weights.BLOCK.match(n)
        for s in weights.block_slots(n, b)
    }
    resident = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in streamed)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return name, blocks[name], resident, buffers


def decoded_bytes(args) -> int:
    """The largest temporary of a reference GEMM: for its exact emulation, `kernels.fp8_gemm` / `fp4_gemm` decode
    the whole [N, K] weight to float64, block-major (parity/reference). FP8: the codes are laid out block-major (1
    byte per element), then decoded (8 bytes): 9 x N x K bytes. FP4: the codes decode to fp32 [N, K], then to a
    float64 copy in that layout and a block-major one while it is alive: 16 x N x K bytes. The optimized side's
    torch backend calls the same kernels. (The block products, K/128 x tokens x N in float64 and fp32, are small
    next to it at the token counts of a streamed case.)"""
    with torch.device("meta"):
        model = Transformer(args)
    per_element = {torch.float8_e4m3fn: 9, torch.float4_e2m1fn_x2: 16}
    return max(
        (
            per_element[m.weight.dtype] * m.out_features * m.in_features
            for m in model.modules()
            if isinstance(m, Linear) and m.weight.dtype in per_element
        ),
        default=0,
    )


def _dump_bytes(capture) -> int:
    if capture is None or capture.dump.memory is None:
        return 0
    return sum(t.numel() * t.element_size() for t in capture.dump.memory.values())


class StreamMeasure:
    """`with StreamMeasure(case, ckpt) as m: ...; m.held(captures)` then `m.result()` (a dict for the report)."""

    def __init__(self, case, checkpoint):
        self.args = Checkpoint(checkpoint).args.with_(dict(case.overrides))
        self.peak = PeakRSS()
        self.captured = 0
        self.imports = 0

    def __enter__(self) -> "StreamMeasure":
        # the first model built in a process imports what its construction needs (torch._dynamo, sympy: ~130 MiB
        # of code and module objects, measured with the Flash-width bench): done here, before the
        # start, and reported, so the run's RSS is its data (weights, activations), not code loaded once
        before = rss()
        with torch.device("meta"):
            Transformer(self.args)
        self.imports = max(0, rss() - before)
        weights.reset_totals()
        self.peak.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.peak.__exit__(*exc)

    def held(self, c) -> None:
        """The records every run captured (reference, chained, forced, golden): held until the verdict is done."""
        self.captured = sum(_dump_bytes(x) for x in (c.reference, c.chained, c.forced, c.golden))

    def memory(self) -> StreamMemory:
        name, block, resident, buffers = model_bytes(self.args)
        t = weights.TOTALS
        mem = StreamMemory(
            peak=self.peak.peak, start=self.peak.start, block=block, block_name=name, resident=resident,
            captures=self.captured, buffers=buffers, decoded=decoded_bytes(self.args), loads=t.loads,
            read_bytes=t.bytes, read_s=t.seconds, method=self.peak.method, imports=self.imports,
        )  # fmt: skip
        return mem

    def result(self) -> dict:
        mem = self.memory()
        return {**mem.to_dict(), "line": mem.line()}
