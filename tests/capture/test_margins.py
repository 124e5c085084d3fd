"""Routing flip margins: the gap at the reference's own top-k boundary, from its gate input and the checkpoint."""

import torch
from torch import nn

from parity import dump
from parity.capture.margins import route_margins
from parity.checkpoint.reader import Checkpoint
from parity.compare.loader import Dump
from parity.compare.rows import RowStore
from parity.taps import Tap


def _reference_dump(n_layers: int, x: torch.Tensor) -> Dump:
    """`layers.<i>.ffn.input` rows of one request at positions 0.. (what the reference's taps record)."""
    model = nn.Module()
    model.layers = nn.ModuleList()
    for _ in range(n_layers):
        block = nn.Module()
        block.ffn = nn.Module()
        block.ffn.input = Tap()
        model.layers.append(block)
    writer = dump.MemoryWriter()
    handle = dump.install(model, dump.DumpConfig(modules=r"ffn\.input$"), writer=writer)
    with dump.phase("prefill", 0, cu_seqlens=[0, len(x)], requests=["0"], start_pos=[0]):
        for block in model.layers:
            block.ffn.input(x)
    handle.remove()
    return Dump.from_memory(writer, "reference")


def test_margin_is_the_top_k_boundary_gap_of_the_biased_scores(tiny_ckpt, tiny_args):
    args = tiny_args
    x = torch.randn(3, args.dim, generator=torch.Generator().manual_seed(0)).bfloat16()
    margin = route_margins(tiny_ckpt, args, RowStore.from_dump(_reference_dump(args.n_layers, x), args.n_layers))
    ckpt = Checkpoint(tiny_ckpt)
    scored = [i for i in range(args.n_layers) if i >= args.n_hash_layers]
    assert scored, "the tiny model has score-routed layers"
    for layer in scored:
        w = ckpt._shard(ckpt.weight_map[f"layers.{layer}.ffn.gate.weight"]).get_tensor(
            f"layers.{layer}.ffn.gate.weight"
        )
        b = ckpt._shard(ckpt.weight_map[f"layers.{layer}.ffn.gate.bias"]).get_tensor(f"layers.{layer}.ffn.gate.bias")
        # float64 twin of sqrt(softplus(x W^T)) + bias, sorted: the k-th minus the (k+1)-th
        s = (torch.nn.functional.softplus(x.double() @ w.double().T).sqrt() + b.double()).sort(-1, descending=True)
        k = args.n_activated_experts
        for pos in range(len(x)):
            want = float(s.values[pos, k - 1] - s.values[pos, k])
            got = margin(f"layers.{layer}.ffn.route", ("0", pos))
            assert got is not None and got >= 0
            assert abs(got - want) <= 1e-5 * max(1.0, float(s.values[pos, 0].abs())), (layer, pos, got, want)
    for layer in range(args.n_hash_layers):
        assert margin(f"layers.{layer}.ffn.route", ("0", 0)) is None  # hash routing has no scores
    assert margin(f"layers.{scored[0]}.attn.indexer.topk", ("0", 0)) is None
    assert margin(f"layers.{scored[0]}.ffn.route", ("0", 99)) is None  # no reference row there


def _captured_prefill(make_model, n_layers: int, n: int):
    """The reference's tap rows of one prefill of `n` tokens (request "0"), as a RowStore."""
    from parity.capture.reference import attach
    from parity.compare import sites

    model = make_model()
    attach(model)
    writer = dump.MemoryWriter()
    handle = dump.install(model, dump.DumpConfig(modules=sites.tap_pattern()), writer=writer)
    ids = torch.randint(0, 1024, (1, n), generator=torch.Generator().manual_seed(3))
    with dump.phase("prefill", 0, cu_seqlens=[0, n], requests=["0"], start_pos=[0]):
        model.forward_streams(ids, 0)
    handle.remove()
    return RowStore.from_dump(Dump.from_memory(writer, "reference"), n_layers), model


