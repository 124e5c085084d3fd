"""The sites: the taps both implementations expose, what each holds and how it is judged.

A site is a tap path with the layer index replaced by `*` (`layers.*.hc_pre_attn`). Per block (`layers.<i>` and
`mtp.<j>`), in execution order:

| site | holds | kind |
| --- | --- | --- |
| `streams_in` | block input streams `[n, hc, D]` | stream |
| `hc_pre_attn` | mHC pre-mix of the attention: y `[n, D]`, post `[n, hc]`, comb `[n, hc, hc]` (fp32 mixers) | mix |
| `attn.input` | attention input after `attn_norm` | act |
| `attn.qr` | the q-LoRA latent after `q_norm` (the input of `wq_b` and of the indexer) | act |
| `attn.q` | the query heads `[n, h, d]` as the attention core reads them (after `wq_b`, the head norm, RoPE) | act |
| `attn.kv` | the window KV after `kv_norm`, before RoPE and FP8 fake-quant | act |
| `attn.indexer.compressor.entries` | the indexer's new entries (rows: the tokens that completed them) | entry |
| `attn.indexer.topk` | the indexer's chosen entry ids per token (-1 none) | choice |
| `attn.compressor.entries` | the main compressor's new entries | entry |
| `attn.o_lora` | sparse attention, inverse RoPE and the grouped wo_a: the input of `wo_b` | act |
| `attn.output` | attention output (`wo_b`) | act |
| `hc_post_attn` | streams after the attention's post-mix | stream |
| `hc_pre_ffn` | mHC pre-mix of the MoE | mix |
| `ffn.input` | MoE input after `ffn_norm` | act |
| `ffn.route` | routing weights `[n, k]` fp32 and expert ids | choice |
| `ffn.output` | MoE output (routed experts + shared expert) | act |
| `hc_post_ffn` | block output streams | stream |

MTP blocks add `input` (the main model's streams fed in) first and `output_logits` last; the model adds
`output_logits`. Each site names the sub-module a failure there is blamed on.
"""

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Site:
    name: str  # path below the block (or the model)
    kind: str  # stream | mix | act | entry | choice | logits
    submodule: str  # what a failure here is blamed on
    rows_field: str | None = None  # field holding token-row indices (taps called with a trailing `rows`)
    # the coarsest dtype the site's own computation rounds to before its output, where coarser than the output's:
    # the golden's second opinion cannot tell a kernel's legitimate rounding there from a loss below that unit
    inner_dtype: str | None = None


BLOCK_SITES = (
    Site("streams_in", "stream", "block input"),
    Site("hc_pre_attn", "mix", "mHC pre (attention)"),
    Site("attn.input", "act", "attention norm"),
    Site("attn.qr", "act", "attention q projection"),
    Site("attn.q", "act", "attention q projection"),  # wq_b, the head norm and RoPE
    Site("attn.kv", "act", "attention kv projection"),
    Site("attn.indexer.compressor.entries", "entry", "indexer compressor", rows_field="out.1"),
    Site("attn.indexer.topk", "choice", "indexer"),
    Site("attn.compressor.entries", "entry", "compressor", rows_field="out.1"),
    Site("attn.o_lora", "act", "attention core"),
    Site("attn.output", "act", "attention output projection"),
    Site("hc_post_attn", "stream", "mHC post (attention)"),
    Site("hc_pre_ffn", "mix", "mHC pre (MoE)"),
    Site("ffn.input", "act", "MoE norm"),
    Site("ffn.route", "choice", "gate"),
    Site("ffn.output", "act", "experts"),
    Site("hc_post_ffn", "stream", "mHC post (MoE)"),
)
MTP_SITES = (
    Site("input", "stream", "MTP input streams"),
    *BLOCK_SITES,
    Site("output_logits", "logits", "MTP head", rows_field="out.1", inner_dtype="bfloat16"),
)
# the head's fp32 logits come from its normed streams rounded to bf16 (hc head, then the norm in the streams'
# dtype), and the golden's head is the reference's own fp32 code: a kernel whose norm rounds one midpoint the other
# way moves the logits by bf16's unit roundoff, measured on the H200 (1.35e-3 on one row) against a golden at 0
MODEL_SITES = (Site("output_logits", "logits", "head", rows_field="out.1", inner_dtype="bfloat16"),)

_BLOCK = re.compile(r"^(layers|mtp)\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class SitePath:
    """A concrete tap path split into its block and site: `layers.2.attn.output` -> block `layers.2`."""

    path: str
    block: str | None  # `layers.2`, `mtp.0`, or None for model-level taps
    layer: int | None  # the block's index in execution order of blocks: layers first, then MTP blocks
    site: Site

    @property
    def template(self) -> str:
        """`layers.*.attn.output`: what thresholds are keyed by."""
        return self.path if self.block is None else f"{self.block.split('.')[0]}.*.{self.site.name}"


def parse(path: str, n_layers: int) -> SitePath | None:
    """The site at a tap path, or None if the path is not a site."""
    m = _BLOCK.match(path)
    if m is None:
        site = next((s for s in MODEL_SITES if s.name == path), None)
        return None if site is None else SitePath(path, None, None, site)
    kind, index, rest = m[1], int(m[2]), m[3]
    sites = BLOCK_SITES if kind == "layers" else MTP_SITES
    site = next((s for s in sites if s.name == rest), None)
    if site is None:
        return None
    return SitePath(path, f"{kind}.{index}", index if kind == "layers" else n_layers + index, site)


def order_key(sp: SitePath, n_layers: int) -> tuple:
    """Execution order of sites: blocks by index (MTP after the layers, the model's logits between), then the
    sites of a block in the table's order."""
    if sp.block is None:
        return (n_layers, -1, 0)
    sites = BLOCK_SITES if sp.block.startswith("layers") else MTP_SITES
    return (sp.layer, [s.name for s in sites].index(sp.site.name), 1)


def tap_pattern() -> str:
    """Regex of every tap path (what `parity.dump` selects)."""
    names = {re.escape(s.name) for s in (*BLOCK_SITES, *MTP_SITES)}
    model = "|".join(re.escape(s.name) for s in MODEL_SITES)
    return rf"^((layers|mtp)\.\d+\.({'|'.join(sorted(names))})|{model})$"
