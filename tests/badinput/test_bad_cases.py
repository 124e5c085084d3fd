"""Bad case files: wrong types, out-of-range values, unknown keys, non-UTF-8. Each is refused by `parity run` with
one line naming the file and the key, before any checkpoint or report is written."""

import pytest

from tests.badinput.conftest import assert_bad_input

GOOD = """name = "bad"
[model]
preset = "tiny"
{model}
[[requests]]
prompt_len = 5
decode_steps = 2
{request}
[engine]
chunk_size = 64
{engine}
"""


def _case(tmp_path, model: str = "", request: str = "", engine: str = "", top: str = ""):
    path = tmp_path / "case.toml"
    path.write_text(top + GOOD.format(model=model, request=request, engine=engine))
    return path


@pytest.mark.parametrize(
    ("parts", "culprits"),
    [
        pytest.param({"model": "overrides = { max_batch_size = 0 }"}, ("'max_batch_size'", "got 0"), id="mbs-0"),
        pytest.param({"model": "overrides = { dim = '256' }"}, ("'dim'", "integer >= 1", "'256'"), id="dim-as-str"),
        pytest.param({"model": "overrides = { norm_eps = nan }"}, ("'norm_eps'", "finite", "nan"), id="eps-nan"),
        pytest.param({"model": "overrides = { dtype = 'fp16' }"}, ("'dtype'", "'bf16', 'fp8'", "'fp16'"), id="dtype"),
        pytest.param({"model": "overrides = { revision = 'old' }"}, ("'revision'", "'old'"), id="revision"),
        pytest.param({"model": "overrides = { max_seq_len = 2.5 }"}, ("'max_seq_len'", "2.5"), id="float-for-int"),
        pytest.param({"model": "overrides = { n_mtp_layers = 0 }"}, ("engine.mtp_draft", "no MTP layer"), id="no-mtp"),
        pytest.param({"model": "overrides = { o_groups = 3 }"}, ("'o_groups'", "divisor of n_heads (4)"), id="groups"),
        pytest.param({"model": "overrides = { q_lora_rank = 100 }"}, ("'q_lora_rank'", "multiple of 128"), id="fp8-k"),
        pytest.param(
            {"model": "overrides = { window_size = 1 }"}, ("'window_size'", ">= 2", "got 1"), id="window-1"
        ),
        pytest.param(
            {"model": "overrides = { index_head_dim = 96 }"}, ("'index_head_dim'", "power of two"), id="idx-96"
        ),
        pytest.param(
            {"model": "overrides = { index_head_dim = 32 }"}, ("'index_head_dim'", ">= rope_head_dim (64)"), id="idx-32"
        ),
        pytest.param({"model": "overrides = { bogus = 1 }"}, ("unknown ModelArgs key(s) ['bogus']",), id="unknown"),
        pytest.param({"model": "init = 'warm'"}, ("model.init", "'warm'"), id="init"),
        pytest.param({"model": "seed = -1"}, ("model.seed", "got -1"), id="seed-negative"),
        pytest.param({"model": "seed = 9223372036854775807"}, ("model.seed", "9223372036854775807"), id="seed-huge"),
        pytest.param({"model": "color = 1"}, ("unknown key(s) ['color'] in [model]",), id="unknown-model-key"),
        pytest.param({"request": "prompt_len = 1"}, ("Cannot overwrite a value",), id="duplicate-key"),
        pytest.param({"engine": "token_budget = 0"}, ("engine.token_budget", "got 0"), id="budget-0"),
        pytest.param({"engine": "mtp_draft = true"}, ("engine.mtp_draft", "True"), id="bool-for-int"),
        pytest.param({"engine": "decode_exact_chunks = 1"}, ("decode_exact_chunks", "true or false"), id="int-bool"),
        pytest.param({"engine": "block_size = 1\nnum_blocks = 1"}, ("num_blocks = 1", "the 2 KV blocks"), id="blocks"),
        pytest.param({"engine": "chunksize = 8"}, ("unknown key(s) ['chunksize'] in [engine]",), id="typo"),
        pytest.param({"top": "description = 5\n"}, ("description must be a string", "5"), id="description"),
    ],
)  # fmt: skip
def test_bad_case_values(parity_cli, tmp_path, parts, culprits):
    out = tmp_path / "out"
    case = _case(tmp_path, **parts)
    assert_bad_input(parity_cli("run", case, "--out", out), str(case), *culprits)
    assert not out.exists()  # refused before any checkpoint or report


