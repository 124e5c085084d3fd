"""Issue 17: how fast do page-cached dump bytes reach GPU memory, by method?

GPU box: `python bench/gpu_read_paths.py [--dir D]` (< 2 min; 2 x 2 GiB files in /dev/shm if it has room, else /tmp);
`--dry-run` without a GPU (2 x 32 MiB, CPU destination, no cudaHostRegister). Each row reads both files into one
destination tensor, timed after a warm-up run, then checks per-block int64 sums of it against the bytes written.
"""

import argparse
import contextlib
import ctypes
import faulthandler
import mmap
import os
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from time import perf_counter as now

import numpy as np
import torch

MiB, GiB, BUDGET = 1 << 20, 1 << 30, 95.0  # BUDGET: seconds after which no new row starts (faulthandler: + 22 s)
warnings.filterwarnings("ignore", message=".*not writable.*")  # views of read-only mmaps: nothing writes through them
LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MADV_WILLNEED, MADV_POPULATE_READ = 3, 22  # POPULATE_READ (Linux >= 5.14) maps the pages, WILLNEED only reads ahead


def cudart():
    """libcudart as torch loaded it, through ctypes: its calls drop the GIL, and a failed cudaHostRegister's error can
    be cleared (cudaGetLastError, same thread) before torch's next kernel-launch check raises it. None on CPU."""
    with open("/proc/self/maps") as f:
        path = next((ln.split()[-1] for ln in f if "libcudart.so" in ln), None)
    if path is None:
        return None, "no libcudart loaded"
    lib = ctypes.CDLL(path)
    lib.cudaHostRegister.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
    lib.cudaHostUnregister.argtypes = [ctypes.c_void_p]
    v = [ctypes.c_int(-1), ctypes.c_int(-1)]  # cudaDevAttrHostRegisterSupported = 99, ...ReadOnlySupported = 113
    for val, attr in zip(v, (99, 113)):
        lib.cudaDeviceGetAttribute(ctypes.byref(val), attr, 0)
    return lib, f"{path.rsplit('/', 1)[-1]}: register supported {v[0].value}, read-only {v[1].value}"


def each(fn, items, threads):  # reads, copies and ctypes calls drop the GIL
    with ThreadPoolExecutor(threads) as ex:
        return list(ex.map(fn, items))


def pieces(size, nfiles, chunk):  # (file, file offset, destination offset, bytes) of every chunk, file by file
    return [(k, off, k * size + off, min(chunk, size - off)) for k in range(nfiles) for off in range(0, size, chunk)]


