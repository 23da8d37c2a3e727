"""Whether ``flashinfer_onesided`` can run on this machine, and if not, why (for ``hostcore plugins``).

Checks, cheapest first, none of which imports FlashInfer or allocates GPU memory:

1. flashinfer-python >= 0.6.16 is installed (from package metadata);
2. torch sees CUDA and at least 2 GPUs;
3. every pair of visible GPUs has peer access (the one-sided kernels write
   straight into the peers' memory) and, where NVML can tell, is linked by
   NVLink (FlashInfer's NVLink backends refuse otherwise, and over PCIe the
   point of a one-sided all-to-all is lost).

`check` takes the probes as arguments so each answer is tested on the CPU;
`availability` wires in the real ones and caches the answer for the process.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from . import _flashinfer


@dataclass(frozen=True)
class Probes:
    """How `check` looks at the machine. ``nvlink(i, j)`` is ``None`` when it cannot tell (no NVML)."""

    flashinfer_version: Callable[[], str | None]
    cuda_available: Callable[[], bool]
    device_count: Callable[[], int]
    peer_access: Callable[[int, int], bool]
    nvlink: Callable[[int, int], bool | None]


def check(probes: Probes) -> str | None:
    """``None`` when the backend can run, else a one-line reason with what to do."""
    problem = _flashinfer.version_problem(probes.flashinfer_version())
    if problem:
        return problem
    if not probes.cuda_available():
        return "needs >= 2 CUDA GPUs; torch sees no CUDA device (torch.cuda.is_available() is False)"
    count = probes.device_count()
    if count < 2:
        return f"needs >= 2 CUDA GPUs, found {count}"
    for i in range(count):
        for j in range(i + 1, count):
            if not (probes.peer_access(i, j) and probes.peer_access(j, i)):
                return (f"GPUs {i} and {j} have no peer access (torch.cuda.can_device_access_peer is False): the "
                        "one-sided kernels write into peer GPUs; use dispatch=torch_a2a")
            if probes.nvlink(i, j) is False:
                return f"GPUs {i} and {j} are not linked by NVLink; use dispatch=torch_a2a"
    return None


def _nvml_nvlink(i: int, j: int) -> bool | None:
    """NVML's P2P-over-NVLink status of two torch device indices, or ``None`` when NVML cannot say."""
    try:
        import pynvml
        import torch

        pynvml.nvmlInit()
        try:
            handles = [pynvml.nvmlDeviceGetHandleByUUID(_nvml_uuid(torch.cuda.get_device_properties(k).uuid))
                       for k in (i, j)]
            status = pynvml.nvmlDeviceGetP2PStatus(handles[0], handles[1], pynvml.NVML_P2P_CAPS_INDEX_NVLINK)
            return status == pynvml.NVML_P2P_STATUS_OK
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML, old driver, odd UUID format: peer access alone decides
        return None


def _nvml_uuid(uuid: object) -> str:
    text = str(uuid)
    return text if text.startswith("GPU-") else f"GPU-{text}"


def real_probes() -> Probes:
    import torch

    return Probes(
        flashinfer_version=_flashinfer.installed_version,
        cuda_available=torch.cuda.is_available,
        device_count=torch.cuda.device_count,
        peer_access=torch.cuda.can_device_access_peer,
        nvlink=_nvml_nvlink,
    )


@functools.lru_cache(maxsize=1)
def availability() -> str | None:
    """The registered ``Backend.availability``: cached, and never raises (a failing probe becomes the reason)."""
    try:
        return check(real_probes())
    except Exception as exc:
        return f"could not check the GPUs ({type(exc).__name__}: {exc})"
