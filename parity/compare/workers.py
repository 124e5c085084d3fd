"""Measure pairs on a few worker threads and hand the results back in order.

Each worker thread owns a `stream.Worker` (its read and float64 buffers), so nothing is allocated per record.
torch runs each op in the calling thread (intra-op threads set to 1 while the workers run): the parallelism is
across records, which scales on a shared machine where intra-op thread teams wait on each other. File reads
release the GIL, so one worker's reading overlaps the others' arithmetic. At most `2 * threads` pairs are in
flight, so memory stays at that many records' buffers, and a caller that stops early leaves the rest unread.

Light items (`light(item)`: small records, a decode step's [tokens, dim] activations) run on the calling thread when
their turn comes: their work is mostly Python, which the GIL serializes, so handing them to a worker only adds the
hand-off and the threads' contention (measured here, 2 threads on 2 cores, per pair of bf16 records: 8 KiB 0.30 ms
inline against 0.89 ms through the workers, 128 KiB 0.52 against 1.07; 1 MiB 1.36 against 1.21, 8 MiB 10.3 against
5.2). The heavy items within the next `2 * threads` still go to the workers ahead of time. Light items are measured
on the CPU whatever the device: on a GPU each pays launches and syncs for a few KiB of work (measured on an H100 box,
8 threads, per pair of bf16 records: 16-512 KiB 2.7-2.9 ms on the GPU workers against 0.7-1.1 on the calling
thread's CPU, 1 MiB 2.8 against 2.1; from 4 MiB on the GPU workers win, 16 MiB 3.1 against 4.7 on CPU workers).
"""

import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from parity.compare.stream import Worker


def run_ordered(
    items: Sequence, work: Callable, threads: int = 1, device: str = "cpu", light: Callable | None = None
) -> Iterator:
    """`work(i, item, worker)` for each item, yielded in order; stopping the iteration cancels what is queued.
    `light(item)`: the items run on the calling thread rather than a worker's (module docstring)."""
    lit = [light is not None and light(item) for item in items]  # each item's class, decided once
    all_light = light is not None and all(lit)
    if threads <= 1 or all_light:
        workers = {}  # light or not -> its Worker, made when first needed
        intra = torch.get_num_threads()
        if all_light:  # ops on small records gain nothing from a thread team, whose idle members spin between them
            torch.set_num_threads(1)
        try:
            for i, item in enumerate(items):
                worker = workers.get(lit[i]) or workers.setdefault(lit[i], Worker("cpu" if lit[i] else device))
                yield work(i, item, worker)
        finally:
            torch.set_num_threads(intra)
        return
    local = threading.local()

    def call(i, item):
        if not hasattr(local, "worker"):
            # OpenMP's thread count is per thread: a new thread would start its own team of all cores, whose
            # idle members spin (measured: 3.5x the CPU time for the same work on 2 busy cores)
            torch.set_num_threads(1)
            local.worker = Worker(device)
        return work(i, item, local.worker)

    def start(i, item):  # (i, item, its worker's future, or None: run here when its turn comes)
        return i, item, None if lit[i] else pool.submit(call, i, item)

    intra = torch.get_num_threads()
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="parity-compare")
    pending: deque = deque()
    here = None  # the calling thread's own Worker, made for its first light item
    try:
        todo = iter(enumerate(items))
        for i, item in todo:
            pending.append(start(i, item))
            if len(pending) >= 2 * threads:
                break
        while pending:
            i, item, future = pending.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(start(*nxt))
            if future is None:
                here = here or Worker("cpu")
                result = work(i, item, here)
            else:
                result = future.result()
            yield result
    finally:
        for _, _, f in pending:
            if f is not None:
                f.cancel()
        pool.shutdown(wait=True)
        torch.set_num_threads(intra)
