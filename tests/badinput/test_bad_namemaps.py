"""Bad name maps: two names renamed onto one (named, both of them), invalid regexes, non-UTF-8, a dir."""

import pytest

from tests.badinput.conftest import assert_bad_input


@pytest.mark.parametrize(
    ("toml", "culprits"),
    [
        pytest.param(
            "[[rename]]\nmatch = '^layers\\.1\\.ffn:out$'\nto = 'layers.0.ffn:out'\n",
            ("side b", "'layers.0.ffn:out'", "'layers.1.ffn:out'", "become"),
            id="onto-an-existing-name",
        ),
        pytest.param(
            "[[rename]]\nside = 'a'\nmatch = '^layers\\.\\d+\\.attn:'\nto = 'attn:'\n",
            ("side a", "'layers.0.attn:out'", "'layers.1.attn:out'", "'attn:out'"),
            id="many-onto-one",
        ),
        pytest.param("[[rename]]\nmatch = '('\nto = 'x'\n", ("rename[0]", "not a valid regex"), id="bad-regex"),
        pytest.param("[[rename]]\nmatch = 'x'\nto = 3\n", ("rename[0]", "to must be a string"), id="to-not-str"),
        pytest.param("[[shard]]\nmatch = 'x'\n", ("shard[0]", "dim"), id="shard-without-dim"),
        pytest.param("ignore = 'x'\n", ("ignore must be a list",), id="ignore-not-list"),
        pytest.param("[[shard]]\nmatch = 'x'\ndim = true\n", ("shard[0]", "dim = <int>"), id="shard-dim-bool"),
        pytest.param("[[renmae]]\nmatch = 'x'\n", ("unknown key(s) renmae",), id="typo-key"),
    ],
)
def test_bad_name_maps(parity_cli, ref, tmp_path, toml, culprits):
    path = tmp_path / "map.toml"
    path.write_text(toml)
    assert_bad_input(parity_cli("compare", ref, ref, "--map", path), str(path), *culprits)


def test_a_non_utf8_name_map(parity_cli, ref, tmp_path):
    path = tmp_path / "map.toml"
    path.write_bytes(b"ignore = ['\xff\xfe']\n")
    assert_bad_input(parity_cli("bisect", ref, ref, "--map", path), str(path), "not valid TOML")


def test_a_dir_as_name_map(parity_cli, ref, tmp_path):
    assert_bad_input(parity_cli("compare", ref, ref, "--map", tmp_path), str(tmp_path), "cannot read name map")


def test_a_map_renaming_one_to_one_is_accepted(parity_cli, ref, tmp_path):
    """The control: a rename whose targets stay distinct compares (the renamed names are missing on side a)."""
    path = tmp_path / "map.toml"
    path.write_text("[[rename]]\nmatch = '^layers\\.(\\d+)\\.ffn:'\nto = 'L\\1.ffn:'\n")
    r = parity_cli("compare", ref, ref, "--map", path, "--allow-missing", "ffn:")
    assert r.code == 0, r.out


@pytest.mark.parametrize(
    ("toml", "culprits"),
    [
        pytest.param(
            "[[rename]]\nmatch = '^layers'\nto = '\\9'\n", ("rename[0]", "not a valid replacement", "reference 9"),
            id="group-9",
        ),
        pytest.param(
            "[[rename]]\nmatch = '(?P<a>x)'\nto = '\\g<b>'\n", ("rename[0]", "unknown group name 'b'"), id="group-name"
        ),
        pytest.param("[[shard]]\nmatch = 'x'\ndim = 0\nreduce = 'mean'\n", ("shard[0]", "reduce = 'mean'"), id="mean"),
        pytest.param("[[shard]]\nmatch = 'x'\nreduce = 'sum'\ndim = 1\n", ("dim = 1, reduce = 'sum'",), id="both"),
        pytest.param("ignore = ['(']\n", ("ignore[0]", "not a valid regex"), id="ignore-regex"),
        pytest.param("ignore = [5]\n", ("ignore[0]", "must be a string"), id="ignore-int"),
        pytest.param("dtype_width = 'yes'\n", ("dtype_width must be true or false",), id="dtype-width"),
    ],
)  # fmt: skip
def test_rules_that_cannot_apply(parity_cli, ref, tmp_path, toml, culprits):
    """Refused when the map is read, naming the rule: not an exit 1 with every record 'missing'."""
    path = tmp_path / "map.toml"
    path.write_text(toml)
    for command in ("compare", "bisect", "schema"):
        assert_bad_input(parity_cli(command, ref, ref, "--map", path), str(path), *culprits)
