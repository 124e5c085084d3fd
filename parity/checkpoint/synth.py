"""Deterministic synthetic weights in the official on-disk formats, in two flavours ("inits").

Each parameter is drawn from its own generator, seeded from (seed, parameter name), so any subset (one layer, one
shard) can be produced alone and always comes out the same. Quantized weights are drawn in fp32 and then quantized
exactly like the official checkpoints: FP8 e4m3 with a power-of-two ue8m0 scale per 128x128 block, FP4 e2m1 packed
two per byte (low nibble first) with a ue8m0 scale per 32 inputs.

`init="chaotic"` (the default, unchanged since the first release: existing seeds give bit-identical tensors):
i.i.d. draws sized so activations stay finite and non-degenerate through every layer. Linear weights ~ N(0, 1/in),
norm weights ~ 1 + N(0, 0.1^2), mHC mixers ~ N(0, 1/(hc*D)). Such a model is numerically chaotic: two legitimate
schedules of the *reference itself* (prompt prefilled whole, or prefilled in part and the rest decoded) end up at
logits cos 0.86-0.98 on the tiny preset, while trained models stay at ~0.9999 (docs/synthetic_weights.md).

`init="calm"`: weights whose sensitivity to rounding resembles a trained model's. Why the chaotic model amplifies a
one-ulp difference, and what calm does about each cause:
- Every GEMM input is fake-quantized (FP8 per 128, FP4 per 32 in the indexer). A perturbation e of the input flips
  the rounding of a fraction ~e/ulp of its elements by a whole ulp, so after the GEMM the error is ~sqrt(e * ulp):
  1e-3 becomes ~1e-2. With i.i.d. weights each output is an incoherent sum, exactly as large as the sum of those
  rounding flips, so the relative error survives every GEMM. Calm writes a narrow random network into the wide
  layout through fixed orthonormal frames (stream, q-LoRA, o-LoRA, attention and indexer heads: a fraction of each
  width): activations live in the frame and weights read the frame, so their outputs are coherent, while the
  rounding flips are isotropic and mostly fall outside the frame. Each GEMM keeps ~sqrt(k/n) of the noise.
- Each sublayer adds an O(1) update to an O(1) residual stream (attention 0.14-0.26, MoE 0.43-0.86 of its rms),
  so the error of every sublayer lands on the stream undiluted. Calm sizes the residual-branch output projections
  (`wo_b`, expert and shared `w2`) so that all 2 * n_layers updates together add ~0.6 of the embedding's norm.
- Router scores are continuous: a few percent of tokens sit at a top-k near-tie, and a flip swaps a whole expert
  (~70% of the MoE output). Calm routes like trained MoEs do, mostly by token identity: part of the stream frame
  is reserved for routing directions, each token's embedding points at its preferred experts, and each score-routed
  gate reads those directions (under its own permutation of expert ids). Context still moves the scores; near-ties
  become rare. Hash layers are unchanged.
- Indexer scores are near ties too (FP4 q and k), and a random indexer's picks are unrelated to what attention
  weighs, so a flipped pick can carry most of the attention mass. Calm's indexer is a projection of the attention
  it serves (query and compressed-key maps are rows of the attention's own), with per-head weights kept positive.
- mHC: data-dependent mixers (hc_*_fn) of full size make pre/post/comb swing with every token. Calm keeps them 10x
  smaller, the comb near the identity (Sinkhorn of a +4 diagonal) and the scales near 1.
- Attention: half the heads match a token against itself (their query map reproduces the key map), and compressed
  keys resemble the window keys they summarize, so attention is peaked (not uniform) and bugs in what a query sees
  (a missing slot, a wrong entry) move the output more than rounding does.
- The head predicts a successor token with a clear margin (row v reads the embedding of v's predecessor under a
  random permutation), so greedy tokens do not flip on rounding noise.
Every matrix keeps a 10% isotropic component, so nothing is rank-deficient; norms, sinks, ape, biases and hash
tables are drawn as in chaotic. What several parameters share (frames, routing directions, embedding coordinates,
the attention's core matrices) comes from generators named after it, so any subset still reproduces alone; the
linear algebra runs in float64 from fp32 draws, so results do not hinge on the machine's BLAS/LAPACK kernels.
"""

