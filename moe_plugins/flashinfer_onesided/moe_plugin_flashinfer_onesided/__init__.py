"""hostcore plugin: dispatch backend ``flashinfer_onesided`` on FlashInfer's NVLink one-sided MoE all-to-all.

Select it with ``dispatch=flashinfer_onesided`` (options below). It produces the
rank-major padded layout of `hostcore.contract` exactly like ``torch_a2a``,
with the padding rows' top-k ids set to the sentinel the configured sentinel
strategy chose for each receiving rank. Modules:

``_flashinfer``   the only module that imports FlashInfer (the adapter)
``layout``        pure rules: ownership check, payload order, bytes, ``R`` checks
``dispatch``      the stage object and the factory
``host_check``    `availability`: why it cannot run here, for ``hostcore plugins``
``warmup``        `warm_up`: the first-use JIT build with visible progress
``graphs``        CUDA-graph capture of dispatch + combine with a fixed ``R``
"""

from __future__ import annotations

from hostcore.contract import Stage
from hostcore.hookspecs import Backend, Option, Register, hookimpl

from ._flashinfer import APIS
from .dispatch import FlashInferOneSidedDispatch, build
from .host_check import availability
from .warmup import WarmUpReport, warm_up

hostcore_api_version = 1

OPTIONS = {
    "api": Option(str, "auto", "FlashInfer entry point: moe_ep (NVLinkOneSidedAlltoAll, needs every sentinel "
                               "outside [0, E)), moe_alltoall (MoeAlltoAll), auto: moe_ep when it can serve the "
                               "group", APIS),
    "scale_bytes_per_token": Option(int, 0, "workspace bytes per token reserved for prepare's scales"),
    "rows_per_source": Option(bool, True, "expose FlashInfer's per-source receive counts as rows_per_source"),
}


def _warm_up_summary() -> str:
    report = warm_up()
    state = "was already built" if report.was_built else "built now"
    return f"FlashInfer {report.flashinfer_version} one-sided all-to-all module {state} ({report.seconds:.1f} s)"


@hookimpl
def hostcore_register_dispatch(register: Register) -> None:
    register(Backend(Stage.DISPATCH, "flashinfer_onesided", build,
                     "FlashInfer NVLink one-sided all-to-all (MoeAlltoAll): padded rank-major layout, "
                     "sentinel per receiving rank, CUDA-graph safe with fixed R",
                     OPTIONS, availability=availability, warm_up=_warm_up_summary))


__all__ = [
    "OPTIONS",
    "FlashInferOneSidedDispatch",
    "WarmUpReport",
    "availability",
    "build",
    "hostcore_api_version",
    "hostcore_register_dispatch",
    "warm_up",
]
