"""Fake of ``flashinfer.utils``: the one helper the adapter imports from it."""

import torch


def device_support_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch needs a CUDA device of compute capability 9 or newer."""
    if device.type != "cuda":
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 9
