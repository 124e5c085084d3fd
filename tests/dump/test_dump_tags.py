"""dump.phase / dump.tags: validation, nesting, and restoring the outer tag even when the forward raises."""

import pytest
import torch

from parity import dump
from parity.errors import ParityError


def test_phase_sets_and_restores():
    assert dump.current_tags().phase is None
    with dump.tags(impl="reference"):
        with dump.phase("prefill", step=0, cu_seqlens=torch.tensor([0, 5, 9]), requests=["a", 7]) as t:
            assert (t.phase, t.step, t.cu_seqlens, t.requests) == ("prefill", 0, (0, 5, 9), ("a", "7"))
            assert t.extra == {"impl": "reference"}
            with dump.phase("decode", step=3, batch=2, slot_ids=[4, 1]):
                inner = dump.current_tags()
                assert (inner.phase, inner.step, inner.batch, inner.cu_seqlens) == ("decode", 3, 2, None)
                assert inner.extra == {"impl": "reference", "slot_ids": [4, 1]}
            assert dump.current_tags().phase == "prefill"
        assert dump.current_tags().phase is None and dump.current_tags().extra == {"impl": "reference"}
    assert dump.current_tags().extra == {}


def test_phase_restored_after_exception():
    with pytest.raises(RuntimeError):
        with dump.phase("mtp-draft", step=1):
            raise RuntimeError("forward failed")
    assert dump.current_tags().phase is None


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        pytest.param(("warmup",), {}, "unknown phase", id="unknown-phase"),
        pytest.param(("decode", -1), {}, "step", id="negative-step"),
        pytest.param(("decode", 1.0), {}, "step", id="float-step"),
        pytest.param(("decode",), {"cu_seqlens": [0, 2], "batch": 1}, "not both", id="both-layouts"),
        pytest.param(("decode",), {"cu_seqlens": [1, 2]}, "cu_seqlens", id="cu-not-from-zero"),
        pytest.param(("decode",), {"cu_seqlens": [0, 3, 2]}, "cu_seqlens", id="cu-decreasing"),
        pytest.param(("decode",), {"batch": 0}, "batch", id="batch-zero"),
        pytest.param(("decode",), {"batch": 2, "requests": ["a"]}, "1 request ids for 2 slots", id="requests-count"),
        pytest.param(("decode",), {"impl": object()}, "JSON", id="extra-not-json"),
    ],
)
def test_phase_rejects_bad_tags(args, kwargs, match):
    with pytest.raises(ParityError, match=match):
        with dump.phase(*args, **kwargs):
            pass


def test_one_tag_schema():
    """The tags of `dump.phase` are the tag fields of every record, in one definition (`format.Tags`)."""
    from dataclasses import fields

    from parity.dump.format import Origin, Record, Tags

    assert dump.Tags is Tags and issubclass(Record, Tags)
    names = [f.name for f in fields(Record)]
    own = ["merge", "rank", "world_size", "file", "key", "stats"]
    assert names == [f.name for f in fields(Origin)] + [f.name for f in fields(Tags)] + own
    with dump.phase("decode", step=2, batch=1, requests=["r"], start_pos=[5], impl="x") as t:
        record = Record(seq=0, run="r", kind="activation", name="m:out", module="m", field="out", shape=(1,),
                        dtype="float32", **t.as_record_fields(), file="f", key="out")  # fmt: skip
    assert Record.from_json(record.to_json(), "line 1") == record
    assert (record.phase, record.step, record.start_pos, record.extra) == ("decode", 2, (5,), {"impl": "x"})
