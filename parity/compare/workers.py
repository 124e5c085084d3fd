"""Measure pairs on a few worker threads and hand the results back in order.

Each worker thread owns a `stream.Worker` (its read and float64 buffers), so nothing is allocated per record.
torch runs each op in the calling thread (intra-op threads set to 1 while the workers run): the parallelism is
across records, which scales on a shared machine where intra-op thread teams wait on each other. File reads
release the GIL, so one worker's reading overlaps the others' arithmetic. At most `2 * threads` pairs are in
flight, so memory stays at that many records' buffers, and a caller that stops early leaves the rest unread.
"""

import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from parity.compare.stream import Worker


def run_ordered(items: Sequence, work: Callable, threads: int = 1, device: str = "cpu") -> Iterator:
    """`work(i, item, worker)` for each item, yielded in order; stopping the iteration cancels what is queued."""
    if threads <= 1:
        worker = Worker(device)
        for i, item in enumerate(items):
            yield work(i, item, worker)
        return
    local = threading.local()

    def call(i, item):
        if not hasattr(local, "worker"):
            # OpenMP's thread count is per thread: a new thread would start its own team of all cores, whose
            # idle members spin (measured: 3.5x the CPU time for the same work on 2 busy cores)
            torch.set_num_threads(1)
            local.worker = Worker(device)
        return work(i, item, local.worker)

    intra = torch.get_num_threads()
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="parity-compare")
    pending: deque = deque()
    try:
        todo = iter(enumerate(items))
        for i, item in todo:
            pending.append(pool.submit(call, i, item))
            if len(pending) >= 2 * threads:
                break
        while pending:
            result = pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(call, *nxt))
            yield result
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True)
        torch.set_num_threads(intra)
