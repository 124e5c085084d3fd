"""Batch metadata for one forward of the optimized model: a frozen record passed explicitly, never a global.

Tokens of all sequences are flattened into `[T]`; sequence i owns tokens `cu_seqlens[i] : cu_seqlens[i+1]` at
positions `start_pos[i] .. context_len(i) - 1`. Letters: T tokens, N sequences.
"""

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

import numpy as np
import torch


@dataclass(frozen=True, kw_only=True)
class Chunk:
    """One sequence's share of a forward: `tokens` fed at positions `start_pos .. start_pos + len(tokens) - 1`."""

    request_id: int  # engine request id, for dumps and slot-invariance reports
    slot: int  # state slot: window ring and compressor state rows
    start_pos: int  # context already in the cache before these tokens
    tokens: tuple[int, ...]


class PerToken(NamedTuple):
    """Sequence metadata repeated per token, on the tokens' device: [T] int64 each."""

    seq: torch.Tensor  # the sequence each token belongs to
    start: torch.Tensor  # its sequence's start_pos
    slot: torch.Tensor  # its sequence's state slot


def host_ints(values) -> torch.Tensor:
    """Host ints (a list, equal-length lists, or a host tensor) as an int64 CPU tensor. Lists go through numpy: torch's
    own conversion of a decode step's small lists cost 3-5x more host time ([3, 64] ints: 13-27 against 5 us)."""
    if isinstance(values, torch.Tensor):
        return values.to(torch.int64)
    return torch.from_numpy(np.array(values, dtype=np.int64))


HOST_BUILD_TOKENS = 256  # `Batch.on_host`: the largest batch whose index lists are built on the host
# `Batch.on_host`: the most pool entries a host build may walk. An HCA layer's lists walk every entry of the batch's
# contexts, ~60 ns an entry on the CPU (64 requests at 64k positions: 2 ms a step, `bench/decode_host.py`); built on
# the device they are ~25 launches, ~0.2 ms of host time at the ~8 us a launch measured on the H200's host
HOST_BUILD_ENTRIES = 4096


