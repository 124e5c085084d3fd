"""Did HF load the checkpoint's weights? Every HF parameter and buffer against the reference's, dequantized.

HF's loader renames the official tensors, fuses each layer's experts into `gate_up_proj` `[E, 2I, D]` (w1 over w3)
and `down_proj` `[E, D, I]`, and, on CPU, dequantizes FP8 (128x128 block scales) and FP4 (per-32 scales) weights to
bf16. The reference holds the official parameters: FP8/FP4 codes with their scales, bf16 or fp32 copies of bf16
disk tensors. `compare` maps every HF tensor to its official source (`official_sources`, the built-in name map),
splits the fused experts, dequantizes the reference's (exact: e4m3 and e2m1 times a power of two fit bf16), and
requires equal values (dtype-tolerant: fp32 vs bf16 copies of the same bf16 value, int32 vs int64 hash tables are
equal). Every official tensor must be consumed by some HF tensor (MTP blocks excepted: HF has no MTP module).
"""

import re

import torch

from parity.checkpoint import build_model
from parity.formats import dequantize_fp4_groups, dequantize_fp8_blocks

# HF name below `model.layers.<i>.` -> official name below `layers.<i>.` (the fused experts are handled apart)
_LAYER = {
    "self_attn.sinks": "attn.attn_sink",
    "self_attn.q_a_proj.weight": "attn.wq_a.weight",
    "self_attn.q_a_norm.weight": "attn.q_norm.weight",
    "self_attn.q_b_proj.weight": "attn.wq_b.weight",
    "self_attn.kv_proj.weight": "attn.wkv.weight",
    "self_attn.kv_norm.weight": "attn.kv_norm.weight",
    "self_attn.o_a_proj.weight": "attn.wo_a.weight",
    "self_attn.o_b_proj.weight": "attn.wo_b.weight",
    "self_attn.compressor.position_bias": "attn.compressor.ape",
    "self_attn.compressor.kv_proj.weight": "attn.compressor.wkv.weight",
    "self_attn.compressor.gate_proj.weight": "attn.compressor.wgate.weight",
    "self_attn.compressor.kv_norm.weight": "attn.compressor.norm.weight",
    "self_attn.compressor.indexer.position_bias": "attn.indexer.compressor.ape",
    "self_attn.compressor.indexer.kv_proj.weight": "attn.indexer.compressor.wkv.weight",
    "self_attn.compressor.indexer.gate_proj.weight": "attn.indexer.compressor.wgate.weight",
    "self_attn.compressor.indexer.kv_norm.weight": "attn.indexer.compressor.norm.weight",
    "self_attn.compressor.indexer.q_b_proj.weight": "attn.indexer.wq_b.weight",
    "self_attn.compressor.indexer.scorer.weights_proj.weight": "attn.indexer.weights_proj.weight",
    "mlp.gate.weight": "ffn.gate.weight",
    "mlp.gate.e_score_correction_bias": "ffn.gate.bias",
    "mlp.gate.tid2eid": "ffn.gate.tid2eid",
    "mlp.shared_experts.gate_proj.weight": "ffn.shared_experts.w1.weight",
    "mlp.shared_experts.up_proj.weight": "ffn.shared_experts.w3.weight",
    "mlp.shared_experts.down_proj.weight": "ffn.shared_experts.w2.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "attn_hc.fn": "hc_attn_fn",
    "attn_hc.base": "hc_attn_base",
    "attn_hc.scale": "hc_attn_scale",
    "ffn_hc.fn": "hc_ffn_fn",
    "ffn_hc.base": "hc_ffn_base",
    "ffn_hc.scale": "hc_ffn_scale",
}
_MODEL = {
    "model.embed_tokens.weight": "embed.weight",
    "lm_head.weight": "head.weight",
    "model.norm.weight": "norm.weight",
    "model.hc_head.hc_fn": "hc_head_fn",
    "model.hc_head.hc_base": "hc_head_base",
    "model.hc_head.hc_scale": "hc_head_scale",
}
_IN_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# derived buffers (RoPE tables), not checkpoint tensors
_DERIVED = re.compile(r"(^|\.)rotary_emb\.")


