"""The harness's own data path at machine speed: dump write, compare, bisect and dump-info on dumps of 32 bf16
records of 16 MiB per forward, with this machine's limits measured in the same run.

    python bench/datapath.py                      # 0.5 and 2 GB per dump, in a temp dir, then deleted
    python bench/datapath.py --sizes 0.5,2,8 --dir /tmp/dp --device cuda --threads 2
    python bench/datapath.py --repo /path/to/other/checkout     # the same benchmark against another commit
    python bench/datapath.py --sizes "" --small 20000             # per-record cost: 20k decode-sized records

Every timed step runs as its own process (the checkout under test imported from `--repo`), so its wall time, CPU
time (user + sys: the machine may be shared) and peak RSS are its own. Sizes are GB (1e9 bytes) of tensor data per
dump. Dumps: `a` (the reference), `b` (every record differs a little and passes: compare and bisect read and
measure everything), `c` (bitwise `a` except the very last record: bisect skips identical records by their bytes).

Limits, measured here: page-cache read of the dump files (one stream, and `--threads` streams at once), bf16 ->
float64 cast into a reused buffer (one thread, per CPU-second of it), `dd` + fsync of the same bytes to the same
disk (right before the size's writes and again after them: a VM's disk can move several-fold in minutes), and
with `--device cuda` the pinned host -> GPU copy. Throughputs are tensor GB per wall second (both dumps for compare /
bisect), with the share of the relevant limit. With several sizes, the steady-state rate of each step
follows the table: the extra bytes over the extra time from the smallest to the largest size, which leaves out the
fixed cost (process start, imports, dump checks) that every size pays once; the row `compare a b, in process
(steady)` measures that rate directly: the comparison repeated in one process after a warm-up, best of three, and
`(first pass)` the warm-up itself (the comparison a command makes, without its start-up and dump checks). Each
step's dumps are read once, untimed, before it runs, so that it starts with its inputs in the page cache where they
fit (as the page-cache read limit).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RECORD_MIB, RECORDS = 16, 32
ROWS = 1024  # a record is [ROWS, COLS] bf16, 16 MiB
COLS = RECORD_MIB * (1 << 20) // 2 // ROWS
FORWARD_BYTES = RECORDS * RECORD_MIB * (1 << 20)
REPO = Path(__file__).resolve().parents[1]


def child_write(out: str, forwards: int, mode: str, variant: str, device: str = "cpu", rows: int = ROWS) -> None:
    """In a child process: run `forwards` forwards of a 32-block toy model on `device` with dumping `mode` (or off);
    each record [rows, COLS] bf16."""
    import torch
    from torch import nn

    from parity import dump

    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self, i):
            super().__init__()
            self.i = i

        def forward(self, x, bump, where):
            # a new tensor per block (as a real layer returns); `bump` scales one block's output when asked
            y = x.roll(1, 0)
            return y.mul_(1.0 + bump) if self.i == where and bump else y

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Block(i) for i in range(RECORDS))

        def forward(self, x, bump=0.0, where=0):
            for layer in self.layers:
                x = layer(x, bump, where)
            return x

    model = Model()
    x = torch.randn(rows, COLS).bfloat16().to(device)
    config = dump.DumpConfig(dir=out, mode=mode) if mode != "off" else dump.DumpConfig()
    handle = dump.install(model, config)
    start = time.perf_counter()
    for step in range(forwards):
        # b: every record differs a little (from block 0 on); c: only the very last record differs
        last = variant == "c" and step == forwards - 1
        bump = 5e-3 if variant == "b" or last else 0.0  # moves most bf16 values, norm ratio within 1 %
        with dump.phase("decode", step=step):
            model(x, bump, RECORDS - 1 if variant == "c" else 0)
    if device != "cpu":
        torch.cuda.synchronize()
    handle.remove()  # drains a background writer, if any
    json.dump({"seconds": time.perf_counter() - start}, sys.stdout)


def child_steady(a: str, b: str, threads: str, device: str) -> None:
    """In a child process: `compare_dumps(a, b)` once (the first pass: what a command's comparison pays, its start-up
    and dump checks left out), then the best of three, wall and CPU (all threads) of the comparison alone: the rate
    without the process's fixed cost."""
    from parity.compare.diff import compare_dumps
    from parity.compare.loader import load_dump

    da, db = load_dump(a), load_dump(b)
    opts = dict(threads=int(threads), device=device)
    passes = []
    for _ in range(4):
        wall, cpu = time.perf_counter(), time.process_time()
        compare_dumps(da, db, **opts)
        passes.append((time.process_time() - cpu, time.perf_counter() - wall))
    best = min(passes[1:])
    print(json.dumps({"cpu": best[0], "wall": best[1], "first_cpu": passes[0][0], "first_wall": passes[0][1]}))