@dataclass(frozen=True, kw_only=True)
class Batch:
    tokens: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    cu_seqlens: tuple[int, ...]  # [N+1] token offsets (host)
    start_pos: tuple[int, ...]  # [N] context before this step's tokens
    slots: tuple[int, ...]  # [N] per-request state slot: window ring and compressor state rows
    block_tables: dict[int, torch.Tensor]  # compress ratio -> [N, max_blocks] int32 block ids of the entries
    request_ids: tuple[int, ...]  # [N] engine request ids, for dumps and slot-invariance reports
    # row groups for the shape-sensitive torch ops (per-request GEMMs, small vectorized tensors); a refinement of
    # cu_seqlens, empty = cu_seqlens. One group per token makes a chunk compute like that many decodes.
    op_segments: tuple[int, ...] = ()
    # drafting past the committed positions (chained MTP): the step's activations are thrown away afterwards
    speculative: bool = False
    # [2, T] int64 token ids and positions on the host (`make_batch` keeps them: `host`); None: copied back on demand
    host_rows: torch.Tensor | None = field(default=None, repr=False, compare=False)
    # index tensors derived from the fields above, built on first use and shared by every layer (`derived`)
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        n = len(self.start_pos)
        for name in ("slots", "request_ids"):
            assert len(getattr(self, name)) == n, f"Batch.{name}: expected {n} entries"
        assert len(self.cu_seqlens) == n + 1 and self.cu_seqlens[-1] == self.tokens.numel()
        for table in self.block_tables.values():
            assert table.shape[0] == n
        assert set(self.cu_seqlens) <= set(self.segments), "op_segments must refine cu_seqlens"

    @property
    def segments(self) -> tuple[int, ...]:
        return self.op_segments or self.cu_seqlens

    def seq_segments(self, i: int) -> tuple[int, ...]:
        """Op segments inside sequence i, relative to its first token."""
        a, b = self.cu_seqlens[i], self.cu_seqlens[i + 1]
        return tuple(s - a for s in self.segments if a <= s <= b)

    @property
    def num_seqs(self) -> int:
        return len(self.start_pos)

    def seq_len(self, i: int) -> int:
        return self.seq_lens[i]

    def context_len(self, i: int) -> int:
        """Positions covered after this step: start_pos + new tokens."""
        return self.context_lens[i]

    # the same as tuples, made once: the plans loop over every sequence, in every step

    @cached_property
    def seq_lens(self) -> tuple[int, ...]:
        """[N] this step's tokens of each sequence (host)."""
        cu = self.cu_seqlens
        return tuple(b - a for a, b in zip(cu[:-1], cu[1:]))

    @cached_property
    def context_lens(self) -> tuple[int, ...]:
        """[N] positions covered after this step (host)."""
        return tuple(s + n for s, n in zip(self.start_pos, self.seq_lens))

    def rows(self, i: int) -> slice:
        return slice(self.cu_seqlens[i], self.cu_seqlens[i + 1])

    @property
    def last_rows(self) -> list[int]:
        """Index of every sequence's last token (where its next-token logits come from)."""
        return [b - 1 for b in self.cu_seqlens[1:]]

    # derived index tensors: the host metadata above as tensors on the tokens' device, copied once per batch (not
    # once per layer, nor once per request) and without waiting for the device (non-blocking host-to-device copies)

    def to_device(self, values) -> torch.Tensor:
        """Host ints (a list, equal-length lists, or a host tensor) as an int64 tensor on the tokens' device."""
        return host_ints(values).to(self.tokens.device, non_blocking=True)

    def to_device_many(self, lists: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Several lists of host ints as int64 tensors on the tokens' device, from one copy (views of one buffer: a
        host-to-device copy costs the host ~10 us whatever its size)."""
        flat = host_ints([v for values in lists for v in values])
        return list(flat.to(self.tokens.device, non_blocking=True).split([len(values) for values in lists]))

    # host ints stay Python ints: small CPU tensor ops cost microseconds each (milliseconds when the CPU thread
    # pool is busy: measured on the H200's host, 6 `repeat_interleave` calls took 0.6-14 ms of a decode step)

    @cached_property
    def seq_of_token(self) -> tuple[int, ...]:
        """[T] on the host: the sequence each token belongs to."""
        return tuple(i for i, n in enumerate(self.seq_lens) for _ in range(n))

    def spread(self, values: Sequence) -> list:
        """One value per sequence -> one per token (host)."""
        return [values[i] for i in self.seq_of_token]

    @cached_property
    def per_token(self) -> PerToken:
        rows = [list(self.seq_of_token), self.spread(self.start_pos), self.spread(self.slots)]
        return PerToken(*self.to_device(rows))  # one copy for the three

    @cached_property
    def device_tables(self) -> dict[int, torch.Tensor]:
        """`block_tables` on the tokens' device, as int64 (what the row arithmetic takes: converted once per batch,
        not in every layer's `PagedCache.entry_rows`). Non-blocking only to another device: on the host batch the
        non-blocking conversion took 175 us against 16 for a [64, 1024] table (bench/decode_host.py's 64 x 64k)."""
        dev = self.tokens.device
        return {r: t.to(dev, torch.int64, non_blocking=dev.type != "cpu") for r, t in self.block_tables.items()}

    @cached_property
    def host(self) -> "Batch":
        """This batch with its tensors on the host (CPU); the batch itself where its tokens are on the CPU."""
        return self if self.tokens.device.type == "cpu" else self.host_copy()

    def host_copy(self) -> "Batch":
        """A copy of this batch on the host, with its own `derived` cache."""
        rows = self.host_rows if self.host_rows is not None else torch.stack([self.tokens, self.positions]).cpu()
        return dataclasses.replace(self, tokens=rows[0], positions=rows[1], host_rows=rows)

    def on_host(self, key, build: Callable[["Batch"], torch.Tensor | None], entries: int = 0) -> torch.Tensor | None:
        """`derived`: `build(batch)`, an index tensor made from the batch's metadata alone (a window list, ring rows, an
        HCA entry list), on the tokens' device. For a batch of at most HOST_BUILD_TOKENS tokens (decode steps) whose
        build walks at most HOST_BUILD_ENTRIES pool `entries` it is built from `host` by the same code and copied over
        once: each of its ~15 small ops would be a kernel launch on a GPU (~10 us of the H200 host's time, far more
        than the CPU op; the plans were ~1.9 ms of a graphed bs-1 decode step's host time). Larger batches and long
        contexts build it on the device: [T, window] and wider lists, or every entry of 64k contexts, would cost the
        host more than the launches."""

        def made():
            t = build(self.host if self.builds_on_host(entries) else self)
            return None if t is None else t.to(self.tokens.device, non_blocking=True)

        return self.derived(key, made)

    def builds_on_host(self, entries: int = 0) -> bool:
        """Whether `on_host` builds a list that walks `entries` pool entries on the host."""
        return self.tokens.numel() <= HOST_BUILD_TOKENS and entries <= HOST_BUILD_ENTRIES

    def derived(self, key, build: Callable):
        """`build()` on the first call with `key`, the same value afterwards: for index tensors the model derives
        from this batch alone (the same in every layer)."""
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]


def make_batch(
    chunks: Sequence[Chunk],
    block_tables: dict[int, torch.Tensor],
    device="cpu",
    *,
    per_token_after_context: bool = False,
    speculative: bool = False,
) -> Batch:
    """Flatten `chunks` (one per sequence, in batch order) into a Batch.

    `per_token_after_context` gives every token of a chunk after a context its own op segment (decode-exact)."""
    tokens, positions, cu, segments = [], [], [0], [0]
    for c in chunks:
        ids = c.tokens.tolist() if isinstance(c.tokens, torch.Tensor) else list(c.tokens)
        tokens += ids
        positions += range(c.start_pos, c.start_pos + len(ids))
        if per_token_after_context and c.start_pos > 0:
            segments += [cu[-1] + j for j in range(1, len(ids))]
        cu.append(cu[-1] + len(ids))
        segments.append(cu[-1])
    host = host_ints([tokens, positions])
    both = host.to(device, non_blocking=True)  # one copy for the two
    return Batch(
        tokens=both[0],
        positions=both[1],
        host_rows=host,
        cu_seqlens=tuple(cu),
        start_pos=tuple(c.start_pos for c in chunks),
        slots=tuple(c.slot for c in chunks),
        block_tables=block_tables,
        request_ids=tuple(c.request_id for c in chunks),
        op_segments=tuple(segments) if per_token_after_context else (),
        speculative=speculative,
    )
