"""Run-time compilation of ``csrc/marlin_moe.cu`` through CuPy, cached in memory and on disk.

`availability` says (cheaply, never raising) whether this machine can run the
kernels. `kernel_set` compiles the instantiations one stage needs (one
activation dtype, grouped or per-channel scales, every tile configuration in
`TILE_CONFIGS`) into one module for one device, with NVRTC by default
(``MOE_MARLIN_JIT_BACKEND=nvcc`` switches to nvcc). CuPy writes the cubin to
its kernel cache (``CUPY_CACHE_DIR``, default ``~/.cupy/kernel_cache``) keyed by
source, options and GPU architecture, so a later process loads it in
milliseconds; within a process `kernel_set` is memoized.

Kernels are launched on the caller's current torch stream (so CUDA-graph
capture through torch records them) with raw device pointers; the caller owns
every buffer.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hostcore.errors import BackendUnavailableError

SOURCE_PATH = Path(__file__).with_name("csrc") / "marlin_moe.cu"
THREADS = 256
"""Threads per GEMM CTA (8 warps); must match ``marlin::THREADS`` in the source."""
SMEM_PER_CTA = {1: 72 * 1024, 2: 110 * 1024, 4: 110 * 1024}
"""Shared-memory budget of one GEMM CTA by ``m_tiles``: the kernel's launch bounds give 3 CTAs per SM for
16-row tiles (<= 80 registers) and 2 for 32 rows (228 KiB of shared memory per SM on Hopper)."""
RESIDENT_CTAS_PER_SM = {1: 3, 2: 2, 4: 1}
"""GEMM CTAs that run at once on one SM by ``m_tiles``: the minimum blocks of the kernel's launch bounds
(registers) within `SMEM_PER_CTA`; the tile planner counts waves with it."""
MAX_STAGES = 8
ALIGN_THREADS = 1024
MAX_LOCAL_EXPERTS = 4096
"""The align kernel keeps 3 ints per local expert in shared memory (48 KiB)."""

INSTALL_HINT = "pip install 'moe-plugin-marlin[cuda13]' (or [cuda12] on CUDA 12)"


@dataclass(frozen=True)
class TileConfig:
    """One GEMM tile shape: ``bm = 16*m_tiles`` rows, ``tn = 64*n_warps`` columns, ``tk`` per pipeline stage.

    The 8 warps split as ``n_warps`` column slices x ``k_warps = 8 / n_warps``
    K slices; each warp handles ``kw`` 16-deep steps per stage.
    """

    m_tiles: int
    n_warps: int
    kw: int = 2
    stages: int = 0
    """cp.async pipeline depth; 0 = as many as fit `SMEM_PER_CTA` (at most `MAX_STAGES`), see `resolved`."""

    @property
    def bm(self) -> int:
        return 16 * self.m_tiles

    @property
    def tn(self) -> int:
        return 64 * self.n_warps

    @property
    def k_warps(self) -> int:
        return 8 // self.n_warps

    @property
    def tk(self) -> int:
        return 16 * self.k_warps * self.kw

    def stage_bytes(self, grouped: bool) -> int:
        """Shared memory of one pipeline stage: B tile + A tile + (``grouped``) scale rows.

        The scale area is the worst case, ``tk / 16`` rows (group size 16), for every group size: the
        kernel's stage offsets are compile-time constants that way (``S_BYTES`` in csrc/marlin_moe.cu, a
        run-time multiply per stage address otherwise). Costs at most ``tk * tn / 8`` bytes per stage.
        """
        b = self.tk * self.tn // 2
        a = self.bm * self.tk * 2
        s = (self.tk // 16) * self.tn * 2 if grouped else 0
        return a + b + s

    def resolved(self) -> TileConfig:
        """This configuration with a concrete stage count (``MOE_MARLIN_STAGES`` overrides, for experiments)."""
        if self.stages:
            return self
        forced = int(os.environ.get("MOE_MARLIN_STAGES") or 0)
        n = forced or max(2, min(MAX_STAGES, SMEM_PER_CTA[self.m_tiles] // self.stage_bytes(True)))
        return TileConfig(self.m_tiles, self.n_warps, self.kw, n)

    @property
    def red_bytes(self) -> int:
        """Shared memory of the cross-warp (K_WARPS) reduction of one tile's fp32 sums."""
        return (self.k_warps - 1) * self.n_warps * self.m_tiles * 32 * 32 * 4

    def smem_bytes(self, grouped: bool) -> int:
        """Dynamic shared memory of `moe_marlin_gemm` with (``grouped``) or without group scales: the
        pipeline, or the cross-warp reduction if larger."""
        stages = self.stages or self.resolved().stages
        return max(stages * self.stage_bytes(grouped), self.red_bytes)


TILE_CONFIGS: tuple[TileConfig, ...] = tuple(c.resolved() for c in (
    TileConfig(1, 4), TileConfig(1, 2), TileConfig(1, 1),
    TileConfig(2, 4), TileConfig(2, 2),
    TileConfig(4, 4),
))
"""Every configuration compiled for a stage (12 GEMM kernels with both GEMMs)."""

