"""`tensor_stats`'s pass over a finite chunk of bf16, fp16 or fp32 values as one compiled loop (numba).

The torch form (parity/dump/stats.py) casts every 16 Ki-element tile into a float64 buffer and sweeps it five times
(squares, two sums, the zero count, min / max), each sweep a torch call: about 2 us of dispatch per 16 Ki elements
and call, which made stats mode slower than writing the tensors whole (docs/perf.md, data path). Here each element
is read once from the raw bits, widened to float64 in registers, and Σx, Σx², the zero count, the minimum and the
maximum are updated in the same iteration; the loop vectorizes.

Same quantities, same bounds as the torch form: x and x² of bf16, fp16 or fp32 values are exact in float64, the
sums are reassociated float64 sums (within n * 2^-53 * Σ|terms| of the exact sum, as any order:
tests/dump/test_dump_writer.py checks against exactly rounded sums); minimum and maximum are exact, taken over the
doubles' bits mapped to int64 in value order (`_ordered`), which the vectorizer reduces where it cannot reduce a
float minimum. A chunk holding a NaN or Inf (the exponent check on the raw bits) is left to the torch form.
"""

import struct

import torch

from parity.rawbits import FORMATS, UNSIGNED, bits, exponent_check, jit, raw, widen

_LOW63 = 0x7FFFFFFFFFFFFFFF


@jit
def _ordered(x):
    """A double's bits as an int64 that orders as the value (negative doubles: their low 63 bits flipped)."""
    b = bits(x)
    return b ^ ((b >> 63) & _LOW63)


@jit
def _sums(a):
    s1 = s2 = 0.0
    zeros = 0
    lo, hi = _LOW63, -_LOW63 - 1
    for j in range(a.shape[0]):
        x = widen(a[j])
        s1 += x
        s2 += x * x
        zeros += x == 0.0
        k = _ordered(x)
        lo, hi = min(lo, k), max(hi, k)
    return s1, s2, zeros, lo, hi


class StatsLoop:
    """The compiled pass for one dtype: `finite(chunk)` from the raw bits, then `sums(chunk)` on a finite chunk."""

    def __init__(self, view: torch.dtype, mask: int):
        self.view = view
        self.unsigned, kind = UNSIGNED[view.itemsize]
        self._nonfinite = exponent_check(kind, mask)

    def finite(self, chunk: torch.Tensor) -> bool:
        u = raw(chunk, self.unsigned)
        return not self._nonfinite(u, u)

    def sums(self, chunk: torch.Tensor) -> tuple[float, float, int, float, float]:
        """(Σx, Σx², zeros, min, max) of a finite, non-empty chunk, in float64."""
        s1, s2, zeros, lo, hi = _sums(raw(chunk, self.view))
        return float(s1), float(s2), int(zeros), _from_ordered(int(lo)), _from_ordered(int(hi))


def _from_ordered(k: int) -> float:
    b = k ^ ((k >> 63) & _LOW63)  # the same flip undoes itself
    return struct.unpack("<d", struct.pack("<q", b))[0]


LOOPS = {dtype: StatsLoop(view, mask) for dtype, (view, mask) in FORMATS.items()}
