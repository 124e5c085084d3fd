"""parity: correctness and bisect harness for DeepSeek-V4 inference kernels."""

__version__ = "0.1.0"
