"""Build and drive the CPU emulation of ``csrc/preprocess.cu`` (see ``emulator/hc_emulate.h``).

`EmulatedKernels` implements `moe_plugin_cupy_preprocess.launch.KernelSet`, so the real launch sequence
(`launch.launch`) runs the real kernel source on CPU tensors. Needs a C++20 compiler (``g++`` or
``$CXX``); `build` returns ``None`` without one.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from moe_plugin_cupy_preprocess.jit import SOURCE_PATH, name_expressions
from moe_plugin_cupy_preprocess.plan import DEFAULT_SMEM_OPTIN, STAGE_OFFSETS, default_fused_occupancy

HERE = Path(__file__).parent / "emulator"


def _emulation_source() -> str:
    """The kernel source with CUDA shared-memory declarations rewritten for the emulator."""
    text = SOURCE_PATH.read_text()
    dynamic = "extern __shared__ int smem[];"
    assert dynamic in text, "the kernels declare their dynamic shared memory as `extern __shared__ int smem[];`"
    text = text.replace(dynamic, "int* smem = hc_dynamic_smem;")
    return text.replace("__shared__ ", "static ")  # static shared arrays: one per block, blocks run in turn


def build(workdir: Path) -> ctypes.CDLL | None:
    """Compile the emulator into ``workdir`` (reused while the sources are unchanged); ``None`` without g++."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        return None
    source = _emulation_source()
    digest = hashlib.sha256((source + (HERE / "hc_emulate.h").read_text() + (HERE / "driver.cpp").read_text())
                            .encode()).hexdigest()[:16]
    out = workdir / f"hc_emulate_{digest}.so"
    if not out.exists():
        (workdir / "preprocess_emu.inc").write_text(source)
        cmd = [compiler, "-std=c++20", "-O1", "-g", "-pthread", "-shared", "-fPIC", f"-I{workdir}", f"-I{HERE}",
               str(HERE / "driver.cpp"), "-o", str(out)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"building the emulator failed:\n{' '.join(cmd)}\n{result.stderr}")
    lib = ctypes.CDLL(str(out))
    for name in ("emu_lane", "emu_warp", "emu_block_lane", "emu_cluster_lane", "emu_block", "emu_count", "emu_scan",
                 "emu_place", "emu_fused", "emu_smem_overflows"):
        getattr(lib, name).restype = ctypes.c_int
    return lib


class EmulatedKernels:
    """The kernels of ``preprocess.cu`` run by the emulator; the `launch.KernelSet` interface.

    Handles are the kernels' name expressions (as `jit.name_expressions` lists them). ``num_sms`` is
    small so that the fused grid has a few blocks of several tiles each, like a GPU at larger sizes.
    """

    smem_optin = DEFAULT_SMEM_OPTIN
    num_sms = 2
    max_cluster = 16  # as an H100 SXM: the block path takes cluster_lane_preprocess where the plan allows it
    scan_threads: int | None = None  # grid_scan's block size (None: as launched)

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        self.launches: list[tuple[str, int, int, int]] = []  # (kernel, grid, block, smem) in launch order
        self._entry: dict[str, Callable[[int, int, int, Any], int]] = {}
        for name in name_expressions():
            base, _, targs = name.partition("<")
            params = [t.strip() for t in targs.rstrip(">").split(",")] if targs else []
            id64 = int(bool(params) and params[0] == "long long")
            if base == "lane_preprocess":
                self._entry[name] = functools.partial(self._call, lib.emu_lane, id64, int(params[1]), int(params[2]))
            elif base == "warp_preprocess":
                self._entry[name] = functools.partial(self._call, lib.emu_warp, id64, int(params[1]))
            elif base == "block_lane_preprocess":
                self._entry[name] = functools.partial(self._call, lib.emu_block_lane, id64, int(params[1]),
                                                      int(params[2]))
            elif base == "cluster_lane_preprocess":
                self._entry[name] = functools.partial(self._call, lib.emu_cluster_lane, id64, int(params[1]),
                                                      int(params[2]), int(params[3]))
            elif base == "block_preprocess":
                self._entry[name] = functools.partial(self._call, lib.emu_block, id64, int(params[1]), int(params[2]))
            elif base == "grid_count":
                self._entry[name] = functools.partial(self._call, lib.emu_count, id64)
            elif base == "grid_fused":
                self._entry[name] = functools.partial(self._call, lib.emu_fused, id64,
                                                      int(params[1] == STAGE_OFFSETS))
            elif base == "grid_scan":
                self._entry[name] = functools.partial(self._call, lib.emu_scan)
            elif base == "grid_place":
                self._entry[name] = functools.partial(self._call, lib.emu_place)

    @staticmethod
    def _call(fn: Any, *lead_and_launch: Any) -> int:
        *lead, grid, block, smem, words = lead_and_launch
        return fn(*lead, ctypes.c_uint(grid), ctypes.c_uint(block), ctypes.c_size_t(smem),
                  words.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)))

    def handle(self, name: str) -> str:
        if name not in self._entry:
            raise KeyError(f"the emulator has no kernel {name!r}")
        return name

    def fused_occupancy(self, id_type: str) -> Callable[[int], int] | None:
        return default_fused_occupancy

    def run(self, steps: Sequence[Any]) -> None:
        for step in steps:
            block = step.block
            if step.name == "grid_scan" and self.scan_threads:
                block = self.scan_threads
            self.launches.append((step.handle, step.grid, block, step.smem))
            rc = self._entry[step.handle](step.grid, block, step.smem, step.words)
            if rc != 0:
                raise RuntimeError(f"emulated {step.handle} refused its launch (rc={rc})")
            overflows = self.lib.emu_smem_overflows()
            if overflows:
                raise RuntimeError(f"emulated {step.handle}: {overflows} of its {step.grid} blocks wrote past the "
                                   f"{step.smem} bytes of dynamic shared memory it was launched with")


class FewScanThreads(EmulatedKernels):
    """grid_scan with 32 threads per block: its code is block-size generic, and the emulator spawns an OS
    thread per CUDA thread, so many-expert cases stay fast."""

    scan_threads = 32
