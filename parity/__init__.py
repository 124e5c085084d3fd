"""parity: correctness and bisect harness for DeepSeek-V4 inference kernels."""

from parity.optimized.ops.triton.runtime import choose_interpreter_early

__version__ = "0.1.0"

# Triton can only run here through its CPU interpreter when there is no GPU, and the interpreter must be chosen
# before anything imports triton (torch itself does, the first time a model is built on the meta device)
choose_interpreter_early()
