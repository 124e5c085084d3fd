"""DeepSeek-V4 reference model: a pure-torch port of the official `inference/model.py`, bit-exact with it.

Every op, dtype and reduction layout follows the official file (spec §4-§10), because torch picks its summation
order from shapes and strides: a fused or reshaped rewrite would round differently. Module and parameter names are
the checkpoint tensor names, so `state_dict()` equals the official one key for key.

Differences from the official file, none of which changes a value:
- no module-level globals: the quantization policy comes from `ModelArgs`, and tensor parallelism is not ported
  (one rank, so `ColumnParallelLinear`/`RowParallelLinear` are plain `Linear`s and nothing is all-reduced);
- kernels are called through the `kernels` module (the seam: swap one function to test an op);
- caches are allocated in one explicit step (`Transformer.setup_caches`, as gpt-fast does, called by `__init__`) and
  passed explicitly, not attached lazily on the first forward;
- index tensors are built on the input's device instead of the default device;
- the sub-module classes a subclass replaces are class attributes (`Indexer.compressor_class`,
  `Attention.compressor_class` / `indexer_class`, `Block.attn_class` / `ffn_class`), not names in the constructor:
  the optimized modules build their own there, once, with the same arguments in the same order;
- `ModelArgs.reset_state_on_prefill` optionally clears the compressor state that the official model carries from
  one sequence into the next (spec §13.1); off by default.

Letters: b batch, s tokens, h heads, d head dim, r rope dims, hc residual streams, D model dim, k top-k slots.
"""

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from parity.config import ModelArgs
from parity.reference import kernels

BLOCK_SIZE = 128  # FP8 block along K for GEMM activations and weights
FP4_BLOCK_SIZE = 32  # FP4 group along K
KV_QUANT_BLOCK = 64  # the KV fake-quant groups