def reader(paths, size, dst, chunk, threads, nbuf, preadv, cuda):
    """(a)/(b): each thread reads its chunks into `nbuf` pinned buffers (1 = today's stream.py: a refill waits for the
    buffer's copy) and copies each to `dst` without blocking, on its own CUDA stream. dst None: host reads only."""
    jobs = pieces(size, len(paths), chunk)
    nbuf, pin = min(nbuf, -(-len(jobs) // threads)), cuda and dst is not None  # no buffer that would stay unused
    streams = [torch.cuda.Stream() if pin else None for _ in range(threads)]
    bufs = [[torch.empty(min(chunk, size), dtype=torch.uint8, pin_memory=pin) for _ in range(nbuf)] for _ in streams]

    def work(t):
        done = [None] * nbuf
        with contextlib.ExitStack() as stack, torch.cuda.stream(streams[t]):  # stream None: no-op
            fs = [stack.enter_context(open(p, "rb", buffering=0)) for p in paths]
            for j, (k, off, d, n) in enumerate(jobs[t::threads]):
                i, got = j % nbuf, 0
                if done[i] is not None:
                    done[i].synchronize()  # still being copied: wait before refilling
                view = memoryview(bufs[t][i].numpy())[:n]
                fs[k].seek(off)
                while got < n:
                    r = os.preadv(fs[k].fileno(), [view[got:]], off + got) if preadv else fs[k].readinto(view[got:])
                    if not r:
                        raise EOFError(paths[k])
                    got += r
                if dst is not None:
                    dst[d : d + n].copy_(bufs[t][i][:n], non_blocking=pin)
                    if pin:
                        done[i] = torch.cuda.Event()
                        done[i].record()
            if pin:
                streams[t].synchronize()  # run() returns once its bytes are on the GPU

    return lambda: each(work, range(threads), threads)


def mapped(paths, size, dst, lib, flags, piece, threads, advice, cuda):
    """(c)/(c2): mmap, maybe madvise the pages in, cudaHostRegister `piece`-byte ranges (flags None: not, as in (d)),
    copy each range alone (one across registrations may not count as pinned), unregister; on `threads` threads each."""

    def reg(r):  # a failed call's error is cleared in its thread, or torch's next kernel-launch check raises it
        if (err := lib.cudaHostRegister(r[0], r[3], flags)) != 0:
            lib.cudaGetLastError()
        return err

    def copy(r):
        with torch.cuda.stream(torch.cuda.Stream() if cuda else None):  # from torch's pool of streams
            dst[r[2] : r[2] + r[3]].copy_(torch.from_numpy(r[1]))  # waits for this copy only

    def run():
        t0, arrs = now(), []
        for p in paths:  # read-only shared mappings (an array keeps its mmap alive: dropping it unmaps)
            with open(p, "rb") as f:
                arrs.append(np.frombuffer(mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ), np.uint8))
        rng = [(arrs[k].ctypes.data + off, arrs[k][off : off + n], d, n) for k, off, d, n in pieces(size, 2, piece)]
        if advice:
            each(lambda r: LIBC.madvise(r[0], r[3], advice), rng, threads)
        t1 = now()
        errs = each(reg, rng, threads) if flags is not None else [0] * len(rng)
        t2 = now()
        try:
            if any(errs):
                raise RuntimeError(f"cudaHostRegister(flags={flags}): errors {sorted(set(errs))} ({len(errs)} ranges)")
            each(copy, rng, threads)
            t3 = now()
        finally:
            if flags is not None:  # the ranges that were registered
                each(lib.cudaHostUnregister, [r[0] for r, e in zip(rng, errs) if not e], threads)
        return {"map+advise": t1 - t0, "register": t2 - t1, "copy": t3 - t2, "unregister": now() - t3}

    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry-run", action="store_true", help="no CUDA, 2 x 32 MiB")
    ap.add_argument("--dir", help="where the test files go (default: /dev/shm if it has room, else /tmp)")
    args = ap.parse_args()
    start, cuda = now(), torch.cuda.is_available() and not args.dry_run
    size, block, ref = (32 * MiB, 4 * MiB, 64 * MiB) if args.dry_run else (2 * GiB, 64 * MiB, GiB)
    faulthandler.dump_traceback_later(BUDGET + 22, exit=True)  # a call stuck in the driver: say where, and end
    d = args.dir or ("/dev/shm" if shutil.disk_usage("/dev/shm").free > 2 * size + GiB else "/tmp")
    paths, sums = [os.path.join(d, f"io_probe_{os.getpid()}_{k}.bin") for k in range(2)], []
    try:
        base = np.frombuffer(np.random.default_rng(0).bytes(block), np.uint64)
        for k, p in enumerate(paths):  # a random block XOR a key per block: all differ, a misplaced one fails the check
            with open(p, "wb", buffering=0) as f:
                for i in range(size // block):
                    f.write(data := base ^ np.uint64(((k << 32) + i + 1) * 0x9E3779B97F4A7C15 % (1 << 64)))
                    sums.append(int(data.view(np.int64).sum()))  # wraps mod 2**64 like torch's sum
                os.fsync(f.fileno())  # on a disk-backed --dir: no writeback during the timings
        expect, dst = torch.tensor(sums), torch.empty(2 * size, dtype=torch.uint8, device="cuda" if cuda else "cpu")
        lib, note = cudart() if cuda else (None, "dry run: no registration")
        reader(paths, size, None, 16 * MiB, 1, 1, False, cuda)()  # read each file once: in the page cache
        probe = np.frombuffer(mmap.mmap(-1, 4096), np.uint8)  # held: the mapping lives as long as the array
        pop = LIBC.madvise(probe.ctypes.data, 4096, MADV_POPULATE_READ) == 0
        adv, adv_name = (MADV_POPULATE_READ, "POPULATE_READ") if pop else (MADV_WILLNEED, "WILLNEED")  # kernel < 5.14
        with open("/proc/mounts") as f:  # the file system of `d`: its longest mount point
            fs = max((ln.split() for ln in f), key=lambda m: d.startswith(m[1]) * len(m[1]))[2]
        gpu, sync = (torch.cuda.get_device_name(), torch.cuda.synchronize) if cuda else ("no GPU", lambda: None)
        blocksums = lambda: dst.view(torch.int64).view(len(sums), -1).sum(1).cpu()
        print(
            f"torch {torch.__version__}, {gpu}, {os.cpu_count()} CPUs, kernel {os.uname().release}, {note}\nfiles"
            f" 2 x {size / MiB:.0f} MiB in {d} ({fs}), setup {now() - start:.1f} s; GB = 1e9 bytes"
        )
        print(f"{'method':<50} {'GB/s':>7} {'s':>7}  check  phases: s (GB/s)")
        rows = [(f"(ref) page cache -> host, 16 MiB, {t} thr", reader, (None, 16 * MiB, t, 1, 0)) for t in (1, 8, 16)]
        src, out, pinned = (torch.ones(ref, dtype=torch.uint8, pin_memory=cuda and i == 2) for i in range(3))  # touched
        for t in (1, os.cpu_count() or 16):  # copy_ into touched memory is memcpy alone, clone also faults pages in
            rows += [
                (f"(e) RAM {h} {ref // MiB} MiB, {t} thr", None, (t, f))
                for h, f in (("clone", src.clone), ("copy_", lambda: out.copy_(src)))
            ]
        rows += [(f"(e) pinned -> GPU {ref // MiB} MiB", None, (1, lambda: dst[:ref].copy_(pinned, True)))] * cuda
        for mb, t in ((16, 1), (16, 8), (64, 8), (64, 16), (256, 8), (256, 16)):  # (a) today's, (b) 2 larger buffers
            how = f"({'b) preadv' if mb > 16 else 'a) readinto'} {mb} MiB pinned x{1 + (mb > 16)}, {t} thr"
            rows.append((how, reader, (dst, mb * MiB, t, 1 + (mb > 16), mb > 16)))
        rows.append(("(d) mmap pageable -> GPU, 64 MiB, 8 thr", mapped, (dst, None, None, 64 * MiB, 8, 0)))
        for fl, mb, a in ((0, 0, 0), (8, 0, 0), (8, 256, 0), (8, 0, adv), (8, 256, adv), (8, 32, adv)):  # mb 0: a file
            t = 8 if mb else 2  # pieces on 8 threads, or a file per thread
            how = f"(c{'2' if a else ''}) mmap{' +' + adv_name if a else ''} reg({fl}) {mb or size // MiB} MiB, {t} thr"
            rows.append((how, mapped, (dst, lib, fl if cuda else None, mb * MiB or size, t, a)))
        intra = torch.get_num_threads()
        for name, make, a in rows:
            if now() - start > BUDGET:
                print(f"{name:<50} skipped: past the {BUDGET:.0f} s budget")
                continue
            run = phases = None  # the last row's buffers go before this row's come
            try:
                torch.set_num_threads(a[0] if make is None else intra)
                run = make(paths, size, *a, cuda) if make else a[1]
                run()  # warm-up: allocations, CUDA handles, first touch of buffers
                dst.zero_()  # the check sees this run's bytes only
                sync()
                t0, phases = now(), run()
                sync()
                dt, nbytes, check = now() - t0, 2 * size if make else ref, make is not None and a[0] is not None
                ok = ("ok" if torch.equal(blocksums(), expect) else "BAD") if check else "-"
                phases = phases.items() if isinstance(phases, dict) else ()
                parts = ", ".join(f"{k} {v:.3f} ({nbytes / v / 1e9:.1f})" for k, v in phases if v > 1e-4)
                print(f"{name:<50} {nbytes / dt / 1e9:7.2f} {dt:7.3f}  {ok:<5}  {parts}", flush=True)
            except Exception as e:  # a probe row reports its failure and the next row runs
                print(f"{name:<50} error: {type(e).__name__}: {str(e)[:150]}", flush=True)
    finally:
        for p in paths:
            with contextlib.suppress(OSError):
                os.unlink(p)
        print(f"total {now() - start:.1f} s, files removed")


if __name__ == "__main__":
    main()
