"""Build and drive the CPU emulation of ``csrc/preprocess.cu`` (see ``emulator/hc_emulate.h``).

`EmulatedKernels` implements `moe_plugin_cupy_preprocess.launch.KernelSet`, so the real launch sequence
(`launch.launch`) runs the real kernel source on CPU tensors. Needs a C++20 compiler (``g++`` or
``$CXX``); `build` returns ``None`` without one.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moe_plugin_cupy_preprocess.jit import SOURCE_PATH
from moe_plugin_cupy_preprocess.plan import DEFAULT_SMEM_OPTIN

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
    for name in ("emu_block", "emu_count", "emu_scan", "emu_place"):
        getattr(lib, name).restype = ctypes.c_int
    return lib


def _words(args: Sequence[Any]) -> np.ndarray:
    return np.array([int(a) for a in args], dtype=np.int64)


class EmulatedKernels:
    """The kernels of ``preprocess.cu`` run by the emulator; the `launch.KernelSet` interface."""

    smem_optin = DEFAULT_SMEM_OPTIN

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        self.launches: list[tuple[str, int, int, int]] = []  # (kernel, grid, block, smem) in launch order

    def _kernel(self, name: str, call: Callable[[int, int, int, Any], int]) -> Callable[..., None]:
        def run(grid: tuple[int, ...], block: tuple[int, ...], args: Sequence[Any], shared_mem: int = 0) -> None:
            words = _words(args)
            self.launches.append((name, grid[0], block[0], shared_mem))
            rc = call(grid[0], block[0], shared_mem, words.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)))
            if rc != 0:
                raise RuntimeError(f"emulated {name} refused its launch (rc={rc})")
        return run

    def block(self, id_type: str, ipt: int) -> Callable[..., None]:
        id64 = int(id_type == "int64")
        return self._kernel(f"block_preprocess<{id_type},{ipt}>",
                            lambda g, b, s, a: self.lib.emu_block(id64, ipt, ctypes.c_uint(g), ctypes.c_uint(b),
                                                                  ctypes.c_size_t(s), a))

    def count(self, id_type: str) -> Callable[..., None]:
        id64 = int(id_type == "int64")
        return self._kernel(f"grid_count<{id_type}>",
                            lambda g, b, s, a: self.lib.emu_count(id64, ctypes.c_uint(g), ctypes.c_uint(b),
                                                                  ctypes.c_size_t(s), a))

    @property
    def scan(self) -> Callable[..., None]:
        return self._kernel("grid_scan", lambda g, b, s, a: self.lib.emu_scan(ctypes.c_uint(g), ctypes.c_uint(b),
                                                                              ctypes.c_size_t(s), a))

    @property
    def place(self) -> Callable[..., None]:
        return self._kernel("grid_place", lambda g, b, s, a: self.lib.emu_place(ctypes.c_uint(g), ctypes.c_uint(b),
                                                                                ctypes.c_size_t(s), a))

    def context(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()


class FewScanThreads(EmulatedKernels):
    """grid_scan with 32 threads per block: its code is block-size generic, and the emulator spawns an OS
    thread per CUDA thread, so many-expert cases stay fast."""

    @property
    def scan(self) -> Callable[..., None]:
        run = super().scan
        return lambda grid, block, args, shared_mem=0: run(grid, (32,), args, shared_mem)
