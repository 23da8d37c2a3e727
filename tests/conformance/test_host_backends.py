"""The host's own reference backends pass the conformance kit."""

from __future__ import annotations

import torch

from hostcore.conformance import DispatchContract, ExpertsContract, PreprocessContract


class TestTorchPreprocess(PreprocessContract):
    backend = "torch"


class TestTorchPreprocessSafeExplicit(PreprocessContract):
    backend = "torch"
    options = {"mode": "safe"}
    cases = 6


class TestTorchExperts(ExpertsContract):
    backend = "torch"


class TestTorchExpertsFloat64(ExpertsContract):
    backend = "torch"
    options = {"compute_dtype": "float64"}
    dtypes = (torch.float32,)
    rtol = 1e-6


class TestTorchAllToAllDispatch(DispatchContract):
    backend = "torch_a2a"
    ep_sizes = (1, 2)


class TestLocalDispatch(DispatchContract):
    backend = "local"
    ep_sizes = (1,)
