"""How close to a tie the reference's routing choice was, for each flipped row: near-tie flips vs real ones.

A forced MoE gate sees the reference's input, so a flip (other expert ids than the reference's) happens either
because the reference's own choice was nearly a tie (the k-th and the (k+1)-th biased scores almost equal: any
legitimate rounding can swap them) or because the candidate's gate is wrong. The margin of a row is that gap,
`s[k-1] - s[k]` of the reference's biased scores sorted descending, recomputed from the reference's gate input
(`ffn.input`) with the checkpoint's gate weights and the reference's own score function. Hash-routed layers choose
by token id: they have no margin.

Indexer top-k flips get the same gap of the reference's index scores, recomputed as `Indexer.forward` computes them
(its wq_b, RoPE, Hadamard, FP4 simulation, weights_proj, relu-weighted head sum) from the reference's own captured
values: the q-LoRA latent (`attn.qr`), the attention input (`attn.input`) and the indexer compressor's entries of
that request completed up to the position (the entries its cache held). A row with no more visible entries than
top-k slots cannot flip legitimately: it has no margin. The block's weights are loaded from the checkpoint on the
first flip there (`build_model` of that block alone).

Ties: a flipped row whose candidate ids and reference ids are both a top-k of those rescored scores (every id
taken scores at least as high as every visible id left out) chose among exactly tied scores. Neither choice is
wrong, so the judge counts such a row as a tie, not a flip. The indexer's relu-weighted scores tie exactly at 0
whenever fewer than k visible entries score above 0. A row is excused only when both choices are exact top-k sets of
the rescored scores: where the rescoring does not reproduce the reference's own choice exactly, the row stays a
flip.
"""

import functools
from collections.abc import Callable

import torch

from parity.checkpoint.layout import disk_tensors_for_param
from parity.checkpoint.reader import Checkpoint, Selection, build_model
from parity.compare.rows import Key, RowStore
from parity.reference import kernels
from parity.reference import model as ref

Margin = Callable[[str, Key], float | None]
Tie = Callable[[str, Key, torch.Tensor, torch.Tensor], bool]
Scores = Callable[[str, Key], tuple[torch.Tensor, int] | None]


def boundary_gap(scores: torch.Tensor, k: int) -> float:
    """The margin of a top-k choice over `scores` [n] (n > k): the k-th largest minus the (k+1)-th."""
    top = scores.topk(k + 1).values
    return float(top[-2] - top[-1])


def is_top_k(scores: torch.Tensor, ids: torch.Tensor, k: int) -> bool:
    """Whether the valid ids (>= 0) of `ids` are k distinct indices of `scores` [n] scoring at least as high as
    every index left out (a top-k of `scores`, ties broken any way)."""
    chosen = ids[ids >= 0].long().unique()
    if chosen.numel() != k or int(chosen.max()) >= scores.numel():
        return False
    taken = torch.zeros(scores.numel(), dtype=torch.bool)
    taken[chosen] = True
    return bool((~taken).sum() == 0 or scores[taken].min() >= scores[~taken].max())


def _margin(scores: Scores) -> Margin:
    return lambda path, key: None if (s := scores(path, key)) is None else boundary_gap(*s)


def route_margins(ckpt_path, args, reference: RowStore) -> Margin:
    """`margin(site path, key)` for `<prefix>.ffn.route` sites; None where it does not apply."""
    return _margin(route_scores(ckpt_path, args, reference))


def indexer_margins(ckpt_path, reference: RowStore, overrides=()) -> Margin:
    """`margin(site path, key)` for `<block>.attn.indexer.topk` sites; None where it does not apply."""
    return _margin(indexer_scores(ckpt_path, reference, overrides))


