"""Kernel repros: the op call behind a failed verdict, saved with a standalone script that reruns it against the
op's reference twin (`write_kernel_repros`, docs/repro.md); `parity repro DIR` lists and runs them."""

from parity.repro.extract import run_and_extract, write_kernel_repros
from parity.repro.listing import Repro, find_repros, run_script

__all__ = ["Repro", "find_repros", "run_and_extract", "run_script", "write_kernel_repros"]
