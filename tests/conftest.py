"""Shared fixtures: throwaway plugin distributions installed as real entry-point metadata."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hostcore.registry import ALLOWLIST_ENV, reset_registry


@pytest.fixture
def install_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """Install a throwaway distribution (module + dist-info with a ``hostcore.plugins`` entry point) on sys.path.

    The metadata is laid out exactly as pip writes it, so discovery goes through
    ``importlib.metadata`` as it does for a pip-installed plugin.
    """
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv(ALLOWLIST_ENV, raising=False)
    modules: list[str] = []

    def install(dist: str, module: str, source: str, entry_name: str | None = None, version: str = "1.0") -> None:
        (site / f"{module}.py").write_text(textwrap.dedent(source))
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[hostcore.plugins]\n{entry_name or module} = {module}\n")
        modules.append(module)
        reset_registry()  # a registry cached by an earlier test would not see the new distribution

    yield install
    for module in modules:
        sys.modules.pop(module, None)
    reset_registry()