def route_scores(ckpt_path, args, reference: RowStore) -> Scores:
    """`scores(site path, key)`: the reference's biased gate scores [E] of a `<prefix>.ffn.route` row and its k;
    None where they do not apply. `reference`: the reference's rows (the judge's own); the gate weights are read on
    the first flip."""
    ckpt = Checkpoint(ckpt_path)

    @functools.cache  # read once per layer, on its first flip
    def gate(prefix: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        name = f"{prefix}.gate.bias"
        if name not in ckpt.weight_map:  # hash routing: no bias, no scores
            return None
        e = args.n_routed_experts
        (w,) = disk_tensors_for_param(f"{prefix}.gate.weight", (e, args.dim), torch.bfloat16)
        (b,) = disk_tensors_for_param(name, (e,), torch.float32)
        return ckpt.read(w), ckpt.read(b).float()

    def row_scores(path: str, key: Key):
        if not path.endswith(".ffn.route"):
            return None
        prefix = path[: -len(".route")]
        x = reference.rows.get((f"{prefix}.input", "out"), {}).get(key)
        g = gate(prefix)
        if x is None or g is None:
            return None
        scores = ref.gate_scores(x[None].cpu(), g[0], args.score_func)[0] + g[1]  # [E]
        return scores, args.n_activated_experts

    return row_scores


def indexer_scores(ckpt_path, reference: RowStore, overrides=()) -> Scores:
    """`scores(site path, key)`: the reference's index scores [n] over the entries visible to a
    `<block>.attn.indexer.topk` row and its k; None where they do not apply. `overrides`: the run's ModelArgs
    overrides, so the rescoring block is the one the run built."""

    @functools.cache  # built once per block, on its first flip
    def attention(block: str) -> ref.Attention:
        kind, index = block.split(".")
        main = kind == "layers"
        sel = Selection(layers=[int(index)] if main else [], mtp=not main, embed_head=False)
        model, _ = build_model(ckpt_path, sel, overrides=dict(overrides))
        return model.get_submodule(f"{block}.attn")

    def row_scores(path: str, key: Key):
        if not path.endswith(".attn.indexer.topk"):
            return None
        block = path[: -len(".attn.indexer.topk")]
        qr = reference.rows.get((f"{block}.attn.qr", "out"), {}).get(key)
        x = reference.rows.get((f"{block}.attn.input", "out"), {}).get(key)
        table = reference.rows.get((f"{block}.attn.indexer.compressor.entries", "out.0"), {})
        if qr is None or x is None:
            return None
        attn = attention(block)
        idx, (request, pos) = attn.indexer, key
        ratio, k = idx.compress_ratio, idx.index_topk
        # entry j is completed by the token at position (j+1)*ratio - 1 and visible from it on
        entries = [table.get((request, (j + 1) * ratio - 1)) for j in range((pos + 1) // ratio)]
        if len(entries) <= k or any(e is None for e in entries):
            return None
        # the block is built on the CPU (rows may live on the run's device)
        scores = index_scores(attn, qr.cpu(), x.cpu(), torch.stack([e.cpu() for e in entries]), pos)
        return scores.float(), k

    return row_scores


@torch.no_grad()
def index_scores(attn: ref.Attention, qr, x, entries, pos: int) -> torch.Tensor:
    """One query's index scores [n] over `entries` [n, d], as `ref.Indexer.forward` scores them (qr, x: the query
    token's q-LoRA latent and attention input; pos: its position)."""
    with ref.default_dtype(torch.bfloat16):  # the reference runs in bf16 by default: its Linear outputs follow it
        idx, rd = attn.indexer, attn.rope_head_dim
        q = idx.wq_b(qr[None, None]).unflatten(-1, (idx.n_heads, idx.head_dim))  # [1, 1, h, d]
        ref.apply_rotary_emb(q[..., -rd:], attn.freqs_cis[pos : pos + 1])
        q = ref.rotate_activation(q)
        kernels.fp4_act_quant(q, ref.FP4_BLOCK_SIZE, True)
        weights = idx.weights_proj(x[None, None]) * (idx.softmax_scale * idx.n_heads**-0.5)  # [1, 1, h]
        score = torch.einsum("bshd,btd->bsht", q, entries[None])
        return (score.relu_() * weights.unsqueeze(-1)).sum(dim=2)[0, 0]  # [n]


def flip_judges(ckpt_path, args, reference: RowStore, overrides=()) -> tuple[Margin, Tie]:
    """For the judge's flipped rows: `margin(path, key)`, the reference's top-k boundary gap (routing or indexer),
    and `tie(path, key, got ids, want ids)`, whether both choices are top-k sets of the reference's rescored scores
    (module docstring). `args`: the run's ModelArgs, `overrides` what it changed from the checkpoint's. The scores
    of a row are computed once for both."""
    route, index = route_scores(ckpt_path, args, reference), indexer_scores(ckpt_path, reference, overrides)

    @functools.lru_cache(maxsize=4096)
    def scores(path: str, key: Key):
        return route(path, key) if path.endswith(".ffn.route") else index(path, key)

    def tie(path: str, key: Key, got: torch.Tensor, want: torch.Tensor) -> bool:
        s = scores(path, key)
        return s is not None and is_top_k(s[0], want.cpu(), s[1]) and is_top_k(s[0], got.cpu(), s[1])

    return _margin(scores), tie
