"""Tensor parallelism end to end on CPU: a workload of the tiny model at TP world size 2 (2 processes, gloo), its
per-rank dumps merged by their declared rules and compared with the one-process run; a shard-offset bug on rank 1
is named at its layer.

The TP run is teacher-forced at every replicated tap with the one-process run's values (`capture.tp`), so each
site shows only its own TP error. Unforced, the random tiny model amplifies a last-bit difference from layer to
layer (measured: relative L2 0.007 at layer 0's attention output, 0.13 at layer 2's MoE output, expert ids
flipped in layers 2-3), and no gate could tell that from a bug.

The gate is `capture.tp.GATE` (its derivation is there): a record's relative L2 within 4u = 2^-6 of the one-process
run's (u = 2^-8, bf16), the rounding TP adds to a row-parallel sum of two bf16 partials
(`test_row_parallel_rounding_is_within_the_float64_bound` checks the bound on exact float64 sums). The indexer's
bf16 all-reduce cannot move its top-k here: every prompt is short enough that the indexer keeps all entries (tiny
index_topk 16 >= 20 // 4). Measured on a 2-core AMD EPYC: worst record 0.0075 relative L2 (layer 2 attention
output); the split query 0.002 (the bf16 head norm over 2 instead of 4 heads: CPU vector tails).
"""

import sys

import pytest
import torch

import cli as cli_module
from parity.capture.runs import RunInputs, engine_capture, targets
from parity.capture.tp import GATE as TP_GATE
from parity.capture.tp import GATE_EPS, tp_capture
from parity.compare.diff import compare_dumps
from parity.compare.gate import Thresholds
from parity.compare.loader import load_dump
from parity.dump.writer import save_records
from parity.optimized.engine import EngineConfig

EPS = GATE_EPS
GATE = ("--min-cos", str(1 - EPS**2 / 2), "--max-norm-dev", str(EPS))  # capture.tp.GATE as CLI options
# rank 1 reads its slice of layer 2's wq_b one row early: its query heads are built from shifted rows
PLANTED = (1, r"^layers\.2\.attn\.wq_b\.weight$", -1)


@pytest.fixture(scope="module")
def tp_dumps(tiny_ckpt, tmp_path_factory):
    """The one-process run, the forced TP=2 run and the same with the planted bug (one start of 2 processes)."""
    root = tmp_path_factory.mktemp("tp")
    g = torch.Generator().manual_seed(1)
    prompts = tuple(torch.randint(0, 1024, (n,), generator=g) for n in (20, 9))
    # chunk 16: the 20-token prompt runs as a prefill and a chunk after its context, next to the other's decodes
    inp = RunInputs(tiny_ckpt, prompts, (3, 3), EngineConfig(chunk_size=16, token_budget=32))
    tg = targets(inp)
    single = engine_capture(inp, tg)
    save_records(root / "single", single.dump.records, single.dump.memory)
    clean, bug = tp_capture(inp, tg, 2, [root / "tp", (root / "tp_bug", PLANTED)], force=root / "single")
    return root / "single", clean, bug


def _cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["parity", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        cli_module.main()
    return exc.value.code, capsys.readouterr().out


def test_tp_dumps_are_per_rank_and_declare_their_merge(tp_dumps):
    _, clean, _ = tp_dumps
    assert sorted(p.name for p in clean.iterdir()) == ["rank0", "rank1"]
    dump = load_dump(clean)
    assert dump.world_size == 2
    q = [r for r in dump.records if r.name == "layers.0.attn.q:out" and r.step == 0]
    assert sorted(r.rank for r in q) == [0, 1] and {r.merge for r in q} == {"cat:1"}
    assert {r.shape[1] for r in q} == {2}  # 2 of the tiny model's 4 query heads per rank
    streams = [r for r in dump.records if r.name == "layers.0.hc_post_ffn:out"]
    assert streams and {r.merge for r in streams} == {"replicated"}


def test_tp2_merged_dumps_equal_the_one_process_run_within_the_gate(tp_dumps, monkeypatch, capsys):
    single, clean, _ = tp_dumps
    code, out = _cli(monkeypatch, capsys, "compare", single, clean, *GATE)
    assert code == 0, out
    results = compare_dumps(load_dump(single), load_dump(clean), thresholds=Thresholds(min_cos=0.0, max_norm_dev=1e9))
    by_name = {}
    for r in results:
        by_name.setdefault(r.name, []).append(r)
    assert all(r.passed and r.shape_a == r.shape_b for r in results)
    # the split query merges back to all 4 heads; the row-parallel wo_b output rounds its partials (not bitwise:
    # bf16(P0 + P1) != bf16(bf16(P0) + bf16(P1)) for generic data, with machine-independent exact GEMM kernels)
    assert by_name["layers.0.attn.q:out"][0].shape_b[1] == 4
    assert not by_name["layers.0.attn.output:out"][0].metrics.bitwise
    worst = max(r.metrics.rel_l2 for r in results if r.metrics.rel_l2 is not None)
    assert 0 < worst <= EPS


def test_planted_shard_offset_on_rank_1_is_named_at_its_layer(tp_dumps, monkeypatch, capsys):
    single, _, bug = tp_dumps
    code, out = _cli(monkeypatch, capsys, "compare", single, bug, *GATE)
    assert code == 1
    code, out = _cli(monkeypatch, capsys, "bisect", single, bug, *GATE, "--json")
    assert code == 1
    results = compare_dumps(load_dump(single), load_dump(bug), thresholds=TP_GATE)
    first = min((r for r in results if not r.passed), key=lambda r: r.order)
    # nothing before layer 2 differs beyond the gate; the first failure is the query the bad rows build
    assert (first.record.layer, first.name) == (2, "layers.2.attn.q:out")
    assert "layers.2.attn.q" in out
