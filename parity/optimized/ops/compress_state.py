"""The compressor's decode state machine for one token of each of D requests: the token's kv and ape-biased score
written to the state row of its position, and for each request whose token completes a block, that block (the
overlap layout for ratio 4) and the state shifted (the completed block becomes the previous one).

Reference: parity.reference.model.Compressor.decode_block, called once per request on that request's state rows.
"""

import torch

from parity.optimized.ops.registry import Impl


def compress_state_torch(
    kv: torch.Tensor,
    score: torch.Tensor,
    ape: torch.Tensor,
    rows: torch.Tensor | None,
    phase: torch.Tensor,
    slots: torch.Tensor,
    done_slots: torch.Tensor | None,
    state_kv: torch.Tensor,
    state_score: torch.Tensor,
    overlap: bool,
):
    # kv, score: [T, coff*d] fp32 projections; ape [r, coff*d]; rows, phase, slots: [D] (rows None: the D tokens are
    # the T rows in order); state: [slots, coff*r, coff*d]; done_slots: [M] slots whose token completes a block
    ratio, d = ape.shape[0], state_kv.shape[-1] // (1 + overlap)
    if rows is not None:
        kv, score = kv[rows], score[rows]
    score = score + ape[phase]  # [D, coff*d]
    state_row = phase + ratio if overlap else phase
    state_kv[slots, state_row] = kv
    state_score[slots, state_row] = score
    if done_slots is None:
        return None
    # gathered copies (a later token of the step rewrites the state), each slot's whole state once: the block and
    # the shift below are slices of it
    kv_s, score_s = state_kv[done_slots], state_score[done_slots]  # [M, coff*r, coff*d]
    if not overlap:
        return kv_s, score_s
    block = torch.cat([kv_s[:, :ratio, :d], kv_s[:, ratio:, d:]], dim=1)  # [M, 2r, d]
    block_score = torch.cat([score_s[:, :ratio, :d], score_s[:, ratio:, d:]], dim=1)
    # the completed block becomes the previous one
    state_kv[done_slots, :ratio] = kv_s[:, ratio:]
    state_score[done_slots, :ratio] = score_s[:, ratio:]
    return block, block_score


IMPLS = {
    "torch": Impl(compress_state_torch),
    # copies and one fp32 addition (score + ape), as the twin: bit for bit on every device
    "triton": Impl("parity.optimized.ops.triton.compress_state:compress_state", bitwise=True),
}
