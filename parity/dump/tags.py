"""Phase / step / sequence-layout tags that a runner puts around each forward, read by the dump hooks.

    with dump.tags(impl="optimized"):
        with dump.phase("prefill", step=0, cu_seqlens=[0, 5, 9], requests=["a", "b"]):
            model(tokens)                                   # flat ragged [T, ...] activations
        with dump.phase("decode", step=1, batch=2, requests=["a", "b"]):
            model(next_tokens)                              # [b, s, ...] activations

The tags themselves are `parity.dump.format.Tags`, the schema every record stores them in.

Why a ContextVar: forward hooks are called deep inside `model.forward` and cannot take extra arguments, so the tag
has to be ambient. A ContextVar (unlike a module global) is scoped to the `with` block, restored on exit even when
the forward raises, and private to each thread and asyncio task.
"""

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import replace
from typing import Any

import torch

from parity.dump.format import PHASES, Tags, is_cu_seqlens
from parity.errors import ParityError

_UNTAGGED = Tags()
_CURRENT: ContextVar[Tags | None] = ContextVar("parity_dump_tags", default=None)


def current_tags() -> Tags:
    return _CURRENT.get() or _UNTAGGED


@contextmanager
def phase(
    name: str,
    step: int = 0,
    *,
    cu_seqlens: Sequence[int] | torch.Tensor | None = None,
    batch: int | None = None,
    requests: Sequence[object] | None = None,
    start_pos: Sequence[int] | None = None,
    **extra: Any,
) -> Iterator[Tags]:
    """Tag every dump record made inside the block with a phase and step.

    Args:
        name (str):
            One of `prefill`, `decode`, `mtp-draft`, `mtp-verify`.
        step (int):
            Step index inside the run (prefill is usually 0, decode steps count up). Default: `0`.
        cu_seqlens (Sequence[int] or torch.Tensor, Optional):
            Cumulative sequence lengths `[N+1]` for flat ragged `[T, ...]` activations.
        batch (int, Optional):
            Number of sequences N for `[b, s, ...]` activations. Give `cu_seqlens` or `batch`, not both.
        requests (Sequence, Optional):
            One id per slot (N of them); slots with equal ids hold the same sequence.
        start_pos (Sequence[int], Optional):
            Position of each slot's first token (N of them), so every row of a record has a (request, position).
        **extra:
            Free-form JSON-serialisable tags (e.g. `impl="reference"`), merged over the enclosing `tags(...)`.
    """
    if name not in PHASES:
        raise ParityError(f"dump.phase: unknown phase {name!r}; use one of {', '.join(PHASES)}")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ParityError(f"dump.phase: step must be a non-negative int, got {step!r}")
    if cu_seqlens is not None and batch is not None:
        raise ParityError("dump.phase: give cu_seqlens (flat ragged tensors) or batch (batched tensors), not both")
    cu = None if cu_seqlens is None else _cu_seqlens(cu_seqlens)
    if batch is not None and (not isinstance(batch, int) or isinstance(batch, bool) or batch < 1):
        raise ParityError(f"dump.phase: batch must be a positive int, got {batch!r}")
    slots = len(cu) - 1 if cu is not None else batch
    reqs = None if requests is None else tuple(str(r) for r in requests)
    if reqs is not None and slots is not None and len(reqs) != slots:
        raise ParityError(f"dump.phase: {len(reqs)} request ids for {slots} slots")
    starts = None if start_pos is None else tuple(int(p) for p in start_pos)
    if starts is not None and (slots is None or len(starts) != slots or min(starts, default=0) < 0):
        raise ParityError(f"dump.phase: start_pos needs one non-negative position per slot ({slots}), got {starts}")
    outer = current_tags()
    tags = Tags(name, step, cu, batch, reqs, starts, _merge(outer.extra, extra))
    token = _CURRENT.set(tags)
    try:
        yield tags
    finally:
        _CURRENT.reset(token)


@contextmanager
def tags(**extra: Any) -> Iterator[Tags]:
    """Add free-form tags (e.g. `impl="optimized"`) to every record made inside the block, keeping the phase."""
    outer = current_tags()
    token = _CURRENT.set(replace(outer, extra=_merge(outer.extra, extra)))
    try:
        yield current_tags()
    finally:
        _CURRENT.reset(token)


def _merge(outer: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    try:
        json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ParityError(f"dump tags: extra tags must be JSON-serialisable ({e})") from None
    return {**outer, **extra}


def _cu_seqlens(value) -> tuple[int, ...]:
    cu = tuple(int(v) for v in (value.tolist() if isinstance(value, torch.Tensor) else value))
    if not is_cu_seqlens(cu):
        raise ParityError(f"dump.phase: cu_seqlens must start at 0, never decrease and hold >= 2 entries, got {cu}")
    return cu
