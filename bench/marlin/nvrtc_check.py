#!/usr/bin/env python3
"""Compile every kernel instantiation a stage can ask for through NVRTC, without a GPU or CuPy.

Uses libnvrtc directly (ctypes; ``--lib`` or ``$NVRTC_LIB``) with the options jit.py gives CuPy
(``-std=c++17``, the name expressions of `jit.KernelSet` for bf16/fp16 x grouped/per-channel) for ``--arch``
(default sm_90), then prints each kernel's registers and spills
(ptxas -v through the NVRTC log). Exit status 1 when NVRTC rejects the source. An offline check only:
the GPU run compiles the same source through CuPy.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shutil
import subprocess
import sys


def _check(lib: ctypes.CDLL, rc: int, what: str) -> None:
    if rc != 0:
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise RuntimeError(f"{what}: {lib.nvrtcGetErrorString(rc).decode()}")


def compile_names(lib_path: str, source: str, names: list[str], arch: str, options: list[str]) -> tuple[bytes, str]:
    """(cubin, NVRTC log) of ``source`` with ``names`` instantiated; RuntimeError (log printed) on failure."""
    lib = ctypes.CDLL(lib_path)
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"marlin_moe.cu", 0, None, None), "create")
    for n in names:
        _check(lib, lib.nvrtcAddNameExpression(prog, n.encode()), f"name {n}")
    opts = [f"-arch={arch}".encode(), *(o.encode() for o in options)]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    text = log.value.decode(errors="replace")
    if rc != 0:
        print(text, file=sys.stderr)
    _check(lib, rc, "compile")
    lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
    cubin = ctypes.create_string_buffer(size.value)
    _check(lib, lib.nvrtcGetCUBIN(prog, cubin), "cubin")
    return cubin.raw, text


def resource_table(log: str) -> list[str]:
    """One line per kernel from ptxas' ``-v`` report: registers, spill stores/loads (bytes)."""
    rows, name, spill = [], None, ("?", "?")
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            dm = subprocess.run(["c++filt", m.group(1)], capture_output=True, text=True).stdout.strip() \
                if shutil.which("c++filt") else m.group(1)
            name = dm.split("(")[0].replace("void ", "").replace("marlin::", "")
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            spill = m.groups()
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            rows.append(f"  {name:58s} regs {m.group(1):>3s}  spill st/ld {spill[0]}/{spill[1]} B")
            name = None
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", default=os.environ.get("NVRTC_LIB", "libnvrtc.so.13"))
    ap.add_argument("--arch", default="sm_90")
    args = ap.parse_args()
    from moe_plugin_marlin import jit

    names = [jit.ALIGN_NAME]
    for bf16 in (True, False):
        for grouped in (True, False):
            names += [jit.gemm_name(bf16, c, grouped, g2) for c in jit.TILE_CONFIGS for g2 in (False, True)]
        names.append(jit.sum_name(bf16))
    cubin, log = compile_names(args.lib, jit.SOURCE_PATH.read_text(), names, args.arch, ["-std=c++17", "-Xptxas=-v"])
    print(f"NVRTC {args.arch}: {len(names)} kernels, cubin {len(cubin)} bytes")
    print("\n".join(resource_table(log)))


if __name__ == "__main__":
    main()