@contextmanager
def default_dtype(dtype: torch.dtype):
    """The official code runs with bf16 as torch's default dtype (the GEMM kernels allocate outputs with it)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


class ParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.dim = dim
        self.weight = nn.Parameter(torch.empty(vocab_size, dim, dtype=torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.weight)


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, scale_fmt, scale_dtype) -> torch.Tensor:
    """Dispatch on the weight dtype: FP4 and FP8 weights quantize x to FP8 per 128 first; others are F.linear."""
    if weight.dtype == torch.float4_e2m1fn_x2:
        x, s = kernels.act_quant(x, BLOCK_SIZE, scale_fmt, scale_dtype)
        return kernels.fp4_gemm(x, s, weight, scale, scale_dtype)
    if weight.dtype == torch.float8_e4m3fn:
        x, s = kernels.act_quant(x, BLOCK_SIZE, scale_fmt, scale_dtype)
        return kernels.fp8_gemm(x, s, weight, scale, scale_dtype)
    return F.linear(x, weight)


class Linear(nn.Module):
    """A bias-free linear layer in bf16, fp32, FP8 (128x128 block scales) or FP4 (per-32 scales) weights."""

    def __init__(self, in_features: int, out_features: int, args: ModelArgs, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.scale_fmt = args.act_scale_fmt
        self.scale_dtype = args.act_scale_dtype
        dtype = dtype or args.linear_dtype
        if dtype == torch.float4_e2m1fn_x2:
            # two e2m1 values per byte along K; one e8m0 scale per 32 inputs of a row
            self.weight = nn.Parameter(torch.empty(out_features, in_features // 2, dtype=dtype), requires_grad=False)
            self.scale = nn.Parameter(
                torch.empty(out_features, in_features // FP4_BLOCK_SIZE, dtype=torch.float8_e8m0fnu),
                requires_grad=False,
            )
        elif dtype == torch.float8_e4m3fn:
            scale_shape = (-(-out_features // BLOCK_SIZE), -(-in_features // BLOCK_SIZE))
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
            self.scale = nn.Parameter(torch.empty(*scale_shape, dtype=torch.float8_e8m0fnu), requires_grad=False)
        else:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))
            self.register_parameter("scale", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.scale, self.scale_fmt, self.scale_dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """fp32 RMS normalization of the last dim: `w * (x * rsqrt(mean(x^2) + eps))`, back in x's dtype."""
    dtype = x.dtype
    x = x.float()
    var = x.square().mean(-1, keepdim=True)
    x = x * torch.rsqrt(var + eps)
    return (weight * x).to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.eps = eps
        # bf16 in the checkpoint, fp32 here (the load upcasts exactly)
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def precompute_freqs_cis(dim, seqlen, original_seq_len, base, factor, beta_fast, beta_slow, device=None):
    """RoPE table `[seqlen, dim/2]` complex64, with YaRN interpolation when original_seq_len > 0 (spec §5.2).
    Built on `device` (default: torch's default device): CPU and CUDA sin/cos differ, so build it where it runs."""

    def correction_dim(num_rotations):
        return dim * math.log(original_seq_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    if original_seq_len > 0:
        low = max(math.floor(correction_dim(beta_fast)), 0)
        high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low), 0, 1)
        smooth = 1 - ramp
        freqs = freqs / factor * (1 - smooth) + freqs * smooth
    t = torch.arange(seqlen, device=device)
    freqs = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(freqs), freqs)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate interleaved pairs of the bf16 view `x` in place (complex64 multiply, conj for the inverse)."""
    y = x
    x = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    if inverse:
        freqs_cis = freqs_cis.conj()
    if x.ndim == 3:
        freqs_cis = freqs_cis.view(1, x.size(1), x.size(-1))
    else:
        freqs_cis = freqs_cis.view(1, x.size(1), 1, x.size(-1))
    x = torch.view_as_real(x * freqs_cis).flatten(-2)
    y.copy_(x)
    return y


def rotate_activation(x: torch.Tensor) -> torch.Tensor:
    """Deterministic Hadamard rotation (no random signs, despite the official comment) before FP4 quantization."""
    assert x.dtype == torch.bfloat16
    return kernels.hadamard_transform(x, scale=x.size(-1) ** -0.5)


def get_window_topk_idxs(window_size: int, bsz: int, seqlen: int, start_pos: int, device=None) -> torch.Tensor:
    """Window slots each query reads, -1 = none. Prefill: absolute positions; decode: ring slots, oldest first."""
    if start_pos >= window_size - 1:
        start_pos %= window_size
        matrix = torch.cat(
            [torch.arange(start_pos + 1, window_size, device=device), torch.arange(0, start_pos + 1, device=device)]
        )
    elif start_pos > 0:
        matrix = F.pad(torch.arange(start_pos + 1, device=device), (0, window_size - start_pos - 1), value=-1)
    else:
        base = torch.arange(seqlen, device=device).unsqueeze(1)
        matrix = (base - window_size + 1).clamp(0) + torch.arange(min(seqlen, window_size), device=device)
        matrix = torch.where(matrix > base, -1, matrix)
    return matrix.unsqueeze(0).expand(bsz, -1, -1)


def get_compress_topk_idxs(ratio: int, bsz: int, seqlen: int, start_pos: int, offset: int, device=None):
    """HCA: every completed compressed entry, shifted by `offset` (where the entries sit in the attended KV)."""
    if start_pos > 0:
        matrix = torch.arange(0, (start_pos + 1) // ratio, device=device) + offset
    else:
        matrix = torch.arange(seqlen // ratio, device=device).repeat(seqlen, 1)
        mask = matrix >= torch.arange(1, seqlen + 1, device=device).unsqueeze(1) // ratio
        matrix = torch.where(mask, -1, matrix + offset)
    return matrix.unsqueeze(0).expand(bsz, -1, -1)


def causal_entry_mask(seqlen: int, ratio: int, device=None) -> torch.Tensor:
    """[s, s//ratio] True where query i may not use entry j yet (j >= (i+1)//ratio)."""
    entries = torch.arange(seqlen // ratio, device=device).repeat(seqlen, 1)
    return entries >= torch.arange(1, seqlen + 1, device=device).unsqueeze(1) // ratio


class Compressor(nn.Module):
    """Gated pooling of `compress_ratio` tokens into one KV entry; ratio 4 overlaps with the previous block.

    With overlap the 2*head_dim channels split into A = [:d] (feeds the next block's entry) and B = [d:] (this
    block's entry). Decode keeps partial blocks in `kv_state`/`score_state`: [:r] previous block, [r:2r) current.
    """

    def __init__(self, args: ModelArgs, compress_ratio: int = 4, head_dim: int = 512, rotate: bool = False):
        super().__init__()
        self.dim = args.dim
        self.head_dim = head_dim
        self.rope_head_dim = args.rope_head_dim
        self.nope_head_dim = head_dim - args.rope_head_dim
        self.compress_ratio = compress_ratio
        self.overlap = compress_ratio == 4
        self.rotate = rotate
        self.max_batch_size = args.max_batch_size
        self.reset_state_on_prefill = args.reset_state_on_prefill
        self.kv_quant = kernels.act_quant if args.kv_fp8_sim else kernels.act_quant_initial
        self.scale_fmt = args.act_scale_fmt
        self.scale_dtype = args.act_scale_dtype
        coff = 1 + self.overlap

        self.ape = nn.Parameter(torch.empty(compress_ratio, coff * head_dim, dtype=torch.float32))
        # bf16 in the checkpoint, fp32 here: compression runs in fp32
        self.wkv = Linear(self.dim, coff * head_dim, args, dtype=torch.float32)
        self.wgate = Linear(self.dim, coff * head_dim, args, dtype=torch.float32)
        self.norm = RMSNorm(head_dim, args.norm_eps)
        # the decode state of each sequence, allocated by `setup_caches`
        self.register_buffer("kv_state", None, persistent=False)
        self.register_buffer("score_state", None, persistent=False)

    def setup_caches(self, max_batch_size: int) -> None:
        coff = 1 + self.overlap
        state_shape = (max_batch_size, coff * self.compress_ratio, coff * self.head_dim)
        self.kv_state = torch.zeros(state_shape, dtype=torch.float32)
        self.score_state = torch.zeros(state_shape, dtype=torch.float32)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Empty decode state: kv 0, scores -inf (what the official model starts from)."""
        if self.kv_state is not None:
            self.kv_state.zero_()
            self.score_state.fill_(float("-inf"))

    def overlap_transform(self, tensor: torch.Tensor, value=0) -> torch.Tensor:
        # [b, n, r, 2d] -> [b, n, 2r, d]: block i's B half after block i-1's A half (block 0 gets `value`)
        b, s, _, _ = tensor.size()
        ratio, d = self.compress_ratio, self.head_dim
        new_tensor = tensor.new_full((b, s, 2 * ratio, d), value)
        new_tensor[:, :, ratio:] = tensor[:, :, :, d:]
        new_tensor[:, 1:, :ratio] = tensor[:, :-1, :, :d]
        return new_tensor

    def prefill_blocks(self, kv, score, kv_state, score_state):
        """A prefill's blocks. kv, score: [b, s, coff*d] -> the complete blocks to pool, [b, n, w, d] each (w = 2r with
        overlap, r without); the partial tail (and, with overlap, the last complete block) go into the state."""
        ratio, overlap = self.compress_ratio, self.overlap
        seqlen = kv.size(1)
        remainder = seqlen % ratio
        cutoff = seqlen - remainder
        offset = ratio if overlap else 0
        if overlap and cutoff >= ratio:
            # the last complete block becomes the "previous block" for decode
            kv_state[:, :ratio] = kv[:, cutoff - ratio : cutoff]
            score_state[:, :ratio] = score[:, cutoff - ratio : cutoff] + self.ape
        if remainder > 0:
            kv, kv_state[:, offset : offset + remainder] = kv.split([cutoff, remainder], dim=1)
            score_state[:, offset : offset + remainder] = score[:, cutoff:] + self.ape[:remainder]
            score = score[:, :cutoff]
        kv = kv.unflatten(1, (-1, ratio))  # [b, n, r, coff*d]
        score = score.unflatten(1, (-1, ratio)) + self.ape
        if overlap:
            kv = self.overlap_transform(kv, 0)  # [b, n, 2r, d]
            score = self.overlap_transform(score, float("-inf"))
        return kv, score

    def decode_block(self, kv, score, pos: int, kv_state, score_state):
        """One decoded token at pos > 0 into the state. kv, score: [b, coff*d] -> the block it completes, [b, w, d]
        each, or None. Without overlap the block is the state itself: pool it before the next token is written."""
        ratio, d = self.compress_ratio, self.head_dim
        score = score + self.ape[pos % ratio]
        slot = ratio + pos % ratio if self.overlap else pos % ratio
        kv_state[:, slot] = kv
        score_state[:, slot] = score
        if (pos + 1) % ratio:
            return None
        if not self.overlap:
            return kv_state, score_state
        block = torch.cat([kv_state[:, :ratio, :d], kv_state[:, ratio:, d:]], dim=1)
        block_score = torch.cat([score_state[:, :ratio, :d], score_state[:, ratio:, d:]], dim=1)
        # the completed block becomes the previous one (the block above is a copy)
        kv_state[:, :ratio] = kv_state[:, ratio:]
        score_state[:, :ratio] = score_state[:, ratio:]
        return block, block_score

    def forward(self, x: torch.Tensor, start_pos: int, kv_cache: torch.Tensor, freqs_cis: torch.Tensor):
        """x: [b, s, D] -> new entries [b, n, d] (also written to kv_cache), or None if no block completed."""
        bsz, seqlen, _ = x.size()
        ratio, rd = self.compress_ratio, self.rope_head_dim
        dtype = x.dtype
        if start_pos == 0 and self.reset_state_on_prefill:
            self.reset_buffers()
        x = x.float()
        kv = self.wkv(x)  # [b, s, coff*d]
        score = self.wgate(x)
        kv_state, score_state = self.kv_state[:bsz], self.score_state[:bsz]
        if start_pos == 0:
            should_compress = seqlen >= ratio
            kv, score = self.prefill_blocks(kv, score, kv_state, score_state)  # [b, n, w, d]
            kv = (kv * score.softmax(dim=2)).sum(dim=2)  # [b, n, d]
        else:
            should_compress = (start_pos + 1) % ratio == 0
            block = self.decode_block(kv.squeeze(1), score.squeeze(1), start_pos, kv_state, score_state)
            if should_compress:
                kv, score = block  # [b, w, d]
                kv = (kv * score.softmax(dim=1)).sum(dim=1, keepdim=True)  # [b, 1, d]
        if not should_compress:
            return None
        kv = self.norm(kv.to(dtype))
        # an entry's RoPE position is the first token of its own block
        if start_pos == 0:
            freqs_cis = freqs_cis[: seqlen - seqlen % ratio : ratio]
        else:
            freqs_cis = freqs_cis[start_pos + 1 - ratio].unsqueeze(0)
        apply_rotary_emb(kv[..., -rd:], freqs_cis)
        if self.rotate:
            kv = rotate_activation(kv)
            kernels.fp4_act_quant(kv, FP4_BLOCK_SIZE, True)
        else:
            self.kv_quant(kv[..., :-rd], KV_QUANT_BLOCK, self.scale_fmt, self.scale_dtype, True)
        if start_pos == 0:
            kv_cache[:bsz, : seqlen // ratio] = kv
        else:
            kv_cache[:bsz, start_pos // ratio] = kv.squeeze(1)
        return kv


class Indexer(nn.Module):
    """Scores compressed entries per query with its own FP4-simulated compressor and picks the top-k (CSA)."""

    compressor_class = Compressor

    def __init__(self, args: ModelArgs, compress_ratio: int = 4):
        super().__init__()
        self.dim = args.dim
        self.n_heads = args.index_n_heads
        self.head_dim = args.index_head_dim
        self.rope_head_dim = args.rope_head_dim
        self.index_topk = args.index_topk
        self.q_lora_rank = args.q_lora_rank
        self.wq_b = Linear(self.q_lora_rank, self.n_heads * self.head_dim, args)
        self.weights_proj = Linear(self.dim, self.n_heads, args, dtype=torch.bfloat16)
        self.softmax_scale = self.head_dim**-0.5
        self.compress_ratio = compress_ratio
        self.compressor = self.compressor_class(args, compress_ratio, self.head_dim, True)
        self.max_seq_len = args.max_seq_len
        # the indexer's own compressed entries, allocated by `setup_caches`
        self.register_buffer("kv_cache", None, persistent=False)

    def setup_caches(self, max_batch_size: int) -> None:
        cache_shape = (max_batch_size, self.max_seq_len // self.compress_ratio, self.head_dim)
        self.kv_cache = torch.zeros(cache_shape, dtype=torch.bfloat16)

    def reset_buffers(self) -> None:
        if self.kv_cache is not None:
            self.kv_cache.zero_()

    def forward(self, x: torch.Tensor, qr: torch.Tensor, start_pos: int, offset: int, freqs_cis: torch.Tensor):
        """x: [b, s, D], qr: [b, s, q_lora_rank] -> top-k entry slots [b, s, k] (+offset, -1 = none)."""
        bsz, seqlen, _ = x.size()
        ratio = self.compress_ratio
        rd = self.rope_head_dim
        end_pos = start_pos + seqlen
        q = self.wq_b(qr)
        q = q.unflatten(-1, (self.n_heads, self.head_dim))  # [b, s, h, d]
        apply_rotary_emb(q[..., -rd:], freqs_cis[start_pos:end_pos])
        q = rotate_activation(q)
        kernels.fp4_act_quant(q, FP4_BLOCK_SIZE, True)
        self.compressor(x, start_pos, self.kv_cache, freqs_cis)
        weights = self.weights_proj(x) * (self.softmax_scale * self.n_heads**-0.5)  # [b, s, h]
        index_score = torch.einsum("bshd,btd->bsht", q, self.kv_cache[:bsz, : end_pos // ratio])
        index_score = (index_score.relu_() * weights.unsqueeze(-1)).sum(dim=2)  # [b, s, t]
        if start_pos == 0:
            mask = causal_entry_mask(seqlen, ratio, x.device)
            index_score += torch.where(mask, float("-inf"), 0.0).to(index_score.dtype)
        topk_idxs = index_score.topk(min(self.index_topk, end_pos // ratio), dim=-1)[1]
        if start_pos == 0:
            mask = topk_idxs >= torch.arange(1, seqlen + 1, device=x.device).unsqueeze(1) // ratio
            topk_idxs = torch.where(mask, -1, topk_idxs + offset)
        else:
            topk_idxs += offset
        return topk_idxs


class Attention(nn.Module):
    """MQA over one 512-d latent (key = value): sliding window + compressed entries (all for HCA, indexer top-k for
    CSA) in one sparse softmax with a per-head sink; q-LoRA in, grouped o-LoRA out."""

    compressor_class = Compressor
    indexer_class = Indexer

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.dim = args.dim
        self.n_heads = args.n_heads
        self.q_lora_rank = args.q_lora_rank
        self.o_lora_rank = args.o_lora_rank
        self.head_dim = args.head_dim
        self.rope_head_dim = args.rope_head_dim
        self.nope_head_dim = args.head_dim - args.rope_head_dim
        self.n_groups = args.o_groups
        self.window_size = args.window_size
        self.compress_ratio = args.compress_ratios[layer_id]
        self.eps = args.norm_eps
        self.max_seq_len = args.max_seq_len
        self.kv_quant = kernels.act_quant if args.kv_fp8_sim else kernels.act_quant_initial
        self.scale_fmt = args.act_scale_fmt
        self.scale_dtype = args.act_scale_dtype

        self.attn_sink = nn.Parameter(torch.empty(self.n_heads, dtype=torch.float32))
        self.wq_a = Linear(self.dim, self.q_lora_rank, args)
        self.q_norm = RMSNorm(self.q_lora_rank, self.eps)
        self.wq_b = Linear(self.q_lora_rank, self.n_heads * self.head_dim, args)
        self.wkv = Linear(self.dim, self.head_dim, args)
        self.kv_norm = RMSNorm(self.head_dim, self.eps)
        # FP8 on disk; the official convert.py dequantizes it exactly to bf16
        self.wo_a = Linear(
            self.n_heads * self.head_dim // self.n_groups, self.n_groups * args.o_lora_rank, args, torch.bfloat16
        )
        self.wo_b = Linear(self.n_groups * args.o_lora_rank, self.dim, args)
        self.softmax_scale = self.head_dim**-0.5

        self.indexer = None
        if self.compress_ratio:
            self.compressor = self.compressor_class(args, self.compress_ratio, self.head_dim)
            if self.compress_ratio == 4:
                self.indexer = self.indexer_class(args, self.compress_ratio)
        # pure sliding-window layers use the base theta without YaRN
        if self.compress_ratio:
            self.rope = (args.original_seq_len, args.compress_rope_theta)
        else:
            self.rope = (0, args.rope_theta)
        self.rope_args = (args.rope_factor, args.beta_fast, args.beta_slow)
        # allocated by `setup_caches`
        self.register_buffer("kv_cache", None, persistent=False)
        freqs = self._freqs_cis(None)
        self.register_buffer("freqs_cis", freqs, persistent=False)

    def _freqs_cis(self, device) -> torch.Tensor:
        original_seq_len, theta = self.rope
        factor, beta_fast, beta_slow = self.rope_args
        return precompute_freqs_cis(
            self.rope_head_dim, self.max_seq_len, original_seq_len, theta, factor, beta_fast, beta_slow, device
        )

    def setup_caches(self, max_batch_size: int) -> None:
        # slots [0, window) are the window ring; compressed entries follow
        cache_len = self.window_size + (self.max_seq_len // self.compress_ratio if self.compress_ratio else 0)
        cache_shape = (max_batch_size, cache_len, self.head_dim)
        self.kv_cache = torch.zeros(cache_shape, dtype=torch.bfloat16)

    def reset_buffers(self) -> None:
        """Zero the KV cache and rebuild the RoPE table on the buffers' device (after `.to()` or `to_empty`)."""
        if self.kv_cache is not None:
            self.kv_cache.zero_()
        self.freqs_cis = self._freqs_cis(self.freqs_cis.device)

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        """x: [b, s, D] -> [b, s, D]. start_pos 0 is a prefill of any length; p > 0 decodes one token at p."""
        bsz, seqlen, _ = x.size()
        if start_pos > 0 and seqlen != 1:
            raise ValueError(f"the official model decodes one token at a time: start_pos={start_pos}, s={seqlen}")
        freqs_cis = self.freqs_cis[start_pos : start_pos + seqlen]
        win = self.window_size
        ratio = self.compress_ratio
        rd = self.rope_head_dim
        # q
        qr = q = self.q_norm(self.wq_a(x))  # [b, s, q_lora_rank]
        q = self.wq_b(q).unflatten(-1, (self.n_heads, self.head_dim))  # [b, s, h, d]
        # per-head unit RMS, in bf16 tensor ops
        q *= torch.rsqrt(q.square().mean(-1, keepdim=True) + self.eps)
        apply_rotary_emb(q[..., -rd:], freqs_cis)

        # window kv and the slots each query reads
        kv = self.wkv(x)
        kv = self.kv_norm(kv)  # [b, s, d]
        apply_rotary_emb(kv[..., -rd:], freqs_cis)
        # FP8-simulate the non-rope dims (the model was trained with it); rope dims stay bf16
        self.kv_quant(kv[..., :-rd], KV_QUANT_BLOCK, self.scale_fmt, self.scale_dtype, True)
        topk_idxs = get_window_topk_idxs(win, bsz, seqlen, start_pos, x.device)
        if ratio:
            offset = kv.size(1) if start_pos == 0 else win
            if self.indexer is not None:
                compress_topk_idxs = self.indexer(x, qr, start_pos, offset, self.freqs_cis)
            else:
                compress_topk_idxs = get_compress_topk_idxs(ratio, bsz, seqlen, start_pos, offset, x.device)
            topk_idxs = torch.cat([topk_idxs, compress_topk_idxs], dim=-1)  # window first: the order matters
        topk_idxs = topk_idxs.int()  # [b, s, k]

        # caches and attention
        if start_pos == 0:
            if seqlen <= win:
                self.kv_cache[:bsz, :seqlen] = kv
            else:
                # position t lands in ring slot t % win
                cutoff = seqlen % win
                self.kv_cache[:bsz, cutoff:win], self.kv_cache[:bsz, :cutoff] = kv[:, -win:].split(
                    [win - cutoff, cutoff], dim=1
                )
            if ratio:
                kv_compress = self.compressor(x, start_pos, self.kv_cache[:, win:], self.freqs_cis)
                if kv_compress is not None:
                    kv = torch.cat([kv, kv_compress], dim=1)
            o = kernels.sparse_attn(q, kv, self.attn_sink, topk_idxs, self.softmax_scale)
        else:
            self.kv_cache[:bsz, start_pos % win] = kv.squeeze(1)
            if ratio:
                self.compressor(x, start_pos, self.kv_cache[:, win:], self.freqs_cis)
            o = kernels.sparse_attn(q, self.kv_cache[:bsz], self.attn_sink, topk_idxs, self.softmax_scale)
        apply_rotary_emb(o[..., -rd:], freqs_cis, True)

        # grouped output LoRA: a bf16 einsum per group, then the FP8 wo_b
        o = o.view(bsz, seqlen, self.n_groups, -1)  # [b, s, g, h/g*d]
        wo_a = self.wo_a.weight.view(self.n_groups, self.o_lora_rank, -1)
        o = torch.einsum("bsgd,grd->bsgr", o, wo_a)  # [b, s, g, o_lora_rank]
        return self.wo_b(o.flatten(2))


class Gate(nn.Module):
    """Routing: sqrt(softplus) scores; top-k on score + bias (or a token-id hash table for the first layers);
    weights are the unbiased scores of the chosen experts, renormalized and scaled."""

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.dim = args.dim
        self.topk = args.n_activated_experts
        self.score_func = args.score_func
        self.route_scale = args.route_scale
        self.hash = layer_id < args.n_hash_layers
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim, dtype=torch.bfloat16))
        if self.hash:
            # int64 on disk, int32 here (the load converts)
            self.tid2eid = nn.Parameter(
                torch.empty(args.vocab_size, args.n_activated_experts, dtype=torch.int32), requires_grad=False
            )
            self.bias = None
        else:
            self.bias = nn.Parameter(torch.empty(args.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None = None):
        """x: [N, D] -> (weights [N, k] fp32, indices [N, k])."""
        tid2eid = self.tid2eid if self.hash else None
        return route(x, self.weight, self.bias, tid2eid, input_ids, self.topk, self.score_func, self.route_scale)


def gate_scores(x: torch.Tensor, weight: torch.Tensor, score_func: str) -> torch.Tensor:
    """The Gate's unbiased expert scores. x: [N, D] -> [N, E] fp32."""
    scores = F.linear(x.float(), weight.float())  # [N, E]
    if score_func == "softmax":
        return scores.softmax(dim=-1)
    if score_func == "sigmoid":
        return scores.sigmoid()
    return F.softplus(scores).sqrt()


def route(x, weight, bias, tid2eid, input_ids, topk: int, score_func: str, route_scale: float):
    """The Gate's math. x: [N, D] -> (weights [N, k] fp32, indices [N, k]); `tid2eid` set for hash routing."""
    scores = gate_scores(x, weight, score_func)
    original_scores = scores
    # the bias steers the choice of experts only, never the weights
    if bias is not None:
        scores = scores + bias
    if tid2eid is not None:
        indices = tid2eid[input_ids]
    else:
        indices = scores.topk(topk, dim=-1)[1]
    weights = original_scores.gather(1, indices)
    if score_func != "softmax":
        weights /= weights.sum(dim=-1, keepdim=True)
    weights *= route_scale
    return weights, indices


class Expert(nn.Module):
    """SwiGLU FFN between quantized GEMMs; the activation math and the routing weight are fp32."""

    def __init__(self, dim: int, inter_dim: int, args: ModelArgs, dtype=None, swiglu_limit: float = 0.0):
        super().__init__()
        self.w1 = Linear(dim, inter_dim, args, dtype)
        self.w2 = Linear(inter_dim, dim, args, dtype)
        self.w3 = Linear(dim, inter_dim, args, dtype)
        self.swiglu_limit = swiglu_limit

    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        return swiglu(x, self.w1, self.w2, self.w3, self.swiglu_limit, weights)


def swiglu(x: torch.Tensor, w1, w2, w3, swiglu_limit: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Expert.forward's math. w1, w2, w3: the three GEMMs (`Linear`s, or any x -> y with their rounding)."""
    dtype = x.dtype
    gate = w1(x).float()
    up = w3(x).float()
    if swiglu_limit > 0:
        up = torch.clamp(up, min=-swiglu_limit, max=swiglu_limit)
        gate = torch.clamp(gate, max=swiglu_limit)
    x = F.silu(gate) * up
    if weights is not None:
        x = weights * x
    return w2(x.to(dtype))


class MoE(nn.Module):
    """Routed experts (accumulated in fp32, ascending expert id) plus one shared expert."""

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.dim = args.dim
        self.n_routed_experts = args.n_routed_experts
        self.n_activated_experts = args.n_activated_experts
        self.gate = Gate(layer_id, args)
        self.experts = nn.ModuleList(
            [
                Expert(args.dim, args.moe_inter_dim, args, args.routed_expert_dtype, args.swiglu_limit)
                for _ in range(self.n_routed_experts)
            ]
        )
        self.shared_experts = Expert(args.dim, args.moe_inter_dim, args, swiglu_limit=args.shared_expert_limit)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        shape = x.size()
        x = x.view(-1, self.dim)  # [N, D]
        weights, indices = self.gate(x, input_ids.flatten())
        return combine_experts(x, weights, indices, self.experts, self.shared_experts).view(shape)


def combine_experts(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts, shared) -> torch.Tensor:
    """MoE.forward's expert math. x: [N, D], weights/indices: [N, k] -> [N, D]; experts[i](x, w) and shared(x) are
    the `Expert`s (or any callables with their math)."""
    y = torch.zeros_like(x, dtype=torch.float32)
    counts = torch.bincount(indices.flatten(), minlength=len(experts)).tolist()
    for i in range(len(experts)):
        if counts[i] == 0:
            continue
        idx, top = torch.where(indices == i)
        y[idx] += experts[i](x[idx], weights[idx, top, None])
    y += shared(x)
    return y.type_as(x)


class Block(nn.Module):
    """One layer over hc residual streams: mix streams in (hc_pre), sublayer, mix back out (hc_post); twice."""

    attn_class = Attention
    ffn_class = MoE

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.norm_eps = args.norm_eps
        self.attn = self.attn_class(layer_id, args)
        self.ffn = self.ffn_class(layer_id, args)
        self.attn_norm = RMSNorm(args.dim, self.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, self.norm_eps)
        self.hc_mult = hc_mult = args.hc_mult
        self.hc_sinkhorn_iters = args.hc_sinkhorn_iters
        self.hc_eps = args.hc_eps
        mix_hc = (2 + hc_mult) * hc_mult
        hc_dim = hc_mult * args.dim
        f32 = torch.float32
        self.hc_attn_fn = nn.Parameter(torch.empty(mix_hc, hc_dim, dtype=f32))
        self.hc_ffn_fn = nn.Parameter(torch.empty(mix_hc, hc_dim, dtype=f32))
        self.hc_attn_base = nn.Parameter(torch.empty(mix_hc, dtype=f32))
        self.hc_ffn_base = nn.Parameter(torch.empty(mix_hc, dtype=f32))
        self.hc_attn_scale = nn.Parameter(torch.empty(3, dtype=f32))
        self.hc_ffn_scale = nn.Parameter(torch.empty(3, dtype=f32))

    def hc_pre(self, x: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor):
        params = (self.norm_eps, self.hc_mult, self.hc_sinkhorn_iters, self.hc_eps)
        return hc_pre(x, hc_fn, hc_scale, hc_base, *params)

    def hc_post(self, x: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor):
        # x: [b, s, D], residual: [b, s, hc, D] -> [b, s, hc, D]; new[k] = post[k] x + sum_j comb[j, k] res[j]
        y = post.unsqueeze(-1) * x.unsqueeze(-2) + torch.sum(comb.unsqueeze(-1) * residual.unsqueeze(-2), dim=2)
        return y.type_as(x)

    def forward(self, x: torch.Tensor, start_pos: int, input_ids: torch.Tensor | None) -> torch.Tensor:
        # x: [b, s, hc, D] bf16 streams -> same
        residual = x
        x, post, comb = self.hc_pre(x, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base)
        x = self.attn_norm(x)
        x = self.attn(x, start_pos)
        x = self.hc_post(x, residual, post, comb)

        residual = x
        x, post, comb = self.hc_pre(x, self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base)
        x = self.ffn_norm(x)
        x = self.ffn(x, input_ids)
        x = self.hc_post(x, residual, post, comb)
        return x


class ParallelHead(nn.Module):
    """Collapse the streams with sigmoid weights, RMSNorm, fp32 logits of the last position."""

    def __init__(self, vocab_size: int, dim: int, norm_eps: float = 1e-6, hc_eps: float = 1e-6):
        super().__init__()
        self.vocab_size = vocab_size
        self.dim = dim
        self.norm_eps = norm_eps
        self.hc_eps = hc_eps
        # bf16 in the checkpoint, fp32 here for the fp32 logits
        self.weight = nn.Parameter(torch.empty(vocab_size, dim, dtype=torch.float32))

    def get_logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x[:, -1].float(), self.weight)

    def forward(self, x: torch.Tensor, hc_fn, hc_scale, hc_base, norm: RMSNorm) -> torch.Tensor:
        # x: [b, s, hc, D] -> [b, vocab] fp32
        x = self.hc_head(x, hc_fn, hc_scale, hc_base)
        return self.get_logits(norm(x))

    def hc_head(self, x: torch.Tensor, hc_fn, hc_scale, hc_base) -> torch.Tensor:
        return hc_head(x, hc_fn, hc_scale, hc_base, self.norm_eps, self.hc_eps)


def hc_pre(x, hc_fn, hc_scale, hc_base, norm_eps: float, hc_mult: int, sinkhorn_iters: int, hc_eps: float):
    """Block.hc_pre's math. x: [b, s, hc, D] -> y: [b, s, D], post: [b, s, hc], comb: [b, s, hc, hc]."""
    shape, dtype = x.size(), x.dtype
    x = x.flatten(2).float()  # [b, s, hc*D]
    rsqrt = torch.rsqrt(x.square().mean(-1, keepdim=True) + norm_eps)
    mixes = F.linear(x, hc_fn) * rsqrt  # [b, s, (2+hc)*hc]
    pre, post, comb = kernels.hc_split_sinkhorn(mixes, hc_scale, hc_base, hc_mult, sinkhorn_iters, hc_eps)
    # a broadcast product summed over the stream dim: not a matmul, which would sum in another order
    y = torch.sum(pre.unsqueeze(-1) * x.view(shape), dim=2)
    return y.to(dtype), post, comb


def hc_head(x, hc_fn, hc_scale, hc_base, norm_eps: float, hc_eps: float) -> torch.Tensor:
    """ParallelHead.hc_head's math. x: [b, s, hc, D] -> [b, s, D] with sigmoid stream weights."""
    shape, dtype = x.size(), x.dtype
    x = x.flatten(2).float()
    rsqrt = torch.rsqrt(x.square().mean(-1, keepdim=True) + norm_eps)
    mixes = F.linear(x, hc_fn) * rsqrt  # [b, s, hc]
    pre = torch.sigmoid(mixes * hc_scale + hc_base) + hc_eps
    y = torch.sum(pre.unsqueeze(-1) * x.view(shape), dim=2)
    return y.to(dtype)


class MTPBlock(Block):
    """Multi-token prediction: a sliding-window Block fed the main model's final streams and the next token's
    embedding; shares `embed` and `head` with the main model (spec §10)."""

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__(layer_id, args)
        self.e_proj = Linear(args.dim, args.dim, args)
        self.h_proj = Linear(args.dim, args.dim, args)
        self.enorm = RMSNorm(args.dim, args.norm_eps)
        self.hnorm = RMSNorm(args.dim, args.norm_eps)
        self.norm = RMSNorm(args.dim, args.norm_eps)
        hc_dim = args.hc_mult * args.dim
        f32 = torch.float32
        self.hc_head_fn = nn.Parameter(torch.empty(args.hc_mult, hc_dim, dtype=f32))
        self.hc_head_base = nn.Parameter(torch.empty(args.hc_mult, dtype=f32))
        self.hc_head_scale = nn.Parameter(torch.empty(1, dtype=f32))
        self.embed: ParallelEmbedding | None = None
        self.head: ParallelHead | None = None

    def forward_streams(self, x: torch.Tensor, start_pos: int, input_ids: torch.Tensor) -> torch.Tensor:
        # x: [b, s, hc, D] main-model streams at positions i, input_ids: [b, s] tokens at i+1 -> [b, s, hc, D]
        assert self.embed is not None and self.head is not None
        e = self.embed(input_ids)
        e = self.enorm(e)
        x = self.hnorm(x)
        x = self.e_proj(e).unsqueeze(2) + self.h_proj(x)
        return super().forward(x, start_pos, input_ids)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, start_pos: int, input_ids: torch.Tensor) -> torch.Tensor:
        with default_dtype(torch.bfloat16):
            x = self.forward_streams(x, start_pos, input_ids)
            return self.head(x, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, self.norm)