def run_child(args: list[str], repo: Path) -> dict:
    """A process in `repo`: wall seconds, CPU seconds (user + sys) and peak RSS (MB) of that process alone."""
    env = {**os.environ, "PYTHONPATH": str(repo)}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(args, cwd=repo, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (getrusage would accumulate)
        wall = time.perf_counter() - start
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        text, errors = out.read(), err.read()
    if code not in (0, 1):
        raise SystemExit(f"{' '.join(args)}: exit {code}\n{errors.strip()[-2000:]}")
    cpu = usage.ru_utime + usage.ru_stime
    return {"wall": wall, "out": text, "code": code, "cpu": cpu, "rss_mb": usage.ru_maxrss / 1024}


def read_rate(files: list[Path], streams: int) -> float:
    """Page-cache read of `files` (bytes / s), split over `streams` threads (file reads release the GIL)."""

    def read(part: list[Path]) -> int:
        view, total = memoryview(bytearray(64 << 20)), 0
        for path in part:
            with open(path, "rb", buffering=0) as f:
                while k := f.readinto(view):
                    total += k
        return total

    start = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        total = sum(pool.map(read, [files[i::streams] for i in range(streams)]))
    return total / (time.perf_counter() - start)


def h2d_rate() -> float:
    """Pinned host -> GPU copy (bytes / s), 64 MiB at a time."""
    import torch

    src = torch.empty(64 << 20, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(src, device="cuda")
    dst.copy_(src)
    torch.cuda.synchronize()
    start, reps = time.perf_counter(), 32
    for _ in range(reps):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return reps * src.numel() / (time.perf_counter() - start)


def dd_rate(scratch: Path, nbytes: int) -> float:
    """`dd` + fsync of `nbytes` to `scratch`'s disk, bytes / s."""
    target = scratch / "dd.bin"
    count = max(1, nbytes // (16 << 20))
    start = time.perf_counter()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={target}", "bs=16M", f"count={count}", "conv=fsync"],
        check=True,
        capture_output=True,
    )
    rate = count * (16 << 20) / (time.perf_counter() - start)
    target.unlink()
    return rate


def limits(dump_dir: Path, nbytes: int, scratch: Path, streams: int, device: str) -> dict:
    """This machine's ceilings: page-cache read (1 and `streams` threads), bf16 -> float64 cast (reused buffer, one
    thread), dd + fsync, and the pinned host -> GPU copy on `cuda`."""
    import torch

    files = sorted((dump_dir / "tensors").iterdir())
    read = read_rate(files, 1)
    read_par = read_rate(files, streams)
    torch.set_num_threads(1)
    src = torch.randn(8 << 20).bfloat16()
    dst = torch.empty(src.numel(), dtype=torch.float64)
    dst.copy_(src)
    # per CPU-second of this thread, as the steps' GB/cpu-s: on a shared machine a wall-clock cast rate would fall
    # with the load while the steps' CPU-time rates do not, and their share would look better than it is
    start, reps = time.thread_time(), 8
    for _ in range(reps):
        dst.copy_(src)
    cast = reps * src.numel() * 2 / max(time.thread_time() - start, 1e-9)
    dd = dd_rate(scratch, nbytes)
    out = {"read": read, "read_par": read_par, "streams": streams, "cast": cast, "dd_fsync": dd}
    if device != "cpu":
        out["h2d"] = h2d_rate()
    return out


def bench_size(size_gb: float, root: Path, repo: Path, threads: int | None, device: str) -> list[dict]:
    """Write the dumps of one size (timed), measure the limits on them, then time compare, bisect and dump-info."""
    forwards = max(1, round(size_gb * 1e9 / FORWARD_BYTES))
    nbytes = forwards * FORWARD_BYTES
    py, me = sys.executable, str(Path(__file__).resolve())
    rows = []

    def write(name: str, mode: str, variant: str) -> dict:
        return write_dump(root / f"{size_gb}-{name}", forwards, mode, variant, device, ROWS, repo)

    # dd + fsync also right before the writes: a VM's disk can move several-fold within minutes, and the limit
    # measured after the writes (`limits`) may then be far from what the writes met; the report gives both
    dd_before = dd_rate(root, nbytes)
    off = write("off", "off", "a")
    for name, mode, variant in (("a", "full", "a"), ("b", "full", "b"), ("c", "full", "c"), ("stats", "stats", "a")):
        r = write(name, mode, variant)
        extra = max(r["seconds"] - off["seconds"], 1e-9)
        if name in ("a", "stats"):
            rows.append(_row(size_gb, f"write {mode}", r, nbytes, extra=extra))
    shutil.rmtree(root / f"{size_gb}-stats", ignore_errors=True)
    lim = limits(root / f"{size_gb}-a", nbytes, root, threads or min(4, os.cpu_count() or 1), device)
    lim["dd_fsync_before"] = dd_before
    cli = [py, str(repo / "cli.py")]
    opts = _data_opts(threads, device)
    a, b, c = (str(root / f"{size_gb}-{n}") for n in "abc")
    steps = [  # (label, command, tensor bytes moved, the dumps it reads)
        ("compare a b", ["compare", a, b, "--out", str(root / "cmp.json"), *opts], 2 * nbytes, (a, b)),
        ("bisect a b (full read)", ["bisect", a, b, "--out", str(root / "bis.json"), *opts], 2 * nbytes, (a, b)),
        ("bisect a c (bitwise skip)", ["bisect", a, c, "--out", str(root / "bic.json"), *opts], 2 * nbytes, (a, c)),
        ("dump-info a", ["dump-info", a, "--out", str(root / "info.json")], nbytes, (a,)),
    ]
    for label, args, moved, dumps in steps:
        # the step's dumps are read once, untimed, first: each step starts with its inputs in the page cache where
        # they fit (the writes of the other dumps evict them otherwise, and the step would time this VM's disk)
        read_rate([p for d in dumps for p in sorted(Path(d).rglob("*")) if p.is_file()], 2)
        rows.append(_row(size_gb, label, run_child([*cli, *args, "--json"], repo), moved))
    # the same comparison repeated inside one process: the steady rate, without start, imports and dump checks
    workers = str(threads or min(4, os.cpu_count() or 1))
    r = run_child([py, me, "--child-steady", a, b, workers, device], repo)
    steady = json.loads(r["out"])
    first = {**r, "wall": steady["first_wall"], "cpu": steady["first_cpu"]}
    rows.append(_row(size_gb, "compare a b, in process (first pass)", first, 2 * nbytes))
    rows.append(_row(size_gb, "compare a b, in process (steady)", {**r, **steady}, 2 * nbytes))
    for r in rows:
        r["limits"] = lim
    for n in "abc":
        shutil.rmtree(root / f"{size_gb}-{n}", ignore_errors=True)
    shutil.rmtree(root / f"{size_gb}-off", ignore_errors=True)
    return rows


def bench_small(n: int, root: Path, repo: Path, threads: int | None, device: str) -> str:
    """`n` decode-sized records per dump (one token's [1, COLS] bf16, 16 KiB: a decode step's activations), where the
    bytes are nothing and the per-record work is everything: compare, bisect (`b`: every record differs a little and
    passes, so both read all of them) and dump-info, wall ms per record (the process's fixed cost included)."""
    forwards = max(1, n // RECORDS)
    a, b = root / f"small{n}-a", root / f"small{n}-b"
    for out, variant in ((a, "a"), (b, "b")):
        write_dump(out, forwards, "full", variant, device, 1, repo)
    records = forwards * RECORDS
    cli = [sys.executable, str(repo / "cli.py")]
    opts = _data_opts(threads, device)
    lines = [
        f"{records} records of [1, {COLS}] bf16 per dump ({2 * COLS // 1024} KiB each):",
        "",
        "| step | wall s | cpu s | ms / record | peak RSS MB |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label, args in (
        ("compare a b", ["compare", str(a), str(b), "--out", str(root / "small-cmp.json"), *opts]),
        ("bisect a b", ["bisect", str(a), str(b), "--out", str(root / "small-bis.json"), *opts]),
        ("dump-info a", ["dump-info", str(a), "--out", str(root / "small-info.json")]),
    ):
        r = run_child([*cli, *args, "--json"], repo)
        lines.append(
            f"| {label} | {r['wall']:.2f} | {r['cpu']:.2f} | {1e3 * r['wall'] / records:.3f} | {r['rss_mb']:.0f} |"
        )
    for d in (a, b):
        shutil.rmtree(d, ignore_errors=True)
    return "\n".join(lines)


def write_dump(out: Path, forwards: int, mode: str, variant: str, device: str, rows: int, repo: Path) -> dict:
    """`child_write` in its own process (`run_child`), with the forwards' seconds it measured."""
    args = [str(out), str(forwards), mode, variant, device, str(rows)]
    r = run_child([sys.executable, str(Path(__file__).resolve()), "--child-write", *args], repo)
    r["seconds"] = json.loads(r["out"])["seconds"]
    return r


def _data_opts(threads: int | None, device: str) -> list[str]:
    """compare / bisect's --threads and --device as this run was asked for them (their defaults otherwise)."""
    return (["--threads", str(threads)] if threads else []) + (["--device", device] if device != "cpu" else [])


def _row(size_gb, label, r, nbytes, extra=None) -> dict:
    seconds = extra if extra is not None else r["wall"]
    return {
        "size_gb": size_gb,
        "step": label,
        "wall_s": r["wall"] if extra is None else extra,
        "cpu_s": r["cpu"],
        "bytes": nbytes,
        "gb_s": nbytes / seconds / 1e9,
        "gb_per_cpu_s": nbytes / max(r["cpu"], 1e-9) / 1e9,
        "rss_mb": r["rss_mb"],
        "code": r["code"],
    }


def report(rows: list[dict], repo: Path, threads, device) -> str:
    import platform

    import torch

    lines = [
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
        f"repo {repo}, threads {threads or 'default'}, device {device}",
    ]
    for size in dict.fromkeys(r["size_gb"] for r in rows):
        lim = next(r["limits"] for r in rows if r["size_gb"] == size)
        h2d = f", pinned host->GPU {lim['h2d'] / 1e9:.2f} GB/s" if "h2d" in lim else ""
        lines.append(
            f"limits at {size} GB: page-cache read {lim['read'] / 1e9:.2f} GB/s (1 stream), "
            f"{lim['read_par'] / 1e9:.2f} GB/s ({lim['streams']} streams), bf16->f64 cast {lim['cast'] / 1e9:.2f} "
            f"GB/cpu-s (1 thread, reused buffer), dd+fsync {lim['dd_fsync_before'] / 1e9:.2f} GB/s before the "
            f"writes and {lim['dd_fsync'] / 1e9:.2f} after{h2d}"
        )
    lines += [
        "",
        "| size GB | step | wall s | cpu s | GB/s | GB/cpu-s | % of limit | peak RSS MB |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lim = r["limits"]
        if r["step"].startswith("write"):
            before, after = (100 * r["gb_s"] * 1e9 / lim[k] for k in ("dd_fsync_before", "dd_fsync"))
            pct = f"{before:.0f} / {after:.0f} % of dd+fsync (before / after)"
        elif r["step"].startswith("dump-info"):
            pct = "-"
        else:
            of_read = 100 * r["gb_s"] * 1e9 / lim["read"]
            of_cast = 100 * r["gb_per_cpu_s"] * 1e9 / lim["cast"]
            pct = f"{of_read:.1f} % of read, {of_cast:.0f} % of cast/core"
        lines.append(
            f"| {r['size_gb']} | {r['step']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r['gb_s']:.3f} | "
            f"{r['gb_per_cpu_s']:.3f} | {pct} | {r['rss_mb']:.0f} |"
        )
    steady = steady_rates(rows)
    if steady:
        lines += ["", "steady state (extra bytes / extra time, smallest to largest size: the fixed cost left out):"]
        lines += [
            f"- {step}: {r['gb_s']:.3f} GB/s wall, {r['gb_per_cpu_s']:.3f} GB/cpu-s, "
            f"{100 * r['gb_s'] * 1e9 / r['read_par']:.0f} % of the {r['streams']}-stream read, "
            f"{100 * r['gb_per_cpu_s'] * 1e9 / r['cast']:.0f} % of cast/core"
            for step, r in steady.items()
        ]
    return "\n".join(lines)


def steady_rates(rows: list[dict]) -> dict:
    """Per compare / bisect step measured at two sizes or more: GB/s and GB/cpu-s from the smallest to the largest,
    i.e. the rate once the fixed cost is paid (both dumps counted, as in the table)."""
    out = {}
    for step in dict.fromkeys(r["step"] for r in rows):
        if not step.startswith(("compare", "bisect")) or "in process" in step:
            continue
        mine = sorted((r for r in rows if r["step"] == step), key=lambda r: r["size_gb"])
        if len(mine) < 2 or mine[-1]["wall_s"] <= mine[0]["wall_s"]:
            continue
        small, large = mine[0], mine[-1]
        moved = (large["bytes"] - small["bytes"]) / 1e9
        cpu = max(large["cpu_s"] - small["cpu_s"], 1e-9)
        out[step] = {
            "gb_s": moved / (large["wall_s"] - small["wall_s"]),
            "gb_per_cpu_s": moved / cpu,
            "read_par": large["limits"]["read_par"],
            "cast": large["limits"]["cast"],
            "streams": large["limits"]["streams"],
        }
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child-write":
        child_write(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6], int(sys.argv[7]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--child-steady":
        child_steady(*sys.argv[2:6])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="0.5,2", help="GB of tensor data per dump, comma-separated (e.g. 0.5,2,8)")
    p.add_argument("--dir", type=Path, default=None, help="where dumps go (default: a temp dir, deleted after)")
    p.add_argument("--repo", type=Path, default=REPO, help="the checkout under test (default: this one)")
    p.add_argument("--threads", type=int, default=None, help="compare/bisect --threads (default: theirs)")
    p.add_argument("--device", default="cpu", help="the toy model's device and compare/bisect --device (cuda on a GPU)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    p.add_argument("--small", type=int, default=0, metavar="N", help="also N decode-sized records per dump (16 KiB)")
    args = p.parse_args()
    sizes = [float(s) for s in args.sizes.split(",") if s]
    root = args.dir or Path(tempfile.mkdtemp(prefix="parity-datapath-"))
    root.mkdir(parents=True, exist_ok=True)
    need = 4.2 * max(sizes, default=0) * 1e9
    free = shutil.disk_usage(root).free
    if free < need:
        raise SystemExit(f"{root}: {free / 1e9:.1f} GB free, the largest size needs about {need / 1e9:.1f} GB")
    rows = []
    try:
        for size in sizes:
            rows += bench_size(size, root, args.repo.resolve(), args.threads, args.device)
            print(report(rows, args.repo, args.threads, args.device), flush=True)
        if args.small:
            print(bench_small(args.small, root, args.repo.resolve(), args.threads, args.device), flush=True)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
