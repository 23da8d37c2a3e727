"""``availability()``: one clear reason per missing requirement, and never an exception."""

from __future__ import annotations

import pytest
from moe_plugin_flashinfer_onesided import host_check as av


def probes(version: str | None = "0.7.2.post1", cuda: bool = True, count: int = 4,
           no_peer: tuple[int, int] | None = None, no_nvlink: tuple[int, int] | None = None,
           nvml: bool = True) -> av.Probes:
    return av.Probes(
        flashinfer_version=lambda: version,
        cuda_available=lambda: cuda,
        device_count=lambda: count,
        peer_access=lambda i, j: no_peer is None or {i, j} != set(no_peer),
        nvlink=lambda i, j: None if not nvml else (no_nvlink is None or {i, j} != set(no_nvlink)),
    )


def test_runs_on_a_nvlinked_multi_gpu_host() -> None:
    assert av.check(probes()) is None
    assert av.check(probes(nvml=False)) is None  # without NVML, peer access alone decides


@pytest.mark.parametrize("kwargs,reason", [
    ({"version": None}, "needs flashinfer-python>=0.6.16: pip install 'flashinfer-python>=0.6.16'"),
    ({"version": "0.6.3"}, "needs flashinfer-python>=0.6.16 (single-host POSIX-fd memory handles), found 0.6.3: "
                           "pip install -U 'flashinfer-python>=0.6.16'"),
    ({"cuda": False}, "needs >= 2 CUDA GPUs; torch sees no CUDA device (torch.cuda.is_available() is False)"),
    ({"count": 1}, "needs >= 2 CUDA GPUs, found 1"),
    ({"no_nvlink": (0, 1)}, "GPUs 0 and 1 are not linked by NVLink; use dispatch=torch_a2a"),
    ({"no_nvlink": (2, 3)}, "GPUs 2 and 3 are not linked by NVLink; use dispatch=torch_a2a"),
])
def test_each_missing_requirement_has_its_reason(kwargs: dict, reason: str) -> None:
    assert av.check(probes(**kwargs)) == reason


def test_missing_peer_access_is_reported_before_nvlink() -> None:
    reason = av.check(probes(no_peer=(1, 2), no_nvlink=(1, 2)))
    assert reason is not None and reason.startswith("GPUs 1 and 2 have no peer access")


def test_this_machine_and_a_failing_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    av.availability.cache_clear()
    reason = av.availability()  # CI: no flashinfer or no GPU -> a reason; a GPU host may say it runs (None)
    assert reason is None or (isinstance(reason, str) and reason)

    def broken() -> av.Probes:
        raise OSError("NVML driver mismatch")

    monkeypatch.setattr(av, "real_probes", broken)
    av.availability.cache_clear()
    assert av.availability() == "could not check the GPUs (OSError: NVML driver mismatch)"
    av.availability.cache_clear()


def test_nvml_uuid_format() -> None:
    assert av._nvml_uuid("1234-abcd") == "GPU-1234-abcd"
    assert av._nvml_uuid("GPU-1234") == "GPU-1234"
