"""Which torch ops give a row a different result depending on how many rows share the call (CUDA vs CPU)?

    python bench/cuda_shape_probe.py [--device cuda]

For each op: run it on [T, ...] and on every row alone ([1, ...]); print how many rows differ bitwise.
"""

import argparse

import torch
import torch.nn.functional as F


def probe(device: str, t: int = 64) -> None:
    g = torch.Generator().manual_seed(0)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    x1024, x256 = r(t, 1024), r(t, 256)
    s4, s44 = r(t, 4, 256), r(t, 4, 4, 256)
    p4, c44 = r(t, 4), r(t, 4, 4)
    b128 = r(t, 4, 512, dtype=torch.bfloat16)
    w24, wb = r(24, 1024), r(4, 256, dtype=torch.bfloat16)
    xb = x256.to(torch.bfloat16)
    kv, sc = r(t, 8, 128), r(t, 8, 128)
    # each probe maps a row slice to the op's output on those rows
    ops = {
        "mean(x^2) fp32 [T,1024]": lambda i: x1024[i].square().mean(-1, keepdim=True),
        "rms_norm fp32 [T,256]": lambda i: x256[i] * torch.rsqrt(x256[i].square().mean(-1, keepdim=True) + 1e-6),
        "F.linear fp32 [T,1024]x[24]": lambda i: F.linear(x1024[i], w24),
        "F.linear bf16 [T,256]x[4]": lambda i: F.linear(xb[i], wb),
        "sum over streams [T,4,D] dim1": lambda i: (p4[i, :, None] * s4[i]).sum(1),
        "hc_post sum [T,4,4,D] dim1": lambda i: s44[i].sum(1),
        "bf16 head mean [T,h,512]": lambda i: b128[i].square().mean(-1, keepdim=True),
        "softmax pool [n,8,d] dim-2": lambda i: (kv[i] * sc[i].softmax(-2)).sum(-2),
        "silu fp32": lambda i: F.silu(x256[i]),
        "sigmoid [T,4]": lambda i: torch.sigmoid(p4[i]),
        "softmax [T,4,4]": lambda i: c44[i].softmax(-1),
    }
    print(f"device {device}, T={t}")
    for name, fn in ops.items():
        full = fn(slice(None))
        bad = sum(not torch.equal(full[i : i + 1], fn(slice(i, i + 1))) for i in range(t))
        print(f"  {name:34s} rows differing alone vs batched: {bad}/{t}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    probe(parser.parse_args().device)
