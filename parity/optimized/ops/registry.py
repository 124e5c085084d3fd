"""Backend selection for the optimized ops.

Every compute op of `parity.optimized.model` is looked up here by name. An op module registers its implementations
in a module-level `IMPLS = {"torch": fn, ...}` table (read-only after import). Backends:

- `torch`: the reference math with the optimized data layout (flat ragged tokens, paged KV); runs on CPU and CUDA.
- `triton`: Triton kernels (CUDA and ROCm); ops without one refuse the selection with a clear error.
- `aiter`: AMD aiter ops; needs a ROCm build of torch, which this project cannot run or test (no ROCm machine), so
  no op registers one yet and selecting it is refused.

Selection: `OpsConfig(default="torch", overrides=(("sparse_attn", "triton"),))`, or from the environment:
`PARITY_BACKEND=torch` and `PARITY_OPS="sparse_attn=triton,fp8_gemm=torch"` (docs/ENVS.md).
"""

import importlib
import os
from dataclasses import dataclass
from types import MappingProxyType, SimpleNamespace

import torch

from parity.errors import ParityError

BACKENDS = ("torch", "triton", "aiter")
OP_MODULES = (
    "act_quant",
    "kv_fake_quant",
    "fp4_fake_quant",
    "fp8_gemm",
    "fp4_gemm",
    "dense_linear",
    "rms_norm",
    "head_norm",
    "rope",
    "hadamard",
    "hc_pre",
    "hc_post",
    "hc_head",
    "compress_pool",
    "indexer_topk",
    "sparse_attn",
    "o_lora",
    "moe_gate",
    "moe_experts",
)


def _load_registry() -> MappingProxyType:
    table = {}
    for name in OP_MODULES:
        module = importlib.import_module(f"parity.optimized.ops.{name}")
        table[name] = MappingProxyType(dict(module.IMPLS))
    return MappingProxyType(table)


def registry() -> MappingProxyType:
    """op name -> {backend: implementation}."""
    return _load_registry()


def _rocm() -> bool:
    return getattr(torch.version, "hip", None) is not None


@dataclass(frozen=True)
class OpsConfig:
    default: str = "torch"
    overrides: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        for op, backend in ((None, self.default), *self.overrides):
            if backend not in BACKENDS:
                where = f"op {op!r}" if op else "default backend"
                raise ParityError(f"{where}: unknown backend {backend!r}; choose from {BACKENDS}")
            if op is not None and op not in OP_MODULES:
                raise ParityError(f"unknown op {op!r} in backend overrides; ops: {list(OP_MODULES)}")

    def backend_of(self, op: str) -> str:
        return dict(self.overrides).get(op, self.default)

    @classmethod
    def from_env(cls, env=None) -> "OpsConfig":
        env = os.environ if env is None else env
        overrides = []
        for item in filter(None, (s.strip() for s in env.get("PARITY_OPS", "").split(","))):
            if "=" not in item:
                raise ParityError(f"PARITY_OPS: expected op=backend items, got {item!r}")
            op, backend = (s.strip() for s in item.split("=", 1))
            overrides.append((op, backend))
        try:
            return cls(default=env.get("PARITY_BACKEND", "torch"), overrides=tuple(overrides))
        except ParityError as e:
            # name the variable that carried the bad value
            var = "PARITY_BACKEND" if str(e).startswith("default backend") else "PARITY_OPS"
            raise ParityError(f"{var}: {e}") from None


def resolve_ops(config: OpsConfig | None = None) -> SimpleNamespace:
    """An object whose attributes are the selected implementation of every op (`ops.sparse_attn(...)`)."""
    config = config or OpsConfig()
    table = registry()
    chosen = {}
    for op, impls in table.items():
        backend = config.backend_of(op)
        if backend == "aiter" and not _rocm():
            raise ParityError(f"op {op!r}: the aiter backend needs ROCm (torch.version.hip is None on this machine)")
        if backend not in impls:
            raise ParityError(f"op {op!r} has no {backend!r} implementation (available: {sorted(impls)})")
        chosen[op] = impls[backend]
    return SimpleNamespace(**chosen, config=config)
