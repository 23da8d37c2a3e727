"""Compile ``csrc/preprocess.cu`` with CuPy once per process and cache it on disk; launch on torch's stream.

Compilation: one `cupy.RawModule` (NVRTC) holding every template instantiation the launcher uses,
compiled on first use for the current GPU's architecture. CuPy keeps the binary in its kernel cache
directory (``$CUPY_CACHE_DIR``, default ``~/.cupy/kernel_cache``), keyed by source and options, so later
processes load it without compiling; within a process the module and its kernels are cached here.

Streams: every launch goes to ``torch.cuda.current_stream(device)``, wrapped (not copied) as a
`cupy.cuda.ExternalStream`, so the kernels order with the surrounding torch work and are captured by
``torch.cuda.graph``. Warm up (`kernels` + the first call) before capturing: loading a module is not a
stream operation and is not allowed while a capture is under way.

Imports CuPy lazily: importing this module needs no GPU.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SOURCE_PATH = Path(__file__).with_name("csrc") / "preprocess.cu"
COMPILE_OPTIONS = ("-std=c++17",)

BLOCK_KERNEL = "block_preprocess<{id_type}, {ipt}>"
COUNT_KERNEL = "grid_count<{id_type}>"
SCAN_KERNEL = "grid_scan"
PLACE_KERNEL = "grid_place"
EMPTY_KERNEL = "empty_kernel"
ID_TYPES = {"int32": "int", "int64": "long long"}
BLOCK_IPTS = (1, 4, 16)
DYNAMIC_SMEM_KERNELS = ("block", "count", "place")


def name_expressions() -> tuple[str, ...]:
    """Every kernel the module exports, as NVRTC name expressions (template instantiations)."""
    names = [BLOCK_KERNEL.format(id_type=t, ipt=i) for t in ID_TYPES.values() for i in BLOCK_IPTS]
    names += [COUNT_KERNEL.format(id_type=t) for t in ID_TYPES.values()]
    return tuple(names) + (SCAN_KERNEL, PLACE_KERNEL, EMPTY_KERNEL)


def cache_dir() -> str:
    """Where CuPy caches compiled kernels (``$CUPY_CACHE_DIR`` or ``~/.cupy/kernel_cache``)."""
    return os.environ.get("CUPY_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cupy", "kernel_cache"))


@functools.cache
def _module() -> Any:
    import cupy

    return cupy.RawModule(code=SOURCE_PATH.read_text(), options=COMPILE_OPTIONS, name_expressions=name_expressions())


@dataclass
class Kernels:
    """The compiled kernels on one device, with their dynamic shared-memory limit raised to the opt-in maximum."""

    device_index: int
    smem_optin: int
    functions: dict[str, Any]

    def block(self, id_type: str, ipt: int) -> Any:
        return self.functions[BLOCK_KERNEL.format(id_type=ID_TYPES[id_type], ipt=ipt)]

    def count(self, id_type: str) -> Any:
        return self.functions[COUNT_KERNEL.format(id_type=ID_TYPES[id_type])]

    @property
    def scan(self) -> Any:
        return self.functions[SCAN_KERNEL]

    @property
    def place(self) -> Any:
        return self.functions[PLACE_KERNEL]

    @property
    def empty(self) -> Any:
        return self.functions[EMPTY_KERNEL]

    def context(self) -> contextlib.ExitStack:
        """Make this device and torch's current stream on it CuPy's current ones for the launches inside."""
        import cupy

        stack = contextlib.ExitStack()
        stack.enter_context(cupy.cuda.Device(self.device_index))
        stack.enter_context(current_stream(self.device_index))
        return stack


_lock = threading.Lock()
_kernels: dict[int, Kernels] = {}


def kernels(device_index: int) -> Kernels:
    """Compile (or load from the disk cache) and return the kernels for ``device_index``; cached per process."""
    found = _kernels.get(device_index)
    if found is not None:
        return found
    import cupy

    device = cupy.cuda.Device(device_index)
    with _lock, device:
        if device_index in _kernels:
            return _kernels[device_index]
        module = _module()
        functions = {name: module.get_function(name) for name in name_expressions()}
        optin = smem_optin(device_index)
        for name, fn in functions.items():
            if name.startswith(("block_preprocess", "grid_count", "grid_place")):
                # Loads the binary for this device and lets launches ask for up to `optin` bytes.
                fn.max_dynamic_shared_size_bytes = optin - int(fn.shared_size_bytes)
        _kernels[device_index] = Kernels(device_index, optin, functions)
        return _kernels[device_index]


def smem_optin(device_index: int) -> int:
    """The most shared memory one block may opt in to on this device, in bytes."""
    import torch

    value = getattr(torch.cuda.get_device_properties(device_index), "shared_memory_per_block_optin", 0)
    if value:
        return int(value)
    import cupy

    return int(cupy.cuda.runtime.deviceGetAttribute(97, device_index))  # cudaDevAttrMaxSharedMemoryPerBlockOptin


_streams: dict[tuple[int, int], Any] = {}


def current_stream(device_index: int) -> Any:
    """torch's current stream on ``device_index`` as a `cupy.cuda.ExternalStream` (cached per stream handle)."""
    import cupy
    import torch

    handle = int(torch.cuda.current_stream(device_index).cuda_stream)
    key = (device_index, handle)
    stream = _streams.get(key)
    if stream is None:
        # ExternalStream wraps the handle without owning it (it never destroys torch's stream); CuPy 14
        # deprecates it in favour of Stream.from_external, whose objects are Streams that destroy their
        # handle when collected. The wrapper is made once per stream and kept for the process.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            stream = _streams[key] = cupy.cuda.ExternalStream(handle, device_index)
    return stream
