"""The fake FlashInfer has the same API surface as the real one (skipped where no real FlashInfer is installed).

Set ``FLASHINFER_REAL_SITE`` to a directory holding a real flashinfer-python
(e.g. ``pip install --no-deps --target DIR flashinfer-python==0.7.2.post1
apache-tvm-ffi nvidia-ml-py cuda-bindings einops tabulate``) to run it on a CPU
machine; on the GPU hosts it runs against the installed wheel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from fi_testlib import FAKE_SITE, TESTS


def _surface(site: str | None) -> dict:
    env = dict(os.environ)
    paths = [p for p in [site, env.get("PYTHONPATH")] if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    proc = subprocess.run([sys.executable, str(TESTS / "fi_introspect.py")], env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode:
        raise AssertionError(f"introspection failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def _real_site() -> str | None:
    site = os.environ.get("FLASHINFER_REAL_SITE")
    if site:
        return site
    # importable as is, and not the fake (a dry run puts the fake on PYTHONPATH)
    probe = subprocess.run([sys.executable, "-c", "import importlib.util as u; s = u.find_spec('flashinfer'); "
                            "print(bool(s) and 'fake_site' not in str(s.origin))"], capture_output=True, text=True)
    return "" if probe.stdout.strip() == "True" else None


def test_fake_matches_the_installed_flashinfer() -> None:
    site = _real_site()
    if site is None:
        pytest.skip("no real flashinfer-python here (set FLASHINFER_REAL_SITE to check the fake against one)")
    real = _surface(site or None)
    assert "fake_site" not in real["file"], real["file"]
    fake = _surface(str(FAKE_SITE))
    assert "fake_site" in fake["file"]
    problems = []
    for kind in ("callables", "records", "attributes"):
        for key, want in real[kind].items():
            if not (isinstance(want, (list, bool)) and want):
                problems.append(f"real FlashInfer lacks {key}: {want}")
            elif fake[kind][key] != want:
                problems.append(f"{key}:\n  fake {fake[kind][key]}\n  real {want}")
    assert not problems, "\n".join(problems)
