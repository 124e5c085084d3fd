"""One CUDA graph of repeated op calls, for the benches' graph timings (the GPU's own time, without the host's
per-call launch overhead that bounds the smallest batches)."""

import torch


def captured(calls, reps: int) -> torch.cuda.CUDAGraph:
    """A graph of `reps` passes over `calls` (closures). Each call runs once first on a side stream, so compiling,
    autotuning and workspace allocation happen outside the capture."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for c in calls:
                c()
    return graph
