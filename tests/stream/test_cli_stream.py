"""`parity run --stream` end to end: the verdict passes, the memory line is printed and written to parity.json."""

import json

from tests.commands.conftest import parity_cli  # noqa: F401  (fixture)

CASE = """name = "cli-stream"
[model]
preset = "tiny"
[[requests]]
prompt_len = 6
decode_steps = 1
[engine]
chunk_size = 4
token_budget = 8
"""


def test_parity_run_stream(parity_cli, tmp_path, tiny_ckpt):  # noqa: F811
    case = tmp_path / "case.toml"
    case.write_text(CASE)
    r = parity_cli("run", case, "--stream", "--checkpoint", tiny_ckpt, "--out", tmp_path / "out")
    assert r.code == 0, r.err
    line = next(x for x in r.out.splitlines() if x.startswith("stream: peak RSS"))
    assert "one layer's weights" in line and "block reads" in line
    memory = json.loads((tmp_path / "out" / "parity.json").read_text())["memory"]
    assert memory["loads"] > 0 and memory["block_name"].startswith(("layers.", "mtp."))
    assert memory["peak"] >= memory["start"] > 0
