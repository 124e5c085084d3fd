"""What the routed experts of a checkpoint hold (FP4, FP8 or bf16), detected the way real checkpoints carry it.

V4-Flash and V4-Pro store routed experts as FP4 (packed int8 + e8m0 per 32); V4-Flash-Base stores them as FP8 e4m3
with 128x128 ue8m0 block scales, like every other FP8 linear. The official code learns it from `expert_dtype` in
`inference/config.json` ("fp4"; absent = the default Linear dtype, FP8), and its README asks the user to delete the
key by hand for FP8 experts. The HF root `config.json` says it too, but not reliably: the current revision writes
`"expert_dtype": "fp4"`, the initial one has no key at all while its experts are FP4 (spec §0.1), and Base has
`quantization_config` without `expert_dtype` (or with "fp8"). So:

1. an explicit "fp4"/"fp8" in the root config is a claim; an absent or null key claims nothing;
2. the stored bytes decide: the header dtype of the first routed expert's `w1.weight` (I8 = FP4, F8_E4M3 = FP8,
   BF16 = bf16), read without loading data;
3. a claim that contradicts the bytes is refused (one line naming both files); the inference config's value is
   replaced by the detected format when it means another one (e.g. "fp4" left in a Base checkpoint's config),
   and left as written when it means the same (None and "fp8" both give FP8 experts under dtype "fp8").
"""

import json
import re
from pathlib import Path

from parity.config import ModelArgs
from parity.errors import ParityError

_FIRST_EXPERT = re.compile(r"^layers\.\d+\.ffn\.experts\.\d+\.w1\.weight$")
# safetensors header dtype -> what the experts hold
_STORED = {"I8": "fp4", "F8_E4M3": "fp8", "BF16": "bf16"}


def declared_format(root: dict) -> str | None:
    """The routed-expert format an HF root config states explicitly ("fp4" / "fp8"), or None when it does not.
    `quantization_config` without `expert_dtype` is Base's FP8 layout but also the initial Flash revision's FP4
    one, so it states nothing on its own: the stored bytes decide (`stored_format`)."""
    value = root.get("expert_dtype")
    return value if value in ("fp4", "fp8") else None


def stored_format(weight_map: dict[str, str], header_dtype) -> tuple[str, str, str] | None:
    """(format, tensor name, header dtype) of the first routed expert weight, or None when the checkpoint has no
    readable one (a broken shard is then reported by the normal read, with its own message)."""
    name = next((n for n in sorted(weight_map) if _FIRST_EXPERT.match(n)), None)
    if name is None:
        return None
    try:
        dtype = header_dtype(name)
    except (ParityError, OSError, ValueError, RuntimeError):
        return None
    fmt = _STORED.get(dtype)
    return None if fmt is None else (fmt, name, dtype)


def resolve(args: ModelArgs, root_path: Path, weight_map: dict[str, str], header_dtype) -> ModelArgs:
    """`args` (from inference/config.json) with `expert_dtype` set to what the checkpoint really holds;
    `header_dtype(name)` is a tensor's safetensors dtype string, read from its shard's header."""
    root = _read_root(root_path)
    declared = declared_format(root)
    stored = stored_format(weight_map, header_dtype)
    if stored is None:
        return args
    fmt, name, dtype = stored
    if declared is not None and declared != fmt:
        raise ParityError(
            f"{root_path}: expert_dtype {declared!r} but tensor {name!r} ({weight_map[name]}) is stored as {dtype}: "
            f"the routed experts are {fmt}"
        )
    if fmt == args.expert_format or fmt == "bf16":
        return args  # bf16 experts under FP8 linears cannot be expressed: the layout check names the tensor
    return args.with_(expert_dtype=fmt, source=f"{root_path.parent}: detected routed experts")


def _read_root(path: Path) -> dict:
    """The HF root config.json, or {} when the checkpoint has none (the reference never reads it; only its expert
    keys are used here). One that is there but damaged, or that states an expert format no V4 checkpoint has, is
    refused: it would otherwise be ignored without a word."""
    try:
        d = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ParityError(f"{path}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ParityError(f"{path}: not a readable JSON config ({e})") from None
    if not isinstance(d, dict):
        raise ParityError(f"{path}: expected a JSON object, found {type(d).__name__}")
    if d.get("expert_dtype") not in (None, "fp4", "fp8"):
        raise ParityError(f"{path}: key 'expert_dtype': expected 'fp4' or 'fp8', got {d['expert_dtype']!r}")
    return d
