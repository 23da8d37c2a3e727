"""Kernel launches for one `Plan`: argument packing and the launch sequence of each path.

Arguments go to the kernels by value as NumPy scalars (``uint64`` device pointers taken from the torch
tensors, ``int32`` sizes), so no array is converted or copied: the kernels read and write the torch
tensors' memory directly. The launches are asynchronous on torch's current stream; nothing here
allocates or synchronises, so a sequence is safe to capture in a CUDA graph once the kernels are loaded.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

from .buffers import PreprocessBuffers
from .plan import GRID_THREADS, SCAN_THREADS, MapChoice, Plan

_i32 = np.int32


class KernelSet(Protocol):
    """What `launch` needs: the compiled kernels (`jit.Kernels`), or a CPU emulation of them in the tests.

    Each kernel is called as ``kernel(grid, block, args, shared_mem=bytes)``.
    """

    smem_optin: int  # the most dynamic shared memory a block may ask for, in bytes

    def block(self, id_type: str, ipt: int) -> Any: ...

    def count(self, id_type: str) -> Any: ...

    @property
    def scan(self) -> Any: ...

    @property
    def place(self) -> Any: ...

    def context(self) -> AbstractContextManager[Any]: ...


def _ptr(t: torch.Tensor) -> np.uint64:
    return np.uint64(t.data_ptr())


def launch(kernels: KernelSet, plan: Plan, topk_ids: torch.Tensor, device_map: torch.Tensor | None,
           map_choice: MapChoice, first: int, faithful: bool, out: PreprocessBuffers,
           marks: Callable[[str], None] | None = None) -> None:
    """Run the plan's kernels on ``topk_ids`` (contiguous, on the device) into ``out``.

    ``device_map`` is the map's device copy (its entries start at ``device_map.data_ptr()``), ``None``
    without a map; ``first`` is the first local global id without a map. ``marks`` (benchmarks only) is
    called with a kernel's name before each launch and with ``"end"`` after the last one, e.g. to record
    CUDA events between the kernels.
    """
    mark = marks or _no_mark
    id_type = "int32" if topk_ids.dtype == torch.int32 else "int64"
    nk = plan.num_slots
    map_ptr = _ptr(device_map) if device_map is not None else np.uint64(0)
    lookup = (_ptr(topk_ids), _i32(nk), map_ptr, _i32(map_choice.size), _i32(map_choice.mode), _i32(int(faithful)),
              _i32(first), _i32(plan.num_local))
    null = np.uint64(0)
    aligned = plan.block_m > 0
    sorted_ptr = _ptr(out.sorted_slot_ids) if aligned else null
    blocks_ptr = _ptr(out.block_expert_ids) if aligned else null
    total_ptr = _ptr(out.num_slots_post_padded) if aligned else null
    with kernels.context():
        if plan.path == "block":
            mark("block_preprocess")
            kernels.block(id_type, plan.ipt)(
                (1,), (plan.block_threads,),
                lookup + (_ptr(out.local_ids), _ptr(out.expert_counts), _ptr(out.invalid_count), sorted_ptr,
                          blocks_ptr, total_ptr, _i32(plan.block_m), _i32(plan.capacity), _i32(plan.window),
                          _i32(plan.active_warps)),
                shared_mem=plan.smem_block_bytes)
            mark("end")
            return
        windows = plan.window_bounds()
        keys8 = _ptr(out.keys8) if plan.keys8_bytes else null
        tiles = _i32(plan.tiles)
        for w, (e0, wl) in enumerate(windows):
            first_window, last_window = w == 0, w == len(windows) - 1
            mark("grid_count")
            kernels.count(id_type)(
                (plan.tiles,), (GRID_THREADS,),
                lookup + (_ptr(out.local_ids), _i32(int(first_window)), _ptr(out.tile_hist), _ptr(out.tile_invalid),
                          keys8, _i32(e0), _i32(wl), _i32(plan.window), tiles),
                shared_mem=plan.smem_count_bytes)
            mark("grid_scan")
            kernels.scan(
                (max(wl, 1),), (SCAN_THREADS,),
                (_ptr(out.tile_hist), tiles, _ptr(out.tile_invalid), _i32(int(first_window)), _ptr(out.expert_counts),
                 _i32(e0), _i32(wl), _ptr(out.group_start), _ptr(out.done), _ptr(out.invalid_count), total_ptr,
                 _i32(plan.block_m), _i32(int(last_window))))
            if aligned:
                mark("grid_place")
                kernels.place(
                    (plan.tiles,), (GRID_THREADS,),
                    (_ptr(out.local_ids), keys8, _i32(nk), _i32(plan.num_local), _ptr(out.tile_hist), tiles,
                     _ptr(out.expert_counts), _ptr(out.group_start), _i32(e0), _i32(wl), _i32(plan.window),
                     sorted_ptr, blocks_ptr, _i32(plan.block_m), _i32(plan.capacity), _i32(int(last_window))),
                    shared_mem=plan.smem_place_bytes)
        mark("end")


def _no_mark(name: str) -> None:
    pass
