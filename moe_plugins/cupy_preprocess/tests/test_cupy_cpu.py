"""CPU (CI) tests of the cupy preprocess plugin: discovery, availability, sizing, argument checks, source build.

The kernels themselves run on the CPU in test_cupy_emulated.py and on a GPU in test_cupy_gpu.py.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from preprocess_testlib import context, make_local

import moe_plugin_cupy_preprocess as plugin
from hostcore import BackendChoice, Registry, Stage
from hostcore.registry import coerce_options
from hostcore.contract import aligned_capacity
from hostcore.errors import BackendUnavailableError, ConfigError, ContractError
from moe_plugin_cupy_preprocess import jit
from moe_plugin_cupy_preprocess.plan import (BLOCK_FINE_MAX_COUNTERS, BLOCK_LANE_AUTO_MAX, BLOCK_MAX_SLOTS,
                                             BLOCK_PATH_AUTO_MAX,
                                             CLUSTER_AUTO_MAX, CLUSTER_MAX_SLOTS, CLUSTER_SIZES, CLUSTER_WIDE_MIN_SLOTS,
                                             CLUSTER_WIDE_SMEM_BYTES, DEFAULT_SMEM_OPTIN,
                                             GRID_WARPS, KEYS8_MAX_LOCAL, LANE_MAX_LOCAL, LANE_MAX_SLOTS, MAP_GLOBAL,
                                             MAP_NONE, MAP_SHARED, MAX_WINDOW, PLACE_QUEUE, SMEM_MAP_AUTO_MAX, STAGE_MIN_CHUNK,
                                             OFFSETS_MAX_CHUNK, STAGE_KEYED, STAGE_OFFSETS,
                                             TILE,
                                             WARP_MAX_LOCAL, WARP_MAX_SLOTS, WARP_PATH_AUTO_MAX, MapChoice,
                                             check_block_m, choose_map, moved_bytes, plan_for)
from moe_plugin_cupy_preprocess.validate import (as_tensor, check_contiguous_for_capture, check_topk_ids,
                                                 normalize_device)

HAS_GPU = plugin.availability_reason() is None
CUDA0 = torch.device("cuda", 0)


# --- discovery and availability ----------------------------------------------------------------------

def test_entry_point_names_the_plugin_module() -> None:
    eps = [ep for ep in metadata.entry_points(group="hostcore.plugins") if ep.name == "cupy_preprocess"]
    assert eps, "moe-plugin-cupy-preprocess is not installed: pip install -e moe_plugins/cupy_preprocess"
    assert {ep.value for ep in eps} == {"moe_plugin_cupy_preprocess"}
    assert {ep.dist.name for ep in eps} == {"moe-plugin-cupy-preprocess"}


def test_registered_with_its_options() -> None:
    registry = Registry.discover()
    assert not [f for f in registry.failures if f.name == "cupy_preprocess"]
    backend = registry.get(Stage.PREPROCESS, "cupy")
    assert backend.distribution == "moe-plugin-cupy-preprocess"
    assert backend.options["mode"].default == "safe"
    assert set(backend.options["mode"].choices) == {"safe", "checked", "faithful"}
    assert set(backend.options) == {"mode", "map_in", "path", "clusters"}


def test_extras_name_the_cupy_wheels() -> None:
    requires = metadata.requires("moe-plugin-cupy-preprocess") or []
    assert any(r.startswith("cupy-cuda12x") and 'extra == "cuda12"' in r for r in requires), requires
    assert any(r.startswith("cupy-cuda13x") and 'extra == "cuda13"' in r for r in requires), requires
    assert not any(r.startswith("cupy") and "extra" not in r for r in requires), "CuPy must stay an extra"


@pytest.mark.skipif(HAS_GPU, reason="this machine can run the backend")
def test_unavailable_here_says_why_and_how_to_fix() -> None:
    reason = Registry.discover().get(Stage.PREPROCESS, "cupy").availability()
    assert reason
    if importlib.util.find_spec("cupy") is None:
        assert "needs CuPy" in reason and "moe-plugin-cupy-preprocess[cuda13]" in reason
    else:
        assert "GPU" in reason


def test_availability_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "cupy" else real_find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    plugin._availability.cache_clear()
    try:
        assert plugin.availability_reason() == "needs a CUDA GPU (torch.cuda.is_available() is False)"
    finally:
        plugin._availability.cache_clear()


def test_availability_without_cupy(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cupy" else real_find_spec(name, *a))
    plugin._availability.cache_clear()
    try:
        assert plugin.availability_reason() == (
            "needs CuPy: pip install 'moe-plugin-cupy-preprocess[cuda13]' (CUDA 13) or '[cuda12]' (CUDA 12)")
    finally:
        plugin._availability.cache_clear()


@pytest.mark.skipif(HAS_GPU, reason="this machine can run the backend")
def test_selecting_it_here_raises_backend_unavailable() -> None:
    placement, local, sentinel = make_local(16, 2, 0, "non_local")
    ctx = context(placement, 0, local, "cpu", sentinel=sentinel)
    registry = Registry.discover()
    with pytest.raises(BackendUnavailableError, match=r"preprocess backend 'cupy' \(moe-plugin-cupy-preprocess\) "
                                                      r"cannot run here: needs"):
        registry.build(Stage.PREPROCESS, BackendChoice.of("cupy"), ctx)
    from moe_plugin_cupy_preprocess.backend import CupyPreprocess

    with pytest.raises(BackendUnavailableError, match="cannot run here"):
        CupyPreprocess(ctx)


def test_bad_options_are_refused_by_the_registry() -> None:
    backend = Registry.discover().get(Stage.PREPROCESS, "cupy")
    assert coerce_options(backend, {}) == {"mode": "safe", "map_in": "auto", "path": "auto", "clusters": True}
    with pytest.raises(ConfigError, match="must be one of safe, checked, faithful, got 'fast'"):
        coerce_options(backend, {"mode": "fast"})
    with pytest.raises(ConfigError, match="no option 'map'.*Did you mean 'map_in'"):
        coerce_options(backend, {"map": "shared"})


# --- sizing ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows, top_k, num_local, block_m", [(1, 1, 1, 1), (7, 3, 5, 16), (64, 8, 32, 64),
                                                              (4096, 8, 256, 16), (1, 8, 0, 8), (0, 8, 32, 16)])
def test_capacity_is_the_contracts_static_bound(rows: int, top_k: int, num_local: int, block_m: int) -> None:
    plan = plan_for(rows, top_k, torch.int32, block_m, num_local, MapChoice(MAP_NONE, 0))
    assert plan.capacity == aligned_capacity(rows * top_k, num_local, block_m)
    assert plan.num_blocks == plan.capacity // block_m and plan.capacity % block_m == 0
    no_layout = plan_for(rows, top_k, torch.int32, None, num_local, MapChoice(MAP_NONE, 0))
    assert no_layout.capacity == 0 and no_layout.num_blocks == 0 and no_layout.block_m == 0


def test_path_choice_and_items_per_thread() -> None:
    def plan(nk: int, path: str = "auto"):
        return plan_for(nk, 1, torch.int32, 16, 32, MapChoice(MAP_SHARED, 256), path)

    assert [plan(n, "block").ipt for n in (0, 1, 1024, 1025, 4096, 4097, 8192, 8193, BLOCK_MAX_SLOTS)] == \
        [1, 1, 1, 4, 4, 8, 8, 16, 16]
    assert plan(1000).active_warps == 32 and plan(5000, "block").active_warps == 20
    # Threads: enough for the slots and for one expert of the window each.
    assert [plan(n, "block").block_threads for n in (0, 8, 100, 1000, 5000, BLOCK_MAX_SLOTS)] == \
        [32, 32, 128, 1024, 640, 1024]
    assert plan_for(8, 1, torch.int32, 16, 300, MapChoice(MAP_NONE, 0)).block_threads == 320
    # auto: the block path up to BLOCK_LANE_AUTO_MAX with <= 64 local experts (block_lane_preprocess), else up to
    # BLOCK_PATH_AUTO_MAX (block_preprocess; grid_fused wins at 16384 on the H100); forced up to 16384
    assert (BLOCK_LANE_AUTO_MAX, BLOCK_PATH_AUTO_MAX) == (BLOCK_MAX_SLOTS, 8192)
    assert plan(BLOCK_LANE_AUTO_MAX).path == "block" and plan(BLOCK_LANE_AUTO_MAX).lanes
    for options in ({"num_local": LANE_MAX_LOCAL + 1}, {"lanes": False}):
        def many(nk: int) -> object:
            return plan_for(nk, 1, torch.int32, 16, options.get("num_local", 32), MapChoice(MAP_SHARED, 256),
                            lanes=options.get("lanes", True))

        assert many(BLOCK_PATH_AUTO_MAX).path == "block" and many(BLOCK_PATH_AUTO_MAX + 1).path == "grid"
    assert plan(BLOCK_MAX_SLOTS, "block").path == "block" and plan(BLOCK_MAX_SLOTS + 1).path == "grid"
    assert plan(BLOCK_MAX_SLOTS + 1).tiles == -(-(BLOCK_MAX_SLOTS + 1) // TILE)
    assert plan(5, "grid").path == "grid" and plan(5, "grid").tiles == 1
    assert plan(0, "grid").tiles == 1, "an empty batch still launches one tile (it writes the fills)"
    with pytest.raises(ConfigError, match=r"path=block handles at most 16384 slots.*got 16385 x 1 = 16385"):
        plan(BLOCK_MAX_SLOTS + 1, "block")
    with pytest.raises(ConfigError, match="path must be one of auto, warp, block, grid"):
        plan(5, "bogus")
    # auto: one warp up to WARP_PATH_AUTO_MAX slots and WARP_MAX_LOCAL local experts, 1/4/16 slots per lane
    assert WARP_PATH_AUTO_MAX == 128 and WARP_MAX_SLOTS == 512 and WARP_MAX_LOCAL == 256
    assert [(plan(n).path, plan(n).ipt) for n in (0, 1, 32, 33, 128)] == \
        [("warp", 1), ("warp", 1), ("warp", 1), ("warp", 4), ("warp", 4)]
    assert plan(129).path == "block" and plan(512).path == "block" and plan(8, "block").path == "block"
    assert [(plan(n, "warp").path, plan(n, "warp").ipt) for n in (129, 512)] == [("warp", 16), ("warp", 16)]
    lanes = plan(100)  # 32 local experts, <= 128 slots: one expert per lane
    assert lanes.block_threads == 32 and lanes.lanes and lanes.kernel_names == ("lane_preprocess",)
    assert lanes.smem_block_bytes == 256 * 4  # the map only
    warp = plan(129, "warp")
    assert warp.block_threads == 32 and not warp.lanes and warp.kernel_names == ("warp_preprocess",)
    assert warp.smem_block_bytes == (256 + 16 * 32 + 32) * 4  # map, chunk counters, group starts
    many = plan_for(100, 1, torch.int32, 16, LANE_MAX_LOCAL + 1, MapChoice(MAP_NONE, 0))
    assert many.path == "warp" and many.kernel_names == ("warp_preprocess",) and many.experts_per_lane == 0
    # lane e stands for experts e and e + 32 past 32 local experts
    assert LANE_MAX_LOCAL == 64
    assert [plan_for(100, 1, torch.int32, 16, n, MapChoice(MAP_NONE, 0)).experts_per_lane for n in (1, 32, 33, 64)] \
        == [1, 1, 2, 2]
    two = plan_for(5000, 1, torch.int32, 16, 64, MapChoice(MAP_SHARED, 256))  # 20 warps, 64 experts per row
    assert two.kernel_names == ("block_lane_preprocess",) and two.experts_per_lane == 2
    assert two.smem_block_bytes == (256 + 20 * 65 + 2 * 64 + 1) * 4
    assert plan_for(LANE_MAX_SLOTS, 1, torch.int64, 16, LANE_MAX_LOCAL, MapChoice(MAP_NONE, 0)).lanes
    assert plan_for(8, 1, torch.int32, 16, WARP_MAX_LOCAL + 1, MapChoice(MAP_NONE, 0)).path == "block"
    assert plan_for(8, 1, torch.int32, 16, WARP_MAX_LOCAL, MapChoice(MAP_NONE, 0)).path == "warp"
    with pytest.raises(ConfigError, match="path=warp handles at most 512 slots"):
        plan(513, "warp")


def test_block_path_takes_the_lane_kernel_up_to_64_local_experts() -> None:
    def plan(nk: int, num_local: int, **options: object) -> object:
        return plan_for(nk, 1, torch.int32, 16, num_local, MapChoice(MAP_SHARED, 257), "block", **options)

    lanes = plan(4000, 32)  # ipt 4: 32 warps, 4 blocks of 8 warps each
    assert lanes.lanes and lanes.kernel_names == ("block_lane_preprocess",) and lanes.experts_per_lane == 1
    assert (lanes.ipt, lanes.active_warps, lanes.block_threads) == (4, 32, 1024)
    assert (lanes.grid_blocks, lanes.owned_rows, lanes.sub) == (4, 8, 4)
    assert lanes.smem_block_bytes == (257 + 32 * 33 + 65) * 4  # map, per warp 32 counts and a bad count, totals
    two = plan(4000, LANE_MAX_LOCAL)  # two experts per lane: rows of 64
    assert two.lanes and two.experts_per_lane == 2 and two.smem_block_bytes == (257 + 32 * 65 + 129) * 4
    # The kernel lays out a row per launched warp: the shared memory must count every one of them.
    for nk in (0, 1, 32, 33, 500, 1025, 8000, BLOCK_MAX_SLOTS):
        for num_local in (1, 32, 33, 64):
            p = plan(nk, num_local)
            assert p.lanes and p.block_threads == 32 * max(1, p.active_warps), (nk, num_local)
            rows = p.block_threads // 32
            assert p.smem_block_bytes == (257 + rows * (32 * p.experts_per_lane + 1) + 64 * p.experts_per_lane + 1) * 4
    assert plan(0, 5).smem_block_bytes == (257 + 33 + 65) * 4, "an empty batch still runs one warp"
    assert plan(4000, 7, block_grid=3).grid_blocks == 3
    for other in (plan(4000, LANE_MAX_LOCAL + 1), plan(4000, 8, lanes=False)):
        assert not other.lanes and other.kernel_names == ("block_preprocess",)
    # block_preprocess: a counter row per 32-slot chunk while the table is small, else a row per warp
    fine, coarse = plan(4000, 128), plan(4000, 256)
    assert (fine.ipt, fine.sub, fine.grid_blocks) == (4, 1, 4) and 128 * 128 <= BLOCK_FINE_MAX_COUNTERS
    assert (coarse.ipt, coarse.sub, coarse.grid_blocks, coarse.owned_rows) == (4, 4, 4, 8), coarse
    with pytest.raises(ConfigError, match="the block kernel needs .* use map_in=global or path=grid"):
        plan_for(4000, 1, torch.int32, 16, 8, MapChoice(MAP_SHARED, DEFAULT_SMEM_OPTIN // 4 - 100), "block")


def test_block_path_takes_one_cluster_where_the_device_has_them() -> None:
    def plan(nk: int, num_local: int = 32, path: str = "block", max_cluster: int = 8, **options: object) -> object:
        return plan_for(nk, 1, torch.int32, 16, num_local, MapChoice(MAP_SHARED, 257), path, max_cluster=max_cluster,
                        **options)

    # Past one block's 1024 slots: 8 blocks, the fewest slots per thread, then the fewest warps per block.
    assert (CLUSTER_SIZES, CLUSTER_MAX_SLOTS, CLUSTER_AUTO_MAX) == ((8, 16), 131072, 131072)
    assert CLUSTER_WIDE_MIN_SLOTS == 2048
    shapes = {nk: (plan(nk).ipt, plan(nk).block_threads) for nk in (1025, 2048, 8192, 8193, 16384, 30000, 65536)}
    assert shapes == {1025: (1, 160), 2048: (1, 256), 8192: (1, 1024), 8193: (2, 544), 16384: (2, 1024),
                      30000: (4, 960), 65536: (8, 1024)}
    # Where the device holds 16-block clusters: 8 blocks up to CLUSTER_WIDE_MIN_SLOTS, 16 past it (up to 131072).
    wide = {nk: (plan(nk, max_cluster=16).grid_blocks, plan(nk, max_cluster=16).ipt,
                 plan(nk, max_cluster=16).block_threads) for nk in (2048, 2049, 4096, 16384, 16385, 65536, 131072)}
    assert wide == {2048: (8, 1, 256), 2049: (16, 1, 160), 4096: (16, 1, 256), 16384: (16, 1, 1024),
                    16385: (16, 2, 544), 65536: (16, 4, 1024), 131072: (16, 8, 1024)}
    assert plan(16384, max_cluster=16, cluster_blocks=8).grid_blocks == 8, "a benchmark can hold it to 8 blocks"
    for max_cluster, nk in ((8, 1025), (8, 16384), (8, 65536), (16, 2049), (16, 131072)):
        p = plan(nk, max_cluster=max_cluster)
        blocks = p.grid_blocks
        assert p.cluster and p.lanes and p.kernel_names == ("cluster_lane_preprocess",)
        assert blocks == (16 if nk > CLUSTER_WIDE_MIN_SLOTS and max_cluster == 16 else 8)
        assert blocks * p.block_threads * p.ipt >= nk and p.active_warps == p.block_threads // 32
        # map, per warp 32 counts and a bad count, totals, first blocks, starts; from a 16-byte boundary a row of
        # 32 counts, a bad count and 3 unused ints per block; the mbarrier (8 bytes)
        ints = 257 + (p.block_threads // 32) * 33 + 65 + 32
        assert p.smem_block_bytes == (-(-ints // 4) * 4 + blocks * 36 + 2) * 4
    ints = 257 + 20 * 65 + 129 + 64  # rows of 64 experts
    assert plan(20000, LANE_MAX_LOCAL).smem_block_bytes == (-(-ints // 4) * 4 + 8 * 68 + 2) * 4
    # A map too large for a 16-block cluster's checked shared memory keeps 8 blocks (which fit up to the opt-in).
    big_map = MapChoice(MAP_SHARED, CLUSTER_WIDE_SMEM_BYTES // 4)
    assert plan_for(20000, 1, torch.int32, 16, 32, big_map, "block", max_cluster=16).grid_blocks == 8
    with pytest.raises(ConfigError, match=r"clusters have 8 or 16 blocks here, got max_cluster=True"):
        plan(4000, max_cluster=True)
    # One block's share or less, a fixed block count, more than 64 local experts, lanes=False, no clusters: the
    # other block kernels; past 16384 slots path=block then refuses (with clusters it names their bound).
    assert plan(1024).kernel_names == ("block_lane_preprocess",)
    assert plan(4000, block_grid=3).kernel_names == ("block_lane_preprocess",)
    assert plan(4000, LANE_MAX_LOCAL + 1).kernel_names == ("block_preprocess",)
    assert plan(4000, lanes=False).kernel_names == ("block_preprocess",)
    assert plan_for(4000, 1, torch.int32, 16, 32, MapChoice(MAP_SHARED, 257), "block").kernel_names == \
        ("block_lane_preprocess",)
    with pytest.raises(ConfigError, match=r"at most 65536 slots as one thread-block cluster .*16384 otherwise, got 65537"):
        plan(65537)
    with pytest.raises(ConfigError, match=r"at most 131072 slots as one thread-block cluster .*got 131073"):
        plan(CLUSTER_MAX_SLOTS + 1, max_cluster=16)
    with pytest.raises(ConfigError, match=r"cluster \(at most 64 local experts, this rank has 65\).*got 20000 x 1"):
        plan(20000, LANE_MAX_LOCAL + 1)
    # auto: the cluster up to CLUSTER_AUTO_MAX (as far as the widest cluster goes), then grid_fused
    assert plan(CLUSTER_AUTO_MAX, path="auto", max_cluster=16).cluster
    assert plan(CLUSTER_AUTO_MAX + 1, path="auto", max_cluster=16).path == "grid"
    assert plan(65536, path="auto").cluster and plan(65537, path="auto").path == "grid"
    assert plan(100, path="auto").kernel_names == ("lane_preprocess",)


def test_expert_windows_and_shared_memory_fit() -> None:
    for num_local in (0, 1, 31, 1024, 1025, 100_000):
        for nk in (1, 5000, BLOCK_MAX_SLOTS, 1_000_000):
            plan = plan_for(nk, 1, torch.int64, 8, num_local, choose_map(100_000, "auto"))
            assert 1 <= plan.window <= MAX_WINDOW
            assert plan.windows * plan.window >= num_local and (plan.windows - 1) * plan.window < max(num_local, 1)
            bounds = plan.window_bounds()
            assert len(bounds) == plan.windows and sum(wl for _, wl in bounds) == num_local
            for nbytes in (plan.smem_block_bytes, plan.smem_count_bytes, plan.smem_place_bytes, plan.smem_fused_bytes):
                assert 0 <= nbytes <= DEFAULT_SMEM_OPTIN
            ws = plan.workspace_ints()
            assert plan.fused == (plan.path == "grid" and num_local <= MAX_WINDOW)
            if plan.fused:
                groups = 0 if plan.two_phase else -(-plan.grid_blocks // 16)  # sums of 16 blocks' counts, two halves
                assert plan.group_blocks == (0 if plan.two_phase else 16) and plan.fused_groups == groups
                assert ws == {"tile_hist": num_local * plan.grid_blocks, "tile_invalid": plan.grid_blocks,
                              "group_start": 0, "done": 32 * 33 + 2 * groups * num_local, "keys8_bytes": 0}
                assert plan.kernel_names == ("grid_fused",)
            elif plan.path == "grid":
                assert ws == {"tile_hist": plan.window * plan.tiles, "tile_invalid": plan.tiles,
                              "group_start": num_local + 1, "done": 1,
                              "keys8_bytes": nk if num_local <= KEYS8_MAX_LOCAL else 0}
            else:
                assert set(ws.values()) == {0}


def test_where_the_map_lives() -> None:
    assert choose_map(None, "auto") == MapChoice(MAP_NONE, 0)
    assert choose_map(256, "auto") == MapChoice(MAP_SHARED, 256)
    assert choose_map(SMEM_MAP_AUTO_MAX, "auto").mode == MAP_SHARED
    assert choose_map(SMEM_MAP_AUTO_MAX + 1, "auto").mode == MAP_GLOBAL
    assert choose_map(100_000, "auto") == MapChoice(MAP_GLOBAL, 100_000), "too large for shared memory: global"
    assert choose_map(256, "global").mode == MAP_GLOBAL
    assert choose_map(20_000, "shared").mode == MAP_SHARED, "fits next to a smaller counter window"
    with pytest.raises(ConfigError, match=r"map_in=shared: the expert map has 100000 entries \(400000 bytes\).*"
                                          "use map_in=auto or map_in=global"):
        choose_map(100_000, "shared")
    with pytest.raises(ConfigError, match="map_in must be one of auto, shared, global"):
        choose_map(8, "texture")


def test_fused_grid_sizing() -> None:
    """grid_fused: as many blocks as can be co-resident (132 SMs x 2 modelled), whole-tile chunks balanced
    to within a tile; the shared memory that keeps the grid co-resident goes to the block's stage first (up to
    a chunk), then to per-warp lists of local slots (at most a segment each)."""
    def plan(nk: int, num_local: int = 32, **kw: object):
        return plan_for(nk, 1, torch.int32, 16, num_local, MapChoice(MAP_SHARED, 256), "grid", **kw)

    for nk, blocks, chunk in ((1, 1, TILE), (65_536, 16, TILE), (1 << 20, 128, 2 * TILE), (1 << 22, 256, 4 * TILE),
                              (1 << 23, 256, 8 * TILE), (3_000_000, 245, 3 * TILE)):
        p = plan(nk)
        assert (p.fused, p.grid_blocks, p.chunk) == (True, blocks, chunk), (nk, p)
        assert (p.grid_blocks - 1) * p.chunk < nk <= p.grid_blocks * p.chunk or nk < TILE
        assert p.smem_fused_bytes <= DEFAULT_SMEM_OPTIN // 2, "two blocks per SM"
        seg = p.chunk // GRID_WARPS
        unstaged = plan(nk, staged=False)
        assert (unstaged.grid_blocks, unstaged.chunk, unstaged.stage_cap) == (blocks, chunk, 0)
        if nk == 1 << 23:  # 32K-slot chunks: most of the stage (keyed), lists of 1.25x a warp's expected 256 slots
            assert p.stage_type == STAGE_KEYED and 20_000 < p.stage_cap < chunk and p.list_cap == 320, p
            assert not p.keys_in_smem
            stage_first = plan(nk, share_lists=False)  # the whole chunk wanted: offset entries hold it, 64 KiB
            assert stage_first.stage_type == STAGE_OFFSETS and stage_first.stage_cap == chunk, stage_first
            assert stage_first.list_cap == 692, "the lists get the rest"
            assert PLACE_QUEUE < unstaged.list_cap < seg and unstaged.keys_in_smem, "without a stage: ~1.7K entries"
        elif chunk < STAGE_MIN_CHUNK:  # one tile per block: no stage
            assert p.stage_cap == 0 and p.list_cap == max(PLACE_QUEUE, seg) and p.keys_in_smem, p
        else:  # a whole chunk staged; lists up to a segment
            assert p.stage_cap == chunk and PLACE_QUEUE <= p.list_cap <= max(PLACE_QUEUE, seg) and p.keys_in_smem, p
            assert unstaged.list_cap == max(PLACE_QUEUE, seg) and unstaged.keys_in_smem
    assert plan(1 << 22).list_cap < 1024, "4M: the stage takes 16K entries, the lists what is left"
    # 4096 tiles: 16 per block, 4096-slot warp segments: lists of 640 (1.25 x 512 expected local slots), the stage
    # the rest (~17K entries >= 2 x a block's expected 8192)
    big = plan(1 << 24)
    assert big.fused and big.grid_blocks == 256 and big.list_cap == 640 and 16_384 < big.stage_cap < 65536
    assert big.stage_type == STAGE_KEYED
    # 64 of 256 experts local at 16M: keyed entries cannot hold twice a block's expected 16K; offsets. Lists of 1.25 x
    # 1024 would leave the stage less than that: the stage gets exactly that, the lists the rest
    p = plan(1 << 24, num_local=64)
    assert p.stage_type == STAGE_OFFSETS and p.stage_cap == 32_768 and PLACE_QUEUE < p.list_cap < 1280, p
    # 128 of 256 at 8M: the whole chunk staged in offsets, the lists what is left (less than 1.25 x 1024)
    p = plan(1 << 23, num_local=128)
    assert p.stage_type == STAGE_OFFSETS and p.stage_cap == p.chunk and PLACE_QUEUE < p.list_cap < 1280, p
    # Offsets only up to 65536-slot chunks: keyed past them, with what stage fits
    p = plan(1 << 25, num_local=128)
    assert p.chunk > OFFSETS_MAX_CHUNK and p.stage_type == STAGE_KEYED and 0 < p.stage_cap < p.chunk, p
    assert big.smem_fused_bytes <= DEFAULT_SMEM_OPTIN // 2
    assert plan(2_000_000_000).chunk >= 1 << 22 and plan(2_000_000_000).stage_cap == 0, "no stage: 2**22-slot chunks"
    assert not plan(1 << 20, fused_occupancy=None).fused, "no cooperative launch: three launches"
    assert not plan(1 << 20, num_local=1025).fused, "more than one expert window: three launches"
    assert not plan(1 << 20).two_phase and plan(1 << 20, num_local=256).two_phase
    no_layout = plan_for(1 << 20, 1, torch.int32, None, 32, MapChoice(MAP_NONE, 0), "grid")
    assert no_layout.keys_in_smem is False and no_layout.stage_cap == 0


def test_forced_shared_map_shrinks_the_window_to_fit() -> None:
    plan = plan_for(BLOCK_MAX_SLOTS, 1, torch.int32, 16, 4096, choose_map(40_000, "shared"), "block")
    assert plan.window < MAX_WINDOW and plan.smem_block_bytes <= DEFAULT_SMEM_OPTIN


def test_block_m_and_size_errors_say_what_to_do() -> None:
    assert check_block_m(None) == 0 and check_block_m(16) == 16
    for bad in (0, -8, True, 16.0, "16"):
        with pytest.raises(ContractError, match="block_m must be a positive int"):
            check_block_m(bad)
    with pytest.raises(ContractError, match=r"2147483648 slots is more than .* split the batch"):
        plan_for(2**28, 8, torch.int32, None, 8, MapChoice(MAP_NONE, 0))
    with pytest.raises(ContractError, match="past int32 indexing; use a smaller block_m"):
        plan_for(2**27, 8, torch.int32, 512, 2**22, MapChoice(MAP_NONE, 0))
    with pytest.raises(ContractError, match="int32 or int64, got torch.float32"):
        plan_for(4, 2, torch.float32, None, 8, MapChoice(MAP_NONE, 0))


def test_moved_bytes_counts_each_input_once_and_each_output_once() -> None:
    plan = plan_for(1000, 8, torch.int64, 16, 32, MapChoice(MAP_SHARED, 256))
    expected = 8000 * 8 + 8000 * 4 + 32 * 4 + 4 + (plan.capacity + plan.capacity // 16 + 1) * 4
    assert moved_bytes(plan) == expected
    plain = plan_for(1000, 8, torch.int32, None, 32, MapChoice(MAP_SHARED, 256))
    assert moved_bytes(plain) == 8000 * 4 * 2 + 32 * 4 + 4


# --- argument checks ---------------------------------------------------------------------------------

def test_topk_ids_checks_name_the_problem() -> None:
    ok = torch.zeros(4, 2, dtype=torch.int32)
    check_topk_ids(ok, torch.device("cpu"))
    with pytest.raises(ContractError, match=r"int32/int64 \[N, K\], got dtype torch.float32; cast with"):
        check_topk_ids(ok.float(), torch.device("cpu"))
    with pytest.raises(ContractError, match=r"got shape \(2, 4, 2\) \(for the received \[ep_size, R, K\] layout"):
        check_topk_ids(torch.zeros(2, 4, 2, dtype=torch.int32), torch.device("cpu"))
    with pytest.raises(ContractError, match=r"got shape \(8,\)$"):
        check_topk_ids(torch.zeros(8, dtype=torch.int64), torch.device("cpu"))
    with pytest.raises(ContractError, match=r"built for cuda:0 but topk_ids is on cpu; move it with \.to\('cuda:0'\) "
                                            "or select preprocess=torch"):
        check_topk_ids(ok, CUDA0)


def test_inputs_come_in_without_copies() -> None:
    t = torch.arange(6, dtype=torch.int32).reshape(3, 2)
    assert as_tensor(t) is t
    array = np.arange(6, dtype=np.int32).reshape(3, 2)
    shared = as_tensor(array)  # DLPack: the same memory
    assert shared.data_ptr() == array.ctypes.data and shared.dtype == torch.int32
    with pytest.raises(ContractError, match="must be a torch tensor .* got list"):
        as_tensor([[1, 2]])


def test_preallocated_path_refuses_to_copy() -> None:
    check_contiguous_for_capture(torch.zeros(4, 2, dtype=torch.int32))
    with pytest.raises(ContractError, match=r"needs a contiguous topk_ids \(got strides \(1, 4\).*call \.contiguous\(\)"):
        check_contiguous_for_capture(torch.zeros(2, 4, dtype=torch.int32).t())


def test_cpu_devices_are_refused_with_the_alternative() -> None:
    with pytest.raises(ContractError, match="runs on CUDA devices, but the layer's device is cpu; select preprocess=torch"):
        normalize_device("cpu")
    assert normalize_device("cuda:1") == torch.device("cuda", 1)


# --- the CUDA source ----------------------------------------------------------------------------------

def test_every_kernel_the_launcher_uses_is_in_the_source() -> None:
    source = jit.SOURCE_PATH.read_text()
    assert jit.SOURCE_PATH.parent.name == "csrc" and jit.SOURCE_PATH.suffix == ".cu"
    for name in jit.name_expressions():
        base = name.split("<")[0]
        assert re.search(rf"\b{base}\s*\(", source), f"{base} is not defined in {jit.SOURCE_PATH.name}"
    assert "#include" not in source, "NVRTC compiles it without a CUDA include path"


def test_source_is_packaged() -> None:
    files = metadata.files("moe-plugin-cupy-preprocess") or []
    editable = any(str(f).endswith((".pth", "direct_url.json")) for f in files)
    assert editable or any(str(f).endswith("csrc/preprocess.cu") for f in files)
    assert Path(plugin.__file__).with_name("csrc").joinpath("preprocess.cu").is_file()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_source_compiles_for_sm90_without_spills(tmp_path: Path) -> None:
    cmd = ["nvcc", "-DHOSTCORE_NVCC_CHECK", "-arch=sm_90", "-Xptxas", "-v", "-c", "-x", "cu", str(jit.SOURCE_PATH),
           "-o", str(tmp_path / "preprocess.o")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = result.stderr
    entries = re.findall(r"Compiling entry function '(\w+)'", report)
    assert len(entries) == len(jit.name_expressions()), entries
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert spills and all(s == ("0", "0") for s in spills), report
    used = re.findall(r"Compiling entry function '(\w+)'.*?Used (\d+) registers", report, re.S)
    assert len(used) == len(entries)
    # 1024-thread blocks need <= 64 registers; the one-warp kernels run 32 threads (__launch_bounds__(32)).
    assert all(int(r) <= 64 for name, r in used if not re.search("(warp|lane)_preprocess", name)), used
    assert all(int(r) <= 255 for _, r in used), used
