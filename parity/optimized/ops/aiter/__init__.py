"""The `aiter` backend: AMD aiter's Triton kernels behind adapters (`loader.py` says how aiter is imported off
ROCm; each adapter module says which aiter kernel it runs, what it converts and how its numerics differ)."""
