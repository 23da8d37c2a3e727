"""Fixtures of the plugin's tests (the helper modules' folder is on sys.path through the root pyproject.toml)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest


@pytest.fixture
def fake_flashinfer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The CPU fake of FlashInfer importable as ``flashinfer`` in this process, with a fresh JIT cache dir."""
    import fi_testlib

    monkeypatch.setenv("FAKE_FLASHINFER_JIT_DIR", str(tmp_path / "jit"))
    saved = list(sys.path)
    fi_testlib.use_fake_flashinfer()
    import flashinfer

    yield flashinfer
    sys.path[:] = saved
    for name in [m for m in sys.modules if m == "flashinfer" or m.startswith("flashinfer.")]:
        del sys.modules[name]