import functools
import zlib
from collections.abc import Iterator

import torch

from parity.checkpoint.layout import DiskTensor, disk_tensors_for_param, model_param_specs
from parity.config import ModelArgs
from parity.errors import ParityError
from parity.formats import quantize_fp4_groups, quantize_fp8_blocks

INITS = ("chaotic", "calm")


def check_init(init: str) -> str:
    """`init` if it names a known weight distribution, else a ParityError."""
    if init not in INITS:
        raise ParityError(f"synthetic init: unknown value {init!r}; choices: {', '.join(INITS)}")
    return init


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def _master_value(
    name: str, shape: tuple[int, ...], args: ModelArgs, g: torch.Generator, init: str = "chaotic", seed: int = 0
) -> torch.Tensor:
    """fp32 values of a parameter before it is stored in its disk format."""
    if init == "calm":
        return _calm_value(name, shape, args, g, seed)
    return _chaotic_value(name, shape, args, g)


def _chaotic_value(name: str, shape: tuple[int, ...], args: ModelArgs, g: torch.Generator) -> torch.Tensor:
    def normal(std: float) -> torch.Tensor:
        return torch.randn(shape, generator=g, dtype=torch.float32) * std

    leaf = name.rsplit(".", 1)[-1]
    if name.endswith("norm.weight"):
        return 1.0 + normal(0.1)
    if name == "embed.weight":
        return normal(1.0)
    if leaf.startswith("hc_") and leaf.endswith("_fn"):
        return normal((shape[-1]) ** -0.5)
    if leaf.startswith("hc_") and leaf.endswith("_base"):
        return normal(0.1)
    if leaf.startswith("hc_") and leaf.endswith("_scale"):
        return 0.5 + torch.rand(shape, generator=g, dtype=torch.float32)
    if leaf == "attn_sink":
        return normal(1.0)
    if leaf == "ape":
        return normal(0.1)
    if leaf == "bias":
        return normal(0.1)
    if leaf == "tid2eid":
        rows = [torch.randperm(args.n_routed_experts, generator=g)[: shape[1]] for _ in range(shape[0])]
        return torch.stack(rows)
    # every linear weight, logical [out, in]
    return normal(shape[-1] ** -0.5)


# ---------------------------------------------------------------------------------------------------------------
# calm init

FRAME_DIV = 8  # stream, q-LoRA and o-LoRA frames keep 1/8 of their width
HEAD_FRAME_DIV = 4  # attention / indexer head frames keep 1/4 of the non-rotary dims
LEAK = 0.1  # isotropic share (amplitude) of every framed matrix: full rank, some noise still read
BRANCH = 0.57  # root-sum-square of the residual-branch output gains over all 2 * n_layers sublayers
ROUTE_SHARE = 0.7  # amplitude share of each embedding on its preferred experts' routing directions
ROUTE_GAIN = 3.0  # score-routed gate: pre-activation score of a fully aligned token
SELF_MIX = 0.7  # share of a self-matching head's query map that reproduces the key map
COMPRESS_MIX = 0.7  # share of the compressor's key map that copies the window key map
INDEX_DC = 0.9  # share of the indexer's head-weight rows along the (token-independent) routing mean
MTP_EMBED_MIX = 0.9  # share of e_proj that passes the next token's embedding through unchanged
HEAD_PEAK = 12.0  # logit of the successor token for a stream aligned with the current token's embedding
HEAD_SPREAD = 1.5  # std of every other logit
HC_FN_GAIN = 0.1  # mHC mixer rows relative to chaotic
HC_COMB_DIAG = 4.0  # Sinkhorn input bias on the comb diagonal (comb ~0.9 on the diagonal)


