"""Attach the optimized model's taps to a reference `Transformer` from outside, at the same points.

The reference is frozen (bit-exact with the official code), so nothing is added to its source: `attach(model)`
registers `Tap` modules on a built model under the same paths the optimized model has (`layers.2.hc_pre_attn`,
`layers.2.attn.output`, ...) and routes values through them with forward hooks and, where the reference computes a
site inside a method rather than a module (the mHC mixes, the logits), with instance-level wrappers of that method.
A tap only returns what it is given, so the attached model computes bit for bit what it computed before (tested);
hooks on the taps (dump records, teacher forcing) then work on both models alike.

The reference runs one request at a time (`[1, s, ...]`); its taps see the batch dim squeezed (`[s, ...]`, the token
rows of one sequence), like the optimized model's flat `[T, ...]` rows. Indexer ids lose their KV offset (entry ids,
-1 = none) and compressor entries get the token rows that completed them, as in the optimized model.
"""

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from parity.reference import kernels
from parity.reference import model as ref
from parity.taps import Tap


class Attached:
    """What `attach` did: `remove()` takes the taps, hooks and wrappers off again."""

    def __init__(self, model: ref.Transformer):
        self.model = model
        self.hooks: list[RemovableHandle] = []
        self.taps: list[tuple[nn.Module, str]] = []
        self.wrapped: list[tuple[object, str]] = []

    def tap(self, owner: nn.Module, name: str) -> Tap:
        t = Tap()
        owner.add_module(name, t)
        self.taps.append((owner, name))
        return t

    def wrap(self, owner: object, name: str, fn) -> None:
        setattr(owner, name, fn)  # an instance attribute shadows the class's method
        self.wrapped.append((owner, name))

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        for owner, name in self.taps:
            delattr(owner, name)
        for owner, name in self.wrapped:
            delattr(owner, name)
        self.hooks, self.taps, self.wrapped = [], [], []


def attach(model: ref.Transformer) -> Attached:
    """Give a reference model the optimized model's taps (see the module docstring)."""
    done = Attached(model)
    for block in [*model.layers, *model.mtp]:
        _attach_block(done, block)
    for block in model.mtp:
        _attach_mtp(done, block)
    logits_tap = done.tap(model, "output_logits")
    logits = model.logits

    def tapped_logits(h):
        # the official head returns the last position's logits: that position is token row s-1
        out = logits(h)  # [1, vocab]
        rows = _rows([h.shape[1] - 1], h)
        return logits_tap(out, rows)[0]

    done.wrap(model, "logits", tapped_logits)
    return done


def _rows(values, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=like.device)


def _attach_block(done: Attached, block: ref.Block) -> None:
    taps = {n: done.tap(block, n) for n in ("streams_in", "hc_pre_attn", "hc_post_attn", "hc_pre_ffn", "hc_post_ffn")}
    hc_pre, hc_post = block.hc_pre, block.hc_post
    state = {}  # which sub-layer the block is in, and its (maybe forced) input streams

    def tapped_hc_pre(x, hc_fn, hc_scale, hc_base):
        attn = hc_fn is block.hc_attn_fn
        state["attn"] = attn
        if attn:
            # Block.forward took `residual = x` before this call: a forced input must reach hc_post too
            x = taps["streams_in"](x[0])[None]
            state["streams_in"] = x
        y, post, comb = hc_pre(x, hc_fn, hc_scale, hc_base)
        tap = taps["hc_pre_attn" if attn else "hc_pre_ffn"]
        y, post, comb = tap(y[0], post[0], comb[0])
        return y[None], post[None], comb[None]

    def tapped_hc_post(x, residual, post, comb):
        attn = state["attn"]
        if attn:
            residual = state.pop("streams_in")
        out = hc_post(x, residual, post, comb)
        return taps["hc_post_attn" if attn else "hc_post_ffn"](out[0])[None]

    done.wrap(block, "hc_pre", tapped_hc_pre)
    done.wrap(block, "hc_post", tapped_hc_post)
    for sub in (block.attn, block.ffn):
        _attach_io(done, sub)
    route = done.tap(block.ffn, "route")
    done.hooks.append(block.ffn.gate.register_forward_hook(lambda m, args, out: route(*out)))
    attn = block.attn
    _attach_attn_inner(done, attn)
    if attn.indexer is not None:
        _attach_indexer(done, attn.indexer)
        _attach_compressor(done, attn.indexer.compressor)
    if attn.compress_ratio:
        _attach_compressor(done, attn.compressor)


