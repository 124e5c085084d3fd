"""Layout adapters of the HF name map that need no HF model: a forced value must reach what HF computes next."""

import pytest
import torch
from torch import nn

from parity.engines import hf_taps
from parity.errors import ParityError
from parity.taps import Tap


def _forcing_tap(value: float) -> Tap:
    tap = Tap()
    tap.register_forward_hook(lambda m, args, out: torch.full_like(out, value))
    return tap


def test_forced_streams_after_the_attention_reach_the_layers_residual():
    # HF's decoder layer hands `hidden_states` to ffn_hc and then keeps using the same tensor as the residual: only
    # an in-place write reaches both (a returned replacement would reach ffn_hc alone)
    x = torch.zeros(1, 3, 4, 2)
    residual = x
    assert hf_taps._in_place_first_arg(_forcing_tap(7.0))(None, (x,)) is None
    assert torch.equal(residual, torch.full((1, 3, 4, 2), 7.0))


def test_unforced_streams_are_left_alone():
    x = torch.arange(24.0).view(1, 3, 4, 2)
    hf_taps._in_place_first_arg(Tap())(None, (x,))
    assert torch.equal(x, torch.arange(24.0).view(1, 3, 4, 2))


def test_mix_adapter_reorders_to_the_references_fields():
    tap = Tap()
    seen = []
    tap.register_forward_hook(lambda m, args, out: seen.append([t.shape for t in out]))
    post, comb, y = torch.zeros(1, 5, 4), torch.zeros(1, 5, 4, 4), torch.zeros(1, 5, 16)
    out = hf_taps._mix(tap)(None, (), (post, comb, y))
    assert seen == [[torch.Size([5, 16]), torch.Size([5, 4]), torch.Size([5, 4, 4])]]  # (y, post, comb), squeezed
    assert [t.shape for t in out] == [post.shape, comb.shape, y.shape]  # back in HF's order and layout


def test_site_names_per_layer_type():
    assert "attn.indexer.topk" in hf_taps.site_names("compressed_sparse_attention")
    hca = hf_taps.site_names("heavily_compressed_attention")
    assert "attn.compressor.entries" in hca and "attn.indexer.topk" not in hca
    assert "attn.compressor.entries" not in hf_taps.site_names("sliding_attention")


def test_a_model_the_name_map_does_not_fit_is_one_line():
    class Layer(nn.Module):  # a decoder layer without HF's `self_attn`
        def __init__(self):
            super().__init__()
            self.mlp = nn.Identity()

    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList([Layer()])
    model.config = type("Config", (), {"layer_types": ["sliding_attention"]})()
    with pytest.raises(ParityError, match="the HF name map does not fit Module's modules: .*self_attn") as e:
        hf_taps.HFTaps(model)
    assert "\n" not in str(e.value)
