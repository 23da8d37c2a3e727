"""Run a function on N CPU ranks joined by gloo and collect each rank's return value."""

from __future__ import annotations

import pickle
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, world: int, port: int, out_dir: str, fn: Callable[..., Any], args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))


def run_ranks(world: int, fn: Callable[..., Any], *args: Any, tmp: Path) -> list[Any]:
    """``[fn(rank, world, *args) for each rank]``, each in its own spawned process (fn must be importable)."""
    torch.multiprocessing.start_processes(_entry, args=(world, _free_port(), str(tmp), fn, args), nprocs=world,
                                          start_method="spawn")
    return [pickle.loads(Path(tmp, f"rank{r}.pkl").read_bytes()) for r in range(world)]
