"""What machine a run happened on: CPU model, torch's CPU dispatch level, threads, and the GPU if any.

Numerics of torch's CPU kernels depend on all of these (the vectorized head and scalar tail of a reduction, the
GEMM's blocking by row count), so every report and every CI log names them.
"""

import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> dict:
    """CPU model, torch's CPU capability (what ATEN_CPU_CAPABILITY would force), thread count, torch and CUDA."""
    info = {
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": None,
    }
    if torch.cuda.is_available():
        info["cuda"] = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return info


def summary() -> str:
    """One line, e.g. `AMD EPYC, torch 2.13.0+cpu CPU capability AVX2, 2 threads`."""
    d = describe()
    gpu = f", {d['cuda']}" if d["cuda"] else ""
    return f"{d['cpu']}, torch {d['torch']} CPU capability {d['cpu_capability']}, {d['threads']} threads{gpu}"
