"""CPU tests of the plugin: registration, availability, build-time validation and tile planning."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from hostcore import BackendUnavailableError, BuildContext, ExpertPlacement, Stage
from hostcore.errors import ContractError
from hostcore.quant import synthetic_experts
from hostcore.registry import get_registry
from moe_plugin_marlin import jit, kernels
from moe_plugin_marlin.stage import MarlinExperts


def _ctx(device="cuda", dtype=torch.bfloat16, weights="default", ep=1, local_count=None) -> BuildContext:
    placement = ExpertPlacement.contiguous(4, ep)
    local = placement.local_experts(0, ep > 1)
    if weights == "default":
        weights = synthetic_experts(local.global_ids(), 128, 64, 64, seed=0, scale_dtype=torch.bfloat16)
    if local_count is not None:
        local = local.__class__(local.global_num_experts, local_count, None, 0)
    return BuildContext(rank=0, ep_size=ep, device=torch.device(device), placement=placement, local=local,
                        hidden_size=128, top_k=2, dtype=dtype, max_tokens_per_rank=8, weights=weights)


def test_registered_as_experts_backend():
    reg = get_registry()
    assert "marlin" in reg.names(Stage.EXPERTS)
    backend = reg.get(Stage.EXPERTS, "marlin")
    assert backend.distribution == "moe-plugin-marlin"
    assert set(backend.options) == {"block_m"}


@pytest.mark.skipif(jit.availability() is None, reason="this machine can run the kernels")
def test_unavailable_here_with_a_reason():
    reason = get_registry().get(Stage.EXPERTS, "marlin").availability()
    assert reason and ("CuPy" in reason or "compute capability" in reason)
    with pytest.raises(BackendUnavailableError, match="marlin"):
        MarlinExperts(_ctx())


def test_availability_reasons(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert "pip install 'moe-plugin-marlin[cuda13]'" in jit.availability()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "compute capability >= 8.0" in jit.availability()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    assert "found 7.5" in jit.availability()


@pytest.fixture
def pretend_available(monkeypatch):
    """Let the build-time checks run on the CPU (they come before anything touches CUDA)."""
    import moe_plugin_marlin.stage as stage

    monkeypatch.setattr(stage, "availability", lambda: None)


@pytest.mark.parametrize("kwargs,match", [
    ({"device": "cpu"}, "runs on CUDA devices"),
    ({"dtype": torch.float32}, "bf16 or fp16"),
    ({"weights": None}, "needs the rank's expert weights"),
    ({"weights": "not weights"}, "must be QuantizedExperts"),
    ({"local_count": 3}, "local experts"),
])
def test_build_errors_say_what_to_do(pretend_available, kwargs, match):
    with pytest.raises(ContractError, match=match):
        MarlinExperts(_ctx(**kwargs))


def test_block_m_option_is_checked(pretend_available):
    with pytest.raises(ContractError, match="0 \\(auto\\), 16, 32 or 64"):
        MarlinExperts(_ctx(), block_m=48)


def _bare_stage() -> MarlinExperts:
    s = object.__new__(MarlinExperts)
    s.hidden_size, s.dtype, s.device = 128, torch.bfloat16, torch.device("cpu")
    return s


@pytest.mark.parametrize("change,match", [
    (lambda h, w, i: (h[:, :64], w, i), "H=128"),
    (lambda h, w, i: (h.half(), w, i), "built for torch.bfloat16"),
    (lambda h, w, i: (h, w.double(), i), "float32"),
    (lambda h, w, i: (h, w, i.long()), "int32"),
    (lambda h, w, i: (h, w, i.t().contiguous().t()), "contiguous"),
    (lambda h, w, i: (h, w[:3], i[:3]), "N=4"),
])
def test_compute_input_errors(change, match):
    h = torch.randn(4, 128).bfloat16()
    w = torch.rand(4, 2)
    i = torch.zeros(4, 2, dtype=torch.int32)
    with pytest.raises(ContractError, match=match):
        _bare_stage()._check_inputs(*change(h, w, i))


def test_tile_configs_fit_shared_memory():
    """Every tile's launch (scale area reserved for g = 16, whatever the group size) stays within the
    per-CTA budget that keeps 3 (16-row) / 2 (32-row) CTAs on one SM."""
    for cfg in jit.TILE_CONFIGS:
        for grouped in (True, False):
            assert cfg.smem_bytes(grouped) <= jit.SMEM_PER_CTA[cfg.m_tiles] <= 227 * 1024, (cfg, grouped)


def test_block_m_and_plans():
    assert kernels.choose_block_m(8, 128) == 16
    assert kernels.choose_block_m(2048, 8) == 64
    assert kernels.choose_block_m(24 * 8, 8) == 32
    # qwen3-30b-a3b decode: narrow tiles to fill 132 SMs; no split for GEMM1
    p = kernels.plan_gemm(1536, 2048, 8, 128, 16, 132, allow_split=False)
    assert p.cfg.tn == 64 and p.k_splits == 1
    # mixtral GEMM2 at M=1: few blocks -> split along K
    p = kernels.plan_gemm(4096, 14336, 2, 8, 16, 132, allow_split=True)
    assert p.k_splits > 1 and 14336 % p.cfg.tk == 0
    # large batch: the widest tile
    p = kernels.plan_gemm(1536, 2048, 8192, 128, 64, 132, allow_split=True)
    assert p.cfg.tn == 256 and p.cfg.bm == 64
    with pytest.raises(ValueError, match="override"):
        kernels.plan_gemm(1536, 2048, 8, 128, 16, 132, False, override=(3, 1))


@pytest.mark.parametrize(("n_out", "k", "slots", "num_local", "split", "tn", "k_splits"), [
    # the winners of the run-9 tile sweep on an H100 (bench/marlin/NOTES.md), bf16, 16-row blocks
    (2 * 14336, 4096, 2, 8, False, 256, 1),  # mixtral M=1 GEMM1: 0.53 of a wave of 256-wide tiles
    (2 * 14336, 4096, 8, 8, False, 128, 1),  # mixtral M=4 GEMM1: 2.97 waves of 128-wide beat 1.48 of 256
    (2 * 14336, 4096, 32, 8, False, 128, 1),  # mixtral M=16 GEMM1
    (4096, 14336, 32, 8, True, 256, 3),  # mixtral M=16 GEMM2
    (2 * 768, 2048, 128, 128, False, 128, 1),  # qwen3 M=16 GEMM1: 2.45 waves beat 1.23
    (2048, 768, 32, 128, True, 256, 1),  # qwen3 M=4 GEMM2: no split
])
def test_plans_follow_the_measured_tile_sweep(n_out, k, slots, num_local, split, tn, k_splits):
    p = kernels.plan_gemm(n_out, k, slots, num_local, 16, 132, allow_split=split)
    assert (p.cfg.tn, p.k_splits) == (tn, k_splits)


def test_expected_blocks_against_sampled_routing():
    assert kernels.expected_blocks(0, 8, 16) == 1.0
    gen = torch.Generator().manual_seed(0)
    for slots, experts, bm in ((2, 8, 16), (8, 8, 16), (128, 8, 16), (32, 128, 16), (512, 8, 64), (4096, 8, 64)):
        counts = torch.randint(0, experts, (400, slots), generator=gen)
        sampled = sum(float(((torch.bincount(row, minlength=experts) + bm - 1) // bm).sum()) for row in counts) / 400
        assert kernels.expected_blocks(slots, experts, bm) == pytest.approx(sampled, rel=0.08), (slots, experts, bm)
