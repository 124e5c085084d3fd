"""The heatmap rows of an id site (the indexer's top-k) whose reference rows differ in width from call to call:
the reference runs each request alone, so a short prompt's lists are narrower than the batch's. `site_rows` once
stacked those rows as they came and a run whose first failure was such a site ended in a traceback."""

import json

from tests.report.conftest import _run


def test_indexer_failure_maps_its_rows(tmp_path):
    run = _run(tmp_path / "indexer", "--plant", "indexer-causal-off-by-one")
    assert run.code == 1, run.err
    rep = json.loads((run.folder / "summary.json").read_text())["report"]
    rm = rep["rowmap"]
    assert rm["site"].endswith("indexer.topk") and rm["measure"] == "ids differing (as sets)"
    judged = [s for s in rep["sites"] if (s["site"], s["field"]) == (rm["site"], rm["field"])]
    # the planted bug's rows are there, as the verdict counted them: the rows whose id sets differ are its flips
    # and its ties (exact ties broken another way), and the bug makes real flips
    flipped = sum(e > 0 for v in rm["requests"].values() for e in v["errors"])
    assert flipped == sum(s["flips"] + s["ties"] for s in judged) and sum(s["flips"] for s in judged) > 0
