"""`hostcore warmup` for the CuPy preprocess loads its kernels (compiler stubbed on the CPU)."""

from __future__ import annotations

import pytest
import torch

from hostcore import Stage
from hostcore.registry import Registry


def test_cupy_warm_up_loads_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    from moe_plugin_cupy_preprocess import jit

    loaded = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(jit, "kernels", loaded.append)
    backend = Registry.discover().get(Stage.PREPROCESS, "cupy")
    assert f"{len(jit.name_expressions())} kernels ready on GPU 1" in backend.warm_up()
    assert loaded == [1]