def test_a_request_longer_than_max_seq_len_names_the_request(parity_cli, tmp_path):
    case = _case(tmp_path, model="overrides = { max_seq_len = 8 }")
    assert_bad_input(parity_cli("run", case), str(case), "requests[0] needs 9 positions", "max_seq_len=8")


def test_a_wrongly_typed_request(parity_cli, tmp_path):
    path = tmp_path / "case.toml"
    path.write_text(GOOD.format(model="", request="", engine="").replace("prompt_len = 5", "prompt_len = '5'"))
    assert_bad_input(parity_cli("run", path), str(path), "requests[0].prompt_len", "'5'")


def test_a_non_utf8_case(parity_cli, tmp_path):
    path = tmp_path / "case.toml"
    path.write_bytes(GOOD.format(model="", request="", engine="").encode().replace(b'"bad"', b'"b\xe9d"'))
    assert_bad_input(parity_cli("run", path), str(path), "not UTF-8", "byte 9")


def test_a_dir_named_like_a_case(parity_cli, tmp_path):
    d = tmp_path / "case.toml"
    d.mkdir()
    assert_bad_input(parity_cli("run", d), str(d), "not a file")


def test_calibrate_refuses_a_bad_case_before_its_runs(parity_cli, tmp_path):
    case = _case(tmp_path, engine="block_size = 0")
    out = tmp_path / "noise.json"
    assert_bad_input(parity_cli("calibrate", case, "--out", out), "engine.block_size", "got 0")
    assert not out.exists()


def _model_case(tmp_path, model: str, engine: str = "", top: str = ""):
    """A case whose [model] table is `model` (instead of `preset = "tiny"`)."""
    path = tmp_path / "case.toml"
    path.write_text(top + GOOD.format(model="", request="", engine=engine).replace('preset = "tiny"', model))
    return path


