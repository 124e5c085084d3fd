"""parity's taps on HF transformers' `DeepseekV4ForCausalLM`: the built-in name map and the layout adapters.

HF's modules have other names and layouts than the official model, so its records cannot be compared with the
reference's as they are. `attach(hf_model)` builds a shell module tree whose paths are parity's site paths
(`layers.2.attn.output`, `output_logits`, ...; `parity.compare.sites`), each a `Tap`, and routes HF's values through
them with hooks and instance-level wrappers, adapted to the layout the reference's taps pass (one sequence, batch
dim squeezed: `[s, ...]`). Dump hooks and teacher forcing (`parity.capture.forcing`) then work on the shell exactly
as on the optimized model; a forced value goes back into HF's computation in HF's layout.

The name map, per decoder layer `model.layers.<i>` (site: HF point; adapter):

- `streams_in`: the decoder layer's input (pre-hook); `[1, s, hc, D]` -> `[s, hc, D]`.
- `hc_pre_attn`, `hc_pre_ffn`: `attn_hc` / `ffn_hc` output `(post, comb, collapsed)`; reordered to (y, post, comb).
- `attn.input`, `attn.o_lora`, `ffn.input`: the inputs of `self_attn`, `self_attn.o_b_proj`, `mlp` (pre-hooks).
- `attn.qr`, `attn.kv`: the outputs of `self_attn.q_a_norm`, `self_attn.kv_norm` (the kv before RoPE).
- `attn.q`: the query the attention function receives (`eager_attention_forward`, wrapped per run);
  `[1, h, s, d]` -> `[s, h, d]`.
- `attn.compressor.entries`, `attn.indexer.compressor.entries`: the new entries `[1, n, d]` handed to the cache
  layer's `update_compressor_states("compressor" / "indexer", ...)` (HF's compressors return the running list
  `[1, 1, T, d]`); tapped with the token rows that completed them, from the entry count and the step's layout.
- `attn.indexer.topk`: `compressor.indexer` output; HF's ids are entry ids already (the reference's carry a KV
  offset, which its own tap removes).
- `attn.output`: `self_attn` output `(output, weights)`.
- `hc_post_attn`: `ffn_hc`'s input (pre-hook), forced in place: the layer keeps that tensor as the residual.
- `ffn.route`: `mlp.gate` output `(logits, weights, ids)` over flat `[b*s]` rows; tapped as (weights, ids).
- `ffn.output`: `mlp` output (routed experts + shared expert, `[1, s, D]`).
- `hc_post_ffn`: the decoder layer's output.

and the model's `output_logits` on `lm_head`'s output (run with `logits_to_keep=1`: the last position, the row
the reference's head computes). HF has no MTP module: MTP sites have no counterpart (a case with a candidate other
than `optimized` runs without MTP drafts).
"""

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from parity.errors import ParityError
from parity.taps import Tap

# the sites of a decoder layer, by the sub-module path they live under in parity's naming
_LAYER_TAPS = (
    "streams_in",
    "hc_pre_attn",
    "hc_post_attn",
    "hc_pre_ffn",
    "hc_post_ffn",
    "attn.input",
    "attn.qr",
    "attn.q",
    "attn.kv",
    "attn.o_lora",
    "attn.output",
    "ffn.input",
    "ffn.route",
    "ffn.output",
)
_CSA_TAPS = ("attn.compressor.entries", "attn.indexer.compressor.entries", "attn.indexer.topk")
_HCA_TAPS = ("attn.compressor.entries",)
# HF's cache-layer entry names -> parity's compressor site
ENTRY_SITES = {"compressor": "attn.compressor.entries", "indexer": "attn.indexer.compressor.entries"}


def site_names(layer_type: str) -> tuple[str, ...]:
    """The sites a decoder layer of HF's `layer_type` carries (what the name map promises to line up)."""
    extra = {"compressed_sparse_attention": _CSA_TAPS, "heavily_compressed_attention": _HCA_TAPS}
    return _LAYER_TAPS + extra.get(layer_type, ())


def _put(root: nn.Module, path: str) -> Tap:
    """A `Tap` at `path` below `root`, creating plain container modules on the way."""
    *parents, leaf = path.split(".")
    node = root
    for name in parents:
        child = node._modules.get(name)
        if child is None:
            child = nn.Module()
            node.add_module(name, child)
        node = child
    tap = Tap()
    node.add_module(leaf, tap)
    return tap


