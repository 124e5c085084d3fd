"""Sequence layouts, from the tags a record carries: flat ragged `[T, ...]` with `cu_seqlens [N+1]`, or batched
`[b, s, ...]` with `batch = b`. Used to cut per-sequence slices and to line up one side's layout with the other's.

Padded batches are assumed right-padded: sequence i of `[b, s, ...]` is `t[i, :len_i]`.
"""

import itertools

import torch

from parity.dump.format import Record


def token_dims(record: Record, shape: tuple[int, ...]) -> int:
    """How many leading dims index tokens: 2 for a `[b, s, ...]` tensor under a batch layout, else 1."""
    return 2 if record.batch is not None and len(shape) >= 2 and shape[0] == record.batch else 1


def slot_slices(t: torch.Tensor, record: Record) -> list[torch.Tensor] | None:
    """One `[tokens, ...]` slice per sequence, or None if the tensor is not laid out by sequence."""
    cu = record.cu_seqlens
    if cu is not None and t.ndim >= 1 and t.shape[0] == cu[-1]:
        return [t[lo:hi] for lo, hi in itertools.pairwise(cu)]
    if record.batch is not None and t.ndim >= 1 and t.shape[0] == record.batch:
        return list(t.unbind(0))
    return None


def match_layouts(
    ta: torch.Tensor, ra: Record, tb: torch.Tensor, rb: Record
) -> tuple[torch.Tensor, torch.Tensor, str | None] | None:
    """Bring two tensors of one record to one shape: `(a, b, note)`, or None if their layouts do not line up."""
    if ta.shape == tb.shape:
        return ta, tb, None
    lens = packing(tuple(ta.shape), ra, tuple(tb.shape), rb)
    if lens is not None:
        return _pack(ta, lens), tb, "a [b, s, ...] packed to b's cu_seqlens"
    lens = packing(tuple(tb.shape), rb, tuple(ta.shape), ra)
    if lens is not None:
        return ta, _pack(tb, lens), "b [b, s, ...] packed to a's cu_seqlens"
    return None


def packing(batched: tuple[int, ...], rbatched: Record, ragged: tuple[int, ...], rragged: Record) -> list[int] | None:
    """The sequence lengths that cut a `[b, s, ...]` tensor into the other side's flat `[T, ...]`, if they fit."""
    cu, b = rragged.cu_seqlens, rbatched.batch
    if cu is None or b is None or len(batched) < 2 or not ragged or batched[0] != b or len(cu) - 1 != b:
        return None
    lens = [hi - lo for lo, hi in itertools.pairwise(cu)]
    if ragged[0] != cu[-1] or batched[2:] != ragged[1:] or max(lens) > batched[1]:
        return None
    return lens


def _pack(t: torch.Tensor, lens: list[int]) -> torch.Tensor:
    return torch.cat([t[i, :n] for i, n in enumerate(lens)])  # [T, ...]
