"""Tensor-parallel pieces without processes: the sharding rules against the official layout, a rank's weights read
from the full checkpoint, the merge rules of the dump format and of `compare`, and the float64 bound behind the
TP gate (tests/tp/test_tensor_parallel.py)."""

import json

import pytest
import torch

from parity.checkpoint import Selection, build_model
from parity.compare.diff import compare_dumps
from parity.compare.loader import load_dump
from parity.config import ModelArgs
from parity.dump.format import MERGE_ATTR, Record
from parity.dump.tags import Tags
from parity.dump.writer import DumpWriter, Site
from parity.errors import ParityError
from parity.formats import dequantize_fp8_blocks, e8m0_to_float
from parity.optimized import parallel
from parity.optimized.model import OptimizedTransformer
from parity.optimized.parallel import TP
from parity.reference import kernels
from parity.reference.model import Transformer

U = 2.0**-8  # bf16 unit roundoff


def _meta(factory):
    with torch.device("meta"):
        return factory()


def test_rank_model_holds_the_official_slices_and_its_experts():
    args = ModelArgs.tiny()
    full = dict(_meta(lambda: Transformer(args)).named_parameters())
    for rank in (0, 1):
        model = _meta(lambda r=rank: OptimizedTransformer(args, tp=TP(r, 2)))
        assert model.weight_shard == TP(rank, 2)
        mine = dict(model.named_parameters())
        split = {n for n in mine if parallel.split_dim(n) is not None}
        # the official convert.py mapping: embed, head, wq_b (both), wo_a, wo_b, attn_sink, weights_proj
        assert {n.rsplit(".", 2)[-2] if "." in n else n for n in split} >= {"wq_b", "wo_a", "wo_b", "weights_proj"}
        assert "layers.1.attn.attn_sink" in split and "embed.weight" in split and "head.weight" in split
        for name, p in mine.items():
            dim = parallel.split_dim(name)
            want = list(full[name].shape)
            if dim is not None:
                want[dim] //= 2
            assert list(p.shape) == want, name
        experts = [i for i, e in enumerate(model.layers[0].ffn.experts) if e is not None]
        assert experts == list(range(4 * rank, 4 * rank + 4))
        assert not any(".ffn.experts." in n and int(n.split(".")[4]) not in experts for n in mine if "layers.0" in n)
    one = _meta(lambda: OptimizedTransformer(args))
    assert one.weight_shard is None and {n: p.shape for n, p in one.named_parameters()} == {
        n: p.shape for n, p in full.items() if n in dict(one.named_parameters())
    }


def test_world_size_that_does_not_divide_is_refused_in_one_line():
    with pytest.raises(ParityError, match=r"n_heads is 4, not divisible by the world size 3"):
        _meta(lambda: OptimizedTransformer(ModelArgs.tiny(), tp=TP(0, 3)))


def test_rank_weights_are_slices_of_the_full_checkpoint(tiny_ckpt):
    sel = Selection(layers=[1], mtp=False, embed_head=True)
    full, _ = build_model(tiny_ckpt, sel, factory=lambda a: OptimizedTransformer(a))
    whole = dict(full.named_parameters())
    for rank in (0, 1):
        part, _ = build_model(tiny_ckpt, sel, factory=lambda a, r=rank: OptimizedTransformer(a, tp=TP(r, 2)))
        for name, p in part.named_parameters():
            if p.is_meta:
                continue
            dim = parallel.split_dim(name)
            want = whole[name] if dim is None else whole[name].chunk(2, dim)[rank]
            assert torch.equal(p.view(torch.uint8) if p.element_size() == 1 else p, _bits(want)), name
    # the planted bug moves rank 1's slice one row: its wq_b then differs from the true slice
    bad, _ = build_model(
        tiny_ckpt, sel, factory=lambda a: OptimizedTransformer(a, tp=TP(1, 2, (1, r"\.attn\.wq_b\.weight$", -1)))
    )
    w = bad.layers[1].attn.wq_b.weight.float()
    assert torch.equal(w, whole["layers.1.attn.wq_b.weight"].float()[255:511])
    with pytest.raises(ParityError, match=r"layers\.0\.attn\.wq_b\.weight slice start 257 is outside"):
        build_model(tiny_ckpt, sel, factory=lambda a: OptimizedTransformer(a, tp=TP(1, 2, (1, r"wq_b\.weight$", 1))))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t


def test_backend_must_fit_the_device():
    parallel.check_backend("gloo", "cpu")
    parallel.check_backend("nccl", "cuda:0")
    for backend, device in (("nccl", "cpu"), ("gloo", "cuda"), ("mpi", "cpu")):
        with pytest.raises(ParityError, match="tensor parallel backend"):
            parallel.check_backend(backend, device)


# merge rules: the dump format and compare
def _dump(root, rank: int, world: int, tensor: torch.Tensor, merge) -> None:
    writer = DumpWriter(root, "full", rank, world)
    site = Site("layers.0.ffn", "MoE", 0, "layers.0", merge)
    writer.write_activation(site, Tags("prefill", 0, (0, tensor.shape[0])), 0, 0, "output", {"out": tensor})


