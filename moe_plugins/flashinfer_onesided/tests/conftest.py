"""Make the helpers (``fi_testlib``) and the plugin importable without installing anything.

The repository runs pytest with ``--import-mode=importlib``, which does not put
test directories on ``sys.path``; the rank processes of ``run_ranks`` also need
these paths (spawn copies the parent's ``sys.path``).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for path in (HERE, HERE.parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


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
