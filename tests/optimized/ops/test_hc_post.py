"""hc_post: mHC post-mix, new[k] = post[k] * x + sum_j comb[j, k] * residual[j] per token, fp32 then bf16.

Twin: `parity.reference.model.Block.hc_post` on one request's `[1, s, D]` sublayer output, `[1, s, hc, D]`
residual and its `[1, s, hc]` / `[1, s, hc, hc]` weights. No segments: every token is mixed alone. Every backend
claims bit equality (the triton kernel follows the twin's op order, see its module docstring).
"""

import copy
import itertools

import pytest
import torch

from parity.optimized.ops import OpsConfig, registry, resolve_ops
from tests.optimized.ops.conftest import BackendImpl, check

OP = "hc_post"
OPS = resolve_ops()

CASES = [(1,), (2,), (5,), (37,), (63,), (129,), (1, 2, 5), (37, 1, 63), (2, 5, 1, 3, 1)]
PARAMS = [pytest.param(c, id="L{}".format("_".join(map(str, c)))) for c in CASES]


def cu_of(lengths):
    return tuple(itertools.accumulate(lengths, initial=0))


def device_of(impl) -> str:
    return "cuda" if impl.backend != "torch" and torch.cuda.is_available() else "cpu"


def operands(block, t, dev="cpu", d=256):
    """Sublayer output, residual streams, and the post/comb weights hc_pre derives from those streams."""
    residual = torch.randn(t, 4, d).to(torch.bfloat16)
    if d == 256:
        # the post/comb weights come from the CPU torch op whatever device the block was moved to
        fn, scale, base = (p.cpu() for p in (block.hc_attn_fn, block.hc_attn_scale, block.hc_attn_base))
    else:  # a mixer of the checkpoint's kind for a wider model
        fn, scale, base = torch.randn(24, 4 * d) * (4 * d) ** -0.5, 0.5 + torch.rand(3), torch.randn(24) * 0.1
    _, post, comb = OPS.hc_pre(
        residual, fn, scale, base, (0, t), block.norm_eps, block.hc_mult, block.hc_sinkhorn_iters, block.hc_eps
    )
    return [u.to(dev) for u in (torch.randn(t, d).to(torch.bfloat16), residual, post, comb)]


def reference_per_sequence(block, x, residual, post, comb, cu):
    return torch.cat(
        [
            block.hc_post(x[None, a:b], residual[None, a:b], post[None, a:b], comb[None, a:b])[0]
            for a, b in zip(cu[:-1], cu[1:])
        ]
    )


@pytest.mark.parametrize("lengths", PARAMS)
def test_ragged_matches_reference_per_sequence(impl, ref_model, lengths):
    dev = device_of(impl)
    block = copy.deepcopy(ref_model.layers[1]).to(dev)
    cu = cu_of(lengths)
    x, residual, post, comb = operands(block, cu[-1], dev)
    out = impl(x, residual, post, comb)
    assert out.dtype == torch.bfloat16 and out.shape == (cu[-1], 4, 256)
    check(impl, out, reference_per_sequence(block, x, residual, post, comb, cu))


def test_larger_dim(impl, ref_model):
    # D 1000: not a multiple of the column block (masked tail columns), several column blocks on the GPU
    dev = device_of(impl)
    block = copy.deepcopy(ref_model.layers[1]).to(dev)
    cu = cu_of((5, 1, 37))
    ops = operands(block, cu[-1], dev, d=1000)
    check(impl, impl(*ops), reference_per_sequence(block, *ops, cu))


def test_rows_do_not_depend_on_batchmates_or_position(impl, ref_model):
    dev = device_of(impl)
    block = ref_model.layers[1]
    a = operands(block, 37, dev)
    alone = impl(*a)
    for before, after in ((5, 1), (0, 63), (129, 0), (300, 3)):
        parts = [operands(block, before, dev), a, operands(block, after, dev)]
        batch = [torch.cat(ts) for ts in zip(*parts)]
        assert torch.equal(impl(*batch)[before : before + 37], alone)


def test_output_is_written_everywhere(impl, ref_model):
    # a NaN-poisoned output buffer: an element the kernel does not write stays NaN and fails the comparison
    if impl.backend == "torch":
        pytest.skip("the torch backend allocates its output; it takes no output buffer")
    dev = device_of(impl)
    block = copy.deepcopy(ref_model.layers[1]).to(dev)
    cu = cu_of((37, 1, 5))
    ops = operands(block, cu[-1], dev)
    out = torch.full((43, 4, 256), float("nan"), dtype=torch.bfloat16, device=dev)
    assert impl(*ops, out=out) is out
    check(impl, out, reference_per_sequence(block, *ops, cu))


def test_planted_bug_bf16_mixing_is_caught(impl, ref_model):
    # a kernel that mixes in bf16 (weights rounded, bf16 products and sum) must fail the comparison
    x, residual, post, comb = operands(ref_model.layers[1], 63, device_of(impl))
    bf = torch.bfloat16
    mixed = torch.sum(comb.to(bf).unsqueeze(-1) * residual.unsqueeze(-2), dim=1)
    buggy = post.to(bf).unsqueeze(-1) * x.unsqueeze(-2) + mixed
    assert not torch.equal(buggy, impl(x, residual, post, comb))


def test_planted_bug_comb_transposed_is_caught(ref_model):
    # the triton kernel reading comb as [k, j] (rows and columns swapped) must fail its bitwise check
    ops = resolve_ops(OpsConfig(overrides=((OP, "triton"),)))
    tri = BackendImpl(OP, "triton", registry()[OP]["triton"], ops.hc_post)
    from parity.optimized.ops.triton import hc_post as module

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    block = copy.deepcopy(ref_model.layers[1]).to(dev)
    args = operands(block, 63, dev)
    want = reference_per_sequence(block, *args, (0, 63))
    check(tri, module.launch(*args), want)
    with pytest.raises(AssertionError):
        check(tri, module.launch(*args, plant=1), want)
