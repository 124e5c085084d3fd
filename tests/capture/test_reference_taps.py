"""Taps attached to the frozen reference from outside: the same paths as the optimized model's, bit for bit the same
computation, fully removable; forcing through them replaces values (and the compressor's cached entries)."""

import torch

from parity.capture.reference import attach
from parity.compare import sites
from parity.optimized.model import OptimizedTransformer
from parity.reference.generate import greedy_generate


def _prompt(n=37, seed=1):
    return torch.randint(0, 1024, (n,), generator=torch.Generator().manual_seed(seed))


def test_attached_taps_change_no_bit_and_come_off(make_model):
    plain = greedy_generate(make_model(), _prompt(13), 3, prefill_len=5)
    model = make_model()
    before = dict(model.named_modules())
    handle = attach(model)
    tapped = greedy_generate(model, _prompt(13), 3, prefill_len=5)
    assert tapped.tokens == plain.tokens and tapped.mtp_drafts == plain.mtp_drafts
    assert all(torch.equal(a, b) for a, b in zip(tapped.logits, plain.logits))
    handle.remove()
    assert dict(model.named_modules()).keys() == before.keys()
    assert "hc_pre" not in vars(model.layers[0]) and "logits" not in vars(model)


def test_reference_and_optimized_expose_the_same_sites(make_model, tiny_args):
    ref = make_model()
    attach(ref)
    with torch.device("meta"):
        opt = OptimizedTransformer(tiny_args)
    n = tiny_args.n_layers

    def site_paths(model):
        return {p for p, _ in model.named_modules() if sites.parse(p, n) is not None}

    assert site_paths(ref) == site_paths(opt)
    assert len(site_paths(opt)) >= n * 11  # every block's sites (compressors and indexers where the layer has them)


def test_a_forcing_hook_replaces_the_value_downstream(make_model):
    # the hook protocol forcing relies on: a forward hook on a tap that returns a value replaces the tap's output
    model = make_model()
    attach(model)
    seen = {}
    model.layers[1].attn.output.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
    model.layers[1].hc_post_attn.register_forward_hook(lambda m, a, out: seen.setdefault("x", out))
    plain = make_model()
    attach(plain)
    plain.layers[1].hc_post_attn.register_forward_hook(lambda m, a, out: seen.setdefault("y", out))
    ids = _prompt(9)[None]
    model.forward_streams(ids, 0)
    plain.forward_streams(ids, 0)
    assert not torch.equal(seen["x"], seen["y"])


def test_forcing_the_attention_inner_taps_reaches_the_attention_output(make_model):
    # qr, q, kv and o_lora sit inside Attention.forward (hooks on q_norm, kv_norm, wo_b; the seam's sparse_attn
    # swapped for the call): a value forced there must reach the attention output, and the seam is put back
    from parity.reference import kernels

    seam = kernels.sparse_attn
    ids = _prompt(9)[None]

    def attn_out(model, tap=None):
        seen = {}
        attach(model)
        if tap is not None:
            getattr(model.layers[1].attn, tap).register_forward_hook(lambda m, a, out: out.roll(1, -1))
        model.layers[1].attn.output.register_forward_hook(lambda m, a, out: seen.setdefault("o", out))
        model.forward_streams(ids, 0)
        return seen["o"]

    plain = attn_out(make_model())
    for tap in ("qr", "q", "kv", "o_lora"):
        assert not torch.equal(attn_out(make_model(), tap), plain), tap
    assert kernels.sparse_attn is seam
