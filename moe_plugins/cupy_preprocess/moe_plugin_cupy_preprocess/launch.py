"""Kernel launches for one `Plan`: argument blocks built once, then one cheap launch call per kernel.

The arguments of every launch of a sequence are packed once per (buffers, stage configuration) into an
``int64`` word array (device pointers of the torch tensors, int32 sizes in the low half of a word: the
driver copies each parameter with its own size from the word's address, little-endian) and an array of
the words' addresses (the ``void** kernelParams`` of ``cuLaunchKernel``). A call only writes the ids'
pointer into the words that hold it and launches: no per-call argument conversion, no CuPy stream or
device objects (the old path spent ~30 us of host time per call there). The kernels read and write the
torch tensors' memory directly, on torch's current stream; nothing here allocates or synchronises, so a
sequence is safe to capture in a CUDA graph once the kernels are loaded.

Why a `Sequence` is cached on the buffers: every pointer in it except the ids' belongs to the buffers or
the stage (map), so the words are valid for as long as the buffers are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence as Seq
from typing import Any, Protocol

import numpy as np
import torch

from .buffers import PreprocessBuffers
from .plan import GRID_THREADS, SCAN_THREADS, MapChoice, Plan

ID_TYPES = {torch.int32: "int32", torch.int64: "int64"}


class Step:
    """One kernel launch: the kernel's handle, launch shape and its packed argument words.

    ``words[0]`` is the ids' pointer when ``takes_ids``; ``argv`` holds the address of every word.
    """

    __slots__ = ("name", "handle", "grid", "block", "smem", "cooperative", "words", "argv", "argv_ptr", "takes_ids")

    def __init__(self, name: str, handle: Any, grid: int, block: int, smem: int, args: Seq[int],
                 cooperative: bool = False, takes_ids: bool = False) -> None:
        self.name = name
        self.handle = handle
        self.grid, self.block, self.smem = grid, block, smem
        self.cooperative = cooperative
        self.takes_ids = takes_ids
        self.words = np.array([int(a) for a in args], dtype=np.int64)
        base = self.words.ctypes.data
        self.argv = np.arange(base, base + 8 * len(args), 8, dtype=np.uint64)
        self.argv_ptr = int(self.argv.ctypes.data)


class KernelSet(Protocol):
    """What `launch` needs: the compiled kernels (`jit.Kernels`), or a CPU emulation of them in the tests."""

    smem_optin: int  # the most dynamic shared memory a block may ask for, in bytes
    num_sms: int  # streaming multiprocessors: the fused grid is sized from them
    max_cluster: int  # the widest thread-block cluster that can be launched (0: none; 8 or 16, sm_90+)

    def handle(self, name: str) -> Any:
        """The launchable handle of the kernel named by its jit name expression."""
        ...

    def fused_occupancy(self, id_type: str) -> Callable[[int], int] | None:
        """Co-resident grid_fused blocks per SM for a given dynamic shared memory; ``None`` without
        cooperative launches (the grid path then takes three launches)."""
        ...

    def run(self, steps: Seq[Step]) -> None:
        """Launch ``steps`` in order on the current stream (torch's, on the kernels' device)."""
        ...


class Sequence:
    """The launches of one plan into one set of buffers; `run` patches the ids pointer and launches."""

    __slots__ = ("steps", "id_steps", "shape", "dtype", "device_index", "routing", "slab_words")

    def __init__(self, steps: list[Step], shape: tuple[int, int], dtype: torch.dtype, device_index: int) -> None:
        self.steps = steps
        self.id_steps = [s.words for s in steps if s.takes_ids]
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.device_index = device_index  # torch.Tensor.get_device() of the ids (-1: CPU, emulation)
        self.routing: Any = None  # the stage's cached LocalRouting view of the buffers
        self.slab_words: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (words, which, offset): `rebase`

    def set_ids(self, ids_ptr: int) -> None:
        for words in self.id_steps:
            words[0] = ids_ptr

    def track_slab(self, slab: torch.Tensor) -> None:
        """Remember which argument words point into ``slab`` (the allocation the sequence's buffers were carved
        from, `PreprocessBuffers.allocate`) and where, so that `rebase` can point them at another slab of the
        same layout. Every other word stays: the map's and the ids' pointers (other allocations), null pointers
        and the int32 sizes (below 2**31, where no allocation lies). (An empty buffer at the slab's very end points
        one past it and keeps its first address: nothing reads through it.)"""
        base, end = slab.data_ptr(), slab.data_ptr() + slab.numel() * slab.element_size()
        self.slab_words = []
        for step in self.steps:
            which = np.nonzero((step.words >= base) & (step.words < end))[0]
            self.slab_words.append((step.words, which, step.words[which] - base))

    def rebase(self, slab: torch.Tensor) -> None:
        """Point the words `track_slab` found at the same offsets of ``slab`` (the driver copies the words at
        each launch, so earlier launches keep theirs)."""
        base = slab.data_ptr()
        for words, which, offset in self.slab_words:
            words[which] = offset + base


def _ptr(t: torch.Tensor | None) -> int:
    return t.data_ptr() if t is not None else 0


def build_sequence(kernels: KernelSet, plan: Plan, device_map: torch.Tensor | None, map_choice: MapChoice, first: int,
                   faithful: bool, out: PreprocessBuffers, device_index: int) -> Sequence:
    """Pack the launches of ``plan`` into ``out`` (the ids pointer is set per call by `Sequence.set_ids`).

    ``device_map`` is the map's device copy (its entries start at ``device_map.data_ptr()``), ``None``
    without a map; ``first`` is the first local global id without a map.
    """
    id_type = ID_TYPES[plan.id_dtype]
    id_name = {"int32": "int", "int64": "long long"}[id_type]
    nk = plan.num_slots
    lookup = [0, nk, _ptr(device_map), map_choice.size, map_choice.mode, int(faithful), first, plan.num_local]
    aligned = plan.block_m > 0
    sorted_ptr = _ptr(out.sorted_slot_ids) if aligned else 0
    blocks_ptr = _ptr(out.block_expert_ids) if aligned else 0
    total_ptr = _ptr(out.num_slots_post_padded) if aligned else 0
    shape = (plan.rows, plan.top_k)
    # The single-launch kernels' parameters start alike: lookup, then every output, block_m and capacity.
    outputs = lookup + [_ptr(out.local_ids), _ptr(out.expert_counts), _ptr(out.invalid_count), sorted_ptr,
                        blocks_ptr, total_ptr, plan.block_m, plan.capacity]
    if plan.path == "warp":
        kernel = plan.kernel_names[0]
        params = f"{id_name}, {plan.ipt}, {plan.experts_per_lane}" if plan.lanes else f"{id_name}, {plan.ipt}"
        step = Step(kernel, kernels.handle(f"{kernel}<{params}>"), 1, 32, plan.smem_block_bytes, outputs,
                    takes_ids=True)
        return Sequence([step], shape, plan.id_dtype, device_index)
    if plan.cluster:
        name = f"cluster_lane_preprocess<{id_name}, {plan.ipt}, {plan.experts_per_lane}, {plan.grid_blocks}>"
        step = Step("cluster_lane_preprocess", kernels.handle(name), plan.grid_blocks, plan.block_threads,
                    plan.smem_block_bytes, outputs, takes_ids=True)
        return Sequence([step], shape, plan.id_dtype, device_index)
    if plan.path == "block" and plan.lanes:
        name = f"block_lane_preprocess<{id_name}, {plan.ipt}, {plan.experts_per_lane}>"
        step = Step("block_lane_preprocess", kernels.handle(name),
                    plan.grid_blocks, plan.block_threads, plan.smem_block_bytes, outputs + [plan.owned_rows],
                    takes_ids=True)
        return Sequence([step], shape, plan.id_dtype, device_index)
    if plan.path == "block":
        name = f"block_preprocess<{id_name}, {plan.ipt}, {plan.sub}>"
        step = Step("block_preprocess", kernels.handle(name), plan.grid_blocks, plan.block_threads,
                    plan.smem_block_bytes, outputs + [plan.window, plan.active_warps, plan.owned_rows],
                    takes_ids=True)
        return Sequence([step], shape, plan.id_dtype, device_index)
    if plan.fused:
        if out.done.data_ptr() % 8:
            raise ValueError(f"PreprocessBuffers.done must be 8-byte aligned (grid_fused keeps a 64-bit barrier count "
                             f"in it), got address {out.done.data_ptr():#x}; allocate buffers with make_buffers()")
        step = Step("grid_fused", kernels.handle(f"grid_fused<{id_name}, {plan.stage_type}>"), plan.grid_blocks,
                    GRID_THREADS, plan.smem_fused_bytes,
                    outputs + [_ptr(out.tile_hist), _ptr(out.tile_invalid), _ptr(out.done), plan.chunk,
                               plan.list_cap, int(plan.two_phase), plan.stage_cap, plan.group_blocks],
                    cooperative=True, takes_ids=True)
        return Sequence([step], shape, plan.id_dtype, device_index)
    steps = []
    windows = plan.window_bounds()
    keys8 = _ptr(out.keys8) if plan.keys8_bytes else 0
    count, scan, place = kernels.handle(f"grid_count<{id_name}>"), kernels.handle("grid_scan"), \
        kernels.handle("grid_place")
    for w, (e0, wl) in enumerate(windows):
        first_window, last_window = int(w == 0), int(w == len(windows) - 1)
        steps.append(Step("grid_count", count, plan.tiles, GRID_THREADS, plan.smem_count_bytes,
                          lookup + [_ptr(out.local_ids), first_window, _ptr(out.tile_hist), _ptr(out.tile_invalid),
                                    keys8, e0, wl, plan.window, plan.tiles], takes_ids=True))
        steps.append(Step("grid_scan", scan, max(wl, 1), SCAN_THREADS, 0,
                          [_ptr(out.tile_hist), plan.tiles, _ptr(out.tile_invalid), first_window,
                           _ptr(out.expert_counts), e0, wl, _ptr(out.group_start), _ptr(out.done),
                           _ptr(out.invalid_count), total_ptr, plan.block_m, last_window]))
        if aligned:
            steps.append(Step("grid_place", place, plan.tiles, GRID_THREADS, plan.smem_place_bytes,
                              [_ptr(out.local_ids), keys8, nk, plan.num_local, _ptr(out.tile_hist), plan.tiles,
                               _ptr(out.expert_counts), _ptr(out.group_start), e0, wl, plan.window, sorted_ptr,
                               blocks_ptr, plan.block_m, plan.capacity, last_window]))
    return Sequence(steps, shape, plan.id_dtype, device_index)


def sequence_key(kernels: KernelSet, device_map: torch.Tensor | None, map_choice: MapChoice, first: int,
                 faithful: bool) -> tuple[Any, ...]:
    """What a `Sequence` depends on besides its buffers: the key of ``PreprocessBuffers.launch_cache``.

    Made of the values that go into the argument words, not of object identities, so that a cached
    sequence is right for any stage with the same key (even one built after the first was collected).
    """
    return (id(kernels), _ptr(device_map), map_choice, first, faithful)


def sequence_for(kernels: KernelSet, plan: Plan, device_map: torch.Tensor | None, map_choice: MapChoice, first: int,
                 faithful: bool, out: PreprocessBuffers, device_index: int) -> Sequence:
    """The cached `Sequence` for this stage configuration in ``out`` (built on first use)."""
    key = sequence_key(kernels, device_map, map_choice, first, faithful)
    seq = out.launch_cache.get(key)
    if seq is None:
        seq = out.launch_cache[key] = build_sequence(kernels, plan, device_map, map_choice, first, faithful, out,
                                                     device_index)
    return seq


def launch(kernels: KernelSet, plan: Plan, topk_ids: torch.Tensor, device_map: torch.Tensor | None,
           map_choice: MapChoice, first: int, faithful: bool, out: PreprocessBuffers,
           marks: Callable[[str], None] | None = None) -> None:
    """Run the plan's kernels on ``topk_ids`` (contiguous, on the device) into ``out``.

    ``marks`` (benchmarks only) is called with a kernel's name before each launch and with ``"end"``
    after the last one, e.g. to record CUDA events between the kernels.
    """
    seq = sequence_for(kernels, plan, device_map, map_choice, first, faithful, out, topk_ids.get_device())
    seq.set_ids(topk_ids.data_ptr())
    if marks is None:
        kernels.run(seq.steps)
        return
    for step in seq.steps:
        marks(step.name)
        kernels.run((step,))
    marks("end")
