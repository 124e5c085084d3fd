"""The op registry: every op module's IMPLS table, backend selection (`OpsConfig`, `PARITY_BACKEND` / `PARITY_OPS`)
and the one-line refusals of backends an op or this machine cannot run."""

import importlib
import re

import pytest

from parity.errors import ParityError
from parity.optimized.ops import BACKENDS, OP_MODULES, Impl, OpsConfig, registry, resolve_ops


def refusal(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, "a ParityError is printed on one line"
    return msg


# ---- registration ----------------------------------------------------------------------------------------------


def test_every_op_module_is_registered_with_a_torch_impl():
    table = registry()
    assert tuple(table) == OP_MODULES
    for op in OP_MODULES:
        module = importlib.import_module(f"parity.optimized.ops.{op}")
        assert set(table[op]) <= set(BACKENDS), op
        assert table[op]["torch"] is module.IMPLS["torch"]


def test_every_op_docstring_names_a_reference_twin_that_exists():
    for op in OP_MODULES:
        doc = importlib.import_module(f"parity.optimized.ops.{op}").__doc__ or ""
        m = re.search(r"Reference:.*?(parity\.reference\.[\w.]*\w)", doc, re.S)
        assert m, f"{op}: no 'Reference: parity.reference...' in the docstring"
        parts = m.group(1).split(".")
        obj = importlib.import_module(".".join(parts[:3]))  # parity.reference.<module>
        for attr in parts[3:]:
            obj = getattr(obj, attr)  # raises if the named twin does not exist


def test_registry_tables_are_read_only():
    table = registry()
    with pytest.raises(TypeError):
        table["rope"] = {}
    with pytest.raises(TypeError):
        table["rope"]["triton"] = lambda *a: None


def test_default_resolution_gives_every_op_its_torch_impl():
    ops = resolve_ops()
    assert ops.config == OpsConfig()
    for op in OP_MODULES:
        assert getattr(ops, op) is registry()[op]["torch"].load()


def test_explicit_torch_overrides_resolve():
    config = OpsConfig(default="torch", overrides=(("sparse_attn", "torch"), ("fp8_gemm", "torch")))
    ops = resolve_ops(config)
    assert ops.config is config and ops.sparse_attn is registry()["sparse_attn"]["torch"].target


# ---- OpsConfig.from_env ----------------------------------------------------------------------------------------


def test_from_env_defaults():
    assert OpsConfig.from_env({}) == OpsConfig(default="torch", overrides=())
    assert OpsConfig.from_env({"PARITY_OPS": ""}) == OpsConfig()
    assert OpsConfig.from_env({"PARITY_OPS": " , ,"}) == OpsConfig()


def test_from_env_parses_backend_and_overrides():
    env = {"PARITY_BACKEND": "triton", "PARITY_OPS": " sparse_attn = torch ,fp8_gemm=torch,, "}
    config = OpsConfig.from_env(env)
    assert config.default == "triton"
    assert config.overrides == (("sparse_attn", "torch"), ("fp8_gemm", "torch"))
    assert config.backend_of("sparse_attn") == "torch"
    assert config.backend_of("rope") == "triton"


def test_from_env_reads_os_environ(monkeypatch):
    monkeypatch.setenv("PARITY_BACKEND", "torch")
    monkeypatch.setenv("PARITY_OPS", "rope=torch")
    assert OpsConfig.from_env() == OpsConfig(default="torch", overrides=(("rope", "torch"),))


def test_from_env_later_override_of_an_op_wins():
    config = OpsConfig.from_env({"PARITY_OPS": "rope=triton,rope=torch"})
    assert config.backend_of("rope") == "torch"


@pytest.mark.parametrize("item", ["sparse_attn", "sparse_attn:triton", "triton"])
def test_from_env_rejects_a_malformed_item(item):
    with pytest.raises(ParityError) as e:
        OpsConfig.from_env({"PARITY_OPS": f"rope=torch,{item}"})
    msg = refusal(e)
    assert "PARITY_OPS" in msg and repr(item) in msg


@pytest.mark.parametrize("op", ["sparse_atn", "Rope", ""])
def test_from_env_rejects_an_unknown_op(op):
    with pytest.raises(ParityError) as e:
        OpsConfig.from_env({"PARITY_OPS": f"{op}=torch"})
    msg = refusal(e)
    assert f"unknown op {op!r}" in msg


def test_from_env_rejects_an_unknown_backend_for_an_op():
    with pytest.raises(ParityError) as e:
        OpsConfig.from_env({"PARITY_OPS": "sparse_attn=cuda"})
    msg = refusal(e)
    assert "'sparse_attn'" in msg and "'cuda'" in msg


def test_from_env_rejects_an_unknown_default_backend():
    with pytest.raises(ParityError) as e:
        OpsConfig.from_env({"PARITY_BACKEND": "cuda"})
    msg = refusal(e)
    assert "default backend" in msg and "'cuda'" in msg


def test_from_env_unknown_default_backend_names_the_variable():
    with pytest.raises(ParityError) as e:
        OpsConfig.from_env({"PARITY_BACKEND": "cuda"})
    assert "PARITY_BACKEND" in refusal(e)


def test_constructor_validates_like_from_env():
    with pytest.raises(ParityError, match="unknown backend 'cpu'"):
        OpsConfig(default="cpu")
    with pytest.raises(ParityError, match="unknown op 'nope'"):
        OpsConfig(overrides=(("nope", "torch"),))


# ---- refusals at resolution ------------------------------------------------------------------------------------


def test_triton_for_an_op_without_a_triton_impl_is_refused():
    without = [op for op in OP_MODULES if "triton" not in registry()[op]]
    if not without:
        pytest.skip("every op registers a triton implementation")
    op = without[0]
    with pytest.raises(ParityError) as e:
        resolve_ops(OpsConfig(overrides=((op, "triton"),)))
    msg = refusal(e)
    assert f"op {op!r}" in msg and "'triton'" in msg and "torch" in msg


def test_triton_as_default_is_refused_for_the_first_op_without_it():
    without = [op for op in OP_MODULES if "triton" not in registry()[op]]
    if not without:
        pytest.skip("every op registers a triton implementation")
    with pytest.raises(ParityError) as e:
        resolve_ops(OpsConfig.from_env({"PARITY_BACKEND": "triton"}))
    assert f"op {without[0]!r}" in refusal(e)


def test_aiter_is_refused_for_an_op_without_an_aiter_impl():
    assert "aiter" not in registry()["rope"]
    with pytest.raises(ParityError) as e:
        resolve_ops(OpsConfig(overrides=(("rope", "aiter"),)))
    msg = refusal(e)
    assert "'rope'" in msg and "no 'aiter' implementation" in msg


# ---- Impl records ----------------------------------------------------------------------------------------------


def test_every_impl_states_bitwise_or_its_tolerance():
    for op, impls in registry().items():
        for backend, impl in impls.items():
            assert isinstance(impl, Impl), (op, backend)
            assert impl.bitwise or impl.tolerance, (op, backend)
            assert impl.bitwise or backend != "torch", f"{op}: the torch backend is the reference math, bit for bit"


def test_an_impl_that_is_not_bitwise_must_state_a_tolerance():
    with pytest.raises(ParityError) as e:
        Impl("parity.optimized.ops.rms_norm:rms_norm_torch", bitwise=False)
    assert "tolerance" in refusal(e)


def test_a_string_target_is_imported_when_loaded():
    impl = Impl("parity.optimized.ops.rms_norm:rms_norm_torch")
    assert impl.load() is registry()["rms_norm"]["torch"].target


def test_resolution_prepares_a_backend_before_loading_its_kernels(monkeypatch):
    events = []
    reg = importlib.import_module("parity.optimized.ops.registry")  # the package's `registry` is the function
    monkeypatch.setattr(reg, "_setup", lambda backend: events.append(("setup", backend)))
    fake = Impl(lambda *a: events.append("called"), bitwise=False, tolerance="test double")
    table = {op: dict(impls) for op, impls in registry().items()}
    table["rope"]["triton"] = fake
    monkeypatch.setattr(reg, "registry", lambda: table)
    ops = resolve_ops(OpsConfig(overrides=(("rope", "triton"),)))
    assert events == [("setup", "triton")] and ops.rope is fake.target


# ---- second entry points ---------------------------------------------------------------------------------------


def test_the_ragged_indexer_follows_the_per_request_ops_backend():
    # the engine calls indexer_topk_ragged on one rank: PARITY_OPS=indexer_topk=... must still choose its kernel
    follows = OpsConfig.from_env({"PARITY_OPS": "indexer_topk=triton"})
    assert follows.backend_of("indexer_topk_ragged") == "triton"
    assert follows.backends()["indexer_topk_ragged"] == "triton"
    back = OpsConfig.from_env({"PARITY_BACKEND": "triton", "PARITY_OPS": "indexer_topk=torch"})
    assert back.backend_of("indexer_topk_ragged") == "torch" and back.backend_of("rope") == "triton"
    named = OpsConfig(overrides=(("indexer_topk", "triton"), ("indexer_topk_ragged", "torch")))
    assert named.backend_of("indexer_topk_ragged") == "torch"
    assert OpsConfig().backend_of("indexer_topk_ragged") == "torch"
    ops = resolve_ops(follows)
    assert ops.indexer_topk_ragged is registry()["indexer_topk_ragged"]["triton"].load()
