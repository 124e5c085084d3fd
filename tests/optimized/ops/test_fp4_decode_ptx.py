"""The compiled FP4 kernels' e2m1 -> e4m3 decoding (`_gemm_common.FP4_WORDS_PTX`, inline PTX on 32-bit words),
checked on any machine: the CPU cannot run PTX, so this file executes the PTX text itself (its few integer ops, on
numpy uint32) and compares it with the uint8 expressions the interpreter runs and with the e2m1 values. The GPU
tests of fp4_gemm and moe_experts run the compiled form; here a wrong mask or shift in the text fails on every
machine."""

import numpy as np
import pytest
import torch

from parity.formats import fp4_to_float
from parity.optimized.ops.triton._gemm_common import FP4_WORDS_PTX
from tests.optimized.ops.ptx_exec import all_byte_words, run_ptx

PTX = FP4_WORDS_PTX.value


def interpreter_bytes(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The uint8 expressions of the kernels' interpreter path (fp4_gemm / moe_experts)."""
    p = p.astype(np.uint8)
    lo = ((p << 2) & 0x1C) | ((p << 4) & 0x80)
    hi = ((p >> 2) & 0x1C) | (p & 0x80)
    return lo.astype(np.uint8), hi.astype(np.uint8)


def mismatches(text: str) -> int:
    """Bytes whose PTX decoding differs from the interpreter's, over `all_words`."""
    words = all_byte_words()
    lo, hi = run_ptx(text, {"$2": words}, ("$0", "$1"))
    packed = words.view(np.uint8)  # little endian: byte j of word i is packed[4 i + j]
    want_lo, want_hi = interpreter_bytes(packed)
    return int((lo.view(np.uint8) != want_lo).sum() + (hi.view(np.uint8) != want_hi).sum())


def test_the_ptx_equals_the_interpreter_expressions_on_every_byte_in_every_position():
    assert mismatches(PTX) == 0


def test_the_ptx_bytes_are_the_e2m1_values_times_2_to_the_minus_6():
    packed = np.arange(256, dtype=np.uint32)  # one byte per word, in position 0
    lo, hi = run_ptx(PTX, {"$2": packed}, ("$0", "$1"))
    e4m3 = torch.from_numpy(np.stack([lo, hi], 1).astype(np.uint8)).view(torch.float8_e4m3fn).float()  # [256, 2]
    want = fp4_to_float(torch.arange(256, dtype=torch.uint8)).view(256, 2) * 2.0**-6
    assert torch.equal(e4m3, want)


@pytest.mark.parametrize(
    "old, new",
    [
        ("and.b32 t0, t0, 0x1C1C1C1C;\n        shl.b32 t1", "and.b32 t0, t0, 0x1C1C1C0C;\n        shl.b32 t1"),
        ("shr.b32 t0, $2, 2", "shr.b32 t0, $2, 3"),
        ("and.b32 t1, $2, 0x80808080", "and.b32 t1, $2, 0x08080808"),
    ],
    ids=["low nibble mask drops a byte", "high nibble shifted one bit off", "high nibble sign from bit 3"],
)
def test_planted_ptx_bugs_are_caught(old, new):
    assert old in PTX
    assert mismatches(PTX.replace(old, new, 1)) > 0