class Transformer(nn.Module):
    """embed -> hc copies -> blocks -> hc head -> last-position fp32 logits; plus the MTP blocks."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.max_seq_len = args.max_seq_len
        self.norm_eps = args.norm_eps
        self.hc_eps = args.hc_eps
        self.embed = ParallelEmbedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList([Block(layer_id, args) for layer_id in range(args.n_layers)])
        self.norm = RMSNorm(args.dim, self.norm_eps)
        self.head = ParallelHead(args.vocab_size, args.dim, self.norm_eps, self.hc_eps)
        self.mtp = nn.ModuleList()
        for layer_id in range(args.n_mtp_layers):
            self.mtp.append(MTPBlock(args.n_layers + layer_id, args))
            # registered as submodules, as in the official model, so state_dict() also lists mtp.N.embed/head
            self.mtp[-1].embed = self.embed
            self.mtp[-1].head = self.head
        self.hc_mult = hc_mult = args.hc_mult
        hc_dim = hc_mult * args.dim
        f32 = torch.float32
        self.hc_head_fn = nn.Parameter(torch.empty(hc_mult, hc_dim, dtype=f32))
        self.hc_head_base = nn.Parameter(torch.empty(hc_mult, dtype=f32))
        self.hc_head_scale = nn.Parameter(torch.empty(1, dtype=f32))
        self.setup_caches(args.max_batch_size)

    def setup_caches(self, max_batch_size: int) -> None:
        """Allocate every KV cache and compressor state for `max_batch_size` sequences. The modules leave them to this
        step, so a model that keeps its caches elsewhere (the optimized one) shares their parameters without them."""
        for module in self.modules():
            if module is not self and hasattr(module, "setup_caches"):
                module.setup_caches(max_batch_size)

    def reset_buffers(self) -> None:
        """Reset every cache and decode state and rebuild RoPE tables on the current device."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_buffers"):
                module.reset_buffers()

    @torch.inference_mode()
    def forward_streams(self, input_ids: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """input_ids: [b, s] -> final residual streams [b, s, hc, D] (before the hc head): the MTP input."""
        with default_dtype(torch.bfloat16):
            h = self.embed(input_ids)
            h = h.unsqueeze(2).repeat(1, 1, self.hc_mult, 1)  # [b, s, hc, D]
            for layer in self.layers:
                h = layer(h, start_pos, input_ids)
            return h

    @torch.inference_mode()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final streams [b, s, hc, D] -> logits [b, vocab] fp32 of the last position."""
        with default_dtype(torch.bfloat16):
            return self.head(h, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, self.norm)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """input_ids: [b, s] -> logits [b, vocab] fp32 of the last position."""
        return self.logits(self.forward_streams(input_ids, start_pos))
