"""What a compiled Triton kernel's TTGIR says about its main loops (for the benches' sm_90 compile checks)."""


def sync_loads_in_loops(ttgir: str) -> int:
    """Plain (synchronous) `tt.load`s inside `scf.for` bodies: loads the software pipeliner left out. Each waits out
    a memory latency in the iteration that issued it unless its value is used only in a later one (a load issued a
    step ahead, as the GEMM kernels do for their scales, is counted too). Async copies are not counted."""
    open_at, count = [], 0  # indentation of each enclosing scf.for line
    for line in ttgir.splitlines():
        indent = len(line) - len(line.lstrip())
        if open_at and line.lstrip().startswith("}") and indent <= open_at[-1]:
            open_at.pop()
            continue
        if open_at and " tt.load " in line:
            count += 1
        if "scf.for" in line and line.rstrip().endswith("{"):
            open_at.append(indent)
    return count
