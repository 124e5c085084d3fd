"""A tiny executor for the kernels' inline PTX blocks (`tl.inline_asm_elementwise`), so that CPU tests run the very
asm text the compiled kernels run: each instruction of the block on numpy uint32 words, only the few ops the
blocks use (any other fails the test). Registers `$0, $1, ...` as in the asm constraints."""

import re

import numpy as np
import torch

MASK32 = 0xFFFFFFFF


def _prmt(a, b, sel):
    """prmt.b32 d, a, b, sel (default mode): byte i of d is byte sel[i] (0-7) of {b, a}; bit 3 of a selector
    nibble replicates that byte's sign bit over the byte instead."""
    a, b = np.broadcast_arrays(np.asarray(a, np.uint32), np.asarray(b, np.uint32))
    src = np.stack([(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)])
    out = np.zeros(a.shape, np.uint32)
    for i in range(4):
        nib = (int(sel) >> (4 * i)) & 0xF
        byte = src[nib & 7]
        if nib & 8:
            byte = np.where(byte & 0x80, 0xFF, 0).astype(np.uint32)
        out |= byte.astype(np.uint32) << np.uint32(8 * i)
    return out


def _bf16_pair_mul(a, b):
    """mul.rn.bf16x2: each 16-bit lane a bf16; the exact product rounded once to bf16 (round to nearest even)."""

    a, b = np.broadcast_arrays(np.asarray(a, np.uint32), np.asarray(b, np.uint32))

    def lanes(w):
        return torch.from_numpy(np.stack([w & 0xFFFF, w >> 16], -1).astype(np.uint16).view(np.int16).copy())

    prod = lanes(a).view(torch.bfloat16).double() * lanes(b).view(torch.bfloat16).double()
    bits = prod.to(torch.bfloat16).view(torch.int16).numpy().astype(np.uint16).astype(np.uint32)
    return bits[..., 0] | (bits[..., 1] << np.uint32(16))


OPS = {
    "shl.b32": lambda a, b: (a << b) & np.uint32(MASK32),
    "shr.b32": lambda a, b: a >> b,
    "and.b32": lambda a, b: a & b,
    "or.b32": lambda a, b: a | b,
    "mul.rn.bf16x2": _bf16_pair_mul,
}


def run_ptx(text: str, inputs: dict[str, np.ndarray], outputs: tuple[str, ...]) -> tuple[np.ndarray, ...]:
    """Execute the asm block with the given input registers (uint32 words) and return the output registers."""
    regs = {name: np.asarray(w).astype(np.uint32) for name, w in inputs.items()}

    def value(x):
        return regs[x] if x in regs else np.uint32(int(x, 0))

    body = text.strip().removeprefix("{").removesuffix("}")
    for line in filter(None, (s.strip() for s in body.split(";"))):
        if line.startswith(".reg"):
            continue
        m = re.fullmatch(r"(\S+)\s+(\S+),\s*(\S+),\s*(\S+)(?:,\s*(\S+))?", line)
        assert m, f"PTX the test cannot execute: {line!r}"
        if m[1] == "prmt.b32":
            regs[m[2]] = _prmt(value(m[3]), value(m[4]), int(m[5], 0)).astype(np.uint32)
            continue
        assert m[1] in OPS and m[5] is None, f"PTX the test cannot execute: {line!r}"
        regs[m[2]] = OPS[m[1]](value(m[3]), value(m[4])).astype(np.uint32)
    return tuple(regs[o] for o in outputs)


def all_byte_words() -> np.ndarray:
    """Every byte value in every byte position of a word (the other three bytes random, seeded): [1024] uint32."""
    rng = np.random.default_rng(0)
    words = []
    for pos in range(4):
        other = rng.integers(0, 1 << 32, size=256, dtype=np.uint64).astype(np.uint32)
        mask = np.uint32(~(0xFF << (8 * pos)) & MASK32)
        words.append((other & mask) | (np.arange(256, dtype=np.uint32) << np.uint32(8 * pos)))
    return np.concatenate(words)
