"""The official Hugging Face on-disk layout of a DeepSeek-V4 checkpoint, derived from the reference model.

Names on disk are the model's parameter names (no `model.` prefix); what differs is the dtype of some tensors
(spec §2.1-§2.4) and three name-level differences:
- `attn.wo_a` is FP8 + `.scale` on disk; the official convert.py dequantizes it to bf16 and drops the scale;
- `mtp.N.embed.*` / `mtp.N.head.*` exist in the model (shared submodules) but not on disk;
- FP4 expert weights are packed int8 on disk and `float4_e2m1fn_x2` in the model (same bytes).

Shards follow the observed official layout: embed in shard 1, layer L in shard L+2, the final norm/head/hc_head
in shard n_layers+2, `mtp.*` in the last; named `model-0000i-of-0000n.safetensors`.
"""

import re
from dataclasses import dataclass

import torch

from parity.config import ModelArgs
from parity.formats import FP8_BLOCK

INDEX_FILE = "model.safetensors.index.json"
# fp32 model parameters that the checkpoint stores in bf16 (the load upcasts them exactly)
_BF16_ON_DISK = re.compile(r"(norm\.weight|^head\.weight|compressor\.(wkv|wgate)\.weight)$")
_LAYER = re.compile(r"^layers\.(\d+)\.")
_MTP = re.compile(r"^mtp\.(\d+)\.")
_SHARED_IN_MTP = re.compile(r"^mtp\.\d+\.(embed|head)\.")


@dataclass(frozen=True)
class DiskTensor:
    """One tensor as stored in the checkpoint, and the model parameter it feeds."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    param: str  # model parameter name (wo_a.scale feeds wo_a.weight)


def model_param_specs(args: ModelArgs) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of every reference-model parameter, from a model built on the meta device."""
    from parity.reference.model import Transformer

    with torch.device("meta"):
        model = Transformer(args)
    return {name: (tuple(p.shape), p.dtype) for name, p in model.state_dict().items()}


def disk_tensors_for_param(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> list[DiskTensor]:
    """The on-disk tensors that hold model parameter `name` (empty for the shared mtp.N.embed/head)."""
    if _SHARED_IN_MTP.match(name):
        return []
    if name.endswith("attn.wo_a.weight"):
        out_f, in_f = shape
        scale_shape = (-(-out_f // FP8_BLOCK), -(-in_f // FP8_BLOCK))
        scale_name = name[: -len("weight")] + "scale"
        return [
            DiskTensor(name, shape, torch.float8_e4m3fn, name),
            DiskTensor(scale_name, scale_shape, torch.float8_e8m0fnu, name),
        ]
    if dtype == torch.float4_e2m1fn_x2:
        return [DiskTensor(name, shape, torch.int8, name)]
    if name.endswith("tid2eid"):
        return [DiskTensor(name, shape, torch.int64, name)]
    if dtype == torch.float32 and _BF16_ON_DISK.search(name):
        return [DiskTensor(name, shape, torch.bfloat16, name)]
    return [DiskTensor(name, shape, dtype, name)]


def disk_layout(args: ModelArgs) -> list[DiskTensor]:
    """Every tensor of the official checkpoint for `args`, in model state-dict order."""
    tensors = []
    for name, (shape, dtype) in model_param_specs(args).items():
        tensors.extend(disk_tensors_for_param(name, shape, dtype))
    return tensors


def n_shards(args: ModelArgs) -> int:
    return args.n_layers + 3


def shard_index(name: str, args: ModelArgs) -> int:
    """1-based shard number of a tensor in the official layout."""
    if name.startswith("embed."):
        return 1
    if m := _LAYER.match(name):
        return int(m.group(1)) + 2
    if _MTP.match(name):
        return n_shards(args)
    return args.n_layers + 2  # norm, head, hc_head_*


def shard_file(index: int, total: int) -> str:
    return f"model-{index:05d}-of-{total:05d}.safetensors"


def hf_root_config(args: ModelArgs) -> dict:
    """The HF-style root config.json (spec §1.3). The reference never reads it; it is written for fidelity."""
    return {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": 1,
        "moe_intermediate_size": args.moe_inter_dim,
        "n_routed_experts": args.n_routed_experts,
        "n_shared_experts": args.n_shared_experts,
        "num_experts_per_tok": args.n_activated_experts,
        "routed_scaling_factor": args.route_scale,
        "scoring_func": args.score_func,
        "num_hash_layers": args.n_hash_layers,
        "sliding_window": args.window_size,
        "qk_rope_head_dim": args.rope_head_dim,
        "head_dim": args.head_dim,
        "q_lora_rank": args.q_lora_rank,
        "o_lora_rank": args.o_lora_rank,
        "o_groups": args.o_groups,
        "compress_ratios": list(args.compress_ratios),
        "compress_rope_theta": args.compress_rope_theta,
        "rope_theta": args.rope_theta,
        "rope_scaling": {
            "type": "yarn",
            "factor": args.rope_factor,
            "original_max_position_embeddings": args.original_seq_len,
            "beta_fast": args.beta_fast,
            "beta_slow": args.beta_slow,
        },
        "index_n_heads": args.index_n_heads,
        "index_head_dim": args.index_head_dim,
        "index_topk": args.index_topk,
        "hc_mult": args.hc_mult,
        "hc_sinkhorn_iters": args.hc_sinkhorn_iters,
        "hc_eps": args.hc_eps,
        "rms_norm_eps": args.norm_eps,
        "swiglu_limit": args.swiglu_limit,
        "num_nextn_predict_layers": args.n_mtp_layers,
        "max_position_embeddings": 1048576,
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "expert_dtype": args.expert_dtype,
        "quantization_config": {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "scale_fmt": "ue8m0",
            "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
        },
    }
