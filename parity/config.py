"""Model configuration shared by the reference and the optimized implementation.

`ModelArgs` has exactly the fields (names and defaults) of the official `inference/model.py` dataclass, so
`ModelArgs(**json.load(open("inference/config.json")))` works and unknown keys are an error, as in the official
`generate.py`. Two parity-only fields follow the official ones; both default to the official current behaviour.
"""

import json
import math
import os
import typing
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Literal, get_args, get_origin

import torch

from parity.errors import ParityError
from parity.formats import FP8_BLOCK

REVISIONS = ("initial", "current")
# integer fields that may be 0 (every other integer field is a size or a count that must be >= 1)
_MAY_BE_ZERO = {"n_hash_layers", "n_mtp_layers", "original_seq_len", "beta_fast", "beta_slow"}
# the largest integer field value (sizes, counts, lengths): int32, as the kernels index
_MAX_INT = 2**31 - 1
# float fields that may be 0 (every other float field is a scale, base or epsilon that must be > 0)
_FLOAT_MAY_BE_ZERO = {"swiglu_limit"}


@dataclass(frozen=True)
class ModelArgs:
    max_batch_size: int = 4
    max_seq_len: int = 4096
    dtype: Literal["bf16", "fp8"] = "fp8"
    scale_fmt: Literal[None, "ue8m0"] = "ue8m0"
    # None: the default Linear dtype (FP8 when dtype is "fp8"), as in the official code; "fp8" names FP8 experts
    # explicitly (V4-Flash-Base: e4m3 with 128x128 ue8m0 block scales, like every FP8 linear); "fp4": e2m1 per 32
    expert_dtype: Literal[None, "fp4", "fp8"] = None
    scale_dtype: Literal["fp32", "fp8"] = "fp8"
    vocab_size: int = 129280
    dim: int = 4096
    moe_inter_dim: int = 4096
    n_layers: int = 7
    n_hash_layers: int = 0
    n_mtp_layers: int = 1
    n_heads: int = 64
    # moe
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    n_activated_experts: int = 2
    score_func: Literal["softmax", "sigmoid", "sqrtsoftplus"] = "sqrtsoftplus"
    route_scale: float = 1.0
    swiglu_limit: float = 0.0
    # attn
    q_lora_rank: int = 1024
    head_dim: int = 512
    rope_head_dim: int = 64
    norm_eps: float = 1e-6
    o_groups: int = 8
    o_lora_rank: int = 1024
    window_size: int = 128
    compress_ratios: tuple[int, ...] = (0, 0, 4, 128, 4, 128, 4, 0)
    # yarn
    compress_rope_theta: float = 40000.0
    original_seq_len: int = 0
    rope_theta: float = 10000.0
    rope_factor: float = 40
    beta_fast: int = 32
    beta_slow: int = 1
    # index
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    # hc
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    # parity-only: which official revision to reproduce. "current" simulates the KV FP8 fake-quant and clamps the
    # shared expert's SwiGLU; "initial" has an identity KV fake-quant and an unclamped shared expert (spec §0.1).
    revision: Literal["initial", "current"] = "current"
    # parity-only: the official compressor state survives across sequences (spec §13.1). True resets it whenever a
    # sequence starts (start_pos == 0), which is what a serving engine does. False reproduces the official code.
    reset_state_on_prefill: bool = False

    def __post_init__(self):
        check_values(self, "ModelArgs")
        # the official JSON holds a list; keep a tuple so the dataclass stays hashable
        object.__setattr__(self, "compress_ratios", tuple(int(r) for r in self.compress_ratios))
        if self.revision not in REVISIONS:
            raise ParityError(f"ModelArgs.revision: expected one of {REVISIONS}, got {self.revision!r}")
        expected = self.n_layers + self.n_mtp_layers
        if len(self.compress_ratios) < expected:
            raise ParityError(
                f"ModelArgs.compress_ratios: needs {expected} entries (n_layers + n_mtp_layers), "
                f"got {len(self.compress_ratios)}"
            )
        if self.n_shared_experts != 1:
            raise ParityError(f"ModelArgs.n_shared_experts: the official model asserts 1, got {self.n_shared_experts}")

    # quantization policy, derived exactly as the official Transformer.__init__ sets its module globals
    @property
    def linear_dtype(self) -> torch.dtype:
        """Weight dtype of every `Linear` that does not name its own."""
        return torch.float8_e4m3fn if self.dtype == "fp8" else torch.bfloat16

    @property
    def act_scale_fmt(self) -> str | None:
        return "ue8m0" if self.scale_dtype == "fp8" else self.scale_fmt

    @property
    def act_scale_dtype(self) -> torch.dtype:
        return torch.float8_e8m0fnu if self.scale_dtype == "fp8" else torch.float32

    @property
    def routed_expert_dtype(self) -> torch.dtype | None:
        # "fp8" and None give the official Expert the same dtype when dtype is "fp8" (its default Linear dtype)
        return {"fp4": torch.float4_e2m1fn_x2, "fp8": torch.float8_e4m3fn}.get(self.expert_dtype)

    @property
    def expert_format(self) -> str:
        """What the routed experts hold: "fp4", "fp8" or "bf16" (None resolves to the default Linear dtype)."""
        return self.expert_dtype or ("fp8" if self.dtype == "fp8" else "bf16")

    @property
    def shared_expert_limit(self) -> float:
        return self.swiglu_limit if self.revision == "current" else 0.0

    @property
    def kv_fp8_sim(self) -> bool:
        """Whether the in-place KV fake-quant really rounds to FP8 (current) or is a bf16 identity (initial)."""
        return self.revision == "current"

    # serialization
    def official_dict(self) -> dict:
        """The fields an official `inference/config.json` may hold (parity-only fields dropped)."""
        d = asdict(self)
        d.pop("revision")
        d.pop("reset_state_on_prefill")
        d["compress_ratios"] = list(self.compress_ratios)
        return d

    def to_dict(self) -> dict:
        d = asdict(self)
        d["compress_ratios"] = list(self.compress_ratios)
        return d

    @classmethod
    def from_dict(cls, d: Mapping, source: str = "config") -> "ModelArgs":
        check_fields(d, source)
        try:
            return cls(**d)
        except ParityError as e:
            raise ParityError(f"{source}: {str(e).removeprefix('ModelArgs: ')}") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelArgs":
        try:
            with open(path, "rb") as f:
                d = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            raise ParityError(f"{path}: no such config file") from None
        except OSError as e:
            raise ParityError(f"{path}: cannot read ({e.strerror})") from None
        except UnicodeDecodeError as e:
            raise ParityError(f"{path}: not UTF-8 text (byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise ParityError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(d, dict):
            raise ParityError(f"{path}: expected a JSON object of ModelArgs keys")
        return cls.from_dict(d, source=str(path))

    def with_(
        self, changes: Mapping[str, object] | Iterable[tuple[str, object]] = (), /, *,
        source: str = "ModelArgs override", **fields,
    ) -> "ModelArgs":  # fmt: skip
        """A copy with `changes` (field name -> value, as a mapping or as pairs) and keyword `fields` applied. Unknown
        names and values of the wrong type are refused with a ParityError naming the key, so a misspelt override
        never passes unnoticed."""
        changes = {**dict(changes), **fields}
        check_fields(changes, source)
        return replace(self, **changes)

    # presets
    @classmethod
    def flash(cls, **overrides) -> "ModelArgs":
        """DeepSeek-V4-Flash `inference/config.json` (spec §1.2); unlisted keys keep the dataclass defaults."""
        return cls.from_dict({**FLASH_CONFIG, **overrides}, source="ModelArgs.flash")

    @classmethod
    def pro(cls, **overrides) -> "ModelArgs":
        """DeepSeek-V4-Pro `inference/config.json` (spec §1.2)."""
        return cls.from_dict({**PRO_CONFIG, **overrides}, source="ModelArgs.pro")

    @classmethod
    def tiny(cls, **overrides) -> "ModelArgs":
        """A CPU-sized config that keeps every V4 feature: SWA, CSA (ratio 4 + indexer), HCA (ratio 128), hash and
        score-routed layers, shared expert, FP8 linears, FP4 experts, MTP. Window and ratios keep their real values
        (128, 4, 128) because the boundary logic is what parity runs must exercise; widths shrink to the smallest
        multiples the FP8 (128) and FP4 (32) block sizes allow."""
        return cls.from_dict({**TINY_CONFIG, **overrides}, source="ModelArgs.tiny")

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelArgs":
        presets = {"tiny": TINY_CONFIG, "flash": FLASH_CONFIG, "pro": PRO_CONFIG}
        if name not in presets:
            raise ParityError(f"unknown model preset {name!r}; available: {sorted(presets)}")
        return cls.from_dict({**presets[name], **overrides}, source=f"preset {name!r} with overrides")


FIELD_NAMES = tuple(f.name for f in fields(ModelArgs))
_FIELD_TYPES = {f.name: f.type for f in fields(ModelArgs)}


def check_fields(d: Mapping, source: str) -> None:
    """Refuse keys that are not ModelArgs fields (listing the valid ones) and values that do not fit the field's
    declared type (JSON and TOML numbers: an int is accepted where a float is declared, a bool never is)."""
    unknown = sorted(set(d) - set(FIELD_NAMES))
    if unknown:
        raise ParityError(f"{source}: unknown ModelArgs key(s) {unknown}; valid keys: {', '.join(FIELD_NAMES)}")
    for name, value in d.items():
        annotation = _FIELD_TYPES[name]
        expected = _expected(name, annotation, value) or _type_mismatch(annotation, value)
        if expected is not None:
            raise ParityError(f"{source}: key {name!r}: expected {expected}, got {value!r}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _type_mismatch(annotation, value) -> str | None:
    """What `annotation` expects, if `value` does not fit it; None if it does."""
    if get_origin(annotation) is Literal:
        allowed = get_args(annotation)
        return None if any(value == a and type(value) is type(a) for a in allowed) else f"one of {list(allowed)}"
    if get_origin(annotation) is tuple:  # tuple[int, ...]: the official JSON holds a list
        ok = isinstance(value, list | tuple) and all(_is_int(v) for v in value)
        return None if ok else "a list of integers"
    checks = {bool: (lambda v: isinstance(v, bool), "true or false"), int: (_is_int, "an integer"),
              float: (lambda v: _is_int(v) or isinstance(v, float), "a number")}  # fmt: skip
    if annotation not in checks:
        return None if isinstance(value, annotation) else annotation.__name__
    check, expected = checks[annotation]
    return None if check(value) else expected


def check_values(args: ModelArgs, source: str) -> None:
    """Each field's type and range, against its annotation: one line naming the key, expected vs found. Runs before
    any use, so a bad config.json or case override never reaches the model as a crash or a silent nonsense run."""
    for f in fields(args):
        value = getattr(args, f.name)
        expected = _expected(f.name, f.type, value)
        if expected is not None:
            raise ParityError(f"{source}: key {f.name!r}: expected {expected}, got {value!r}")
    if args.n_activated_experts > args.n_routed_experts:
        raise ParityError(
            f"{source}: key 'n_activated_experts': expected <= n_routed_experts ({args.n_routed_experts}), "
            f"got {args.n_activated_experts}"
        )
    if args.rope_head_dim > args.head_dim:
        raise ParityError(
            f"{source}: key 'rope_head_dim': expected <= head_dim ({args.head_dim}), got {args.rope_head_dim}"
        )
    for key, value, expected in _shape_rules(args):
        if not expected[0](value):
            raise ParityError(f"{source}: key {key!r}: expected {expected[1]}, got {value!r}")


def _shape_rules(args: ModelArgs):
    """The divisibility the official kernels assert (quantization blocks along K, head groups, rotary pairs):
    refused here by key instead of as an AssertionError deep inside the first forward."""
    mult = lambda n: (lambda v: v % n == 0, f"a multiple of {n}")  # noqa: E731
    # every FP8/FP4 linear quantizes its input per FP8_BLOCK along K (bf16 linears do not)
    quantized = ("dim", "q_lora_rank", "o_lora_rank", "moe_inter_dim") if args.dtype == "fp8" else ()
    quantized = quantized or (("dim", "moe_inter_dim") if args.expert_dtype in ("fp4", "fp8") else ())
    rules = [(key, getattr(args, key), mult(FP8_BLOCK)) for key in quantized]
    rules.append(
        ("o_groups", args.o_groups, (lambda v: args.n_heads % v == 0, f"a divisor of n_heads ({args.n_heads})"))
    )
    rules.append(("rope_head_dim", args.rope_head_dim, mult(2)))
    # at window_size 1 the official get_window_topk_idxs takes its decode branch at start_pos 0 (one slot for the
    # whole prompt) and the prefill's index concat fails: the smallest window the official code runs is 2
    rules.append(("window_size", args.window_size, (lambda v: v >= 2, "an integer >= 2")))
    if 4 in args.compress_ratios[: args.n_layers + args.n_mtp_layers]:  # ratio-4 layers carry the indexer
        # the indexer rotates its last rope_head_dim dims and Hadamard-transforms all of them (a power-of-two size)
        rules.append((
            "index_head_dim", args.index_head_dim,
            (lambda v: v >= args.rope_head_dim and v & (v - 1) == 0,
             f"a power of two >= rope_head_dim ({args.rope_head_dim}), for the indexer's RoPE and Hadamard"),
        ))  # fmt: skip
    # the KV cache's non-rotary part is FP8-quantized in blocks of 64 (KV_QUANT_BLOCK of the official model)
    nope = args.head_dim - args.rope_head_dim
    rules.append(("head_dim", args.head_dim, (lambda v: nope % 64 == 0, "head_dim - rope_head_dim a multiple of 64")))
    return rules


def _expected(name: str, annotation, value) -> str | None:
    """What `value` should have been, or None when it is fine."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if annotation is bool:
        return None if isinstance(value, bool) else "true or false"
    if annotation is int:
        low = 0 if name in _MAY_BE_ZERO else 1
        if is_int and value > _MAX_INT:  # sizes past int32 are no model's: refused here, not by the allocator
            return f"an integer <= {_MAX_INT}"
        return None if is_int and value >= low else f"an integer >= {low}"
    if annotation is float:
        ok = (is_int or isinstance(value, float)) and math.isfinite(value)
        if name in _FLOAT_MAY_BE_ZERO:
            return None if ok and value >= 0 else "a finite number >= 0"
        return None if ok and value > 0 else "a finite number > 0"
    if typing.get_origin(annotation) is Literal:
        options = typing.get_args(annotation)
        return None if value in options and not isinstance(value, bool) else f"one of {list(options)}"
    if name == "compress_ratios":
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in value
        )
        return None if ok else "a list of integers >= 0"
    return None


_SHIPPED = dict(
    vocab_size=129280,
    n_hash_layers=3,
    head_dim=512,
    rope_head_dim=64,
    window_size=128,
    n_shared_experts=1,
    n_activated_experts=6,
    score_func="sqrtsoftplus",
    swiglu_limit=10.0,
    rope_theta=10000,
    compress_rope_theta=160000,
    original_seq_len=65536,
    rope_factor=16,
    beta_fast=32,
    beta_slow=1,
    index_n_heads=64,
    index_head_dim=128,
    hc_mult=4,
    hc_sinkhorn_iters=20,
    dtype="fp8",
    scale_fmt="ue8m0",
    expert_dtype="fp4",
)

FLASH_CONFIG = dict(
    _SHIPPED,
    dim=4096,
    n_layers=43,
    n_heads=64,
    q_lora_rank=1024,
    o_groups=8,
    o_lora_rank=1024,
    n_routed_experts=256,
    moe_inter_dim=2048,
    route_scale=1.5,
    index_topk=512,
    compress_ratios=(0, 0) + (4, 128) * 20 + (4, 0),
)

PRO_CONFIG = dict(
    _SHIPPED,
    dim=7168,
    n_layers=61,
    n_heads=128,
    q_lora_rank=1536,
    o_groups=16,
    o_lora_rank=1024,
    n_routed_experts=384,
    moe_inter_dim=3072,
    route_scale=2.5,
    index_topk=1024,
    compress_ratios=(128, 128) + (4, 128) * 29 + (4, 0),
)

TINY_CONFIG = dict(
    _SHIPPED,
    max_batch_size=4,
    max_seq_len=512,
    vocab_size=1024,
    dim=256,
    moe_inter_dim=128,
    n_layers=4,
    n_hash_layers=2,
    n_mtp_layers=1,
    n_heads=4,
    n_routed_experts=8,
    n_activated_experts=2,
    route_scale=1.5,
    q_lora_rank=128,
    head_dim=128,
    o_groups=2,
    o_lora_rank=128,
    index_n_heads=4,
    index_topk=16,
    # SWA, CSA, HCA, CSA, then the MTP layer (SWA)
    compress_ratios=(0, 4, 128, 4, 0),
)
