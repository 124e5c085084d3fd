"""Compile one Triton or Gluon kernel for sm_90 (an H100 / H200) on any machine, no GPU needed: Triton's frontend and
NVIDIA backend run anywhere, and the triton wheel ships its own ptxas and cuobjdump. The one helper behind both
benches' compile checks (`bench/triton_gemm.py --compile-check`, `bench/triton_attention.py --compile-sm90`). It
catches what the CPU interpreter cannot: non-constexpr globals, compile-time shapes, shared memory past the SM's,
register spills, loads the software pipeliner left synchronous."""

import os
import re
import subprocess
import tempfile

from bench.ttgir import sync_loads_in_loops


def compile_sm90(kernel, sig: dict, consts: dict, num_warps: int, num_stages: int, divisible) -> dict:
    """Compile `kernel` with argument types `sig` ({name: "*bf16" | "i32" | ...}) and constexprs `consts` as the
    runtime JIT would on sm_90, the arguments named in `divisible` specialized as 16-divisible (what the launcher sees
    for aligned pointers and strides). Returns the cubin's registers, stack bytes (register spills land there) and
    shared bytes, whether the PTX uses wgmma, and the synchronous loads left in the TTGIR's loops."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.experimental.gluon._runtime import GluonASTSource

    names = kernel.arg_names
    unknown = (set(sig) | set(consts)) - set(names)
    assert not unknown, f"{kernel.__name__} has no argument {sorted(unknown)}"
    signature = {n: "constexpr" if n in consts else sig[n] for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in divisible and n not in consts}
    source = GluonASTSource if kernel.is_gluon() else ASTSource
    built = triton.compile(
        source(fn=kernel, signature=signature, constexprs=consts, attrs=attrs),
        target=GPUTarget("cuda", 90, 32),
        options=dict(num_warps=num_warps, num_stages=num_stages),
    )
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(built.asm["cubin"])
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([tool, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", usage)
    return dict(
        regs=int(m.group(1)),
        stack_bytes=int(m.group(2)),
        shared_bytes=built.metadata.shared,
        wgmma="wgmma" in built.asm["ptx"],
        sync_loads=sync_loads_in_loops(built.asm["ttgir"]),
    )