class HFTaps:
    """The shell of taps over one HF model (`tree`), its hooks, and the step state the adapters need."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.tree = nn.Module()
        self.tree.add_module("layers", nn.ModuleList([nn.Module() for _ in model.model.layers]))
        self.taps: list[dict[str, Tap]] = []
        self.hooks: list[RemovableHandle] = []
        self.start_pos = 0  # the current forward's first position (entry rows are relative to it)
        self.n_tokens = 0  # and its number of tokens (the logits' row)
        self._by_attention: dict[int, Tap] = {}
        try:
            for i, layer in enumerate(model.model.layers):
                names = site_names(model.config.layer_types[i])
                self.taps.append({name: _put(self.tree.layers[i], name) for name in names})
                self._attach_layer(layer, self.taps[-1])
            self.logits = _put(self.tree, "output_logits")
            self.hooks.append(model.lm_head.register_forward_hook(self._logits_hook))
        except AttributeError as e:
            # another transformers version renamed a module the name map reads (the map is for 5.23)
            self.remove()
            raise ParityError(f"the HF name map does not fit {type(model).__name__}'s modules: {e}") from None

    # -- per step / per request
    def bind_cache(self, cache) -> None:
        """Route the compressors' new entries of `cache` (a fresh `DynamicCache` per request) through the taps."""
        for i, layer_cache in enumerate(cache.layers):
            if hasattr(layer_cache, "update_compressor_states"):
                self._wrap_entries(layer_cache, self.taps[i])

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []

    # -- adapters
    def _attach_layer(self, layer: nn.Module, taps: dict[str, Tap]) -> None:
        hooks, attn, mlp = self.hooks, layer.self_attn, layer.mlp
        hooks.append(layer.register_forward_pre_hook(_first_arg(taps["streams_in"]), with_kwargs=True))
        hooks.append(layer.register_forward_hook(_squeezed_out(taps["hc_post_ffn"])))
        hooks.append(layer.attn_hc.register_forward_hook(_mix(taps["hc_pre_attn"])))
        hooks.append(layer.ffn_hc.register_forward_pre_hook(_in_place_first_arg(taps["hc_post_attn"])))
        hooks.append(layer.ffn_hc.register_forward_hook(_mix(taps["hc_pre_ffn"])))
        hooks.append(attn.register_forward_pre_hook(_first_arg(taps["attn.input"]), with_kwargs=True))
        hooks.append(attn.q_a_norm.register_forward_hook(_squeezed_out(taps["attn.qr"])))
        hooks.append(attn.kv_norm.register_forward_hook(_squeezed_out(taps["attn.kv"])))
        hooks.append(attn.o_b_proj.register_forward_pre_hook(_first_arg(taps["attn.o_lora"]), with_kwargs=True))
        hooks.append(attn.register_forward_hook(_first_of_tuple(taps["attn.output"])))
        self._by_attention[id(attn)] = taps["attn.q"]
        if "attn.indexer.topk" in taps:
            hooks.append(attn.compressor.indexer.register_forward_hook(_squeezed_out(taps["attn.indexer.topk"])))
        hooks.append(mlp.register_forward_pre_hook(_first_arg(taps["ffn.input"]), with_kwargs=True))
        hooks.append(mlp.gate.register_forward_hook(_route(taps["ffn.route"])))
        hooks.append(mlp.register_forward_hook(_squeezed_out(taps["ffn.output"])))

    def query(self, module: nn.Module, query: torch.Tensor) -> torch.Tensor:
        """`attn.q`: HF's query `[1, h, s, d]` as the reference's tap holds it, `[s, h, d]`, and back."""
        tap = self._by_attention.get(id(module))
        if tap is None:
            return query
        return tap(query[0].transpose(0, 1)).transpose(0, 1)[None]

    def _wrap_entries(self, layer_cache, taps: dict[str, Tap]) -> None:
        update = layer_cache.update_compressor_states
        ratio = layer_cache.compress_rate

        def update_compressor_states(name, compressed):
            # compressed: the new entries [1, n, d]; entry j of this call closes the window that ends at absolute
            # position (count + j + 1) * ratio - 1: its row in this forward is that position minus the first one
            n = compressed.shape[1]
            site = ENTRY_SITES.get(name)
            if n and site in taps:
                count = layer_cache.entry_count[name]
                rows = [(count + j + 1) * ratio - 1 - self.start_pos for j in range(n)]
                new, _ = taps[site](compressed[0], torch.tensor(rows, dtype=torch.int64, device=compressed.device))
                compressed = new[None].to(compressed.dtype)
            return update(name, compressed)

        layer_cache.update_compressor_states = update_compressor_states  # instance attribute: this cache only

    def _logits_hook(self, module, args, out):
        # logits_to_keep=1: [1, 1, vocab], the last position of the forward (lm_head sees only it): token row s - 1
        rows = torch.tensor([self.n_tokens - 1], dtype=torch.int64, device=out.device)
        new, _ = self.logits(out[0], rows)
        return new[None]


def _first_arg(tap: Tap):
    """Pre-hook: the module's first input `[1, ...]` through `tap` as `[...]`."""

    def pre(module, args, kwargs):
        if args:
            return (tap(args[0][0])[None], *args[1:]), kwargs
        key = next(iter(kwargs))  # HF passes hidden_states first, positionally or by name
        return args, {**kwargs, key: tap(kwargs[key][0])[None]}

    return pre


def _in_place_first_arg(tap: Tap):
    """Pre-hook whose forced value is written into the input tensor itself: HF's decoder layer keeps using that
    tensor as the residual after the module returns, so only an in-place replacement reaches it too."""

    def pre(module, args):
        rows = args[0][0]  # a view: writing it writes the layer's tensor
        new = tap(rows)
        if new is not rows:
            rows.copy_(new)
        return None

    return pre


def _squeezed_out(tap: Tap):
    def hook(module, args, out):
        return tap(out[0])[None]

    return hook


def _first_of_tuple(tap: Tap):
    def hook(module, args, out):
        return (tap(out[0][0])[None], *out[1:])

    return hook


def _mix(tap: Tap):
    """HF's mHC returns (post, comb, collapsed); the reference's tap holds (y, post, comb)."""

    def hook(module, args, out):
        post, comb, collapsed = out
        y, post, comb = tap(collapsed[0], post[0], comb[0])
        return post[None], comb[None], y[None]

    return hook


def _route(tap: Tap):
    """HF's router returns (logits, weights, ids) over flat `[b*s]` rows; the reference's tap holds (weights, ids)."""

    def hook(module, args, out):
        logits, weights, ids = out
        weights, ids = tap(weights, ids)
        return logits, weights, ids

    return hook
