"""Summary statistics stored instead of tensors in stats mode (`PARITY_DUMP_MODE=stats`), for runs too big to dump.

Keys (all over the finite elements, in float64): `numel`, `nan`, `inf`, `zeros`, `min`, `max`, `mean`, `std`,
`absmax`, `l2` (the Frobenius norm). Values that do not exist (no finite element) are stored as null.
Packed dtypes that torch cannot cast (fp4 x2) are summarised over their raw bytes.
"""

import math

import torch

from parity.dump.format import to_float64


def tensor_stats(t: torch.Tensor) -> dict[str, float | int | None]:
    x = to_float64(t.detach())
    if x is None:
        # packed dtypes (fp4 x2) cannot be cast: summarise their raw bytes rather than nothing
        x = to_float64(t.detach().contiguous().view(torch.uint8))
    finite = torch.isfinite(x)
    v = x[finite]
    n = v.numel()

    def num(value: torch.Tensor) -> float | None:
        f = float(value)
        return f if n and math.isfinite(f) else None

    return {
        "numel": t.numel(),
        "nan": int(torch.isnan(x).sum()),
        "inf": int(torch.isinf(x).sum()),
        "zeros": int((x == 0).sum()),
        "min": num(v.min()) if n else None,
        "max": num(v.max()) if n else None,
        "mean": num(v.mean()) if n else None,
        "std": num(v.std(correction=0)) if n else None,
        "absmax": num(v.abs().max()) if n else None,
        "l2": float(torch.linalg.vector_norm(v)) if n else 0.0,
    }
