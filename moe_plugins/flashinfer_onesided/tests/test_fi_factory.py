"""The backend as the registry sees it, and the factory's refusals that need no process group."""

from __future__ import annotations

import sys
from pathlib import Path

import fi_testlib
import pytest
import torch

from hostcore import BackendChoice, BackendConfig, Stage
from hostcore.errors import BackendUnavailableError, ConfigError, ContractError
from hostcore.placement import ExpertPlacement
from hostcore.registry import Registry, coerce_options


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Registry:
    """Discovery through entry-point metadata exactly as pip writes it (works whether or not the plugin is installed)."""
    site = tmp_path / "site"
    info = site / "moe_plugin_flashinfer_onesided-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: moe-plugin-flashinfer-onesided\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[hostcore.plugins]\nflashinfer_onesided = moe_plugin_flashinfer_onesided\n")
    monkeypatch.syspath_prepend(str(site))
    return Registry.discover(allowlist=["flashinfer_onesided"])


def test_registered_with_its_options_and_availability(registry: Registry) -> None:
    assert not registry.failures, registry.failures
    backend = registry.get(Stage.DISPATCH, "flashinfer_onesided")
    assert backend.distribution == "moe-plugin-flashinfer-onesided"
    assert set(backend.options) == {"api", "scale_bytes_per_token", "rows_per_source"}
    assert backend.options["api"].choices == ("auto", "moe_ep", "moe_alltoall")
    reason = backend.availability()
    assert reason is None or isinstance(reason, str)


def test_options_are_checked_by_the_registry(registry: Registry) -> None:
    cfg = BackendConfig.parse("dispatch=flashinfer_onesided(api=moe_alltoall,scale_bytes_per_token=224)")
    assert cfg[Stage.DISPATCH] == BackendChoice.of("flashinfer_onesided", api="moe_alltoall", scale_bytes_per_token=224)
    backend = registry.get(Stage.DISPATCH, "flashinfer_onesided")
    assert coerce_options(backend, {"api": "moe_ep"}) == {"api": "moe_ep", "scale_bytes_per_token": 0,
                                                         "rows_per_source": True}
    with pytest.raises(ConfigError, match="must be one of auto, moe_ep, moe_alltoall, got 'nvshmem'"):
        coerce_options(backend, {"api": "nvshmem"})
    with pytest.raises(ConfigError, match="has no option 'apis'. Did you mean 'api'"):
        coerce_options(backend, {"apis": "auto"})


def test_on_this_cpu_machine_the_registry_refuses_with_the_reason(registry: Registry) -> None:
    ctx = fi_testlib.context(0, 2, 8, 64, 2, torch.bfloat16, 8, 8)
    backend = registry.get(Stage.DISPATCH, "flashinfer_onesided")
    if backend.availability() is None:
        pytest.skip("this machine can run flashinfer_onesided")
    with pytest.raises(BackendUnavailableError, match="cannot run here: needs "):
        registry.build(Stage.DISPATCH, BackendChoice.of("flashinfer_onesided"), ctx)


def _build(ctx, **options):
    from moe_plugin_flashinfer_onesided import build

    return build(ctx, **options)


def test_refusals_before_any_collective() -> None:
    ok = dict(rank=0, ep=2, experts=8, hidden=64, top_k=2, dtype=torch.bfloat16, max_tokens=8, sentinel=8)
    with pytest.raises(ContractError, match="BuildContext.sentinel must be set"):
        _build(fi_testlib.context(**{**ok, "sentinel": None}))
    with pytest.raises(ContractError, match="does not fit the int32"):
        _build(fi_testlib.context(**{**ok, "sentinel": 2**31}))
    with pytest.raises(ContractError, match="runs on CUDA GPUs, but this layer is on cpu; use dispatch=torch_a2a"):
        _build(fi_testlib.context(**ok))
    with pytest.raises(ContractError, match="round-robin placement"):
        _build(fi_testlib.context(**ok, placement=ExpertPlacement.round_robin(8, 2)))
    with pytest.raises(ContractError, match="top_k <= 22"):
        _build(fi_testlib.context(**{**ok, "experts": 64, "top_k": 23}))


def test_without_torch_distributed_it_says_how_to_launch(fake_flashinfer) -> None:
    ctx = fi_testlib.context(0, 2, 8, 64, 2, torch.bfloat16, 8, 8)
    with pytest.raises(ContractError, match="needs torch.distributed initialised .*torchrun"):
        fi_testlib.cpu_stage(ctx)


def test_without_flashinfer_the_factory_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from moe_plugin_flashinfer_onesided import _flashinfer

    monkeypatch.setattr(_flashinfer, "installed_version", lambda: None)
    monkeypatch.setattr(_flashinfer.importlib, "import_module", lambda name: pytest.fail("must not import"))
    with pytest.raises(BackendUnavailableError, match="needs flashinfer-python>=0.6.16: pip install "
                                                      "'flashinfer-python>=0.6.16'"):
        _flashinfer.import_flashinfer()


def test_a_broken_flashinfer_install_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    from moe_plugin_flashinfer_onesided import _flashinfer

    def boom(name: str):
        raise ImportError("libcudart.so.13: cannot open shared object file")

    monkeypatch.setattr(_flashinfer, "installed_version", lambda: "0.7.2.post1")
    monkeypatch.setattr(_flashinfer.importlib, "import_module", boom)
    with pytest.raises(BackendUnavailableError, match="could not import flashinfer.comm .*libcudart.*reinstall"):
        _flashinfer.import_flashinfer()
    assert _flashinfer.has_moe_ep() is False
    assert "moe_plugin_flashinfer_onesided" in sys.modules
