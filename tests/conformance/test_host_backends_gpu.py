"""The kit on a CUDA device: the host's torch backends pass it there too (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from hostcore.conformance import DispatchContract, ExpertsContract, PreprocessContract

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


class TestTorchPreprocessCuda(PreprocessContract):
    backend = "torch"
    device = "cuda"


class TestTorchExpertsCuda(ExpertsContract):
    backend = "torch"
    device = "cuda"


class TestTorchAllToAllNccl(DispatchContract):
    backend = "torch_a2a"
    device = "cuda"
    dist_backend = "nccl"
    ep_sizes = (1, 2)  # ep_size 2 is skipped on a one-GPU host
