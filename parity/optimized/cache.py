"""KV storage of the optimized runtime: per-request window rings and compressor state, paged compressed entries.

Per layer (main layers and MTP layers):
- `window[L]`: `[slots, window, head_dim]` bf16, one ring per request slot; position p lives in row p % window.
- `entries[L]`: `[blocks, block_size, head_dim]` bf16 for compressed layers; entry e of a request is in block
  `table[e // block_size]`, row `e % block_size`. All layers of one compress ratio share the block ids (one block
  table per ratio per request); each layer has its own storage.
- `index_entries[L]`: the same for the CSA indexer's 128-d entries (ratio 4 tables).
- `state[L]`, `index_state[L]`: compressor kv/score state, `[slots, coff*ratio, coff*d]` fp32, the ring layout of
  the official model (overlap: rows [0, r) previous block, [r, 2r) current block, current row = pos % r).

Everything a request does not own is NaN: fresh pools, freed blocks and freed slots are poisoned, so a read of a
stale or foreign row shows up as NaN instead of passing silently.
"""

from dataclasses import dataclass

import torch

from parity.config import ModelArgs
from parity.errors import ParityError


@dataclass
class CompressorState:
    kv: torch.Tensor  # [slots, coff*r, coff*d] fp32
    score: torch.Tensor

    def reset(self, slot: int) -> None:
        """A new request's empty state: kv 0, scores -inf (what a fresh official model starts from)."""
        self.kv[slot].zero_()
        self.score[slot].fill_(float("-inf"))

    def poison(self, slots: torch.Tensor) -> None:
        """NaN into the state of `slots` (an index tensor on the state's device)."""
        self.kv.index_fill_(0, slots, float("nan"))
        self.score.index_fill_(0, slots, float("nan"))

    def rows(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The slot's state as [1, coff*r, coff*d] views (the reference's `state[:bsz]` for a batch of one)."""
        return self.kv[slot : slot + 1], self.score[slot : slot + 1]

    def snapshot(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv[slot].clone(), self.score[slot].clone()

    def restore(self, slot: int, snap) -> None:
        self.kv[slot].copy_(snap[0])
        self.score[slot].copy_(snap[1])


def _state(n_slots, ratio, d, device) -> CompressorState:
    coff = 2 if ratio == 4 else 1
    shape = (n_slots, coff * ratio, coff * d)
    nan = float("nan")
    return CompressorState(torch.full(shape, nan, device=device), torch.full(shape, nan, device=device))


class PagedCache:
    """All per-request storage for `max_requests` concurrent requests and `num_blocks` blocks per ratio."""

    def __init__(self, args: ModelArgs, max_requests: int, num_blocks: int, block_size: int = 16, device="cpu"):
        self.args = args
        self.max_requests = max_requests
        self.block_size = block_size
        self.num_blocks = num_blocks
        n_total = args.n_layers + args.n_mtp_layers
        self.ratios = tuple(args.compress_ratios[:n_total])
        nan, bf16 = float("nan"), torch.bfloat16
        d, di = args.head_dim, args.index_head_dim
        ring_shape = (max_requests, args.window_size, d)
        self.window = [torch.full(ring_shape, nan, dtype=bf16, device=device) for _ in self.ratios]
        self.entries = [
            torch.full((num_blocks, block_size, d), nan, dtype=bf16, device=device) if r else None for r in self.ratios
        ]
        self.index_entries = [
            torch.full((num_blocks, block_size, di), nan, dtype=bf16, device=device) if r == 4 else None
            for r in self.ratios
        ]
        self.state = [_state(max_requests, r, d, device) if r else None for r in self.ratios]
        self.index_state = [_state(max_requests, r, di, device) if r == 4 else None for r in self.ratios]
        self.free_slots = list(range(max_requests))
        self.free_blocks = {r: list(range(num_blocks)) for r in sorted({r for r in self.ratios if r})}

    # slots
    def alloc_slot(self) -> int:
        if not self.free_slots:
            raise ParityError(f"PagedCache: all {self.max_requests} request slots are in use")
        slot = self.free_slots.pop(0)
        for st in filter(None, self.state + self.index_state):
            st.reset(slot)
        return slot

    # blocks
    def alloc_blocks(self, ratio: int, n: int) -> list[int]:
        free = self.free_blocks[ratio]
        if n > len(free):
            raise ParityError(f"PagedCache: ratio-{ratio} pool exhausted ({n} blocks asked, {len(free)} free)")
        taken = free[:n]
        del free[:n]  # in place: a new list of the rest cost O(pool) per allocation (64k blocks: ~0.3 ms)
        return taken

    def release(self, slots: list[int], blocks: dict[int, list[int]]) -> None:
        """Free request slots and pool blocks (`blocks`: ratio -> block ids), any number of requests at once,
        NaN-poisoning what they held so that a stale read shows. One index copy per kind (not waited for) and one
        `index_fill_` per tensor, whatever the number of requests. Released one request at a time, each request
        made a blocking index copy and, per layer and pool, an indexed NaN write whose value travelled as a host
        tensor: a host sync each (the H200 profile of the step in which 64 requests finished, 8 layers: 580 syncs,
        64 x 9 of them these)."""
        if slots:
            idx = self._device_index(slots)
            for ring in self.window:
                ring.index_fill_(0, idx, float("nan"))
            for st in filter(None, self.state + self.index_state):
                st.poison(idx)
            self.free_slots.extend(slots)
        for ratio, ids in blocks.items():
            if not ids:
                continue
            idx = self._device_index(ids)
            for r, pool, ipool in zip(self.ratios, self.entries, self.index_entries):
                if r == ratio:
                    pool.index_fill_(0, idx, float("nan"))
                    if ipool is not None:
                        ipool.index_fill_(0, idx, float("nan"))
            self.free_blocks[ratio].extend(ids)

    def _device_index(self, ids: list[int]) -> torch.Tensor:
        # staged through pageable memory without waiting for the device (the host list is copied before return)
        return torch.tensor(ids, dtype=torch.long).to(self.window[0].device, non_blocking=True)

    def ring_rows(self, slot, positions: torch.Tensor) -> torch.Tensor:
        """Flat rows (`window[L].view(-1, d)`) of a slot's ring that hold `positions` (`slot`: an int, or a tensor of
        slots broadcast with `positions`)."""
        win = self.args.window_size
        return slot * win + positions % win

    def entry_rows(self, table: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
        """Flat pool rows (`pool.view(-1, d)`) of entry ids `entries` of one request with block table `table`."""
        bs = self.block_size
        return table[entries // bs].long() * bs + entries % bs  # (the ids read, then widened: not the whole table)

    def entry_rows_of(self, tables: torch.Tensor, seqs: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
        """`entry_rows` for many requests at once: entry ids `entries` of the requests `seqs` (broadcast together)
        whose block tables are the rows of `tables` ([N, max_blocks]).

        The tables laid end to end are one long table, in which entry e of request i is entry
        i * max_blocks * block_size + e, so `entry_rows` itself does the math (one definition of the layout)."""
        per_request = tables.shape[1] * self.block_size
        return self.entry_rows(tables.flatten(), seqs * per_request + entries)

    def blocks_needed(self, ratio: int, positions: int) -> int:
        """Blocks a request needs to hold the entries of its first `positions` tokens."""
        return -(-(positions // ratio) // self.block_size)

    @staticmethod
    def blocks_for(args: ModelArgs, positions: int, block_size: int) -> int:
        """Blocks per ratio pool that one request of `positions` tokens needs (the smallest ratio needs the most)."""
        ratios = [r for r in args.compress_ratios[: args.n_layers + args.n_mtp_layers] if r]
        return max((-(-(positions // r) // block_size) for r in ratios), default=0)

    # rollback for rejected MTP drafts
    def snapshot(self, slot: int, positions: list[int]) -> dict:
        """Copies of a slot's compressor state and of the ring rows that `positions` will overwrite."""
        rows = torch.tensor([p % self.args.window_size for p in positions])  # ring rows of this slot
        return {
            "state": [st.snapshot(slot) if st else None for st in self.state],
            "index_state": [st.snapshot(slot) if st else None for st in self.index_state],
            "rows": rows,
            "window": [ring[slot, rows].clone() for ring in self.window],
        }

    def restore(self, slot: int, snap: dict) -> None:
        for st, s in zip(self.state + self.index_state, snap["state"] + snap["index_state"]):
            if st is not None:
                st.restore(slot, s)
        for ring, saved in zip(self.window, snap["window"]):
            ring[slot, snap["rows"]] = saved
