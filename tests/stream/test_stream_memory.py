"""What a streamed run holds besides one block: the resident weights once for every model built from the checkpoint
(not per model), no shard mapped past the parameter being read, and the printed line built from what it measured."""

import gc
from pathlib import Path
from types import SimpleNamespace

import torch

from parity.checkpoint import build_model
from parity.optimized.model import OptimizedTransformer
from parity.reference.generate import greedy_generate
from parity.stream import build, build_streamed, weights


def _mapped_shards(ckpt: Path) -> int:
    """Mappings of the checkpoint's shard files in this process (safetensors maps a shard while it is open)."""
    lines = Path("/proc/self/maps").read_text().splitlines()
    return sum(1 for line in lines if str(ckpt) in line and line.endswith(".safetensors"))


def test_models_of_one_checkpoint_share_one_copy_of_the_resident_weights(tiny_ckpt):
    gc.collect()
    before = len(build._RESIDENT)
    a, _ = build_streamed(tiny_ckpt)
    b, _ = build_streamed(tiny_ckpt)  # `a` is still alive, as a verdict's previous model is while the next builds
    for name in ("embed.weight", "head.weight", "norm.weight", "hc_head_fn"):
        pa, pb = a.get_parameter(name), b.get_parameter(name)
        assert pa is pb and not pa.is_meta, name
    assert a.mtp[0].head.weight is a.head.weight  # the MTP blocks use the shared head too
    # the engine's model shares them too; the values are the loaded model's
    opt, _ = build_streamed(tiny_ckpt, factory=OptimizedTransformer)
    loaded, _ = build_model(tiny_ckpt)
    for name, p in opt.named_parameters():
        if not p.is_meta and not name.startswith(("layers.", "mtp.")):
            want = loaded.get_parameter(name)
            assert p.dtype == want.dtype and torch.equal(p, want), name
            assert p is a.get_parameter(name), name  # the reference and the engine hold them in the same dtypes
    assert len(build._RESIDENT) > before
    del a, b, opt, pa, pb, p, want
    gc.collect()
    assert len(build._RESIDENT) == before  # dropped with the last model holding them: nothing kept past the run


def test_a_shared_resident_weight_computes_what_a_loaded_one_does(tiny_ckpt, tiny_args):
    loaded, _ = build_model(tiny_ckpt)
    first, _ = build_streamed(tiny_ckpt)
    second, _ = build_streamed(tiny_ckpt)
    prompt = torch.arange(11) % tiny_args.vocab_size
    want = greedy_generate(loaded, prompt, 2)
    for model in (first, second, first):  # one after another on the same resident tensors, as a verdict's runs
        got = greedy_generate(model, prompt, 2)
        assert got.tokens == want.tokens and all(torch.equal(x, y) for x, y in zip(got.logits, want.logits))


def test_a_block_read_maps_one_parameter_of_the_shard_at_a_time(tiny_ckpt, monkeypatch):
    model, _ = build_streamed(tiny_ckpt)
    open_at_read = []
    real = weights.disk_tensors_for_param

    def spy(name, shape, dtype):
        open_at_read.append(_mapped_shards(tiny_ckpt))  # before this parameter's read
        return real(name, shape, dtype)

    monkeypatch.setattr(weights, "disk_tensors_for_param", spy)
    model.streamer.enter("layers.1")
    assert len(open_at_read) == len(model.streamer.slots["layers.1"]) > 5
    # each parameter's read starts with no shard mapped: the previous one's map was closed, so a block read never
    # holds the block's stored bytes besides the converted parameters
    assert open_at_read == [0] * len(open_at_read)
    assert _mapped_shards(tiny_ckpt) == 0
    model.streamer.release()


def test_a_span_peak_is_never_below_the_rss_it_began_with(monkeypatch):
    """The kernel's high-water mark is updated lazily: read after a reset, it can sit a few pages under the RSS read
    just before the reset. The span's peak counts the RSS it began with (without it, CI saw peak < start)."""
    from parity.stream import memory

    values = {"VmRSS": 1000, "VmHWM": 990}  # KiB: the mark the reset left, under the RSS read just before it
    monkeypatch.setattr(memory, "_status_kib", lambda key: values[key])
    monkeypatch.setattr(memory, "_CLEAR_REFS", SimpleNamespace(write_text=lambda text: None))  # the reset "works"
    with memory.PeakRSS() as p:
        pass
    assert p.method == "VmHWM" and p.start == 1000 * 1024 and p.peak == p.start
    values["VmHWM"] = 1500  # a real rise is kept
    with memory.PeakRSS() as p:
        pass
    assert p.peak == 1500 * 1024