def _attach_io(done: Attached, module: nn.Module) -> None:
    """`<module>.input` on the first argument, `<module>.output` on the result (both `[1, s, ...]`)."""
    tin, tout = done.tap(module, "input"), done.tap(module, "output")

    def pre(m, args):
        return (tin(args[0][0])[None], *args[1:])

    done.hooks.append(module.register_forward_pre_hook(pre))
    done.hooks.append(module.register_forward_hook(lambda m, args, out: tout(out[0])[None]))


def _attach_attn_inner(done: Attached, attn: ref.Attention) -> None:
    """`attn.qr`: the q-LoRA latent as `q_norm` returns it (wq_b's and the indexer's input); `attn.q`: the query as
    the seam's `sparse_attn` receives it (after the head norm and RoPE); `attn.kv`: the window KV as `kv_norm` returns
    it (RoPE and the FP8 fake-quant then edit it in place); `attn.o_lora`: the grouped o-LoRA's output as `wo_b`
    receives it.

    The query exists only inside `Attention.forward`, so an instance-level wrapper of that forward swaps the seam's
    `sparse_attn` for the call's duration (as `parity.golden` swaps kernels; not thread-safe either) with one that
    passes q through the tap and then calls whatever `sparse_attn` the seam had (the golden's float64 one included).
    """
    qr, q, kv, o_lora = (done.tap(attn, name) for name in ("qr", "q", "kv", "o_lora"))
    done.hooks.append(attn.q_norm.register_forward_hook(lambda m, args, out: qr(out[0])[None]))
    done.hooks.append(attn.kv_norm.register_forward_hook(lambda m, args, out: kv(out[0])[None]))
    done.hooks.append(attn.wo_b.register_forward_pre_hook(lambda m, args: (o_lora(args[0][0])[None], *args[1:])))
    forward = attn.forward

    def tapped_forward(*args, **kwargs):
        seam = kernels.sparse_attn

        def sparse_attn(query, *rest):
            return seam(q(query[0])[None], *rest)  # [1, s, h, d]: the tap sees [s, h, d]

        kernels.sparse_attn = sparse_attn
        try:
            return forward(*args, **kwargs)
        finally:
            kernels.sparse_attn = seam

    done.wrap(attn, "forward", tapped_forward)


def _attach_indexer(done: Attached, indexer: ref.Indexer) -> None:
    topk = done.tap(indexer, "topk")

    def hook(m, args, out):
        # out: [1, s, k] slots = entry id + offset (-1 none); the tap sees entry ids
        offset = args[3]
        ids = topk(out[0].where(out[0] < 0, out[0] - offset))
        return ids.where(ids < 0, ids + offset)[None].to(out.dtype)

    done.hooks.append(indexer.register_forward_hook(hook))


def _attach_compressor(done: Attached, compressor: ref.Compressor) -> None:
    entries = done.tap(compressor, "entries")
    ratio = compressor.compress_ratio

    def hook(m, args, out):
        if out is None:
            return None
        x, start_pos, kv_cache = args[0], args[1], args[2]
        n = out.shape[1]
        if start_pos == 0:
            rows = [(j + 1) * ratio - 1 for j in range(n)]  # prefill: entry j is completed by token (j+1)r-1
        else:
            rows = [0]  # a decode completes at most one entry, with its one token
        new, _ = entries(out[0], _rows(rows, x))
        if new is not out[0]:
            # forced: the reference already wrote its own entries to the cache; the forced ones replace them
            if start_pos == 0:
                kv_cache[:1, :n] = new
            else:
                kv_cache[:1, start_pos // ratio] = new[0]
        return new[None]

    done.hooks.append(compressor.register_forward_hook(hook))


def _attach_mtp(done: Attached, block: ref.MTPBlock) -> None:
    tin = done.tap(block, "input")
    logits = done.tap(block, "output_logits")

    def pre(m, args):
        return (tin(args[0][0])[None], *args[1:])

    def hook(m, args, out):
        # MTPBlock.forward returns the last position's logits [1, vocab]
        return logits(out, _rows([args[0].shape[1] - 1], out))[0]

    done.hooks.append(block.register_forward_pre_hook(pre))
    done.hooks.append(block.register_forward_hook(hook))
