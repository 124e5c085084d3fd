"""Grouped output LoRA (wo_a): per group g, o[T, g, :] . wo_a[g]^T in bf16.

Reference: parity.reference.model.Attention.forward, `einsum("bsgd,grd->bsgr")` (rows are independent: checked
bitwise on CPU for 1..300 rows).
"""

import torch


def o_lora_torch(o: torch.Tensor, wo_a: torch.Tensor, n_groups: int, rank: int) -> torch.Tensor:
    # o: [T, h*d] -> [T, g, rank]
    o = o.view(o.shape[0], n_groups, -1)
    return torch.einsum("bsgd,grd->bsgr", o[None], wo_a.view(n_groups, rank, -1))[0]


IMPLS = {"torch": o_lora_torch}
