"""How close to a tie the reference's routing choice was, for each flipped row: near-tie flips vs real ones.

A forced MoE gate sees the reference's input, so a flip (other expert ids than the reference's) happens either
because the reference's own choice was nearly a tie (the k-th and the (k+1)-th biased scores almost equal: any
legitimate rounding can swap them) or because the candidate's gate is wrong. The margin of a row is that gap,
`s[k-1] - s[k]` of the reference's biased scores sorted descending, recomputed from the reference's gate input
(`ffn.input`) with the checkpoint's gate weights and the reference's own score function. Hash-routed layers choose
by token id: they have no margin. Indexer top-k flips get none either (their scores need the whole cache).
"""

from collections.abc import Callable

import torch

from parity.checkpoint.layout import disk_tensors_for_param
from parity.checkpoint.reader import Checkpoint
from parity.compare.rows import Key, RowStore
from parity.reference import model as ref

Margin = Callable[[str, Key], float | None]


def route_margins(ckpt_path, args, reference: RowStore) -> Margin:
    """`margin(site path, key)` for `<prefix>.ffn.route` sites; None where it does not apply. `reference`: the
    reference's rows (the judge's own); the gate weights are read on the first flip."""
    ckpt = Checkpoint(ckpt_path)
    gates: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}

    def gate(prefix: str):
        if prefix not in gates:
            name = f"{prefix}.gate.bias"
            if name not in ckpt.weight_map:  # hash routing: no bias, no scores
                gates[prefix] = None
            else:
                e = args.n_routed_experts
                (w,) = disk_tensors_for_param(f"{prefix}.gate.weight", (e, args.dim), torch.bfloat16)
                (b,) = disk_tensors_for_param(name, (e,), torch.float32)
                gates[prefix] = (ckpt.read(w), ckpt.read(b).float())
        return gates[prefix]

    def margin(path: str, key: Key) -> float | None:
        if not path.endswith(".ffn.route"):
            return None
        prefix = path[: -len(".route")]
        x = reference.rows.get((f"{prefix}.input", "out"), {}).get(key)
        g = gate(prefix)
        if x is None or g is None:
            return None
        scores = ref.gate_scores(x[None].cpu(), g[0], args.score_func)[0] + g[1]  # [E]
        top = scores.topk(args.n_activated_experts + 1).values
        return float(top[-2] - top[-1])

    return margin
