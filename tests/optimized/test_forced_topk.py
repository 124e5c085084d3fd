"""Top-k ids a hook puts in place of the indexer's own (teacher forcing) are cut at each sequence's own k, as the
op's own ids are (-1 past it): a forced id past a sequence's k never reaches the attention, and ids the hook leaves
as they are pass unchanged.

Two requests decode side by side: one whose context has fewer CSA entries than `index_topk` (its k is its entry
count: the columns past it are -1 up to the batch's widest k) and one with more. A hook on every indexer's top-k
tap returns a copy of the ids, in one run with every -1 of a decode step turned into entry 0 (a valid id), in the
other untouched: the runs must agree bit for bit (in a decode step a sequence sees all its entries, so its only
-1s are those past its k).
"""

import pytest
import torch

from parity.checkpoint import build_model
from parity.optimized.model import OptimizedTransformer
from tests.optimized.test_decode_graphs import run as engine_run

LENGTHS = (20, 100)  # 5 and 25 CSA entries at the first decode: k = 5 and 16 (index_topk)


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return build_model(tiny_ckpt, factory=OptimizedTransformer)[0]


def run(model, garbage: bool) -> tuple[list[torch.Tensor], int]:
    """Each forward's output streams (eager engine), and how many ids the hook changed."""
    changed = [0]

    def hook(module, args, out):
        new = out.clone()
        if garbage and out.shape[0] == len(LENGTHS):  # a decode step: one row per request
            changed[0] += int((new < 0).sum())
            new[new < 0] = 0
        return new

    handles = [
        layer.attn.indexer.topk.register_forward_hook(hook) for layer in model.layers if layer.attn.indexer is not None
    ]
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, model.args.vocab_size, (n,), generator=g) for n in LENGTHS]
    try:
        _, streams, _ = engine_run(model, prompts, False)
    finally:
        for h in handles:
            h.remove()
    return streams, changed[0]


def test_forced_ids_past_a_sequences_k_are_cut(model):
    clean, _ = run(model, garbage=False)
    forced, changed = run(model, garbage=True)
    assert changed > 0, "no id past a sequence's k was forced: the case does not test the cut"
    assert len(clean) == len(forced)
    for step, (a, b) in enumerate(zip(clean, forced)):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16)), f"step {step}: a forced id past k was attended"
