"""Compile ``csrc/preprocess.cu`` with CuPy once per process and cache it on disk; launch on torch's stream.

Compilation: one `cupy.RawModule` (NVRTC) holding every template instantiation the launcher uses,
compiled on first use for the current GPU's architecture. CuPy keeps the binary in its kernel cache
directory (``$CUPY_CACHE_DIR``, default ``~/.cupy/kernel_cache``), keyed by source and options, so later
processes load it without compiling; within a process the module and its kernels are cached here.

Launches go straight to the driver (``cuLaunchKernel``, and ``cuLaunchCooperativeKernel`` for
grid_fused, whose grid-wide barriers need every block co-resident: the driver refuses a grid that cannot
be, instead of letting it hang) with the argument blocks `launch.Step` packed once, on
``torch.cuda.current_stream(device)``'s raw handle, so the kernels order with the surrounding torch work
and are captured by ``torch.cuda.graph``. The module is compiled normally: grid_fused builds its barrier
from atomics and needs neither cooperative-groups headers nor relocatable device code. Warm up (`kernels`
+ the first call) before capturing: loading a module is not a stream operation and is not allowed while
a capture is under way.

cluster_lane_preprocess is compiled for clusters of 8 and of 16 blocks; the 16-block kernels are allowed their
non-portable cluster size and used only where the driver says such a cluster fits (`widest_cluster`).

Imports CuPy lazily: importing this module needs no GPU.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .plan import BLOCK_IPTS, BLOCK_THREADS, BLOCK_VARIANTS, CLUSTER_IPTS, CLUSTER_SIZES, CLUSTER_WIDE_SMEM_BYTES, \
    GRID_THREADS, LANE_IPTS, STAGE_KEYED, STAGE_OFFSETS

SOURCE_PATH = Path(__file__).with_name("csrc") / "preprocess.cu"
COMPILE_OPTIONS = ("-std=c++17",)

WARP_KERNEL = "warp_preprocess<{id_type}, {ipt}>"
LANE_KERNEL = "lane_preprocess<{id_type}, {ipt}, {epl}>"
BLOCK_LANE_KERNEL = "block_lane_preprocess<{id_type}, {ipt}, {epl}>"
CLUSTER_LANE_KERNEL = "cluster_lane_preprocess<{id_type}, {ipt}, {epl}, {blocks}>"
LANE_EPLS = (1, 2)  # local experts per lane: plan.experts_per_lane
BLOCK_KERNEL = "block_preprocess<{id_type}, {ipt}, {sub}>"
COUNT_KERNEL = "grid_count<{id_type}>"
FUSED_KERNEL = "grid_fused<{id_type}, {stage_type}>"
STAGE_TYPES = (STAGE_OFFSETS, STAGE_KEYED)  # grid_fused's stage entry types (the C type names)
SCAN_KERNEL = "grid_scan"
PLACE_KERNEL = "grid_place"
EMPTY_KERNEL = "empty_kernel"
ID_TYPES = {"int32": "int", "int64": "long long"}
WARP_IPTS = (1, 4, 16)
DYNAMIC_SMEM_PREFIXES = ("lane_preprocess", "warp_preprocess", "block_lane_preprocess", "cluster_lane_preprocess",
                         "block_preprocess", "grid_count", "grid_place", "grid_fused")
CLUSTER_MIN_MAJOR = 9  # thread-block clusters: compute capability 9.0 (Hopper) and later
COOPERATIVE_LAUNCH_ATTR = 95  # cudaDevAttrCooperativeLaunch
NON_PORTABLE_CLUSTER_ATTR = 14  # CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED


def name_expressions() -> tuple[str, ...]:
    """Every kernel the module exports, as NVRTC name expressions (template instantiations)."""
    names = [WARP_KERNEL.format(id_type=t, ipt=i) for t in ID_TYPES.values() for i in WARP_IPTS]
    names += [LANE_KERNEL.format(id_type=t, ipt=i, epl=e) for t in ID_TYPES.values() for i in LANE_IPTS
              for e in LANE_EPLS]
    names += [BLOCK_LANE_KERNEL.format(id_type=t, ipt=i, epl=e) for t in ID_TYPES.values() for i in BLOCK_IPTS
              for e in LANE_EPLS]
    names += [name for b in CLUSTER_SIZES for name in cluster_kernel_names(b)]
    names += [BLOCK_KERNEL.format(id_type=ID_TYPES[t], ipt=i, sub=s) for t, variants in BLOCK_VARIANTS.items()
              for i, s in variants]
    names += [COUNT_KERNEL.format(id_type=t) for t in ID_TYPES.values()]
    names += [FUSED_KERNEL.format(id_type=t, stage_type=s) for t in ID_TYPES.values() for s in STAGE_TYPES]
    return tuple(names) + (SCAN_KERNEL, PLACE_KERNEL, EMPTY_KERNEL)


def cluster_kernel_names(blocks: int) -> list[str]:
    """cluster_lane_preprocess's instantiations for clusters of ``blocks`` blocks (every id type, ipt and EPL)."""
    return [CLUSTER_LANE_KERNEL.format(id_type=t, ipt=i, epl=e, blocks=blocks) for t in ID_TYPES.values()
            for i in CLUSTER_IPTS for e in LANE_EPLS]


