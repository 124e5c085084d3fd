"""Bad `parity tp` options: world sizes the model cannot be split into (0, 1, huge, not a divisor), a malformed or
empty `--plant-offset` (rank outside the world, bad regex, a regex that matches no split tensor, a shift past the
tensor), backends and devices that do not fit, an --out that cannot hold the dumps. All refused in one line before
any process starts or any dump is written."""

import pytest
import torch

from tests.badinput.conftest import SMALL_CASE, assert_bad_input, tree


@pytest.fixture
def case(tmp_path):
    path = tmp_path / "small.toml"
    path.write_text(SMALL_CASE)
    return path


@pytest.mark.parametrize(
    ("args", "culprits"),
    [
        pytest.param(("--world-size", "0"), ("--world-size 0", ">= 2"), id="world-0"),
        pytest.param(("--world-size", "1"), ("--world-size 1", ">= 2"), id="world-1"),
        pytest.param(("--world-size", "-4"), ("--world-size -4",), id="world-negative"),
        pytest.param(("--world-size", "100000"), ("--world-size 100000", "n_heads = 4"), id="world-huge"),
        pytest.param(("--world-size", "3"), ("--world-size 3", "n_heads = 4", "not divisible"), id="world-3"),
        pytest.param(("--plant-offset", "x"), ("--plant-offset 'x'", "RANK:PARAM_REGEX:ROWS"), id="offset-garbage"),
        pytest.param(("--plant-offset", "1:wq_b:1.5"), ("--plant-offset", "RANK:PARAM_REGEX:ROWS"), id="rows-float"),
        pytest.param(("--plant-offset", "2:wq_b:1"), ("rank 2 is not a rank of world size 2",), id="rank-outside"),
        pytest.param(("--plant-offset", "-1:wq_b:1"), ("rank -1 is not a rank",), id="rank-negative"),
        pytest.param(("--plant-offset", "1:(:1"), ("'(' is not a valid regex",), id="bad-regex"),
        pytest.param(("--plant-offset", "1:wq_b:0"), ("non-zero row shift",), id="shift-0"),
        pytest.param(("--backend", "nccl"), ("backend 'nccl' on device 'cpu'", "'gloo'"), id="nccl-on-cpu"),
        pytest.param(("--backend", "mpi"), ("backend 'mpi'", "gloo, nccl"), id="backend"),
        pytest.param(("--device", "npu"), ("--device 'npu'",), id="device"),
    ],
)
def test_refused_before_any_work(parity_cli, tmp_path, case, args, culprits):
    out = tmp_path / "out"
    assert_bad_input(parity_cli("tp", case, "--out", out, *args), *culprits)
    assert not out.exists()


@pytest.mark.parametrize(
    ("offset", "culprits"),
    [
        pytest.param("1:no_such_param:1", ("'no_such_param' matches no tensor the ranks split", "plants nothing")),
        pytest.param("1:wq_b:100000", ("layers.0.attn.wq_b.weight slice of rank 1", "outside its 512 rows")),
    ],
)
def test_a_plant_that_misses_is_refused_from_the_shard_headers(parity_cli, tmp_path, case, tiny_ckpt, offset, culprits):
    out = tmp_path / "out"
    before = tree(tiny_ckpt)
    r = parity_cli("tp", case, "--checkpoint", tiny_ckpt, "--out", out, "--plant-offset", offset)
    assert_bad_input(r, f"--plant-offset '{offset}'", *culprits)
    assert tree(tiny_ckpt) == before and not (out / "one").exists() and not (out / "tp_planted").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_nccl_without_cuda(parity_cli, tmp_path, case):
    r = parity_cli("tp", case, "--out", tmp_path / "out", "--device", "cuda", "--backend", "nccl")
    assert_bad_input(r, "--device 'cuda'", "no CUDA device")


def test_out_paths(parity_cli, tmp_path, case):
    f = tmp_path / "file"
    f.write_text("keep")
    assert_bad_input(parity_cli("tp", case, "--out", f), "--out", str(f), "not a directory")
    assert_bad_input(parity_cli("tp", case, "--out", f / "sub"), "--out", f"{f} is a file")
    used = tmp_path / "used"
    (used / "one").mkdir(parents=True)
    (used / "one" / "mine.txt").write_text("keep")
    assert_bad_input(parity_cli("tp", case, "--out", used), str(used / "one"), "not an empty dir")
    assert f.read_text() == "keep" and tree(used) == {"one/mine.txt": b"keep"}