def _rank(n: int, div: int) -> int:
    return max(1, n // div)


@functools.lru_cache(maxsize=256)
def _orthonormal(seed: int, space: str, n: int, k: int) -> torch.Tensor:
    """[n, k] orthonormal columns spanning a frame, drawn from the frame's own generator."""
    q, _ = torch.linalg.qr(_randn(_generator(seed, "calm-frame:" + space), n, k))
    return q


def _stream_rank(args: ModelArgs) -> int:
    # room for one routing direction per expert next to as many content dims
    return min(args.dim, max(_rank(args.dim, FRAME_DIV), 2 * args.n_routed_experts))


@functools.lru_cache(maxsize=8)
def _stream(args: ModelArgs, seed: int):
    """Stream frame [D, k] and, in its coordinates, the routing directions [k, E] (unit columns) and the content
    basis [k, k - r] orthogonal to them; plus each token's preferred experts [V, n_activated]."""
    k = _stream_rank(args)
    frame = _orthonormal(seed, "stream", args.dim, k)
    r = min(args.n_routed_experts, k // 2)
    coords = _orthonormal(seed, "stream-coords", k, k)
    route_dims, content = coords[:, :r], coords[:, r:]
    if args.n_routed_experts <= r:
        axes = torch.eye(r, dtype=torch.float64)
    else:  # more experts than routing dims: unit directions that share them
        axes = _randn(_generator(seed, "calm-route-axes"), r, args.n_routed_experts)
        axes = axes / axes.norm(dim=0, keepdim=True)
    routes = route_dims @ axes
    g = _generator(seed, "calm-route-pref")
    pref = [
        torch.randperm(args.n_routed_experts, generator=g)[: args.n_activated_experts] for _ in range(args.vocab_size)
    ]
    return frame, routes, content, torch.stack(pref)


@functools.lru_cache(maxsize=1)
def _embed_coords(args: ModelArgs, seed: int) -> torch.Tensor:
    """[V, k] stream-frame coordinates of every embedding (unit variance per coordinate): a content part plus the
    token's preferred routing directions. Shared by the embedding and the head."""
    frame, routes, content, pref = _stream(args, seed)
    k, kc = frame.shape[1], content.shape[1]
    g = _generator(seed, "calm-embed")
    z = _randn(g, args.vocab_size, kc) @ content.T * (k / kc) ** 0.5
    routed = routes.T[pref].sum(1) * (k / args.n_activated_experts) ** 0.5
    return (1 - ROUTE_SHARE**2) ** 0.5 * z + ROUTE_SHARE * routed


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    # draws in fp32 (the generator's stream, as chaotic uses it); all calm linear algebra runs in float64 so the
    # fp32 results do not depend on the BLAS/LAPACK kernels of the machine (summation order, SIMD width)
    return torch.randn(shape, generator=g, dtype=torch.float32).double()


def _core(g: torch.Generator, k_out: int, k_in: int) -> torch.Tensor:
    return _randn(g, k_out, k_in) * k_in**-0.5


def _framed(g, shape, out_frame=None, in_frame=None, gain=1.0, core=None) -> torch.Tensor:
    """A [out, in] weight that maps `in_frame` (None: the whole input space) onto `out_frame` through `core`
    ([k_out, k_in], drawn here when None), scaled so an input inside the frame keeps its rms, plus the LEAK share
    of N(0, 1/in). A frame is one [n, k] tensor or a list of them, the blocks of a block-diagonal frame (per head,
    per group), which is never materialized."""
    n_out, n_in = shape
    k_out = n_out if out_frame is None else _frame_rank(out_frame)
    k_in = n_in if in_frame is None else _frame_rank(in_frame)
    w = _core(g, k_out, k_in) if core is None else core
    if in_frame is not None:
        blocks = _blocks(in_frame)
        k = blocks[0].shape[1]
        w = torch.cat([w[:, i * k : (i + 1) * k] @ b.T for i, b in enumerate(blocks)], dim=1)
    if out_frame is not None:
        blocks = _blocks(out_frame)
        k = blocks[0].shape[1]
        w = torch.cat([b @ w[i * k : (i + 1) * k] for i, b in enumerate(blocks)])
    w = w * (k_in * n_out / (n_in * k_out)) ** 0.5
    if out_frame is not None or in_frame is not None:
        w = (1 - LEAK**2) ** 0.5 * w + LEAK * _randn(g, *shape) * n_in**-0.5
    return gain * w


def _blocks(frame) -> list[torch.Tensor]:
    return frame if isinstance(frame, list) else [frame]


def _frame_rank(frame) -> int:
    return sum(b.shape[1] for b in _blocks(frame))


def _unit_rows(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=-1, keepdim=True)


def _nope_frame(seed: int, space: str, d: int, rd: int, k: int) -> torch.Tensor:
    """A frame inside the non-rotary dims [0, d - rd): RoPE would turn any frame that touches the rotary dims."""
    return torch.cat([_orthonormal(seed, space, d - rd, k), torch.zeros(rd, k, dtype=torch.float64)])


def _head_rank(args: ModelArgs) -> int:
    return _rank(args.head_dim - args.rope_head_dim, HEAD_FRAME_DIV)


def _index_rank(args: ModelArgs) -> int:
    # the indexer's frame is a projection of the attention's: no wider than it
    return min(_rank(args.index_head_dim - args.rope_head_dim, HEAD_FRAME_DIV), _head_rank(args))


def _frames(args: ModelArgs, seed: int, attn: str) -> dict[str, torch.Tensor]:
    """The frames of one attention module (prefix `...attn`)."""
    rd = args.rope_head_dim
    q_lora = _orthonormal(seed, attn + ".q_lora", args.q_lora_rank, _rank(args.q_lora_rank, FRAME_DIV))
    groups = [
        _orthonormal(seed, f"{attn}.o_lora.{i}", args.o_lora_rank, _rank(args.o_lora_rank, FRAME_DIV))
        for i in range(args.o_groups)
    ]
    return {
        "q_lora": q_lora,
        "o_lora": groups,
        "head": _nope_frame(seed, attn + ".head", args.head_dim, rd, _head_rank(args)),
        "index": _nope_frame(seed, attn + ".index", args.index_head_dim, rd, _index_rank(args)),
    }


@functools.lru_cache(maxsize=16)
def _attn_cores(args: ModelArgs, seed: int, attn: str, coff: int) -> dict[str, torch.Tensor]:
    """Core matrices of one attention module that other weights copy: query chain (wq_a, wq_b), key map (wkv) and
    the compressor's key map (`coff` = 2 with overlap, 1 without, 0 for none)."""
    ks, kh = _stream_rank(args), _head_rank(args)
    kq = _rank(args.q_lora_rank, FRAME_DIV)
    gen = lambda leaf: _generator(seed, f"calm-core:{attn}.{leaf}")  # noqa: E731
    wq_a, wkv = _core(gen("wq_a"), kq, ks), _core(gen("wkv"), kh, ks)
    wq_b = _core(gen("wq_b"), args.n_heads * kh, kq)
    # self-matching heads: q = wq_b(wq_a(x)) reproduces wkv(x) within the q-LoRA frame, so q_t . k_t > 0
    target = wkv @ torch.linalg.pinv(wq_a)
    for h in range(args.n_heads // 2):
        rows = slice(h * kh, (h + 1) * kh)
        match = target * (wq_b[rows].norm() / target.norm())
        wq_b[rows] = (1 - SELF_MIX**2) ** 0.5 * wq_b[rows] + SELF_MIX * match
    cores = {"wq_a": wq_a, "wq_b": wq_b, "wkv": wkv}
    if coff:
        own = _core(gen("compressor.wkv"), coff * kh, ks)
        cores["compressor.wkv"] = COMPRESS_MIX * wkv.repeat(coff, 1) + (1 - COMPRESS_MIX**2) ** 0.5 * own
    return cores


def _block_rows(m: torch.Tensor, block: int, take: int, sources: list[int]) -> torch.Tensor:
    """The first `take` rows of each `block`-row block of m named in `sources`, stacked."""
    return torch.cat([m[s * block : s * block + take] for s in sources])


def _branch_gain(args: ModelArgs) -> float:
    return BRANCH / (2 * args.n_layers) ** 0.5


def _is_hash_layer(name: str, args: ModelArgs) -> bool:
    return name.startswith("layers.") and int(name.split(".")[1]) < args.n_hash_layers


def _calm_linear(name: str, shape: tuple[int, int], args: ModelArgs, g: torch.Generator, seed: int):
    frame, routes, content, _ = _stream(args, seed)
    ks = frame.shape[1]
    attn = name[: name.index(".attn.") + len(".attn")] if ".attn." in name else None
    f = _frames(args, seed, attn) if attn else None
    branch = _branch_gain(args)

    def cores(coff: int = 0) -> dict[str, torch.Tensor]:
        return _attn_cores(args, seed, attn, coff)

    kh, ki = _head_rank(args), _index_rank(args)
    if name.endswith("indexer.wq_b.weight"):
        core = _block_rows(cores()["wq_b"], kh, ki, [i % args.n_heads for i in range(args.index_n_heads)])
        return _framed(g, shape, [f["index"]] * args.index_n_heads, f["q_lora"], core=core)
    if name.endswith("indexer.compressor.wkv.weight"):
        coff = shape[0] // args.index_head_dim
        core = _block_rows(cores(coff)["compressor.wkv"], kh, ki, list(range(coff)))
        return _framed(g, shape, [f["index"]] * coff, frame, core=core)
    if name.endswith("indexer.weights_proj.weight"):
        # every token's embedding has the same projection on the routing mean: per-head weights stay positive,
        # so no head ranks entries upside down
        mean = _unit_rows((frame @ routes).sum(1))
        rows = _unit_rows(_framed(g, shape, None, frame))
        return INDEX_DC * mean + (1 - INDEX_DC**2) ** 0.5 * rows
    if name.endswith("attn.wq_a.weight"):
        return _framed(g, shape, f["q_lora"], frame, core=cores()["wq_a"])
    if name.endswith("attn.wq_b.weight"):
        return _framed(g, shape, [f["head"]] * args.n_heads, f["q_lora"], core=cores()["wq_b"])
    if name.endswith("attn.wkv.weight"):
        return _framed(g, shape, f["head"], frame, core=cores()["wkv"])
    if name.endswith("attn.compressor.wkv.weight"):
        coff = shape[0] // args.head_dim
        return _framed(g, shape, [f["head"]] * coff, frame, core=cores(coff)["compressor.wkv"])
    if name.endswith("compressor.wgate.weight"):
        return _framed(g, shape, None, frame)
    if name.endswith("attn.wo_a.weight"):
        return _framed(g, shape, f["o_lora"], [f["head"]] * (args.n_heads // args.o_groups))
    if name.endswith("attn.wo_b.weight"):
        return _framed(g, shape, frame, f["o_lora"], gain=branch)
    if name.endswith("ffn.gate.weight"):
        if _is_hash_layer(name, args):  # the hash table picks the experts; the scores only weight them
            return _framed(g, shape, None, frame)
        perm = torch.randperm(args.n_routed_experts, generator=g)
        rows = (1 - LEAK**2) ** 0.5 * (frame @ routes).T[perm] + LEAK * _unit_rows(_randn(g, *shape))
        return ROUTE_GAIN * (args.n_activated_experts / args.dim) ** 0.5 * rows
    if name.endswith(("w1.weight", "w3.weight")):
        return _framed(g, shape, None, frame)
    if name.endswith("w2.weight"):
        return _framed(g, shape, frame, None, gain=branch)
    if name.endswith("e_proj.weight"):
        # the MTP block routes on the next token: pass its embedding (and routing directions) through
        core = MTP_EMBED_MIX * torch.eye(ks, dtype=torch.float64) + (1 - MTP_EMBED_MIX**2) ** 0.5 * _core(g, ks, ks)
        return _framed(g, shape, frame, frame, core=core)
    if name.endswith("h_proj.weight"):
        # ... and keep the main model's streams out of the routing directions
        return _framed(g, shape, frame @ content, frame)
    if name == "head.weight":
        # row v reads the embedding of v's predecessor: a stream carrying the current token predicts its successor
        pred = torch.randperm(args.vocab_size, generator=g)
        succ = _unit_rows(_embed_coords(args, seed)[pred] @ frame.T)
        spread = _unit_rows(_framed(g, shape, None, frame))
        return (HEAD_PEAK * succ + HEAD_SPREAD * ks**0.5 * spread) * args.dim**-0.5
    return _framed(g, shape)


def _calm_value(name: str, shape: tuple[int, ...], args: ModelArgs, g: torch.Generator, seed: int) -> torch.Tensor:
    def normal(std: float) -> torch.Tensor:
        return torch.randn(shape, generator=g, dtype=torch.float32) * std

    leaf = name.rsplit(".", 1)[-1]
    if name.endswith("norm.weight"):
        return 1.0 + normal(0.1)
    if name == "embed.weight":
        frame = _stream(args, seed)[0]
        z = _embed_coords(args, seed) @ frame.T * (args.dim / frame.shape[1]) ** 0.5
        return ((1 - LEAK**2) ** 0.5 * z + LEAK * normal(1.0).double()).float()
    if leaf.startswith("hc_") and leaf.endswith("_fn"):
        return normal(HC_FN_GAIN * shape[-1] ** -0.5)
    if leaf.startswith("hc_") and leaf.endswith("_base"):
        base = normal(0.1)
        hc = args.hc_mult
        if shape[0] == (2 + hc) * hc:  # [pre | post | comb]: a near-identity comb
            base[2 * hc :] += HC_COMB_DIAG * torch.eye(hc).flatten()
        return base
    if leaf.startswith("hc_") and leaf.endswith("_scale"):
        return 1.0 + normal(0.1)
    if leaf == "attn_sink":
        return normal(1.0)
    if leaf == "ape":
        return normal(0.1)
    if leaf == "bias":
        return normal(0.1)
    if leaf == "tid2eid":
        rows = [torch.randperm(args.n_routed_experts, generator=g)[: shape[1]] for _ in range(shape[0])]
        return torch.stack(rows)
    return _calm_linear(name, shape, args, g, seed).float()


def synth_param(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, args: ModelArgs, seed: int, init: str = "chaotic"
):
    """Disk tensors ({disk name: tensor}) of one model parameter, drawn deterministically."""
    check_init(init)
    disk = disk_tensors_for_param(name, shape, dtype)
    if not disk:
        return {}
    g = _generator(seed, name)
    weight = disk[0]
    if weight.dtype == torch.int8:  # packed FP4 expert weight: logical [out, 2 * packed]
        logical = (shape[0], shape[1] * 2)
        packed, scale = quantize_fp4_groups(_master_value(name, logical, args, g, init, seed))
        return {name: packed, name[: -len("weight")] + "scale": scale}
    if weight.dtype == torch.float8_e4m3fn and name.endswith(".weight"):
        q, scale = quantize_fp8_blocks(_master_value(name, shape, args, g, init, seed))
        return {name: q, name[: -len("weight")] + "scale": scale}
    if name.endswith(".scale"):
        # the FP8/FP4 scales are produced together with their weights
        return {}
    value = _master_value(name, shape, args, g, init, seed)
    return {weight.name: value.to(weight.dtype)}


def synth_tensors(
    args: ModelArgs, seed: int = 0, only: set[str] | None = None, init: str = "chaotic"
) -> Iterator[tuple[str, torch.Tensor]]:
    """(disk name, tensor) for every tensor of the checkpoint (or the params named in `only`), in layout order."""
    check_init(init)
    for name, (shape, dtype) in model_param_specs(args).items():
        if only is not None and name not in only:
            continue
        yield from synth_param(name, shape, dtype, args, seed, init).items()


def expected_disk_tensors(args: ModelArgs) -> dict[str, DiskTensor]:
    """name -> DiskTensor for the whole layout (what a reader checks a checkpoint against)."""
    specs = {}
    for name, (shape, dtype) in model_param_specs(args).items():
        for t in disk_tensors_for_param(name, shape, dtype):
            specs[t.name] = t
    return specs