def cache_dir() -> str:
    """Where CuPy caches compiled kernels (``$CUPY_CACHE_DIR`` or ``~/.cupy/kernel_cache``)."""
    return os.environ.get("CUPY_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cupy", "kernel_cache"))


def _module() -> Any:
    """The module of ``csrc/preprocess.cu``, compiled once per process."""
    return _compile(SOURCE_PATH.read_text())


@functools.cache
def _compile(source: str) -> Any:
    import cupy

    return cupy.RawModule(code=source, options=COMPILE_OPTIONS, name_expressions=name_expressions())


@dataclass
class Kernels:
    """The compiled kernels on one device (`launch.KernelSet`), dynamic shared memory raised to the opt-in maximum.

    ``functions`` maps name expressions to the RawKernels, ``pointers`` to their ``CUfunction`` handles;
    ``max_cluster``: the widest thread-block cluster cluster_lane_preprocess runs as here (0: none, 8 or 16).
    """

    device_index: int
    smem_optin: int
    num_sms: int
    cooperative: bool
    max_cluster: int
    functions: dict[str, Any]
    pointers: dict[str, int]

    def handle(self, name: str) -> int:
        return self.pointers[name]

    def fused_occupancy(self, id_type: str) -> Callable[[int], int] | None:
        if not self.cooperative:
            return None
        from cupy.cuda import driver

        # Both stage types have the same resources (launch bounds, registers; shared memory is dynamic).
        fn = self.pointers[FUSED_KERNEL.format(id_type=ID_TYPES[id_type], stage_type=STAGE_TYPES[-1])]
        return lambda smem: int(driver.occupancyMaxActiveBlocksPerMultiprocessor(fn, GRID_THREADS, smem))

    def run(self, steps: Sequence[Any]) -> None:
        """Launch ``steps`` (`launch.Step`) on torch's current stream of this device."""
        if torch.cuda.current_device() != self.device_index:
            with torch.cuda.device(self.device_index):
                self._run(steps)
        else:
            self._run(steps)

    def _run(self, steps: Sequence[Any]) -> None:
        from cupy.cuda import driver

        stream = raw_stream(self.device_index)
        for s in steps:
            if s.cooperative:
                driver.launchCooperativeKernel(s.handle, s.grid, 1, 1, s.block, 1, 1, s.smem, stream, s.argv_ptr)
            else:
                driver.launchKernel(s.handle, s.grid, 1, 1, s.block, 1, 1, s.smem, stream, s.argv_ptr, 0)


_lock = threading.Lock()
_kernels: dict[int, Kernels] = {}


def kernels(device_index: int) -> Kernels:
    """Compile (or load from the disk cache) and return the kernels for ``device_index``; cached per process."""
    found = _kernels.get(device_index)
    if found is not None:
        return found
    with _lock:
        if device_index not in _kernels:
            _kernels[device_index] = kernels_from_source(device_index, SOURCE_PATH.read_text())
        return _kernels[device_index]


