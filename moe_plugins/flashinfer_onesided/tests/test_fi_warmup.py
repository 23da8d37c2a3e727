"""``warm_up``: the first-use JIT build is explicit, shows progress, and is reused afterwards (fake FlashInfer)."""

from __future__ import annotations

import pytest

from hostcore.errors import BackendUnavailableError


def test_cold_build_shows_progress_then_the_cache_is_reused(fake_flashinfer, monkeypatch: pytest.MonkeyPatch,
                                                            capfd: pytest.CaptureFixture) -> None:
    from flashinfer.jit.comm import BUILDS
    from moe_plugin_flashinfer_onesided import warm_up

    monkeypatch.setenv("FAKE_FLASHINFER_BUILD_S", "0.35")
    lines: list[str] = []
    first = warm_up(log=lines.append, heartbeat_s=0.1)
    assert not first.was_built and first.module == "mnnvl_moe_alltoall" and first.seconds >= 0.35
    assert first.flashinfer_version == "0.7.2.post1"
    assert "not built yet: compiling with nvcc, takes 2-3 minutes" in lines[1]
    assert sum("compiling..." in line for line in lines) >= 2  # heartbeat while nvcc runs
    assert lines[-1].startswith("ready in ")
    assert "[1/2] nvcc" in capfd.readouterr().out  # the build's own command lines are shown when cold
    assert BUILDS["cold"] == 1

    lines.clear()
    second = warm_up(log=lines.append, heartbeat_s=0.1)
    assert second.was_built and second.library == first.library
    assert lines[1] == "found a built module; checking it is up to date"
    assert BUILDS["cold"] == 1  # nothing rebuilt


def test_layer_build_is_quiet_when_built(fake_flashinfer) -> None:
    from moe_plugin_flashinfer_onesided import warm_up
    from moe_plugin_flashinfer_onesided.warmup import ensure_built

    lines: list[str] = []
    ensure_built(log=lines.append, heartbeat_s=0)
    assert "not built yet" in lines[0] and lines[-1].startswith("ready in")
    lines.clear()
    ensure_built(log=lines.append)
    assert lines == []
    assert warm_up(log=lines.append).was_built


def test_build_failure_propagates(fake_flashinfer, monkeypatch: pytest.MonkeyPatch) -> None:
    from moe_plugin_flashinfer_onesided import warm_up

    monkeypatch.setenv("FAKE_FLASHINFER_BUILD_FAIL", "1")
    with pytest.raises(RuntimeError, match="Ninja build failed"):
        warm_up(log=lambda line: None, heartbeat_s=0)


def test_without_flashinfer_it_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from moe_plugin_flashinfer_onesided import _flashinfer, warm_up

    monkeypatch.setattr(_flashinfer, "installed_version", lambda: None)
    with pytest.raises(BackendUnavailableError, match="pip install 'flashinfer-python>=0.6.16'"):
        warm_up(log=lambda line: None)
