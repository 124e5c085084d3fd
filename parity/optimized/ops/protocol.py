"""The op contracts: what every backend of every op takes and returns (`Ops`, what `resolve_ops` builds).

Each field is typed by a callable protocol, so a call `ops.rms_norm(...)` type-checks and go-to-definition lands
on the contract below; the implementations live in `parity/optimized/ops/<op>.py` (torch) and the backend
packages. Letters: T tokens of the flat ragged batch, h heads, d head dim, D model dim, k top-k slots, hc streams,
K / N GEMM depth / width. `segments` / `cu_seqlens` are token offsets `[0, ..., T]` of the row groups that the torch
backend runs together (one group per request, or per token in decode-exact chunks); other backends may ignore
them where their kernels do not round by shape.
"""

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

Segments = tuple[int, ...]


class ActQuant(Protocol):
    def __call__(
        self, x: Tensor, block_size: int = 128, scale_fmt: str | None = None,
        scale_dtype: torch.dtype = torch.float32, inplace: bool = False,
    ) -> Any:  # fmt: skip
        """bf16 `[..., K]` -> (e4m3 `[..., K]`, scales `[..., K/block]` in scale_dtype); twin kernels.act_quant."""


class KvFakeQuant(Protocol):
    def __call__(
        self, x: Tensor, block: int, scale_fmt: str | None, scale_dtype: torch.dtype, fp8: bool = True
    ) -> Tensor:
        """In place on a bf16 view `[..., n]`: x <- bf16(e4m3(x/s) * s) per `block` group (identity if not fp8)."""


class Fp4FakeQuant(Protocol):
    def __call__(self, x: Tensor, block: int = 32) -> Tensor:
        """In place on bf16 `[..., n]`: x <- bf16(e2m1(x/s) * s) per 32-group, ue8m0 scales."""


