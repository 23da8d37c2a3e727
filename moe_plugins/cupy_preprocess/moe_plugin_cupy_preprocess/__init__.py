"""moe-plugin-cupy-preprocess: preprocess backend ``cupy`` for hostcore (entry point ``cupy_preprocess``).

One fused, bounds-safe kernel launch from global top-k ids to local ids, per-expert counts and
the aligned block layout. Layout of the package (one job per module):

``backend``   the stage object `CupyPreprocess` (Python API, modes, ownership)
``plan``      launch plans and sizes (pure Python)
``buffers``   preallocated outputs and workspace (`PreprocessBuffers`)
``validate``  argument checks (metadata only, no sync)
``jit``       compile once per process, CuPy's disk cache, torch's stream
``launch``    argument packing and launch sequences
``csrc/preprocess.cu``  the kernels

CuPy is an extra: ``pip install 'moe-plugin-cupy-preprocess[cuda13]'`` (or ``[cuda12]``). Without it, or
without a GPU, the backend is listed with the reason it cannot run and selecting it raises
`hostcore.errors.BackendUnavailableError`.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from hostcore import Backend, Option, Stage, hookimpl
from hostcore.hookspecs import BuildContext, Register

hostcore_api_version = 1

INSTALL_HINT = "pip install 'moe-plugin-cupy-preprocess[cuda13]' (CUDA 13) or '[cuda12]' (CUDA 12)"
MIN_CAPABILITY = (7, 0)  # __nanosleep (grid barrier), independent thread scheduling

OPTIONS = {
    "mode": Option(str, "safe", "safe: skip and count ids outside the map (no sync); checked: raise on them (syncs); "
                                "faithful: unchecked lookup like the upstream kernel, reproduces the -1 bug",
                   ("safe", "checked", "faithful")),
    "map_in": Option(str, "auto", "where kernels read the expert map: auto (shared memory up to 8192 entries), "
                                  "shared, global", ("auto", "shared", "global")),
    "path": Option(str, "auto", "auto: one single-warp launch up to 128 slots (<= 256 local experts), one "
                                "block-kernel launch up to 131072 slots with <= 64 local experts on sm_90+ (one "
                                "thread-block cluster; see clusters), else up to 16384 with <= 64, 8192 with more "
                                "(a block per 1024 slots), else the grid path (one cooperative grid_fused "
                                "launch); warp (<= 512 slots), block (<= 16384; as a cluster 65536, or 131072 where "
                                "16-block clusters fit) or grid force one",
                   ("auto", "warp", "block", "grid")),
    "clusters": Option(bool, True, "on GPUs with thread-block clusters (sm_90+), the block path past 1024 slots (<= 64 "
                                   "local experts) runs one cluster of 8 blocks that split the slots (16 past 2048 "
                                   "slots where the GPU holds such a cluster, e.g. an H100 SXM), and path=block goes "
                                   "up to 65536 slots (131072 with 16 blocks); false keeps the independent blocks"),
}


def availability_reason() -> str | None:
    """Why the backend cannot run on this machine, or ``None``. Never raises; cheap after the first call."""
    return _availability()


@functools.cache
def _availability() -> str | None:
    if importlib.util.find_spec("cupy") is None:
        return f"needs CuPy: {INSTALL_HINT}"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "needs a CUDA GPU (CuPy sees none)"
    except Exception as exc:  # a CuPy built for another CUDA major, or no driver
        return (f"CuPy is installed but cannot use the GPU ({type(exc).__name__}: {exc}); install the wheel for your "
                f"CUDA: {INSTALL_HINT}")
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        return f"needs compute capability >= 7.0, this GPU has {capability[0]}.{capability[1]}"
    return None


def build(ctx: BuildContext, mode: str = "safe", map_in: str = "auto", path: str = "auto",  # noqa: ANN201
          clusters: bool = True):
    """Factory: the `CupyPreprocess` stage object for ``ctx`` (imports the GPU parts only here)."""
    from .backend import CupyPreprocess

    return CupyPreprocess(ctx, mode=mode, map_in=map_in, path=path, clusters=clusters)


def warm_up() -> str:
    """Compile (or load from CuPy's disk cache) every preprocess kernel for the current GPU."""
    import torch

    from .jit import cache_dir, kernels, name_expressions

    device = torch.cuda.current_device()
    kernels(device)
    return f"{len(name_expressions())} kernels ready on GPU {device} (CuPy cache {cache_dir()})"


@hookimpl
def hostcore_register_preprocess(register: Register) -> None:
    register(Backend(Stage.PREPROCESS, "cupy", build,
                     "fused CuPy kernel: bounds-safe map lookup, counts and aligned block layout, no host sync",
                     OPTIONS, availability=availability_reason, warm_up=warm_up))
