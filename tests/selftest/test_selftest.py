"""The selftest procedure on a small non-bitwise case: planted bugs are caught and localized at their layer,
sub-module and phase; a clean rerun passes; a gate loosened far enough lets the bugs escape (the selftest fails).

The full library runs in `parity selftest` (minutes); here two bugs of different sub-modules keep it short."""

import pytest

from parity.cases import parse_case
from parity.compare.thresholds import NoiseModel
from parity.selftest.bugs import library
from parity.selftest.run import selftest

SMALL = {
    "name": "small-batched",
    "model": {"preset": "tiny", "seed": 0},
    "requests": [{"prompt_len": 21, "decode_steps": 2}, {"prompt_len": 6, "decode_steps": 2}],
    "engine": {"chunk_size": 8, "token_budget": 12, "mtp_draft": 1, "decode_exact_chunks": False},
}


@pytest.fixture(scope="module")
def case():
    return parse_case(SMALL, "small.toml")


def _bugs(*names):
    return [b for b in library(4) if b.name in names]


def test_planted_bugs_are_caught_and_localized(case, tiny_ckpt):
    report = selftest(case, tiny_ckpt, _bugs("sink-scaled", "route-scale-dropped"), NoiseModel(), repeats=1)
    assert [c.passed for c in report.clean] == [True, True], [c.location for c in report.clean]
    assert report.caught == 2 and report.localized == 2, [(b.name, b.location) for b in report.bugs]
    assert report.passed


# bugs this small case cannot show: its positions stay below 127 (the window's last slot, the first HCA block) and
# its requests fill few cache blocks
NEEDS_LONGER_CASE = {"window-127", "hca-entry-early", "paged-block-stride"}


def test_every_planted_bug_still_applies_to_the_engine(case, tiny_ckpt):
    # a patch bug names optimized-model code by attribute: when that code changes shape, the patch must change with
    # it, or `parity selftest` reports the bug as a broken run (compressor-reset-between-chunks did, unnoticed, after
    # the engine batched the compressor projections)
    report = selftest(case, tiny_ckpt, library(4), NoiseModel(), repeats=0)
    errors = [(b.name, b.location) for b in report.bugs if b.location.startswith("error")]
    assert not errors
    missed = {b.name for b in report.bugs if not b.caught}
    assert missed <= NEEDS_LONGER_CASE, missed


def test_a_loosened_gate_lets_the_bugs_escape_and_fails(case, tiny_ckpt):
    loose = NoiseModel().loosened(1e9)
    report = selftest(case, tiny_ckpt, _bugs("sink-scaled"), loose, repeats=0)
    assert report.caught == 0 and not report.passed


def test_every_bug_names_an_expected_site():
    from parity.compare.sites import BLOCK_SITES, MTP_SITES

    labels = {s.submodule for s in (*BLOCK_SITES, *MTP_SITES)}
    bugs = library(4)
    assert len(bugs) >= 12 and len({b.name for b in bugs}) == len(bugs)
    for b in bugs:
        assert set(b.expect.submodules) <= labels, b.name
        assert set(b.expect.phases) <= {"prefill", "chunk", "decode", "mtp"}, b.name


def test_clean_repeats_are_variations_the_calibration_did_not_measure():
    from parity.calibrate import variations
    from parity.selftest.run import clean_variations

    four = dict(SMALL, requests=[{"prompt_len": n, "decode_steps": 2} for n in (21, 6, 3, 9)])
    case = parse_case(four, "four.toml")
    clean = clean_variations(case, 20)
    assert [label.split()[0] for label, _, _ in clean] == ["order", "seed"] * 10
    measured = variations(case, 20)
    seeds = {v.case.seed for v in measured}
    orders = {v.order for v in measured if v.order is not None}
    for label, var, order in clean:
        assert (order is None) != (var.seed == case.seed), label  # each varies exactly one thing
        assert var.seed not in seeds or var.seed == case.seed, label
        assert order is None or order not in orders, label