def kernels_from_source(device_index: int, source: str) -> Kernels:
    """The kernels of ``source`` (a version of ``csrc/preprocess.cu`` exporting the same kernels) on
    ``device_index``, not cached per device: `bench/preprocess/ab_sources.py` times two versions in one process."""
    import cupy

    with cupy.cuda.Device(device_index):
        module = _compile(source)
        functions = {name: module.get_function(name) for name in name_expressions()}
        optin = smem_optin(device_index)
        for name, fn in functions.items():
            if name.startswith(DYNAMIC_SMEM_PREFIXES):
                # Loads the binary for this device and lets launches ask for up to `optin` bytes.
                fn.max_dynamic_shared_size_bytes = optin - int(fn.shared_size_bytes)
        pointers = {name: int(fn.kernel.ptr) for name, fn in functions.items()}
        runtime = cupy.cuda.runtime
        cooperative = bool(runtime.deviceGetAttribute(COOPERATIVE_LAUNCH_ATTR, device_index))
        props = torch.cuda.get_device_properties(device_index)
        max_cluster = widest_cluster(pointers) if props.major >= CLUSTER_MIN_MAJOR else 0
    return Kernels(device_index, optin, int(props.multi_processor_count), cooperative, max_cluster, functions,
                   pointers)


def widest_cluster(pointers: dict[str, int]) -> int:
    """The widest of `plan.CLUSTER_SIZES` that cluster_lane_preprocess can run as on the current device (sm_90+).

    The portable size always; a wider one is allowed per kernel (non-portable cluster size), then kept only if
    the driver says at least one such cluster of `plan.BLOCK_THREADS` threads and `plan.CLUSTER_WIDE_SMEM_BYTES`
    of dynamic shared memory per block fits (cuOccupancyMaxActiveClusters: a GPU whose GPCs hold fewer SMs, or
    a MIG slice, may not).
    """
    from cupy.cuda import driver

    widest = CLUSTER_SIZES[0]
    for blocks in CLUSTER_SIZES[1:]:
        names = cluster_kernel_names(blocks)
        for name in names:
            driver.funcSetAttribute(pointers[name], NON_PORTABLE_CLUSTER_ATTR, 1)
        if max_active_clusters(pointers[names[0]], blocks, BLOCK_THREADS, CLUSTER_WIDE_SMEM_BYTES) >= 1:
            widest = blocks
    return widest


class _LaunchConfig(ctypes.Structure):
    """CUlaunchConfig of the CUDA driver API (no launch attributes: the kernel's cluster size is compiled in)."""

    _fields_ = [("grid_x", ctypes.c_uint), ("grid_y", ctypes.c_uint), ("grid_z", ctypes.c_uint),
                ("block_x", ctypes.c_uint), ("block_y", ctypes.c_uint), ("block_z", ctypes.c_uint),
                ("shared_mem_bytes", ctypes.c_uint), ("stream", ctypes.c_void_p), ("attrs", ctypes.c_void_p),
                ("num_attrs", ctypes.c_uint)]


def max_active_clusters(function: int, blocks: int, threads: int, smem: int) -> int:
    """cuOccupancyMaxActiveClusters for ``function`` (a CUfunction whose cluster size is ``blocks``) launched as
    ``blocks`` blocks of ``threads`` threads with ``smem`` bytes of dynamic shared memory: how many such clusters
    the device holds at once; 0 where the driver has no such call or refuses."""
    try:
        query = ctypes.CDLL("libcuda.so.1").cuOccupancyMaxActiveClusters
    except (OSError, AttributeError):
        return 0
    count = ctypes.c_int(0)
    config = _LaunchConfig(blocks, 1, 1, threads, 1, 1, smem, None, None, 0)
    status = query(ctypes.byref(count), ctypes.c_void_p(function), ctypes.byref(config))
    return count.value if status == 0 else 0


def smem_optin(device_index: int) -> int:
    """The most shared memory one block may opt in to on this device, in bytes."""
    value = getattr(torch.cuda.get_device_properties(device_index), "shared_memory_per_block_optin", 0)
    if value:
        return int(value)
    import cupy

    return int(cupy.cuda.runtime.deviceGetAttribute(97, device_index))  # cudaDevAttrMaxSharedMemoryPerBlockOptin


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def raw_stream(device_index: int) -> int:
    """The ``cudaStream_t`` of torch's current stream on ``device_index`` (no Python stream object made)."""
    if _raw_stream is not None:
        return int(_raw_stream(device_index))
    return int(torch.cuda.current_stream(device_index).cuda_stream)
