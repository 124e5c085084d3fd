"""Optimized ops, one per file, each with its reference twin named in its docstring. See `registry.py`."""

from parity.optimized.ops.protocol import Ops
from parity.optimized.ops.registry import BACKENDS, OP_MODULES, Impl, OpsConfig, registry, resolve_ops

__all__ = ["BACKENDS", "OP_MODULES", "Impl", "Ops", "OpsConfig", "registry", "resolve_ops"]