def official_sources(hf_name: str, hf_shape: tuple[int, ...]) -> list[tuple[str, tuple]] | None:
    """The official tensors an HF tensor holds, each with the index of HF's tensor it fills; None: no source."""
    if hf_name in _MODEL:
        return [(_MODEL[hf_name], ())]
    m = _IN_LAYER.match(hf_name)
    if m is None:
        return None
    layer, rest = f"layers.{m[1]}", m[2]
    if rest in _LAYER:
        return [(f"{layer}.{_LAYER[rest]}", ())]
    if rest == "mlp.experts.gate_up_proj":  # [E, 2I, D]: w1 rows, then w3 rows
        n_experts, two_inter = hf_shape[0], hf_shape[1]
        inter = two_inter // 2
        out = []
        for e in range(n_experts):
            out.append((f"{layer}.ffn.experts.{e}.w1.weight", (e, slice(0, inter))))
            out.append((f"{layer}.ffn.experts.{e}.w3.weight", (e, slice(inter, two_inter))))
        return out
    if rest == "mlp.experts.down_proj":  # [E, D, I]
        return [(f"{layer}.ffn.experts.{e}.w2.weight", (e,)) for e in range(hf_shape[0])]
    return None


def dequantized(params: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """An official parameter's value in float64: FP8/FP4 codes times their scales, others as they are."""
    w = params[name]
    scale = params.get(name.removesuffix("weight") + "scale") if name.endswith(".weight") else None
    if w.dtype == torch.float8_e4m3fn and scale is not None:
        return dequantize_fp8_blocks(w, scale).double()
    if w.dtype == torch.float4_e2m1fn_x2 and scale is not None:
        return dequantize_fp4_groups(w.view(torch.int8), scale).double()
    return w.double()


def compare(hf_model: torch.nn.Module, ckpt, device: str = "cpu") -> list[str]:
    """One line per HF tensor whose values differ from the reference's dequantized ones, per HF tensor with no
    official source, and per official tensor HF does not hold; [] when HF loaded exactly the checkpoint."""
    ref, _ = build_model(ckpt, device=device)
    params = {n: t.detach() for n, t in [*ref.named_parameters(), *ref.named_buffers()]}
    used: set[str] = set()
    problems: list[str] = []
    for name, t in [*hf_model.named_parameters(), *hf_model.named_buffers()]:
        if _DERIVED.search(name):
            continue
        sources = official_sources(name, tuple(t.shape))
        if sources is None:
            problems.append(f"HF tensor {name} {tuple(t.shape)}: no official source in the name map")
            continue
        got = t.detach().double()
        for official, index in sources:
            if official not in params:
                problems.append(f"HF tensor {name}: official tensor {official} not in the reference")
                continue
            used.add(official)
            want, have = dequantized(params, official), got[index] if index else got
            if want.shape != have.shape:
                problems.append(f"{official}: shape {tuple(want.shape)}, HF {name} holds {tuple(have.shape)}")
            elif not torch.equal(want, have):
                bad = int((want != have).sum())
                problems.append(f"{official}: {bad} of {want.numel()} values differ in HF's {name}")
    derived = {n for n in params if n.endswith(".scale") and n.removesuffix("scale") + "weight" in params}
    unused = sorted(n for n in params if n not in used and n not in derived and not _reference_only(n))
    problems += [f"{n}: in the checkpoint, not held by HF's model" for n in unused]
    return problems


def _reference_only(name: str) -> bool:
    """Reference tensors with no HF counterpart by design: the MTP blocks, the reference's caches and RoPE tables."""
    leaf = name.rsplit(".", 1)[-1]
    return name.startswith("mtp.") or leaf in ("kv_cache", "kv_state", "score_state", "freqs_cis")
