"""moe-plugin-marlin: W4A16 GPTQ Mixture-of-Experts expert compute for hostcore (entry point ``marlin``).

Registers the experts backend ``marlin``: our own Marlin-style CUDA kernels
(tensor-core ``mma.sync m16n8k16``, lop3 int4 -> bf16/fp16 dequant, a
multi-stage ``cp.async`` pipeline, one launch per GEMM over all local experts
driven by the aligned block layout), compiled at run time through CuPy for the
GPU at hand and cached on disk. Select it with ``experts=marlin`` (option
``block_m``: 0 = auto, or 16/32/64).

Modules: `layout` (weight packing and its inverse, pure torch), `jit` (CuPy
compilation and cache), `kernels` (tile plans and launches), `stage` (the
`MarlinExperts` stage object), ``csrc/marlin_moe.cu`` (the CUDA source).
"""

from __future__ import annotations

from hostcore import Backend, BuildContext, Option, Stage, hookimpl
from hostcore.hookspecs import Register

from .jit import availability
from .layout import LAYOUT_VERSION, MarlinWeights, prepare_experts, unprepare_experts

hostcore_api_version = 1

__all__ = ["LAYOUT_VERSION", "MarlinWeights", "availability", "build_marlin", "hostcore_register_experts",
           "prepare_experts", "unprepare_experts"]

OPTIONS = {
    "block_m": Option(int, 0, "rows per aligned block: 0 picks 16/32/64 per call from the rows per expert",
                      (0, 16, 32, 64)),
}


def build_marlin(ctx: BuildContext, block_m: int = 0):  # -> MarlinExperts (imported lazily: CuPy/CUDA only)
    """Factory of the ``marlin`` experts stage: packs ``ctx.weights`` and compiles the kernels."""
    from .stage import MarlinExperts

    return MarlinExperts(ctx, block_m=block_m)


def warm_up() -> str:
    """Compile (or load from CuPy's disk cache) every kernel set a stage may use on the current GPU:
    bf16 and fp16 activations, grouped (g=128) and per-channel scales."""
    import torch

    from .jit import kernel_set

    device = torch.cuda.current_device()
    for bf16 in (True, False):
        for group_size in (128, None):
            kernel_set(device, bf16, group_size)
    return f"4 kernel sets (bf16/fp16 x grouped/per-channel) ready on GPU {device}"


@hookimpl
def hostcore_register_experts(register: Register) -> None:
    register(Backend(Stage.EXPERTS, "marlin", build_marlin,
                     "W4A16 GPTQ int4 Marlin-style CUDA kernels (CuPy JIT): one launch per GEMM over all local experts",
                     OPTIONS, availability=availability, warm_up=warm_up))