@pytest.mark.parametrize(
    ("model", "culprits"),
    [
        pytest.param('checkpoint = "nosuch"', ("model.checkpoint", "nosuch", "does not exist"), id="ckpt-missing"),
        pytest.param('checkpoint = "afile"', ("model.checkpoint", "afile", "not a directory"), id="ckpt-file"),
        pytest.param('checkpoint = "empty"', ("model.checkpoint", "model.safetensors.index.json"), id="not-a-ckpt"),
        pytest.param("checkpoint = 5", ("model.checkpoint must be a directory name", "5"), id="ckpt-int"),
        pytest.param('checkpoint = ""', ("model.checkpoint must be a directory name",), id="ckpt-empty"),
        pytest.param('preset = "tiny"\nlayers = [9]', ("model.layers", "layer 9 does not exist", "0..3"), id="layer-9"),
        pytest.param('preset = "tiny"\nlayers = [4]', ("model.layers", "layer 4 does not exist"), id="layer-4"),
        pytest.param('preset = "tiny"\nlayers = [-1]', ("model.layers", "layer -1"), id="layer-negative"),
        pytest.param('preset = "tiny"\nlayers = [1, 1]', ("model.layers", "without repeats", "[1, 1]"), id="repeat"),
        pytest.param('preset = "tiny"\nlayers = [2, 0]', ("model.layers", "ascending", "[2, 0]"), id="descending"),
        pytest.param('preset = "tiny"\nlayers = []', ("model.layers", "non-empty list", "[]"), id="layers-empty"),
        pytest.param('preset = "tiny"\nlayers = "0"', ("model.layers", "list of layer indices", "'0'"), id="str"),
        pytest.param('preset = "tiny"\nlayers = [true]', ("model.layers", "[True]"), id="layers-bool"),
        pytest.param('preset = "tiny"\nlayers = [0.5]', ("model.layers", "[0.5]"), id="layers-float"),
        pytest.param('preset = "tiny"\nstream = "yes"', ("model.stream must be true or false", "'yes'"), id="stream"),
        pytest.param('preset = "tiny"\nstream = 1', ("model.stream must be true or false", "1"), id="stream-int"),
        pytest.param('preset = "huge"', ("unknown model preset 'huge'",), id="preset"),
        pytest.param(
            'preset = "tiny"\noverrides = { expert_dtype = "fp16" }', ("'expert_dtype'", "'fp4', 'fp8'", "'fp16'"),
            id="expert-dtype",
        ),
        pytest.param('preset = "tiny"\noverrides = { expert_dtype = 4 }', ("'expert_dtype'", "4"), id="expert-int"),
        pytest.param('preset = "tiny"\noverrides = { expert_dtype = "FP4" }', ("'expert_dtype'", "'FP4'"), id="FP4"),
        pytest.param(
            'preset = "tiny"\noverrides = { vocab_size = 100000000000000 }', ("'vocab_size'", "<= 2147483647"),
            id="vocab-huge",
        ),
    ],
)  # fmt: skip
def test_bad_model_sources(parity_cli, tmp_path, model, culprits):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty").mkdir()
    case = _model_case(tmp_path, model)
    out = tmp_path / "out"
    assert_bad_input(parity_cli("run", case, "--out", out), str(case), *culprits)
    assert not out.exists()


def test_a_checkpoint_and_a_preset_together(parity_cli, tmp_path, tiny_ckpt):
    case = _model_case(tmp_path, f'preset = "tiny"\ncheckpoint = "{tiny_ckpt}"')
    assert_bad_input(parity_cli("run", case), str(case), "model.checkpoint and model.preset are exclusive")


@pytest.mark.parametrize(
    ("top", "culprits"),
    [
        pytest.param('candidate = "vllm"\n', ("candidate must be one of", "'vllm'"), id="vllm"),
        pytest.param("candidate = 5\n", ("candidate must be one of", "5"), id="int"),
        pytest.param('candidate = "Optimized"\n', ("candidate must be one of", "'Optimized'"), id="case"),
        pytest.param('quant_sim_off = "kv"\n', ("quant_sim_off must be a list", "'kv'"), id="quant-str"),
    ],
)
def test_bad_candidates(parity_cli, tmp_path, top, culprits):
    case = _case(tmp_path, top=top)
    assert_bad_input(parity_cli("run", case, "--out", tmp_path / "out"), str(case), *culprits)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("engine", "culprits"),
    [
        pytest.param("block_size = 100000000000", ("engine.block_size = 100000000000", "max_seq_len"), id="block"),
        pytest.param(
            "num_blocks = 100000000000", ("engine.num_blocks = 100000000000", "positions its sequences"), id="blocks"
        ),
    ],
)
def test_engine_sizes_no_machine_could_allocate(parity_cli, tmp_path, engine, culprits):
    """Refused from the case, not as an allocator error after the checkpoint and the reference run."""
    case = _case(tmp_path, engine=engine)
    assert_bad_input(parity_cli("run", case, "--out", tmp_path / "out"), str(case), *culprits)
    assert not (tmp_path / "out").exists()


def test_a_broken_calibration_is_refused_even_for_a_decode_exact_case(parity_cli, tmp_path):
    (tmp_path / "noise.json").write_text('{"schema": 1, "errors": {"x": "big"}}')
    case = _case(tmp_path, top="")
    case.write_text(case.read_text() + '[tolerance]\ncalibration = "noise.json"\n')
    line = assert_bad_input(parity_cli("run", case, "--out", tmp_path / "out"), str(case), "tolerance.calibration")
    assert "noise.json" in line and "errors['x']" in line
