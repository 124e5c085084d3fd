"""compress_finish: a compressor's pooled entries -> bf16 entries (RMSNorm, RoPE, then Hadamard + FP4 or FP8
fake-quant of the non-rope dims).

Twin: the tail of `parity.reference.model.Compressor.forward` after the pooling. What each backend claims, tested
bit for bit:
- torch: the reference's own code (`RMSNorm`, `apply_rotary_emb`, `rotate_activation` + `kernels.fp4_act_quant` /
  `kernels.act_quant(_initial)`), with the norm over each row group as the reference normalizes a prefill's entries
  together and a decode's entry alone;
- triton: the registered Triton ops it fuses (rms_norm, rope, hadamard, fp4_fake_quant / kv_fake_quant) run in
  sequence: each of those is tested against its own twin in its own file, with its stated tolerance.
Awkward cases: one entry, odd counts, a zero row (the norm's eps and the quantizers' amax floors), huge and tiny
magnitudes, both FP8 modes (e4m3; the initial revision's bf16 identity) and scale formats.
"""

import pytest
import torch

from parity.optimized.ops import OpsConfig, resolve_ops
from parity.optimized.ops.triton import compress_finish as tri
from parity.reference import kernels
from parity.reference.model import FP4_BLOCK_SIZE, KV_QUANT_BLOCK, RMSNorm, apply_rotary_emb, rotate_activation

OP = "compress_finish"
RD = 64


def make_case(m: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pooled = torch.randn(m, d, generator=g) * torch.logspace(-3, 3, m)[:, None]  # rows from 1e-3 to 1e3
    if m > 2:
        pooled[1] = 0.0  # a zero row
    weight = 1 + 0.1 * torch.randn(d, generator=g)
    table = torch.polar(torch.ones(40, RD // 2), torch.rand(40, RD // 2, generator=g) * 6.3)  # [S, rd/2] complex64
    positions = torch.randint(0, 40, (m,), generator=g)
    return pooled, weight, table, positions


def reference_tail(pooled, weight, eps, segments, table, positions, rotate, scale_fmt, scale_dtype, fp8):
    """The reference Compressor's code after the pooling, each row group normalized as one call."""
    norm = RMSNorm(pooled.shape[-1], eps).requires_grad_(False)
    norm.weight.copy_(weight)
    parts = [norm(pooled[a:b].to(torch.bfloat16)[None])[0] for a, b in zip(segments, segments[1:])]
    kv = torch.cat(parts)
    apply_rotary_emb(kv[None][..., -RD:], table[positions])  # the reference's [1, n, rd] layout
    if rotate:
        kv = rotate_activation(kv)
        kernels.fp4_act_quant(kv, FP4_BLOCK_SIZE, True)
    else:
        quant = kernels.act_quant if fp8 else kernels.act_quant_initial
        quant(kv[..., :-RD], KV_QUANT_BLOCK, scale_fmt, scale_dtype, True)
    return kv


def triton_chain(pooled, weight, eps, table, positions, rotate, scale_fmt, scale_dtype, fp8):
    """The registered Triton ops the kernel fuses, in sequence (as the model called them before)."""
    ops = resolve_ops(OpsConfig(default="triton"))
    entries = ops.rms_norm(pooled.to(torch.bfloat16), weight, eps)
    ops.rope(entries[..., -RD:], table[positions])
    if rotate:
        entries = ops.hadamard(entries, entries.size(-1) ** -0.5)
        return ops.fp4_fake_quant(entries, FP4_BLOCK_SIZE)
    ops.kv_fake_quant(entries[..., :-RD], KV_QUANT_BLOCK, scale_fmt, scale_dtype, fp8)
    return entries


E8M0 = ("ue8m0", torch.float8_e8m0fnu)
FP32 = (None, torch.float32)
CASES = [
    pytest.param(1, 512, False, E8M0, True, id="kv-one"),
    pytest.param(7, 512, False, E8M0, True, id="kv-7"),
    pytest.param(33, 512, False, FP32, True, id="kv-fp32-scales"),
    pytest.param(5, 512, False, E8M0, False, id="kv-initial-revision"),
    pytest.param(1, 128, True, E8M0, True, id="indexer-one"),
    pytest.param(9, 128, True, E8M0, True, id="indexer-9"),
]


def device_of(impl) -> str:
    return "cuda" if impl.backend != "torch" and torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(("m", "d", "rotate", "fmt", "fp8"), CASES)
def test_equals_what_the_backend_claims(impl, m, d, rotate, fmt, fp8):
    pooled, weight, table, positions = make_case(m, d)
    eps, dev = 1e-6, device_of(impl)
    for segments in ((0, m), tuple(range(m + 1))):  # a prefill's entries together; every entry alone
        args = (pooled.to(dev), weight.to(dev), eps, segments, table.to(dev), positions.to(dev), rotate, *fmt, fp8)
        got = impl(*args).cpu()
        if impl.backend == "torch":
            want = reference_tail(pooled, weight, eps, segments, table, positions, rotate, *fmt, fp8)
        else:  # rows are independent there: the segments change nothing
            want = triton_chain(*(a.to(dev) if isinstance(a, torch.Tensor) else a for a in args[:3]),
                                table.to(dev), positions.to(dev), rotate, *fmt, fp8).cpu()  # fmt: skip
        assert got.dtype == torch.bfloat16 and torch.equal(got.view(torch.int16), want.view(torch.int16)), segments


@pytest.mark.parametrize("plant", [1, 2])
@pytest.mark.parametrize("rotate", [False, True])
def test_triton_planted_bugs_are_caught(plant, rotate):
    # 1: RoPE on the first rd dims; 2: the normed entries not rounded to bf16 before RoPE
    d = 128 if rotate else 512
    pooled, weight, table, positions = make_case(9, d, seed=1)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    pooled, weight, table, positions = (t.to(dev) for t in (pooled, weight, table, positions))
    got = tri.launch(pooled, weight, 1e-6, table, positions, rotate, "ue8m0", True, plant=plant)
    want = triton_chain(pooled, weight, 1e-6, table, positions, rotate, *E8M0, True)
    assert not torch.equal(got.view(torch.int16), want.view(torch.int16))
