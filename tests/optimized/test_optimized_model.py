"""The optimized modules: the reference's parameters without the reference's caches (those live in a PagedCache)."""

import torch

from parity.optimized.model import OptimizedTransformer
from parity.reference.model import Transformer


def test_same_parameters_as_the_reference_and_no_reference_cache(tiny_args):
    with torch.device("meta"):
        opt, ref = OptimizedTransformer(tiny_args), Transformer(tiny_args)
    params = lambda m: [(n, p.shape, p.dtype) for n, p in m.named_parameters()]  # noqa: E731
    assert params(opt) == params(ref)
    assert {name.rsplit(".", 1)[-1] for name, _ in opt.named_buffers()} == {"freqs_cis"}
    opt.reset_buffers()  # what a checkpoint load runs: only the RoPE tables are rebuilt
