"""Fake of ``flashinfer.jit.comm.gen_moe_alltoall_module``: a JIT spec whose build writes a file.

The artifact lives under ``$FAKE_FLASHINFER_JIT_DIR`` (default: a per-process
temp dir). ``FAKE_FLASHINFER_BUILD_S`` makes the build take that long, and
``FAKE_FLASHINFER_BUILD_FAIL`` makes it fail like a broken nvcc run.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

BUILDS: Counter = Counter()
_DEFAULT_DIR = Path(tempfile.mkdtemp(prefix="fake_flashinfer_jit_"))


def _jit_dir() -> Path:
    return Path(os.environ.get("FAKE_FLASHINFER_JIT_DIR", str(_DEFAULT_DIR)))


class FakeJitSpec:
    def __init__(self, name: str) -> None:
        self.name = name

    @property
    def jit_library_path(self) -> Path:
        return _jit_dir() / self.name / f"{self.name}.so"

    def get_library_path(self) -> Path:
        return self.jit_library_path

    @property
    def is_compiled(self) -> bool:
        return self.get_library_path().exists()

    def build(self, verbose: Optional[bool] = None, need_lock: bool = False) -> None:
        if os.environ.get("FAKE_FLASHINFER_BUILD_FAIL"):
            raise RuntimeError("Ninja build failed. Ninja output:\nnvcc fatal   : fake failure")
        cold = not self.is_compiled
        if cold:
            if verbose:
                print(f"[1/2] nvcc -c moeAlltoAllKernels.cu -o {self.name}/moeAlltoAllKernels.cuda.o", flush=True)
            time.sleep(float(os.environ.get("FAKE_FLASHINFER_BUILD_S", "0")))
            if verbose:
                print(f"[2/2] c++ -shared -o {self.jit_library_path}", flush=True)
            self.jit_library_path.parent.mkdir(parents=True, exist_ok=True)
            self.jit_library_path.write_text("fake module\n")
            BUILDS["cold"] += 1
        else:
            BUILDS["noop"] += 1

    def build_and_load(self) -> Any:
        self.build()
        return self.name


def gen_moe_alltoall_module(target: str = "legacy") -> FakeJitSpec:
    if target != "legacy":
        raise ValueError(f"unsupported MNNVL MoE all-to-all target: {target}")
    return FakeJitSpec("mnnvl_moe_alltoall")
