"""CUDA-graph capture the way torch requires it: warm up on a side stream, then capture one call.

Every backend of this project is meant to be captured (a serving engine replays a whole layer per decode
step), and every capture needs the same preamble: the first calls compile kernels, load modules and size
workspaces, which must not happen inside the captured region, and torch asks for them to run on a side
stream that the capture stream then waits on. `capture` is that preamble plus the capture, written once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def capture(fn: Callable[[], T], warmups: int = 1, device: torch.device | int | None = None
            ) -> tuple[torch.cuda.CUDAGraph, T]:
    """Run ``fn`` ``warmups`` times on a side stream, then capture one call of it into a new graph.

    Returns the graph and what the captured call returned: tensors allocated inside the capture live in
    the graph's private memory pool and are overwritten by every ``graph.replay()`` (read them after a
    replay, copy them to keep them). ``fn`` must read its inputs from tensors that stay alive (the graph
    reads the same addresses on every replay) and must not sync with the host. ``device``: the CUDA
    device whose streams are used (default: the current one).
    """
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fn()
    return graph, result
