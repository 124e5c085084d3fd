"""A small serving engine over the optimized model: mixed batches of chunked prefills and decodes, paged KV
allocation, greedy generation and MTP speculative decoding.

One `step()`:
1. schedule: every decoding request (its last token, plus its MTP draft), then prompt chunks of at most
   `chunk_size` tokens while the step's `token_budget` lasts;
2. allocate the KV blocks the step's positions need; snapshot the state of requests that verify a draft;
3. run the main model on the flat batch; pick greedy tokens; accept the longest agreeing draft prefix;
4. roll back requests whose draft was rejected (restore the snapshot, replay the accepted tokens) so the cache
   holds exactly the committed positions;
5. run the MTP block on the committed positions (streams at i, token at i+1); its logits at the last one draft
   the next token, and `mtp_draft` > 1 chains the block on its own output streams for the following drafts
   (speculative MTP positions are rolled back right away);
6. finish requests that have all their tokens: their blocks and slot are freed and poisoned with NaN.

With `overlap`, step 3 leaves the greedy tokens on the device: the next step's batch takes them from there and the
host reads them after issuing that step, so a step's host work runs while the GPU finishes the step before it.

Requests are independent: a request's tokens and logits do not depend on its slot or its batchmates (per-request
shapes in the torch ops, row-independent GEMMs), which the tests check bitwise.
"""

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import KW_ONLY, dataclass, field
from functools import cached_property

import torch

from parity.errors import ParityError
from parity.optimized.batch import Batch, Chunk, host_ints, make_batch
from parity.optimized.cache import PagedCache
from parity.optimized.graphs import DecodeGraphs
from parity.optimized.model import OptimizedTransformer

# step callbacks see (phase, step index, batch) before each forward: the dump tags hang on this
PhaseHook = Callable[[str, int, Batch], object]


@dataclass(kw_only=True)
class Request:
    id: int
    prompt: torch.Tensor  # [n] int64
    max_new_tokens: int
    slot: int = -1  # -1 until admitted and once released
    forced: list[int] | None = None  # teacher forcing: emit these tokens instead of the greedy ones
    blocks: dict[int, list[int]] = field(default_factory=dict)
    num_computed: int = 0  # positions whose KV and state are in the cache
    mtp_computed: int = 0  # positions the MTP block has consumed
    output: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # [vocab] fp32 that chose each output token
    drafts: list[int] = field(default_factory=list)  # MTP drafts for the positions after the pending token
    mtp_drafts: list[int] = field(default_factory=list)  # every first draft the MTP block made (before draft_fn)
    drafts_proposed: int = 0
    drafts_accepted: int = 0
    pending_streams: list[torch.Tensor] = field(default_factory=list)  # main streams not yet fed to the MTP block
    admitted_slot: int = -1  # the state slot the request ran in
    # length of the prefill chunk that started the request, set when it is scheduled. The schedule is part of the
    # result: the reference replays the request with this prefill length so rows line up position by position
    # (`capture.runs.reference_capture`), and a row before it is a "prefill" row, after it a "chunk" one
    # (`compare.verdict.RequestLayout`).
    first_chunk: int = 0

    @cached_property
    def prompt_ids(self) -> list[int]:
        """The prompt as host ints, converted once: every decode step reads a token of each request, and converting
        the whole prompt tensor each time cost O(prompt) per request and step."""
        return self.prompt.tolist()

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output

    def token(self, i: int) -> int:
        """`tokens[i]` without building the list."""
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output[i - n]

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < len(self.prompt_ids)

    @property
    def done(self) -> bool:
        return len(self.output) >= self.max_new_tokens


