"""The pieces of a repro without a run: op arguments saved and reloaded bit for bit (safetensors + JSON spec), and
the judge a repro prints (bitwise where the backend claims it, the verdict's row metric against a threshold
otherwise, id sets for integer outputs), each with a planted difference it must catch."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from parity.errors import ParityError
from parity.optimized.ops.moe_experts import ExpertWeights
from parity.repro import codec, replay
from parity.repro.extract import _choose
from parity.repro.record import OpCall, OpRecorder, Target


def roundtrip(value, tmp_path):
    tensors = {}
    spec = codec.encode(value, tensors, "args")
    save_file(tensors, tmp_path / "t.safetensors")
    spec = json.loads(json.dumps(spec))  # what the JSON file holds
    return codec.decode(spec, load_file(tmp_path / "t.safetensors"))


def test_op_arguments_roundtrip_bit_for_bit(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, 8, generator=g).to(torch.bfloat16)
    fp8 = torch.randn(3, 128, generator=g).to(torch.float8_e4m3fn)
    e8m0 = torch.tensor([1.0, 2.0, 0.5]).to(torch.float8_e8m0fnu)
    freqs = torch.polar(torch.ones(5, 4), torch.randn(5, 4, generator=g))  # complex64
    expert = ExpertWeights((fp8, e8m0), (fp8, None), (fp8, e8m0), 7.0)
    value = (x[..., 4:], (x, freqs), [expert], None, 3, 1e-6, "ue8m0", torch.float32, (0, 2, 5), True)
    back = roundtrip(value, tmp_path)
    assert back[0].is_contiguous() and torch.equal(back[0], x[..., 4:])  # a strided view comes back contiguous
    assert torch.equal(back[1][0], x) and torch.equal(back[1][1], freqs) and isinstance(back[1], tuple)
    (e,) = back[2]
    assert isinstance(e, ExpertWeights) and e.swiglu_limit == 7.0 and e.w2[1] is None
    assert e.w1[0].view(torch.uint8).equal(fp8.view(torch.uint8)) and e.w1[1].view(torch.uint8).equal(
        e8m0.view(torch.uint8)
    )
    assert back[3:] == (None, 3, 1e-6, "ue8m0", torch.float32, (0, 2, 5), True)


def test_a_tensor_that_does_not_match_its_spec_is_refused(tmp_path):
    tensors = {}
    spec = codec.encode(torch.zeros(2, 3), tensors, "args")
    with pytest.raises(ParityError, match=r"tensor 'args': expected torch.float32 \[2, 3\], found torch.float32 \[3\]"):
        codec.decode(spec, {"args": torch.zeros(3)})
    with pytest.raises(ParityError, match="missing from its safetensors file"):
        codec.decode(spec, {})
    with pytest.raises(ParityError, match="cannot save an op argument of type object"):
        codec.encode(object(), {}, "args.0")


def test_the_judge_catches_one_bf16_ulp_when_bitwise_is_claimed():
    want = torch.randn(6, 4, 8).to(torch.bfloat16)
    got = want.clone()
    assert all(c.passed and c.bitwise for c in replay.judge(got, want, 0.0))
    got.view(torch.int16)[3, 2, 1] += 1  # one bf16 unit in the last place
    (chk,) = replay.judge(got, want, 0.0)
    assert not chk.passed and not chk.bitwise and chk.rows_differ == 1 and chk.worst_row == 3
    # judged by a threshold instead: a row error below it passes, above it fails
    (loose,) = replay.judge(got, want, 1.0)
    assert loose.passed and loose.max_row_err < 1.0
    (tight,) = replay.judge(got, want, loose.max_row_err / 2)
    assert not tight.passed and tight.rows_differ == 1


def test_the_judge_compares_ids_as_sets_and_refuses_shape_changes():
    want = torch.tensor([[0, 3], [1, 2]])
    (same,) = replay.judge((torch.tensor([[3, 0], [1, 2]]),), (want,), 0.0)  # a reorder is no difference
    assert same.passed and not same.bitwise
    (flip,) = replay.judge((torch.tensor([[0, 3], [1, 4]]),), (want,), 0.5)
    assert not flip.passed and flip.rows_differ == 1
    (shape,) = replay.judge(torch.zeros(2, 3), torch.zeros(3, 2), 1.0)
    assert not shape.passed


def test_nan_where_the_twin_is_finite_fails_any_threshold():
    want = torch.ones(3, 4)
    got = want.clone()
    got[1, 1] = float("nan")
    (chk,) = replay.judge(got, want, 1e9)
    assert not chk.passed and chk.worst_row == 1


def _results(recorder, outcomes):
    """(call, result, ran) triples for recorded calls (op, tap before it, passed)."""
    out = []
    for i, (op, tap, passed) in enumerate(outcomes):
        call = OpCall(op, i, tap, None, (), {}, None)
        recorder.calls.append(call)
        out.append((call, replay.ReproResult(op, "c", "t", 0.0, passed), {}))
    return out


def test_choose_prefers_the_failing_call_closest_to_the_site_one_per_op():
    rec = OpRecorder(Target("layers.0.attn.o_lora", 0, "layers.0", 0, "0", 0), segment_start="layers.0.attn.kv")
    results = _results(rec, [
        ("rope", "layers.0.attn.qr", False),  # upstream of the site's segment
        ("rope", "layers.0.attn.kv", False),
        ("sparse_attn", "layers.0.attn.kv", True),
        ("rope", "layers.0.attn.kv", False),  # the inverse RoPE: the latest failing call of the segment
        ("o_lora", "layers.0.attn.kv", True),
    ])  # fmt: skip
    chosen = _choose(results, rec, limit=4)
    assert [(c.op, c.index) for c, _, _ in chosen] == [("rope", 3)]


def test_choose_keeps_the_op_that_computes_the_site_when_no_call_fails():
    rec = OpRecorder(Target("layers.2.attn.o_lora", 2, "layers.2", 5, "1", 130), segment_start="layers.2.attn.kv")
    results = _results(
        rec,
        [
            ("rms_norm", "", True),
            ("sparse_attn", "layers.2.attn.kv", True),
            ("o_lora", "layers.2.attn.kv", True),
            ("fp8_gemm", "layers.2.attn.o_lora", True),
        ],
    )
    (chosen,) = _choose(results, rec, limit=4)
    assert chosen[0].op == "o_lora" and chosen[1].passed
