"""The compiled FP4 kernels' e2m1 -> e4m3 decoding (`_gemm_common.FP4_WORDS_PTX`, inline PTX on 32-bit words),
checked on any machine: the CPU cannot run PTX, so this file executes the PTX text itself (its few integer ops, on
numpy uint32) and compares it with the uint8 expressions the interpreter runs and with the e2m1 values. The GPU
tests of fp4_gemm and moe_experts run the compiled form; here a wrong mask or shift in the text fails on every
machine."""

import re

import numpy as np
import pytest
import torch

from parity.formats import fp4_to_float
from parity.optimized.ops.triton._gemm_common import FP4_WORDS_PTX

PTX = FP4_WORDS_PTX.value


def run_ptx(text: str, word: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Execute the asm block on uint32 words ($2) -> ($0, $1). Only the ops the block uses; any other fails."""
    regs = {"$2": word.astype(np.uint32)}
    ops = {
        "shl.b32": lambda a, b: (a << b) & np.uint32(0xFFFFFFFF),
        "shr.b32": lambda a, b: a >> b,
        "and.b32": lambda a, b: a & b,
        "or.b32": lambda a, b: a | b,
    }
    body = text.strip().removeprefix("{").removesuffix("}")
    for line in filter(None, (s.strip() for s in body.split(";"))):
        if line.startswith(".reg"):
            continue
        m = re.fullmatch(r"(\S+)\s+(\S+),\s*(\S+),\s*(\S+)", line)
        assert m and m[1] in ops, f"PTX the test cannot execute: {line!r}"
        a, b = (regs[x] if x in regs else np.uint32(int(x, 0)) for x in (m[3], m[4]))
        regs[m[2]] = ops[m[1]](a, b).astype(np.uint32)
    return regs["$0"], regs["$1"]


def interpreter_bytes(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The uint8 expressions of the kernels' interpreter path (fp4_gemm / moe_experts)."""
    p = p.astype(np.uint8)
    lo = ((p << 2) & 0x1C) | ((p << 4) & 0x80)
    hi = ((p >> 2) & 0x1C) | (p & 0x80)
    return lo.astype(np.uint8), hi.astype(np.uint8)


def all_words() -> np.ndarray:
    """Every byte value in every byte position of a word (the other three bytes random, seeded)."""
    rng = np.random.default_rng(0)
    words = []
    for pos in range(4):
        other = rng.integers(0, 1 << 32, size=256, dtype=np.uint64).astype(np.uint32)
        mask = np.uint32(~(0xFF << (8 * pos)) & 0xFFFFFFFF)
        words.append((other & mask) | (np.arange(256, dtype=np.uint32) << np.uint32(8 * pos)))
    return np.concatenate(words)


def mismatches(text: str) -> int:
    """Bytes whose PTX decoding differs from the interpreter's, over `all_words`."""
    words = all_words()
    lo, hi = run_ptx(text, words)
    packed = words.view(np.uint8)  # little endian: byte j of word i is packed[4 i + j]
    want_lo, want_hi = interpreter_bytes(packed)
    return int((lo.view(np.uint8) != want_lo).sum() + (hi.view(np.uint8) != want_hi).sum())


def test_the_ptx_equals_the_interpreter_expressions_on_every_byte_in_every_position():
    assert mismatches(PTX) == 0


def test_the_ptx_bytes_are_the_e2m1_values_times_2_to_the_minus_6():
    packed = np.arange(256, dtype=np.uint32)  # one byte per word, in position 0
    lo, hi = run_ptx(PTX, packed)
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
