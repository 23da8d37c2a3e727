"""Argument checks of the cupy preprocess, shared by the allocating and the preallocated paths.

Metadata only (shape, dtype, device, layout): nothing here syncs with the GPU, so the checks are safe
on the hot path and under CUDA-graph capture. Every error says what was wrong, what was expected and
what to do.
"""

from __future__ import annotations

from typing import Any

import torch

from hostcore.errors import ContractError

ID_DTYPES = (torch.int32, torch.int64)


def as_tensor(topk_ids: Any) -> torch.Tensor:
    """``topk_ids`` as a torch tensor without copying.

    torch tensors pass through; CuPy arrays and other CUDA arrays come in through DLPack
    (``torch.from_dlpack``), which shares their memory.
    """
    if isinstance(topk_ids, torch.Tensor):
        return topk_ids
    if hasattr(topk_ids, "__dlpack__"):
        try:
            return torch.from_dlpack(topk_ids)
        except Exception as exc:  # say what came in rather than a bare DLPack failure
            raise ContractError(f"topk_ids of type {type(topk_ids).__name__} could not be shared through DLPack "
                                f"({exc}); pass a torch tensor on the GPU") from exc
    raise ContractError(f"topk_ids must be a torch tensor (or a CUDA array with __dlpack__, e.g. a CuPy array), got "
                        f"{type(topk_ids).__name__}")


def check_topk_ids(topk_ids: torch.Tensor, device: torch.device) -> None:
    """Raise `ContractError` unless ``topk_ids`` is ``[N, K]`` int32/int64 on ``device``."""
    if topk_ids.dtype not in ID_DTYPES:
        raise ContractError(f"preprocess takes topk_ids int32/int64 [N, K], got dtype {topk_ids.dtype}; "
                            "cast with .to(torch.int32)")
    if topk_ids.dim() != 2:
        hint = " (for the received [ep_size, R, K] layout pass received.flat()[1] or .reshape(-1, K))" \
            if topk_ids.dim() == 3 else ""
        raise ContractError(f"preprocess takes topk_ids int32/int64 [N, K], got shape {tuple(topk_ids.shape)}{hint}")
    if topk_ids.device != device:
        raise ContractError(f"preprocess=cupy was built for {device} but topk_ids is on {topk_ids.device}; move it "
                            f"with .to('{device}') or select preprocess=torch for CPU tensors")


def check_contiguous_for_capture(topk_ids: torch.Tensor) -> None:
    """The preallocated path never copies: a non-contiguous ``topk_ids`` is refused there."""
    if not topk_ids.is_contiguous():
        raise ContractError(f"preprocess_into needs a contiguous topk_ids (got strides {tuple(topk_ids.stride())} for "
                            f"shape {tuple(topk_ids.shape)}): it never allocates, so it cannot make a contiguous copy; "
                            "call .contiguous() outside the captured region, or use preprocess()")


def normalize_device(device: torch.device | str) -> torch.device:
    """``cuda`` without an index means the current CUDA device; CPU devices are refused."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ContractError(f"preprocess=cupy runs on CUDA devices, but the layer's device is {device}; "
                            "select preprocess=torch for CPU runs")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device