def availability() -> str | None:
    """``None`` if the kernels can run here, else why not. Cheap; never raises."""
    try:
        if importlib.util.find_spec("cupy") is None:
            return f"needs CuPy: {INSTALL_HINT}"
        if not torch.cuda.is_available():
            return "needs a CUDA GPU of compute capability >= 8.0 (torch sees no CUDA device)"
        major, minor = torch.cuda.get_device_capability()
        if major < 8:
            return f"needs a CUDA GPU of compute capability >= 8.0 (found {major}.{minor})"
    except Exception as exc:  # availability must never raise
        return f"cannot query the CUDA device: {exc}"
    return None


def import_cupy() -> Any:
    """CuPy, or `BackendUnavailableError` saying how to install it."""
    try:
        import cupy
    except Exception as exc:
        raise BackendUnavailableError(f"the marlin experts backend needs CuPy ({exc}): {INSTALL_HINT}") from exc
    return cupy


def gemm_name(bf16: bool, cfg: TileConfig, grouped: bool, gemm2: bool) -> str:
    """Name expression of one `moe_marlin_gemm` instantiation."""
    b = lambda v: "true" if v else "false"  # noqa: E731
    return (f"marlin::moe_marlin_gemm<{b(bf16)},{cfg.m_tiles},{cfg.n_warps},{cfg.kw},{cfg.stages},{b(grouped)},"
            f"{b(gemm2)}>")


def sum_name(bf16: bool) -> str:
    return f"marlin::moe_marlin_topk_sum<{'true' if bf16 else 'false'}>"


ALIGN_NAME = "moe_marlin_align"


class KernelSet:
    """The compiled kernels of one (device, dtype, scale layout), ready to launch.

    ``gemm[(cfg, gemm2)]`` are CuPy ``RawKernel`` objects with their dynamic
    shared-memory limit raised for the scale layout; ``align`` and ``topk_sum``
    likewise; ``smem[cfg]`` is the dynamic shared memory a GEMM launch of ``cfg``
    passes (one size for every group size, see `TileConfig.stage_bytes`).
    Built once per process and cached (`kernel_set`).
    """

    def __init__(self, device_index: int, bf16: bool, group_size: int | None) -> None:
        cupy = import_cupy()
        self.device_index = device_index
        self.bf16 = bf16
        self.group_size = group_size
        grouped = group_size is not None
        names = [gemm_name(bf16, c, grouped, g2) for c in TILE_CONFIGS for g2 in (False, True)]
        names += [sum_name(bf16)]
        backend = os.environ.get("MOE_MARLIN_JIT_BACKEND", "nvrtc")
        with cupy.cuda.Device(device_index):
            try:
                self.module = _compile(cupy, backend, names)
                self.module.get_function(names[0])  # compiles now
            except Exception as exc:
                if backend != "nvrtc":
                    raise
                # NVRTC is the fast path; nvcc (from the CUDA toolkit) is the fallback if it rejects something.
                warnings.warn(f"NVRTC failed to compile the marlin kernels ({str(exc)[:200]}); trying nvcc",
                              RuntimeWarning, stacklevel=2)
                self.module = _compile(cupy, "nvcc", names)
            self.gemm: dict[tuple[TileConfig, bool], Any] = {}
            self.smem: dict[TileConfig, int] = {}
            for cfg in TILE_CONFIGS:
                self.smem[cfg] = cfg.smem_bytes(grouped)
                for g2 in (False, True):
                    fn = self.module.get_function(gemm_name(bf16, cfg, grouped, g2))
                    fn.max_dynamic_shared_size_bytes = self.smem[cfg]
                    self.gemm[(cfg, g2)] = fn
            self.topk_sum = self.module.get_function(sum_name(bf16))
            self.align = self.module.get_function(ALIGN_NAME)
            self.align.max_dynamic_shared_size_bytes = 3 * 4 * MAX_LOCAL_EXPERTS
        self._streams: dict[int, Any] = {}
        self._lock = threading.Lock()

    def stream(self, torch_stream: torch.cuda.Stream) -> Any:
        """A CuPy view of ``torch_stream`` (cached), to launch on it."""
        ptr = int(torch_stream.cuda_stream)
        with self._lock:
            s = self._streams.get(ptr)
            if s is None:
                cupy = import_cupy()
                s = cupy.cuda.ExternalStream(ptr, self.device_index)
                self._streams[ptr] = s
        return s


def _compile(cupy: Any, backend: str, names: list[str]) -> Any:
    options: tuple[str, ...] = ("-std=c++17",) if backend == "nvrtc" else ("-std=c++17", "-O3")
    extra = os.environ.get("MOE_MARLIN_NVRTC_OPTIONS", "").split()  # diagnostics, e.g. -lineinfo
    options += tuple(extra)
    return cupy.RawModule(code=SOURCE_PATH.read_text(), options=options, backend=backend, name_expressions=names)


@functools.lru_cache(maxsize=None)
def kernel_set(device_index: int, bf16: bool, group_size: int | None) -> KernelSet:
    """The compiled `KernelSet` for this device, dtype and scale layout (compiles on first use)."""
    return KernelSet(device_index, bf16, group_size)
