"""A compressor's whole decode step for one token of each of D requests: the state machine (`compress_state`), the
pooling of the blocks the tokens complete (`compress_pool`), their norm, RoPE and fake-quant (`compress_finish`),
and the paged write of the new entries, in one call.

Reference: parity.reference.model.Compressor.decode_block then the rest of Compressor.forward's decode path, per
request (the pooling of the completed block and the tail after it); the entries go to the request's paged pool rows.
The model takes this path on pure decode steps (one token per request after its context); other batches run the
three ops apart (a prefill pools its blocks per prompt; a chunk after a context steps token by token).
"""

from parity.optimized.ops.compress_finish import compress_finish_torch
from parity.optimized.ops.compress_pool import compress_pool_torch
from parity.optimized.ops.compress_state import compress_state_torch
from parity.optimized.ops.registry import Impl


def compress_decode_torch(
    kv, score, ape, rows, phase, slots, done_slots, state_kv, state_score, overlap,
    weight, eps, freqs_cis, positions, rotate, scale_fmt, scale_dtype, fp8, pool, pool_rows,
):  # fmt: skip
    # the three ops' torch forms in sequence, then the paged write: pool [P, d] bf16, pool_rows [M]
    blocks = compress_state_torch(kv, score, ape, rows, phase, slots, done_slots, state_kv, state_score, overlap)
    if blocks is None:
        return None
    pooled = compress_pool_torch(*blocks)  # [M, d]
    segments = tuple(range(pooled.shape[0] + 1))  # a decode's entry is normalized alone
    entries = compress_finish_torch(
        pooled, weight, eps, segments, freqs_cis, positions, rotate, scale_fmt, scale_dtype, fp8
    )
    pool[pool_rows] = entries
    return entries


IMPLS = {
    "torch": Impl(compress_decode_torch),
    "triton": Impl(
        "parity.optimized.ops.triton.compress_decode:compress_decode",
        bitwise=False,
        tolerance=(
            "the Triton compress_state, compress_pool and compress_finish kernels' own arithmetic in one program "
            "per request, bit for bit those kernels in sequence (tested): the state bit for bit the twin, the "
            "pooling within 0.5 fp32 ulp of the exact pooling, the tail as compress_finish's tolerance states"
        ),
    ),
}