@dataclass(frozen=True)
class Scheduled:
    """One request's share of a forward, as the scheduler planned it: `tokens` fed at positions `start ..` (None: a
    token sampled by the last step that the host has not read yet, fed from the device: `EngineConfig.overlap`)."""

    req: Request
    start: int
    tokens: tuple[int | None, ...]
    _: KW_ONLY
    prefill: bool = False  # prompt tokens (a prefill chunk), not the pending token and its drafts
    n_draft: int = 0  # trailing MTP draft tokens to verify (0 for prefill and plain decode)

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    max_requests: int = 4
    num_blocks: int = 64  # per compress ratio
    block_size: int = 16
    chunk_size: int = 64
    token_budget: int = 256
    mtp_draft: int = 0  # MTP drafts per decode step (0 = off); beyond the first, the MTP block is chained
    # run every token of a chunk after a context through the shape-sensitive ops alone, so the chunk computes
    # exactly like that many official decodes (slower; for telling chunking bugs from batching numerics)
    decode_exact_chunks: bool = False
    # decode steps replay each layer's per-token work from graphs (CUDA graphs on a GPU; `parity.optimized.graphs`):
    # the same values, less of the host's per-op cost; off while any module has hooks (dumps, teacher forcing)
    graphs: bool = False
    # the greedy tokens of a step stay on the device: the next step's batch reads them there and the host reads them
    # one step later, after issuing that step (no wait for the GPU between steps). The same tokens and logits; a
    # request's newest output is None until read (a finished one's too: read by the next step, or when `step` finds
    # nothing left to run). Not with MTP drafts, whose acceptance decides the next step's positions
    overlap: bool = False


