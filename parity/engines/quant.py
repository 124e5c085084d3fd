"""The reference's quantization switches for comparing engines that do not simulate DeepSeek-V4's quantization.

The official model simulates quantization in three places a dequantizing engine (HF transformers' port, any bf16
port) leaves out (docs/engines.md):

- `kv`: the window KV and the main compressor's entries are FP8-fake-quantized in place (`act_quant(...,
  inplace=True)`, non-rope dims, blocks of 64). Off: identity.
- `indexer`: the indexer's query and entries are Hadamard-rotated and FP4-fake-quantized in place
  (`rotate_activation`, `fp4_act_quant(..., inplace=True)`). Off: identity, no rotation.

Both are reached through the reference's kernel seam (`parity.reference.kernels`), the way `parity.golden` swaps
its float64 kernels: nothing in `parity/reference/` changes, and outside the `with` block the reference is the
default, bit-exact one (tested). The seam is read when a model is built (`Attention.kv_quant` binds `act_quant` in
`__init__`), so build the model inside the block. Not thread-safe, like the golden's swap.

What stays on: FP8/FP4 *weights* keep their activation quantization (`act_quant` without `inplace` before every
FP8/FP4 GEMM). An engine that dequantizes weights to bf16 computes `x @ dequant(W)` instead; compare it on a
checkpoint with bf16 weights (`dtype = "bf16"`, `expert_dtype` unset: `cases/hf_tiny.toml`) to leave that out too.
"""

from collections.abc import Iterator
from contextlib import contextmanager

from parity.cases import QUANT_SWITCHES as SWITCHES
from parity.errors import ParityError
from parity.golden import swapped_kernels
from parity.reference import kernels


def _inplace_identity(quant):
    """`quant` with its in-place (fake-quant) path made an identity; the quantizing path is left as it was."""

    def act_quant(x, *args, **kwargs):
        # official signature: (x, block_size, scale_fmt, scale_dtype, inplace)
        inplace = kwargs.get("inplace", args[3] if len(args) > 3 else False)
        return x if inplace else quant(x, *args, **kwargs)

    return act_quant


def _fp4_identity(quant):
    def fp4_act_quant(x, *args, **kwargs):
        # official signature: (x, block_size, inplace)
        inplace = kwargs.get("inplace", args[1] if len(args) > 1 else False)
        return x if inplace else quant(x, *args, **kwargs)

    return fp4_act_quant


def _no_rotation(x, scale=1.0):
    return x


def check_switches(off: tuple[str, ...] | list[str], where: str) -> tuple[str, ...]:
    unknown = [s for s in off if s not in SWITCHES]
    if unknown:
        raise ParityError(f"{where}: unknown quantization switch(es) {unknown}; valid: {list(SWITCHES)}")
    return tuple(off)


@contextmanager
def quant_sim_off(off: tuple[str, ...] = SWITCHES) -> Iterator[None]:
    """Turn the reference's quantization simulations named in `off` into identities while the block runs."""
    check_switches(off, "quant_sim_off")
    swap = {}
    if "kv" in off:
        # the KV fake-quant of either revision (current: e4m3, initial: already a bf16 identity)
        swap["act_quant"] = _inplace_identity(kernels.act_quant)
        swap["act_quant_initial"] = _inplace_identity(kernels.act_quant_initial)
    if "indexer" in off:
        # Hadamard (rotate_activation calls the seam's hadamard_transform) and FP4 of the indexer's q and entries
        swap["hadamard_transform"] = _no_rotation
        swap["fp4_act_quant"] = _fp4_identity(kernels.fp4_act_quant)
    with swapped_kernels(swap):
        yield
