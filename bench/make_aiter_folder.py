"""Extract from the amd-aiter wheel only what the aiter backend imports (the Triton kernels, their tuning tables and
the two package `__init__` files the loader bypasses): about 8 MB instead of 190 MB, so the folder can travel with
the repository to a GPU box without network and be named by PARITY_AITER_PATH (docs/aiter.md).

    pip download --no-deps amd-aiter==0.1.7.post2.dev18 -d /tmp/aiter-whl
    python3 bench/make_aiter_folder.py /tmp/aiter-whl/amd_aiter-0.1.7.post2.dev18-py3-none-any.whl .aiter-triton
"""

import sys
import zipfile
from pathlib import Path

KEEP = ("aiter/__init__.py", "aiter/ops/__init__.py", "aiter/ops/triton/")


def main(argv):
    if len(argv) != 2:
        print("usage: make_aiter_folder.py WHEEL OUT_DIR", file=sys.stderr)
        return 2
    wheel, out = Path(argv[0]), Path(argv[1])
    if not wheel.is_file() or not zipfile.is_zipfile(wheel):
        print(f"{wheel}: expected the amd-aiter wheel (a zip file)", file=sys.stderr)
        return 2
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.startswith(KEEP) and not n.endswith("/")]
        if not any(n.startswith(KEEP[2]) for n in names):
            print(f"{wheel}: no aiter/ops/triton/ inside; not an amd-aiter wheel", file=sys.stderr)
            return 2
        z.extractall(out, members=names)
    print(f"{out}: {len(names)} files of aiter's Triton kernels; use PARITY_AITER_PATH={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
