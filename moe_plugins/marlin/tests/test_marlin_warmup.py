"""`hostcore warmup` for marlin compiles every kernel set a stage may use (compiler stubbed on the CPU)."""

from __future__ import annotations

import pytest
import torch

from hostcore import Stage
from hostcore.registry import Registry


def test_marlin_warm_up_builds_every_kernel_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from moe_plugin_marlin import jit

    built = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(jit, "kernel_set", lambda *args: built.append(args))
    backend = Registry.discover().get(Stage.EXPERTS, "marlin")
    assert "4 kernel sets" in backend.warm_up()
    assert sorted(built, key=str) == sorted([(3, True, 128), (3, True, None), (3, False, 128), (3, False, None)],
                                            key=str)