@dataclass(frozen=True)
class Unread:
    """A step's greedy tokens not yet read by the host (`EngineConfig.overlap`): `ids` on the device, their copy on
    the host, and for each placeholder (request, index in its output, row of `ids`)."""

    ids: torch.Tensor  # [rows] int64, on the model's device
    host: torch.Tensor  # [rows] int64: `ids`, copied once the step's work is done (`ready`)
    ready: torch.cuda.Event | None  # recorded after that copy (None: nothing to wait for)
    places: list[tuple[Request, int, int]]

    @classmethod
    def issue(cls, ids: torch.Tensor, places: list[tuple[Request, int, int]]) -> "Unread":
        """Copy `ids` to the host behind the step's work. A plain device -> host read would wait for everything
        issued on the stream by then: the next step too, which is all the overlap is for."""
        if ids.device.type != "cuda":
            return cls(ids, ids.cpu(), None, places)
        host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
        host.copy_(ids, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return cls(ids, host, ready, places)

    def read(self) -> None:
        if self.ready is not None:
            self.ready.synchronize()  # this step's copy; the work issued after it runs on
        values = self.host.tolist()
        for req, k, row in self.places:
            req.output[k] = values[row]


class Engine:
    def __init__(
        self,
        model: OptimizedTransformer,
        config: EngineConfig = EngineConfig(),
        on_phase: PhaseHook = None,
        draft_fn: Callable[[Request, list[int]], list[int]] | None = None,
    ):
        """`on_phase(phase, step, batch)` runs before every forward and may return a context manager that the forward
        runs in (dump tags); `draft_fn(request, mtp_drafts)`, if given, replaces the MTP drafts (tests use it to
        force accepted and rejected drafts)."""
        args = model.args
        if config.mtp_draft < 0 or (config.mtp_draft and not args.n_mtp_layers):
            raise ParityError(f"EngineConfig.mtp_draft: needs >= 0 and an MTP layer, got {config.mtp_draft}")
        if config.overlap and config.mtp_draft:
            raise ParityError("EngineConfig.overlap: not with mtp_draft (a draft's acceptance decides the next step)")
        self.model = model
        self.args = args
        self.config = config
        device = model.embed.weight.device
        self.device = device
        self.cache = PagedCache(args, config.max_requests, config.num_blocks, config.block_size, device)
        self.ratios = tuple(sorted(self.cache.free_blocks))
        # per ratio, each slot's block ids in allocation order, -1 past them (`req.blocks` as a table, written where
        # blocks are allocated): a step's block tables are rows of it, where lists rebuilt and converted every step
        # cost the host O(context) (64 requests at 64k positions: 4-7 ms a decode step, bench/decode_host.py)
        self.block_rows = {
            r: torch.full((config.max_requests, config.num_blocks), -1, dtype=torch.int32) for r in self.ratios
        }
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.finished: dict[int, Request] = {}
        self.step_index = 0
        self._next_id = 0
        self.on_phase = on_phase
        self.draft_fn = draft_fn
        self.graphs = DecodeGraphs() if config.graphs else None
        self.unread: Unread | None = None  # the last step's tokens, with `overlap`

    # requests
    def add_request(self, tokens, max_new_tokens: int, forced: list[int] | None = None) -> int:
        """Queue a prompt; `forced` (teacher forcing) fixes the emitted tokens so runs stay aligned for comparison."""
        prompt = torch.as_tensor(tokens, dtype=torch.int64).flatten()
        if forced is not None and len(forced) < max_new_tokens:
            raise ParityError(f"add_request: forced has {len(forced)} tokens, fewer than max_new_tokens")
        if prompt.numel() == 0:
            raise ParityError("add_request: empty prompt")
        if prompt.numel() + max_new_tokens + 1 > self.args.max_seq_len:
            raise ParityError(f"add_request: {prompt.numel()} + {max_new_tokens} tokens exceed max_seq_len")
        forced = None if forced is None else list(forced)
        req = Request(id=self._next_id, prompt=prompt, max_new_tokens=max_new_tokens, forced=forced)
        self._next_id += 1
        self.waiting.append(req)
        return req.id

    def _admit(self) -> None:
        while self.waiting and self.cache.free_slots:
            req = self.waiting.pop(0)
            req.slot = req.admitted_slot = self.cache.alloc_slot()
            req.blocks = {r: [] for r in self.ratios}
            for rows in self.block_rows.values():
                rows[req.slot] = -1  # a reused slot's row holds its last request's blocks
            self.running.append(req)

    def _reserve(self, req: Request, positions: int) -> None:
        for r in self.ratios:
            have = len(req.blocks[r])
            need = self.cache.blocks_needed(r, positions) - have
            if need > 0:
                new = self.cache.alloc_blocks(r, need)
                self.block_rows[r][req.slot, have : have + need] = host_ints(new)
                req.blocks[r] += new

    def _tables(self, reqs: list[Request]) -> dict[int, torch.Tensor]:
        """ratio -> [N, widest] int32 block tables of `reqs` (-1 past each request's blocks): rows of `block_rows`."""
        slots = host_ints([q.slot for q in reqs])
        tables = {}
        for r in self.ratios:
            width = max(1, max(len(q.blocks[r]) for q in reqs))
            tables[r] = self.block_rows[r][slots, :width]
        return tables

    # one step
    def _schedule(self) -> list[Scheduled]:
        budget = self.config.token_budget
        plan = []
        for req in self.running:
            if req.in_prefill or req.done:
                continue
            tokens = (req.token(req.num_computed), *req.drafts)
            plan.append(Scheduled(req, req.num_computed, tokens, n_draft=len(tokens) - 1))
            budget -= len(tokens)
        for req in self.running:
            if not req.in_prefill or budget <= 0:
                continue
            n = min(self.config.chunk_size, budget, len(req.prompt) - req.num_computed)
            if req.num_computed == 0:
                req.first_chunk = n
            tokens = tuple(req.prompt[req.num_computed : req.num_computed + n].tolist())
            plan.append(Scheduled(req, req.num_computed, tokens, prefill=True))
            budget -= n
        return plan

    def _batch(self, plan: list[Scheduled], speculative: bool = False) -> Batch:
        # tokens the host has not read (None, only while the last step's are unread) go in as 0: `_feed_unread`
        fed = (
            [tuple(0 if t is None else t for t in s.tokens) for s in plan]
            if self.unread is not None
            else [s.tokens for s in plan]
        )
        chunks = [Chunk(request_id=s.req.id, slot=s.req.slot, start_pos=s.start, tokens=t) for s, t in zip(plan, fed)]
        tables = self._tables([s.req for s in plan])
        exact = self.config.decode_exact_chunks
        batch = make_batch(chunks, tables, self.device, per_token_after_context=exact, speculative=speculative)
        self._feed_unread(plan, batch)
        return batch

    def _feed_unread(self, plan: list[Scheduled], batch: Batch) -> None:
        """The batch's tokens the host has not read (None in the plan), copied from the last step's ids on the
        device. Its host copy (`Batch.host`) keeps a 0 there: the host's plans read positions and tables, never
        token ids."""
        if self.unread is None:
            return
        row_of = {(req.id, k): row for req, k, row in self.unread.places}
        dst, src = [], []
        for i, s in enumerate(plan):
            prompt = len(s.req.prompt_ids)
            for j, t in enumerate(s.tokens):
                if t is None:
                    dst.append(batch.cu_seqlens[i] + j)
                    src.append(row_of[s.req.id, s.start + j - prompt])
        if dst:
            dst_d, src_d = batch.to_device_many([dst, src])
            batch.tokens.index_copy_(0, dst_d, self.unread.ids.index_select(0, src_d))

    def _forward(self, phase: str, plan: list[Scheduled]) -> tuple[Batch, torch.Tensor]:
        for s in plan:
            self._reserve(s.req, s.end)
        batch = self._batch(plan)
        with self._scope(phase, batch):
            return batch, self.model(batch, self.cache, self.graphs)

    def _scope(self, phase: str, batch: Batch):
        scope = self.on_phase(phase, self.step_index, batch) if self.on_phase is not None else None
        return scope if scope is not None else nullcontext()

    def step(self) -> bool:
        """Run one engine step; returns False when there is nothing left to do."""
        self._admit()
        plan = self._schedule()
        if not plan:
            if self.unread is not None:  # the last step's tokens: nothing left to issue before reading them
                self.unread.read()
                self.unread = None
            return False
        verifying = [s for s in plan if s.n_draft > 0]
        snapshots = {s.req.id: self.cache.snapshot(s.req.slot, list(range(s.start, s.end))) for s in verifying}
        # a mixed batch is tagged by its most specific member
        phase = "mtp-verify" if verifying else ("prefill" if all(s.prefill for s in plan) else "decode")
        batch, h = self._forward(phase, plan)
        last, self.unread = self.unread, None
        with self._scope(phase, batch):  # the head runs on the step's rows: same tags as its forward
            replay = self._commit(plan, batch, h)
        if last is not None:  # the last step's tokens, read once this step is issued
            last.read()
        if replay:
            # a rejected draft's position wrote the ring and the compressor state: restore, then replay the
            # committed tokens so the cache holds exactly what a non-speculative run would have
            for s in replay:
                self.cache.restore(s.req.slot, snapshots[s.req.id])
            self._forward("mtp-verify", replay)
            for s in replay:
                s.req.num_computed = s.end
        if self.config.mtp_draft:
            self._draft()
        self._finish()
        self.step_index += 1
        return True

    def _commit(self, plan: list[Scheduled], batch: Batch, h: torch.Tensor) -> list[Scheduled]:
        """Greedy tokens for every scheduled request; returns the committed tokens to replay (rejected drafts)."""
        replay = []
        # the logits of every request that samples, in one head call: the hc head and norm run over the whole batch
        # in any call, so one call per request redid them once per request (64 times at 64 decodes); each logits
        # row is still its own fp32 GEMM, the same bits
        wants = {
            i: [batch.rows(i).stop - 1 - s.n_draft + j for j in range(s.n_draft + 1)]
            for i, s in enumerate(plan)
            if not (s.prefill and s.end < len(s.req.prompt_ids))
        }
        rows_all = [r for want in wants.values() for r in want]
        taken = {}  # request index -> (its logits rows, its greedy tokens)
        places = []  # with overlap: (request, output index, greedy row) of every token left unread
        ids = None
        if wants:
            head = self.model.head_logits(h, batch, rows_all)
            ids = head.argmax(-1)  # argmax per row: per-request calls' ids
            # one device -> host read; with overlap none here (the next step reads them: `Unread`)
            greedy_all = list(range(len(rows_all))) if self.config.overlap else ids.tolist()
            head_rows = head.unbind(0)  # every row's view from one call, not a slice per request and a view per token
            at = 0
            for i, want in wants.items():
                taken[i] = head_rows[at : at + len(want)], greedy_all[at : at + len(want)]
                at += len(want)
        for i, s in enumerate(plan):
            req, tokens, n_draft = s.req, s.tokens, s.n_draft
            rows = batch.rows(i)
            if i not in taken:  # a prefill chunk before the prompt's end: nothing to sample
                req.num_computed = s.end
                self._keep_streams(req, h, rows)
                continue
            logits, greedy = taken[i]
            unread_rows = None
            if self.config.overlap and req.forced is None:  # greedy holds rows of the step's ids: None until read
                unread_rows, greedy = greedy, [None] * len(greedy)
            if req.forced is not None:
                n_out = len(req.output)
                greedy = [req.forced[min(n_out + j, len(req.forced) - 1)] for j in range(len(greedy))]
            accepted = 0
            while accepted < n_draft and tokens[1 + accepted] == greedy[accepted]:
                accepted += 1
            req.drafts_proposed += n_draft
            req.drafts_accepted += accepted
            for j in range(accepted + 1):
                if not req.done:
                    if unread_rows is not None:
                        places.append((req, len(req.output), unread_rows[j]))
                    req.output.append(greedy[j])
                    req.logits.append(logits[j])
            committed = len(tokens) - n_draft + accepted
            # streams at committed positions only depend on committed tokens: they feed the MTP block as they are
            self._keep_streams(req, h, rows, committed)
            req.drafts = []
            if accepted < n_draft:
                replay.append(Scheduled(req, s.start, tokens[:committed]))
            else:
                req.num_computed = s.start + committed
        if places:
            self.unread = Unread.issue(ids, places)
        return replay

    def _keep_streams(self, req: Request, h: torch.Tensor, rows: slice, n: int | None = None) -> None:
        """The streams of `rows` (the first `n` of them) for the MTP block; nothing is sliced without MTP."""
        if self.config.mtp_draft:
            req.pending_streams.append(h[rows][:n])

    def _draft(self) -> None:
        """Feed the MTP block every position whose next token is known (streams at i, token at i+1); at the last
        committed position its logits draft the token after the pending one."""
        plan, streams = [], []
        for req in self.running:
            if not req.pending_streams or req.done:
                continue
            h = torch.cat(req.pending_streams)
            next_ids = req.tokens[req.mtp_computed + 1 : req.mtp_computed + 1 + h.shape[0]]
            if len(next_ids) < h.shape[0]:
                continue
            plan.append(Scheduled(req, req.mtp_computed, tuple(next_ids)))
            streams.append(h)
        if not plan:
            return
        batch = self._batch(plan)
        with self._scope("mtp-draft", batch):
            x, logits = self.model.mtp_logits(torch.cat(streams), batch.tokens, batch, self.cache, batch.last_rows)
        drafting = []
        for i, (s, token) in enumerate(zip(plan, logits.argmax(-1).tolist())):
            req = s.req
            req.mtp_computed = s.end
            req.pending_streams = []
            if req.num_computed == len(req.prompt_ids) + len(req.output) - 1:
                req.drafts = [token]
                req.mtp_drafts.append(req.drafts[0])
                drafting.append((req, x[batch.last_rows[i]]))
        self._chain(drafting)
        for req, _ in drafting:
            if self.draft_fn is not None:
                req.drafts = list(self.draft_fn(req, req.drafts))

    def _chain(self, drafting: list[tuple[Request, torch.Tensor]]) -> None:
        """Drafts 2..k: the MTP block at the next position, on its own output streams and the last draft. These
        positions are speculative: the MTP ring rows they overwrite are restored afterwards, and the real streams
        take their place once the main model has committed those positions."""
        if self.config.mtp_draft < 2 or not drafting:
            return
        k = self.config.mtp_draft
        span = {req.id: list(range(req.num_computed, req.num_computed + k - 1)) for req, _ in drafting}
        snapshots = {req.id: self.cache.snapshot(req.slot, span[req.id]) for req, _ in drafting}
        x = torch.stack([h for _, h in drafting])  # [N, hc, D]
        for j in range(1, k):
            reqs = [req for req, _ in drafting]
            batch = self._batch([Scheduled(req, req.num_computed + j - 1, (req.drafts[-1],)) for req in reqs], True)
            with self._scope("mtp-draft", batch):
                x, logits = self.model.mtp_logits(x, batch.tokens, batch, self.cache, batch.last_rows)
            for req, token in zip(reqs, logits.argmax(-1).tolist()):
                req.drafts.append(token)
        for req, _ in drafting:
            self.cache.restore(req.slot, snapshots[req.id])

    def _finish(self) -> None:
        done = [req for req in self.running if req.done]
        if not done:
            return
        blocks: dict[int, list[int]] = {}
        for req in done:
            for r, ids in req.blocks.items():
                blocks.setdefault(r, []).extend(ids)
        # every request finishing in this step released together: one index copy and one fill per cache tensor
        self.cache.release([req.slot for req in done], blocks)
        for req in done:
            self.running.remove(req)
            req.blocks, req.slot = {}, -1
            self.finished[req.id] = req

    def run(self) -> dict[int, Request]:
        """Step until every request has finished; returns the finished requests by id."""
        while self.step():
            pass
        return self.finished