def test_indexer_margin_rescores_the_references_own_choice(make_model, tiny_ckpt, tiny_args):
    # the rescored index scores must reproduce the reference's chosen entries (its top-k as a set), and the margin is
    # the gap at that boundary; rows with no more visible entries than top-k slots have none
    from parity.capture.margins import index_scores, indexer_margins

    n = 90
    rows, model = _captured_prefill(make_model, tiny_args.n_layers, n)
    margin = indexer_margins(tiny_ckpt, rows)
    layers = [i for i, r in enumerate(tiny_args.compress_ratios[: tiny_args.n_layers]) if r == 4]
    assert layers, "the tiny model has CSA layers"
    k = tiny_args.index_topk
    checked = 0
    for layer in layers:
        block, attn = f"layers.{layer}", model.layers[layer].attn
        chosen = rows.rows[(f"{block}.attn.indexer.topk", "out")]
        table = rows.rows[(f"{block}.attn.indexer.compressor.entries", "out.0")]
        for pos in range(n):
            got = margin(f"{block}.attn.indexer.topk", ("0", pos))
            visible = (pos + 1) // 4
            if visible <= k:
                assert got is None, (layer, pos)
                continue
            entries = torch.stack([table[("0", (j + 1) * 4 - 1)] for j in range(visible)])
            qr = rows.rows[(f"{block}.attn.qr", "out")][("0", pos)]
            x = rows.rows[(f"{block}.attn.input", "out")][("0", pos)]
            scores = index_scores(attn, qr, x, entries, pos).float()
            top = scores.topk(k + 1)
            ids = chosen[("0", pos)]
            # the reference's choice is a top-k of these scores: nothing it left out scores above what it took. An
            # exact bf16 tie may be broken either way, and the reference scored the whole prefill in one einsum whose
            # bf16 sums may round otherwise on another CPU's kernels: a few bf16 steps of the largest score are
            # allowed (a rescoring at the wrong position is off by far more: the planted RoPE shift fails here)
            taken = torch.zeros(visible, dtype=torch.bool)
            taken[ids[ids >= 0].long()] = True
            slack = 4 * 2.0**-8 * float(scores.abs().max())
            assert int(taken.sum()) == k and scores[taken].min() >= scores[~taken].max() - slack, (layer, pos)
            assert got == float(top.values[k - 1] - top.values[k]) and got >= 0, (layer, pos, got)
            checked += 1
    assert checked > 0


def test_indexer_margin_rebuilds_the_block_with_the_runs_overrides(make_model, tiny_ckpt, tiny_args):
    # a run with index_topk overridden judges flips at its own top-k boundary: positions with more visible entries
    # than the overridden k (but not than the checkpoint's) get a margin, the gap at that k
    from parity.capture.margins import indexer_margins

    n, k = 44, 8
    assert k + 2 < tiny_args.index_topk
    rows, _ = _captured_prefill(make_model, tiny_args.n_layers, n)
    layer = next(i for i, r in enumerate(tiny_args.compress_ratios[: tiny_args.n_layers]) if r == 4)
    site, pos = f"layers.{layer}.attn.indexer.topk", 4 * (k + 2) - 1  # k + 2 visible entries
    assert indexer_margins(tiny_ckpt, rows)(site, ("0", pos)) is None
    got = indexer_margins(tiny_ckpt, rows, overrides=(("index_topk", k),))(site, ("0", pos))
    assert got is not None and got >= 0


def test_a_top_k_set_is_judged_modulo_exact_ties():
    from parity.capture.margins import is_top_k

    scores = torch.tensor([3.0, 0.0, 0.0, 0.0, 2.0])
    k = 3  # the k-th and (k+1)-th scores tie at 0: any one of the three zeros completes the set
    for tied in (1, 2, 3):
        assert is_top_k(scores, torch.tensor([0, 4, tied]), k)
    assert is_top_k(scores, torch.tensor([tied, -1, 4, 0]), k)  # -1 padding is no id
    assert not is_top_k(scores, torch.tensor([0, 1, 2]), k)  # left out 4, which scores above a taken 0: a real flip
    assert not is_top_k(scores, torch.tensor([0, 4]), k)  # too few
    assert not is_top_k(scores, torch.tensor([0, 4, 4]), k)  # a duplicate is not a set of k
    assert not is_top_k(scores, torch.tensor([0, 4, 7]), k)  # an id past the visible entries