def _compare(tmp_path, single: torch.Tensor, parts: list[torch.Tensor], merge, name: str):
    _dump(tmp_path / f"{name}_one", 0, 1, single, None)
    for r, t in enumerate(parts):
        _dump(tmp_path / f"{name}_tp", r, len(parts), t, merge)
    return compare_dumps(load_dump(tmp_path / f"{name}_one"), load_dump(tmp_path / f"{name}_tp"))[0]


def test_declared_rules_merge_ranks_and_a_wrong_rule_fails(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, generator=g)
    a, b = torch.randn(6, 8, generator=g), None
    b = x - a  # partial sums
    assert _compare(tmp_path, x, [a, b], "sum", "sum").passed
    assert _compare(tmp_path, x, list(x.chunk(2, 1)), "cat:1", "cat").passed
    # planted: the same partials declared as replicas, or slices concatenated along the wrong dim
    wrong = _compare(tmp_path, x, [a, b], "replicated", "rep")
    assert not wrong.passed and "replicas differ from rank 0 on rank(s) [1]" in wrong.reasons[0]
    assert not _compare(tmp_path, x, list(x.chunk(2, 1)), "cat:0", "dim").passed
    rec = load_dump(tmp_path / "sum_tp").records[0]
    assert rec.merge == "sum" and rec.world_size == 2


def test_ranks_declaring_different_rules_are_refused(tmp_path):
    x = torch.ones(2, 4)
    _dump(tmp_path / "one", 0, 1, x, None)
    _dump(tmp_path / "tp", 0, 2, x[:, :2], "cat:1")
    _dump(tmp_path / "tp", 1, 2, x[:, 2:], "sum")
    with pytest.raises(ParityError, match=r"layers.0.ffn:out: the ranks declare different merge rules"):
        compare_dumps(load_dump(tmp_path / "one"), load_dump(tmp_path / "tp"))


def test_bad_merge_field_is_refused_naming_the_line(tmp_path):
    _dump(tmp_path / "d", 0, 1, torch.ones(2, 2), "sum")
    line = json.loads((tmp_path / "d" / "manifest.jsonl").read_text())
    with pytest.raises(ParityError, match=r"line 1: field 'merge' must be replicated, sum or cat:<dim>, got 'cat'"):
        Record.from_json({**line, "merge": "cat"}, "manifest.jsonl line 1")
    with pytest.raises(ParityError, match=rf"{MERGE_ATTR} of field 'out': 'mean' is not"):
        _dump(tmp_path / "e", 0, 1, torch.ones(2, 2), {"out": "mean"})
    assert parallel.MERGE_ATTR == MERGE_ATTR  # the model side spells the attribute the dump reads


def test_row_parallel_rounding_is_within_the_float64_bound(tiny_ckpt):
    """wo_b at TP 2 as `parallel.row_parallel` computes it (each rank's bf16 GEMM output over its input columns,
    summed in fp32, cast to bf16; gloo's fp32 sum of two values is one rounding) against one rank, with the exact
    float64 partial sums: elementwise within u(|S_0| + |S_1|) + 2u|S| (+ the fp32 accumulation), and in L2 within
    4u of ||S||, the gate of the end-to-end test."""
    model, args = build_model(tiny_ckpt, Selection(layers=[0], mtp=False, embed_head=False))
    lin = model.layers[0].attn.wo_b
    fmt = (args.act_scale_fmt, args.act_scale_dtype)
    x = (torch.randn(64, lin.in_features, generator=torch.Generator().manual_seed(3)) * 0.5).bfloat16()
    xq, xs = kernels.act_quant(x, 128, *fmt)
    one = kernels.fp8_gemm(xq, xs, lin.weight, lin.scale, fmt[1])
    half = lin.in_features // 2
    parts = [
        kernels.fp8_gemm(*(t.contiguous() for t in (xq[:, c], xs[:, [r]], lin.weight[:, c], lin.scale[:, [r]])), fmt[1])
        for r, c in enumerate((slice(0, half), slice(half, None)))
    ]
    tp = (parts[0].float() + parts[1].float()).bfloat16()
    # float64: dequantized activations and weights, exact products
    xd = xq.double() * e8m0_to_float(xs).double().repeat_interleave(128, 1)
    wd = dequantize_fp8_blocks(lin.weight, lin.scale).double()
    s0, s1 = xd[:, :half] @ wd[:, :half].T, xd[:, half:] @ wd[:, half:].T
    s = s0 + s1
    slack = 2.0**-22 * (xd.abs() @ wd.abs().T)  # fp32 accumulation over the k-blocks, generously
    diff = (tp.double() - one.double()).abs()
    assert bool((diff <= U * (s0.abs() + s1.abs()) + 2 * U * s.abs() + slack).all())
    assert 0 < float(diff.norm() / s.norm()) <= 4 * U
