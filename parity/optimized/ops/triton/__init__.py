"""Triton kernels of the optimized ops, one module per op (the op's `triton` registry entry points here).

Imported only through `parity.optimized.ops.registry` once the triton backend is selected, after `runtime.setup()`
has chosen how they run: compiled on a CUDA device, or under the CPU interpreter with its numerics fixed.
"""
