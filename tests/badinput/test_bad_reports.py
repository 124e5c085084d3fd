"""Bad report folders for `parity report DIR`: summary.json missing, truncated, of another schema, with fields of the
wrong type at any depth (the renderers would crash or draw nonsense). Each is refused in one line naming the field,
expected vs found, and the pages already in the folder are left as they were (all three are rendered before any is
written)."""

import json
import shutil

import pytest

from tests.badinput.conftest import assert_bad_input, assert_refused_unchanged


@pytest.fixture
def folder(small_run, tmp_path):
    return shutil.copytree(small_run.report, tmp_path / "report", ignore=shutil.ignore_patterns("checkpoint"))


def _edit(folder, edit) -> None:
    path = folder / "summary.json"
    s = json.loads(path.read_text())
    edit(s)
    path.write_text(json.dumps(s))


def _refused(parity_cli, folder, *culprits) -> str:
    # nothing re-rendered, nothing lost, no temporary file left behind
    return assert_refused_unchanged(folder, lambda: parity_cli("report", folder), *culprits)


def test_the_copied_folder_renders(parity_cli, folder):
    """The control: the unedited copy re-renders (exit 0), so every refusal below is the edit's."""
    r = parity_cli("report", folder)
    assert r.code == 0 and "report.html" in r.out, r.err


@pytest.mark.parametrize(
    ("data", "culprits"),
    [
        pytest.param(b"", ("summary.json", "not readable JSON"), id="empty"),
        pytest.param(b'{"schema": "parity.report/1", "report": {"ca', ("summary.json", "not readable JSON"), id="cut"),
        pytest.param(b"\xff\xfe{}", ("summary.json", "not readable JSON"), id="not-utf8"),
        pytest.param(b"[1, 2]", ("summary.json", "schema", "'list'"), id="a-list"),
        pytest.param(b'{"schema": "parity.report/2"}', ("schema", "'parity.report/2'"), id="schema-2"),
        pytest.param(b'{"schema": 1}', ("schema", "found 1"), id="schema-int"),
    ],
)
def test_a_damaged_summary_file(parity_cli, folder, data, culprits):
    (folder / "summary.json").write_bytes(data)
    _refused(parity_cli, folder, str(folder / "summary.json"), *culprits)


def _site(i, **kw):
    return lambda s: s["report"]["sites"][i].update(kw)


@pytest.mark.parametrize(
    ("edit", "culprits"),
    [
        pytest.param(lambda s: s["invocation"].update(device=5), ("invocation.device", "found 5"), id="inv-device"),
        pytest.param(lambda s: s["invocation"].update(env=["x"]), ("invocation.env",), id="inv-env"),
        pytest.param(lambda s: s.pop("created"), ("created", "found None"), id="no-created"),
        pytest.param(lambda s: s["report"].update(location=None), ("report.location", "found NoneType"), id="loc-null"),
        pytest.param(lambda s: s["report"].update(device=[]), ("report.device", "found list"), id="device-list"),
        pytest.param(lambda s: s["report"].update(wall_s="slow"), ("report.wall_s", "found str"), id="wall-str"),
        pytest.param(_site(0, max_err="big"), ("report.sites[0].max_err", "a number", "found str"), id="max-err"),
        pytest.param(_site(0, passed="no"), ("report.sites[0].passed", "true or false"), id="passed-str"),
        pytest.param(_site(1, field=3), ("report.sites[1].field", "a string", "found 3"), id="field-int"),
        pytest.param(_site(0, flips=-1), ("report.sites[0].flips", "integer >= 0", "found -1"), id="flips-neg"),
        pytest.param(_site(0, ties=-1), ("report.sites[0].ties", "integer >= 0", "found -1"), id="ties-neg"),
        pytest.param(_site(0, worst="x"), ("report.sites[0].worst", "[step, request, position]"), id="worst-str"),
        pytest.param(_site(0, layer="0"), ("report.sites[0].layer", "found str"), id="layer-str"),
        pytest.param(lambda s: s["report"]["sites"][0].pop("reasons"), ("sites[0].reasons", "nothing"), id="no-why"),
        pytest.param(lambda s: s["report"]["chained"].__setitem__(0, "x"), ("report.chained[0]",), id="chained-str"),
        pytest.param(lambda s: s["report"]["requests"].__setitem__(0, 7), ("requests[0]", "an object"), id="req"),
        pytest.param(
            lambda s: s["report"]["requests"][0].update(greedy_equal="yes"), ("report.requests[0].greedy_equal",),
            id="req-field",
        ),
        pytest.param(lambda s: s["report"].update(timings={"engine": "6s"}), ("report.timings.engine",), id="timing"),
        pytest.param(lambda s: s["report"].update(rowmap="x"), ("report.rowmap", "found str"), id="rowmap-str"),
        pytest.param(lambda s: s["report"]["rowmap"].pop("site"), ("report.rowmap.site", "nothing"), id="rowmap-site"),
        pytest.param(
            lambda s: s["report"]["rowmap"]["requests"]["0"]["positions"].__setitem__(0, 10**9),
            ("report.rowmap.requests['0'].positions", "1000000000"), id="rowmap-position-huge",
        ),
        pytest.param(
            lambda s: s["report"]["rowmap"]["requests"]["0"]["errors"].append(0.0),
            ("report.rowmap.requests['0']", "positions but"), id="rowmap-ragged",
        ),
    ],
)  # fmt: skip
def test_a_field_of_the_wrong_type_is_named(parity_cli, folder, edit, culprits):
    _edit(folder, edit)
    _refused(parity_cli, folder, str(folder / "summary.json"), *culprits)


def test_a_file_where_the_folder_should_be(parity_cli, tmp_path):
    f = tmp_path / "report"
    f.write_text("keep")
    assert_bad_input(parity_cli("report", f), str(f), "not a directory")
    assert f.read_text() == "keep"


def test_a_page_that_cannot_be_written_is_named(parity_cli, folder):
    """report.html blocked by a directory: refused naming it, the folder as it was (the other pages are rendered
    from the same summary, so byte for byte what they held)."""
    (folder / "report.html").unlink()
    (folder / "report.html").mkdir()
    assert_refused_unchanged(folder, lambda: parity_cli("report", folder), str(folder / "report.html"), "cannot write")
    assert (folder / "report.html").is_dir()
