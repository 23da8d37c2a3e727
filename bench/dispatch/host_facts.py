#!/usr/bin/env python3
"""Print what the flashinfer_onesided GPU run depends on: multicast env, torch/GPUs, imports, the plugin's availability."""

from __future__ import annotations

import importlib
import os

MODULES = ("tvm_ffi", "cuda.bindings", "numpy", "packaging", "einops", "tqdm", "tabulate", "requests", "click",
           "pynvml", "pluggy", "pytest", "matplotlib", "flashinfer", "flashinfer.comm", "flashinfer.moe_ep",
           "hostcore", "moe_plugin_sentinel", "moe_plugin_flashinfer_onesided")


def main() -> None:
    print({k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                          "NVSHMEM_DISABLE_NVLS")})
    import torch

    print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count(),
          [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
    missing = []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
            if name == "flashinfer":
                print("flashinfer", getattr(module, "__version__", "?"), "from", module.__file__)
        except Exception as exc:
            missing.append(f"{name} ({type(exc).__name__}: {exc})")
    print("imports: all present" if not missing else "imports MISSING: " + "; ".join(missing))
    try:
        from moe_plugin_flashinfer_onesided.host_check import availability

        print("flashinfer_onesided availability:", availability() or "runs here")
    except Exception as exc:
        print(f"flashinfer_onesided availability: check failed ({type(exc).__name__}: {exc})")


if __name__ == "__main__":
    main()
