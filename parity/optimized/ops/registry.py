"""Backend selection for the optimized ops.

Every compute op of `parity.optimized.model` is looked up here by name. An op module registers its implementations
in a module-level `IMPLS = {"torch": Impl(fn), "triton": Impl("module:function", bitwise=False, ...)}` table
(read-only after import). Backends:

- `torch`: the reference math with the optimized data layout (flat ragged tokens, paged KV); runs on CPU and CUDA,
  bit for bit equal to the op's reference twin.
- `triton`: Triton kernels (`parity.optimized.ops.triton`), compiled on CUDA, run by the fixed CPU interpreter
  elsewhere (`triton/runtime.py`); within the tolerance each entry states.
- `aiter`: AMD aiter's Triton kernels behind adapters (`parity.optimized.ops.aiter`); ops without an entry refuse
  the selection with a clear error.

A string target (`"module:function"`) is imported only when its backend is selected, after the backend's setup:
Triton's `@jit` must see `TRITON_INTERPRET` before it decorates a kernel.

Selection: `OpsConfig(default="torch", overrides=(("sparse_attn", "triton"),))`, or from the environment:
`PARITY_BACKEND=torch` and `PARITY_OPS="sparse_attn=triton,fp8_gemm=torch"` (docs/ENVS.md). An op in `FOLLOWS` (a
second entry point of another op) runs on that op's backend unless an override names it.
"""

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from types import MappingProxyType

from parity.errors import ParityError
from parity.optimized.ops.protocol import Ops

BACKENDS = ("torch", "triton", "aiter")
OP_MODULES = tuple(f.name for f in fields(Ops) if f.name != "config")
# op -> the op whose backend it takes when no override names it: the batched form of a per-request op, so that
# `PARITY_OPS=indexer_topk=triton` moves the engine's call (the ragged form) and the tensor-parallel path's alike
FOLLOWS = MappingProxyType({"indexer_topk_ragged": "indexer_topk"})


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of an op.

    Args:
        target (Callable or str):
            The function, or `"package.module:function"` imported when the backend is selected.
        bitwise (bool):
            The backend claims bit-for-bit equality with the op's reference twin (its tests assert `torch.equal`).
            Default: `True`.
        tolerance (str):
            When not bitwise: how far from the twin it may be and why (the tests' stated reason). Default: `""`.
    """

    target: Callable | str
    bitwise: bool = True
    tolerance: str = ""

    def __post_init__(self):
        if not self.bitwise and not self.tolerance:
            raise ParityError(f"Impl {self.target!r}: a backend that is not bitwise must state its tolerance")

    def load(self) -> Callable:
        if callable(self.target):
            return self.target
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)


def _load_registry() -> MappingProxyType:
    table = {}
    for name in OP_MODULES:
        module = importlib.import_module(f"parity.optimized.ops.{name}")
        table[name] = MappingProxyType(dict(module.IMPLS))
    return MappingProxyType(table)


def registry() -> MappingProxyType:
    """op name -> {backend: Impl}."""
    return _load_registry()


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
        overrides = dict(self.overrides)
        if op in overrides:
            return overrides[op]
        return self.backend_of(FOLLOWS[op]) if op in FOLLOWS else self.default

    def backends(self) -> dict[str, str]:
        """op -> the backend it runs on (what a report records: which kernel actually ran)."""
        return {op: self.backend_of(op) for op in OP_MODULES}

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


def _setup(backend: str) -> None:
    """Prepare a backend before any of its kernels is imported."""
    if backend == "triton":
        from parity.optimized.ops.triton import runtime

        runtime.setup()
    elif backend == "aiter":
        from parity.optimized.ops.aiter import loader

        loader.setup()


def resolve_ops(config: OpsConfig | None = None) -> Ops:
    """The selected implementation of every op (`ops.sparse_attn(...)`), with `ops.config` the selection."""
    config = config or OpsConfig()
    table = registry()
    chosen = {}
    for op, impls in table.items():
        backend = config.backend_of(op)
        if backend not in impls:
            raise ParityError(f"op {op!r} has no {backend!r} implementation (available: {sorted(impls)})")
    for backend in sorted(set(config.backends().values()) - {"torch"}):
        _setup(backend)
    for op, impls in table.items():
        chosen[op] = impls[config.backend_of(op)].load()
    return Ops(**chosen, config=config)