class Fp8Gemm(Protocol):
    def __call__(
        self, a: Tensor, a_s: Tensor, b: Tensor, b_s: Tensor, scale_dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """e4m3 `[T, K]` (scales `[T, K/128]`) x e4m3 `[N, K]` (scales `[N/128, K/128]`) -> bf16 `[T, N]`."""


class Fp4Gemm(Protocol):
    def __call__(
        self, a: Tensor, a_s: Tensor, b: Tensor, b_s: Tensor, scale_dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """e4m3 `[T, K]` (scales `[T, K/128]`) x packed e2m1 `[N, K/2]` (e8m0 scales `[N, K/32]`) -> bf16 `[T, N]`."""


class DenseLinear(Protocol):
    def __call__(self, x: Tensor, weight: Tensor, cu_seqlens: Segments) -> Tensor:
        """x `[T, K]` . weight `[N, K]`^T in x's dtype (fp32 or bf16) -> `[T, N]`."""


class RmsNorm(Protocol):
    def __call__(self, x: Tensor, weight: Tensor, eps: float, segments: Segments | None = None) -> Tensor:
        """`w * (x * rsqrt(mean(x^2) + eps))` over the last dim in fp32, cast back to x's dtype."""


class HeadNorm(Protocol):
    def __call__(self, q: Tensor, eps: float, cu_seqlens: Segments) -> Tensor:
        """In place on bf16 `[T, h, d]`: q *= rsqrt(mean(q^2) + eps) per head, in bf16 tensor ops."""


class Rope(Protocol):
    def __call__(self, x: Tensor, freqs_cis: Tensor, inverse: bool = False) -> Tensor:
        """In place on a bf16 view `[T, r]` / `[T, h, r]`: interleaved rotation by `freqs_cis` `[T, r/2]`."""


class Hadamard(Protocol):
    def __call__(self, x: Tensor, scale: float = 1.0) -> Tensor:
        """Sylvester Walsh-Hadamard transform of the last dim (a power of two) times scale, in x's dtype."""


class HcPre(Protocol):
    def __call__(
        self, x: Tensor, hc_fn: Tensor, hc_scale: Tensor, hc_base: Tensor, cu_seqlens: Segments, norm_eps: float,
        hc_mult: int, sinkhorn_iters: int, hc_eps: float,
    ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        """Streams bf16 `[T, hc, D]` -> (y bf16 `[T, D]`, post fp32 `[T, hc]`, comb fp32 `[T, hc, hc]`)."""


class HcPost(Protocol):
    def __call__(self, x: Tensor, residual: Tensor, post: Tensor, comb: Tensor) -> Tensor:
        """new[k] = post[k] x + sum_j comb[j, k] residual[j]: x `[T, D]`, residual `[T, hc, D]` -> bf16 `[T, hc, D]`."""


class HcHead(Protocol):
    def __call__(
        self, x: Tensor, hc_fn: Tensor, hc_scale: Tensor, hc_base: Tensor, cu_seqlens: Segments, norm_eps: float,
        hc_eps: float,
    ) -> Tensor:  # fmt: skip
        """Final streams bf16 `[T, hc, D]` -> bf16 `[T, D]` with sigmoid stream weights."""


class CompressState(Protocol):
    def __call__(
        self, kv: Tensor, score: Tensor, ape: Tensor, rows: Tensor | None, phase: Tensor, slots: Tensor,
        done_slots: Tensor | None, state_kv: Tensor, state_score: Tensor, overlap: bool,
    ) -> Any:  # fmt: skip
        """One decode token of each of D requests into its compressor state, in place: projections kv / score fp32
        `[T, coff*d]` (`rows` `[D]` picks the tokens, None: all T in order), ape `[r, coff*d]`, `phase` `[D]`
        position % r, `slots` `[D]`, state `[slots, coff*r, coff*d]` x2 -> the blocks the tokens complete, (kv,
        score) `[M, w, d]` each in request order (`done_slots` `[M]` their slots), or None when `done_slots` is."""


class CompressFinish(Protocol):
    def __call__(
        self, pooled: Tensor, weight: Tensor, eps: float, segments: Segments, freqs_cis: Tensor, positions: Tensor,
        rotate: bool, scale_fmt: str | None, scale_dtype: torch.dtype, fp8: bool,
    ) -> Tensor:  # fmt: skip
        """A compressor's pooled entries fp32 `[M, d]` -> bf16 `[M, d]`: RMSNorm (weight `[d]`, `segments` its row
        groups), RoPE at table rows `positions` `[M]` of `freqs_cis` `[S, rd/2]`, then Hadamard + FP4 fake-quant
        (`rotate`) or FP8 fake-quant of the non-rope dims (`fp8` False: the initial revision's bf16 identity)."""


class CompressDecode(Protocol):
    def __call__(
        self, kv: Tensor, score: Tensor, ape: Tensor, rows: Tensor | None, phase: Tensor, slots: Tensor,
        done_slots: Tensor | None, state_kv: Tensor, state_score: Tensor, overlap: bool, weight: Tensor, eps: float,
        freqs_cis: Tensor, positions: Tensor, rotate: bool, scale_fmt: str | None, scale_dtype: torch.dtype, fp8: bool,
        pool: Tensor, pool_rows: Tensor,
    ) -> Tensor | None:  # fmt: skip
        """`compress_state` (the first ten arguments), the pooling of the blocks it completes, `compress_finish` of
        the pooled entries (each normalized alone; `positions` `[M]`), and the entries written to rows `pool_rows`
        `[M]` of the flat paged pool `[P, d]` bf16 -> the entries bf16 `[M, d]` in request order, or None when
        `done_slots` is."""


class CompressPool(Protocol):
    def __call__(self, kv: Tensor, score: Tensor) -> Tensor:
        """fp32 `[..., w, d]` x2 -> `[..., d]`: per channel, softmax over the w positions weights kv, summed."""


class IndexerTopk(Protocol):
    def __call__(self, q: Tensor, entries: Tensor, weights: Tensor, k: int, start_pos: int, ratio: int) -> Tensor:
        """One request: q bf16 `[L, h, d]`, entries bf16 `[t, d]`, weights `[L, h]` -> entry ids `[L, k]` (-1 none)."""


class IndexerTopkRagged(Protocol):
    def __call__(
        self, q: Tensor, pool: Tensor, entry_rows: Tensor, weights: Tensor, cu_seqlens: Segments,
        cu_entries: Segments, k: Segments, start_pos: Segments, ratio: int,
    ) -> Tensor:  # fmt: skip
        """A batch: q bf16 `[T, h, d]`, the flat entry pool `[P, d]` read at rows `entry_rows` (sequence i's entries
        at `[cu_entries[i], cu_entries[i+1])`), host ints per sequence -> `[T, max k]` (-1 none / past its k)."""


class SparseAttn(Protocol):
    def __call__(
        self, q: Tensor, sources: tuple[Tensor, ...], idx: Tensor, attn_sink: Tensor, softmax_scale: float
    ) -> Tensor:
        """q bf16 `[T, h, d]` over rows `idx` `[T, K]` (-1 none) of the concatenated `sources` -> bf16 `[T, h, d]`."""


class OLora(Protocol):
    def __call__(self, o: Tensor, wo_a: Tensor, n_groups: int, rank: int, segments: Segments) -> Tensor:
        """Grouped output LoRA: o bf16 `[T, h*d]`, wo_a `[g*rank, h*d/g]` -> bf16 `[T, g, rank]`."""


class MoeGate(Protocol):
    def __call__(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, tid2eid: Tensor | None, input_ids: Tensor, topk: int,
        score_func: str, route_scale: float, cu_seqlens: Segments,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """Tokens bf16 `[T, D]` -> (routing weights fp32 `[T, k]`, expert ids `[T, k]`)."""


class MoeExperts(Protocol):
    def __call__(
        self, x: Tensor, weights: Tensor, indices: Tensor, experts: list, shared: Any, scale_fmt: str | None,
        scale_dtype: torch.dtype,
    ) -> Tensor:  # fmt: skip
        """Routed SwiGLU experts (ascending-id fp32 accumulation) plus the shared expert: bf16 `[T, D]` -> same."""


@dataclass(frozen=True)
class Ops:
    """The selected implementation of every op; field order is the registry's op order."""

    act_quant: ActQuant
    kv_fake_quant: KvFakeQuant
    fp4_fake_quant: Fp4FakeQuant
    fp8_gemm: Fp8Gemm
    fp4_gemm: Fp4Gemm
    dense_linear: DenseLinear
    rms_norm: RmsNorm
    head_norm: HeadNorm
    rope: Rope
    hadamard: Hadamard
    hc_pre: HcPre
    hc_post: HcPost
    hc_head: HcHead
    compress_state: CompressState
    compress_pool: CompressPool
    compress_finish: CompressFinish
    compress_decode: CompressDecode
    indexer_topk: IndexerTopk
    indexer_topk_ragged: IndexerTopkRagged
    sparse_attn: SparseAttn
    o_lora: OLora
    moe_gate: MoeGate
    moe_experts: MoeExperts
    config: Any = None  # the OpsConfig that chose them
