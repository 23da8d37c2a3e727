"""Launch plans: which kernels run, with which grid, shared memory and buffer sizes (pure Python).

Nothing here touches a GPU, so the sizing rules are tested on the CPU. The constants mirror the
``#define`` s of ``csrc/preprocess.cu``; `plan_for` is the only place that decides between

``warp`` path
    one launch of ONE warp, ``ipt`` slots per lane (``num_slots <= 32 * 16``, ``num_local <=
    WARP_MAX_LOCAL``); ``path=auto`` up to `WARP_PATH_AUTO_MAX`. Decode sizes: no ``__syncthreads``, no
    block scan, one dependent memory round trip with a shared-memory map. ``lane_preprocess`` (``lanes``:
    at most `LANE_MAX_LOCAL` local experts and `LANE_MAX_SLOTS` slots, one or two experts per lane, counts
    and positions from ballots in registers) or ``warp_preprocess`` (shared per-chunk counters) otherwise.
``block`` path
    one launch of ``grid_blocks`` independent blocks of up to 1024 threads, ``ipt`` slots per thread
    (``num_slots <= 1024 * 16``; ``path=auto`` up to `BLOCK_LANE_AUTO_MAX` / `BLOCK_PATH_AUTO_MAX`). Every
    block maps and counts all slots; each places only its own share (`BLOCK_OWNED_SLOTS` slots or so), so the
    placement spreads over the blocks without any grid-wide barrier. Decode sizes. ``block_lane_preprocess``
    (``lanes``: at most `LANE_MAX_LOCAL` local experts; a shared row per warp, warp 0 scans the columns) or
    ``block_preprocess`` (shared counters per virtual warp, windows of experts) otherwise.
    ``cluster_lane_preprocess`` (``cluster``: devices with thread-block clusters, sm_90+) instead of
    block_lane_preprocess past one block's share of slots (up to `CLUSTER_MAX_SLOTS`): ONE cluster of
    ``grid_blocks`` blocks (`CLUSTER_SIZES`: 8, or 16 where the device holds such a cluster) that split the slots
    (``ipt`` per thread, ``block_threads`` per block) and exchange their counts through distributed shared
    memory, so no block maps or counts another's slots.
``grid`` path, ``fused``
    one cooperative launch of ``grid_fused`` (all blocks co-resident, grid-wide barriers in the kernel):
    ``grid_blocks`` blocks, sized from the kernel's occupancy, each owning ``chunk`` consecutive slots.
    Used whenever ``num_local <= 1024`` (one expert window), the device supports cooperative launches
    and the kernel's shared memory fits.
``grid`` path, split (``fused`` False)
    per expert window: ``grid_count`` (tiles of 4096 slots) -> ``grid_scan`` -> ``grid_place``
    (``grid_place`` skipped without ``block_m``). For more local experts than one window (or a device
    without cooperative launches).

Experts are processed in windows of at most ``window`` local experts (shared memory holds per-warp
counters for one window); more local experts than that repeat the passes per window.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hostcore.contract import aligned_capacity
from hostcore.errors import ConfigError, ContractError

BLOCK_THREADS = 1024
BLOCK_IPTS = (1, 4, 8, 16)
BLOCK_VARIANTS = {"int32": ((1, 1), (4, 1), (4, 4), (8, 1), (8, 8), (16, 1), (16, 16)),
                  "int64": ((1, 1), (4, 1), (4, 4), (8, 1), (8, 8), (16, 16))}
"""The (ipt, sub) instantiations of block_preprocess per id dtype: sub = ipt is one block's layout (a row of
counters per warp), sub = 1 several blocks' (a row per 32-slot chunk). int64 ids at ipt 16 have no sub = 1
kernel: their 16 ids take 32 registers while they load, and with the finer chunk addressing ptxas spilled
(sm_90, 64 registers for 1024 threads); several blocks then place whole warps' segments."""
BLOCK_MAX_SLOTS = BLOCK_THREADS * BLOCK_IPTS[-1]
GRID_THREADS = 512
GRID_WARPS = GRID_THREADS // 32
GRID_IPT = 8
TILE = GRID_THREADS * GRID_IPT
SCAN_THREADS = 1024
SCRATCH_INTS = 40
MAX_WINDOW = 1024
MIN_WINDOW = 32
INT32_MAX = 2**31 - 1

MAP_NONE, MAP_SHARED, MAP_GLOBAL = 0, 1, 2
KEYS8_MAX_LOCAL = 254
"""Up to this many local experts the grid path keeps a byte per slot (its expert, 255 for none) for
grid_place to read instead of the 4-byte local_ids: 3 bytes per slot less traffic."""
MAP_HEAD = 64
"""Zero int32 entries allocated before the device copy of the map: what a faithful read at ids -64..-1
returns on the global-memory path (see ``map_one`` in the .cu)."""

SMEM_MAP_AUTO_MAX = 8192
"""``map_in=auto`` keeps maps of up to this many entries (32 KiB) in shared memory. Larger maps are read
from global memory (L1/L2 cached): every block copies the shared map, so a map much larger than a tile
of ids costs more traffic than it saves."""

DEFAULT_SMEM_OPTIN = 227 * 1024
"""Hopper's opt-in shared memory per block; the real value is read from the device."""

DEFAULT_NUM_SMS = 132
"""H100 SXM; the real value is read from the device."""
SMEM_PER_SM = 228 * 1024
"""Shared memory per SM on Hopper (the occupancy model of `default_fused_occupancy`)."""
FUSED_MAX_BLOCKS_PER_SM = 2
"""``grid_fused`` is compiled with ``__launch_bounds__(512, 2)``: at most 2 blocks of 512 threads per SM."""
FUSED_TAIL_QUEUES = 32
"""HC_TAIL_QUEUES in csrc/preprocess.cu: grid_fused hands out the tail of ``sorted`` from this many counters."""
FUSED_SYNC_STRIDE = 32
"""HC_SYNC_STRIDE: ints between two of grid_fused's sync counters (one 128-byte line each)."""
FUSED_SYNC_INTS = FUSED_SYNC_STRIDE * (1 + FUSED_TAIL_QUEUES)
"""grid_fused's sync words: the grid barrier's 64-bit arrival count, then the tail queues' counters (the group
sums follow them in the same buffer)."""
FUSED_GROUP_BLOCKS = 16
"""grid_fused (one barrier) sums the per-block counts of each group of this many consecutive blocks before its
grid barrier, so that after it a block reads the group sums and its own group's counts, not every block's
(``Plan.group_blocks``; the tests also plan smaller groups, to have several in a small grid)."""
TWO_PHASE_LIMIT = 4096
"""Above this many ints that each block of grid_fused would read after its one barrier (`fused_reads_per_block`:
the group sums and its own group's lower blocks' counts), it scans the counts distributed over the blocks (two
grid barriers) instead. Measured on an H100 (GPU run 90, GPU_RESULTS.md), both ways in one process, N*K = 1M /
4M / 8M: one barrier won at 64 local experts (1984 ints per block at 256 blocks; 18.53 / 35.68 / 58.05 us against
19.02 / 37.57 / 59.42) and at 128 (3968 ints; 20.67 / 42.34 / 75.62 against 22.27 / 43.10 / 77.10). Larger reads
are unmeasured and keep two barriers. (Before the group sums every block read all ``num_local * grid_blocks``
counts, and two barriers won from 64 x 256 on: GPU run 57.)"""


def fused_reads_per_block(grid_blocks: int, num_local: int) -> int:
    """Ints each grid_fused block reads after a single barrier: every group's sums (`FUSED_GROUP_BLOCKS` blocks a
    group) and the counts of up to ``FUSED_GROUP_BLOCKS - 1`` lower blocks of its own group, per local expert."""
    groups = -(-grid_blocks // FUSED_GROUP_BLOCKS)
    return (groups + min(grid_blocks, FUSED_GROUP_BLOCKS) - 1) * num_local

PATHS = ("auto", "warp", "block", "grid")
WARP_IPTS = (1, 4, 16)
WARP_MAX_SLOTS = 32 * WARP_IPTS[-1]
WARP_MAX_LOCAL = 256
"""warp_preprocess's bound on local experts (HC_WARP_MAX_LOCAL): each lane owns ceil(num_local / 32)
experts and scans their chunk counts serially, and its shared counters are ``ipt * num_local`` ints. 256 covers
every expert of DeepSeek-V3 on one rank (no expert parallelism), which took block_preprocess below 128."""
LANE_IPTS = (1, 4)
LANE_MAX_SLOTS = 32 * LANE_IPTS[-1]
LANE_MAX_LOCAL = 64
"""The lane kernels' bounds (HC_LANE_MAX_EPL): lane e stands for local experts e and e + 32
(`experts_per_lane`); lane_preprocess holds per 32-slot chunk 6-7 ballots in registers (the ballots of more
chunks would crowd the registers; up to 128 slots covers `WARP_PATH_AUTO_MAX`)."""
WARP_PATH_AUTO_MAX = 128
"""``path=auto`` takes the one-warp kernel up to this many slots (when ``num_local <= WARP_MAX_LOCAL``).
Measured on an H100 (GPU run 4, commit afebe7f, GPU_RESULTS.md), in a CUDA graph: warp 3.15 / 4.11 / 7.22 us
against block_preprocess 4.72 / 5.01 / 5.57 us at 8 / 64 / 512 slots. The warp's time grows about 7 ns per slot
(its chunks run one after another on one warp), the block's about 1.3 ns: the lines cross near 220 slots, so the
switch sits at 128, inside the range where the warp measured faster."""
MAP_PLACES = ("auto", "shared", "global")
BLOCK_OWNED_SLOTS = 1024
"""block path: ``path=auto`` gives each block about this many slots to place (the blocks all map and count
every slot; see `_block_grid`)."""
BLOCK_MAX_GRID = 16
"""block path: at most this many blocks (each reads all the ids from L2)."""
BLOCK_FINE_MAX_COUNTERS = 16384
"""block_preprocess counts a row per 32-slot chunk (rather than per warp) only up to this many counters (rows x
window ints). Measured on an H100 (GPU run 101, 256 local experts, no map): at 4096 slots the 128 x 256 per-chunk
table (128 KiB to zero and scan) took 18.70 us (graph 15.20), more than 8192 slots with a row per warp, 12.93
(10.17)."""
CLUSTER_SIZES = (8, 16)
"""The blocks of cluster_lane_preprocess's one thread-block cluster (its template argument CB, compiled in with
``__cluster_dims__``): 8 is the size every sm_90 device supports; 16 is a non-portable size that jit.py allows
per kernel and takes where the driver says such a cluster of `BLOCK_THREADS` threads per block and
`CLUSTER_WIDE_SMEM_BYTES` fits (an H100 SXM does)."""
CLUSTER_WIDE_SMEM_BYTES = 64 * 1024
"""The dynamic shared memory per block that jit.py checks a 16-block cluster for: plans past it take 8 blocks."""
CLUSTER_WIDE_MIN_SLOTS = 2048
"""The plan takes a 16-block cluster (where the device has one) past this many slots, 8 blocks up to it.
Measured on an H100, same process, CUDA graphs, since the exchange goes in 16-byte pieces (GPU_RESULTS.md, runs
77 and 78): at 4096 slots 16 blocks led in both runs (3.32 against 3.56 us; 3.41 against 3.67), at 2048 8 blocks
led or tied (3.20 against 3.29; 3.33 against 3.36), and from 8192 up 16 blocks led by 6-26% (run 78: 3.73 against
4.51 us at 8192, 6.05 against 8.19 at 65536)."""
CLUSTER_IPTS = (1, 2, 4, 8)
CLUSTER_MAX_SLOTS = CLUSTER_SIZES[-1] * BLOCK_THREADS * CLUSTER_IPTS[-1]
"""The most slots of the widest cluster (`cluster_max_slots` gives each size's)."""
CLUSTER_AUTO_MAX = CLUSTER_MAX_SLOTS
"""``path=auto`` takes the block path up to this many slots when it runs cluster_lane_preprocess (up to the
cluster's `cluster_max_slots`). Measured on an H100, in CUDA graphs: 8 blocks 5.9-6.1 us at 32768 slots and 8.1
at 65536, against grid_fused's 9.7 and 9.9 (GPU runs 45, 47); 16 blocks 8.56 us at 131072, against grid_fused's
9.63 (eager 11.84 against 13.28, run 64). From 2048 slots up the cluster also beats block_lane_preprocess (3.4
against 3.9 us at 2048, 5.0-5.2 against 7.7 at 16384)."""
BLOCK_LANE_AUTO_MAX = BLOCK_MAX_SLOTS
"""``path=auto`` takes the block path up to this many slots when it runs block_lane_preprocess (at most
`LANE_MAX_LOCAL` local experts). Measured on an H100 (GPU run 28, GPU_RESULTS.md) at 16384 slots: 10.78 us
(graph 7.82) against grid_fused's 13.28 (9.76); block_preprocess took 16.00 (12.95)."""
BLOCK_PATH_AUTO_MAX = 8192
"""``path=auto`` takes the block path up to this many slots with block_preprocess (more than `LANE_MAX_LOCAL`
local experts). Measured on an H100 (GPU_RESULTS.md, path
comparisons): with a block per 1024 slots and 8 slots per thread (run 20) the block path wins at 8192 slots,
12.06 us (graph 9.15) against grid_fused's 13.86 (9.64); at 16384 grid_fused wins (14.27 against 15.71 us,
graph 10.10 against 12.69). With 16 slots per thread at 8192 (runs 16-19) the block path had lost (14.11-14.53
against 13.54-14.27 us), and the switch sat at 4096 from run 12 to run 19."""


STAGE_KEYED = "unsigned"
"""grid_fused's StageT for keyed stage entries (32 bits: offset and key; the copy-out reads the key)."""
STAGE_OFFSETS = "unsigned short"
"""grid_fused's StageT for offset-only stage entries (16 bits: twice as many in the same shared memory; the copy-out
finds each position's expert from the block's group starts, which costs more where a warp's share of the stage
spans many experts: GPU run 96, every expert local at 1M, 26.0 against 27.8 us)."""
OFFSETS_MAX_CHUNK = 1 << 16
"""Offset-only stage entries hold slot offsets in chunks of up to this many slots."""


@dataclass(frozen=True)
class MapChoice:
    """Where the kernels read the expert map: ``mode`` is MAP_NONE, MAP_SHARED or MAP_GLOBAL."""

    mode: int
    size: int  # entries of the map, guard slots included (0 without a map)


def choose_map(map_size: int | None, map_in: str, smem_optin: int = DEFAULT_SMEM_OPTIN) -> MapChoice:
    """Decide where the map lives, at build time. ``map_size`` is ``None`` without an expert map.

    Raises `ConfigError` for an unknown ``map_in`` or ``map_in=shared`` with a map that cannot fit.
    """
    if map_in not in MAP_PLACES:
        raise ConfigError(f"map_in must be one of {', '.join(MAP_PLACES)}, got {map_in!r}")
    if map_size is None:
        return MapChoice(MAP_NONE, 0)
    fits = _block_smem_ints(map_size, MIN_WINDOW, 1, 32) * 4 <= smem_optin
    if map_in == "shared":
        if not fits:
            raise ConfigError(f"map_in=shared: the expert map has {map_size} entries ({map_size * 4} bytes), more than "
                              f"fits in the {smem_optin} bytes of shared memory a block can get next to its counters; "
                              "use map_in=auto or map_in=global")
        return MapChoice(MAP_SHARED, map_size)
    if map_in == "global" or map_size > SMEM_MAP_AUTO_MAX or not fits:
        return MapChoice(MAP_GLOBAL, map_size)
    return MapChoice(MAP_SHARED, map_size)


@dataclass(frozen=True)
class Plan:
    """Everything the launcher needs for one input shape; see the module docstring.

    Sizes are in elements of int32 unless named ``*_bytes``. ``block_m == 0`` means no aligned layout.
    """

    rows: int
    top_k: int
    id_dtype: torch.dtype
    block_m: int
    num_local: int
    map: MapChoice
    path: str  # "warp", "block" or "grid"
    capacity: int  # entries of sorted_slot_ids (0 without block_m)
    window: int  # local experts per window (>= 1)
    windows: int  # passes over the experts (>= 1)
    ipt: int  # warp and block paths: slots per thread
    active_warps: int  # block path: warps that hold slots
    block_threads: int  # block path: threads per block (>= 32 * active_warps and >= window)
    tiles: int  # grid path: tiles of TILE slots (>= 1)
    smem_block_bytes: int
    smem_count_bytes: int
    smem_place_bytes: int
    fused: bool = False  # grid path: one cooperative grid_fused launch instead of count/scan/place
    grid_blocks: int = 0  # fused: blocks of the cooperative grid (all co-resident); block path: blocks of the launch
    sub: int = 0  # block path: chunks of 32 slots per virtual warp (a row of counters): 1 or ipt
    owned_rows: int = 0  # block path: virtual warps each block places (grid_blocks * owned_rows >= rows)
    chunk: int = 0  # fused: consecutive slots per block (a multiple of TILE)
    keys_in_smem: bool = False  # fused: list_cap >= half a warp's segment (see `_fused_layout`)
    list_cap: int = 0  # fused: entries of each warp's shared list of its local slots (>= PLACE_QUEUE)
    stage_cap: int = 0  # fused: entries of the block's shared stage of placed slots (0: stored straight to sorted)
    stage_type: str = STAGE_KEYED  # fused: StageT of grid_fused, the C type of a stage entry (see `_fused_layout`)
    group_blocks: int = 0  # fused with one barrier: consecutive blocks per group of summed counts (FUSED_GROUP_BLOCKS)
    smem_fused_bytes: int = 0
    two_phase: bool = False  # fused: distributed column scan (two grid barriers) instead of one barrier
    lanes: bool = False  # lane_preprocess / block_lane_preprocess (warp / block path): experts by lane
    cluster: bool = False  # block path: cluster_lane_preprocess (grid_blocks: the cluster's blocks, lanes)

    @property
    def experts_per_lane(self) -> int:
        """The lane kernels' EPL template argument (0 without them)."""
        return experts_per_lane(self.num_local) if self.lanes else 0

    @property
    def kernel_names(self) -> tuple[str, ...]:
        """The kernels one preprocess launches, in order (for breakdowns and docs)."""
        if self.path == "warp":
            return ("lane_preprocess",) if self.lanes else ("warp_preprocess",)
        if self.path == "block":
            if self.cluster:
                return ("cluster_lane_preprocess",)
            return ("block_lane_preprocess",) if self.lanes else ("block_preprocess",)
        if self.fused:
            return ("grid_fused",)
        per_window = ("grid_count", "grid_scan") + (("grid_place",) if self.block_m else ())
        return per_window * self.windows

    @property
    def num_slots(self) -> int:
        return self.rows * self.top_k

    @property
    def num_blocks(self) -> int:
        """Entries of block_expert_ids."""
        return self.capacity // self.block_m if self.block_m else 0

    def window_bounds(self) -> list[tuple[int, int]]:
        """``(e0, wl)`` of every window; one empty window when there is no local expert."""
        if self.num_local == 0:
            return [(0, 0)]
        return [(e0, min(self.window, self.num_local - e0)) for e0 in range(0, self.num_local, self.window)]

    def workspace_ints(self) -> dict[str, int]:
        """Sizes of the grid path's workspace buffers (all zero on the block path).

        Fused: ``tile_hist`` holds the per-block counts ``[num_local * grid_blocks]``, ``tile_invalid`` the
        per-block invalid counts, ``done`` the kernel's sync words: the grid barrier's 64-bit arrival count,
        the counters of phase 3's tail queues and two halves of group sums (`buffers.PreprocessBuffers`).
        """
        if self.path != "grid":
            return {"tile_hist": 0, "tile_invalid": 0, "group_start": 0, "done": 0, "keys8_bytes": 0}
        if self.fused:
            return {"tile_hist": self.num_local * self.grid_blocks, "tile_invalid": self.grid_blocks,
                    "group_start": 0, "done": FUSED_SYNC_INTS + 2 * self.fused_groups * self.num_local,
                    "keys8_bytes": 0}
        return {"tile_hist": self.window * self.tiles, "tile_invalid": self.tiles,
                "group_start": self.num_local + 1, "done": 1, "keys8_bytes": self.keys8_bytes}

    @property
    def fused_groups(self) -> int:
        """grid_fused's groups of ``group_blocks`` consecutive blocks, whose counts it sums before its barrier
        (0 where it runs two barriers, or does not run)."""
        return -(-self.grid_blocks // self.group_blocks) if self.group_blocks else 0

    @property
    def keys8_bytes(self) -> int:
        """Size of the grid path's byte-per-slot key buffer (0 when it is not used)."""
        use = self.path == "grid" and not self.fused and self.block_m > 0 and self.num_local <= KEYS8_MAX_LOCAL
        return self.num_slots if use else 0


def _block_smem_ints(map_entries: int, window: int, rows: int, slots: int) -> int:
    """block_preprocess's dynamic shared memory: map, one row of ``window | 1`` counters per virtual warp,
    group starts and totals of the window, scratch, the layout key of each of the block's ``slots``."""
    return map_entries + rows * (window | 1) + 2 * window + 1 + SCRATCH_INTS + slots


def _block_grid(nk: int, ipt: int, active_warps: int, id_dtype: str, num_sms: int, blocks: int | None,
                fine: bool = True) -> tuple[int, int, int]:
    """``(grid_blocks, sub, owned_rows)`` of block_preprocess for ``blocks`` blocks (``None``: one per
    `BLOCK_OWNED_SLOTS` slots, at most `BLOCK_MAX_GRID` and ``num_sms``): one block counts a row per warp
    (sub = ipt); several count a row per 32-slot chunk (sub = 1, where `BLOCK_VARIANTS` has it and ``fine``),
    so that each block's share of the rows spreads over its warps."""
    if blocks is None:
        blocks = max(1, min(BLOCK_MAX_GRID, num_sms, -(-nk // BLOCK_OWNED_SLOTS)))
    sub = 1 if fine and blocks > 1 and (ipt, 1) in BLOCK_VARIANTS[id_dtype] else ipt
    rows = active_warps * (ipt // sub)
    owned = max(1, -(-rows // blocks))  # an empty batch: one block (it writes the fills)
    return max(1, -(-rows // owned)), sub, owned


def experts_per_lane(num_local: int) -> int:
    """Local experts each lane of the lane kernels stands for (lane e: experts e, e + 32): 1 up to 32, else 2."""
    return 1 if num_local <= 32 else 2


def _block_lane_smem_ints(map_entries: int, warps: int, num_local: int) -> int:
    """block_lane_preprocess's dynamic shared memory: map, a row of 32 * EPL expert counts (then positions) and
    a bad count per warp, the experts' totals and first blocks, the total of blocks."""
    experts = 32 * experts_per_lane(num_local)
    return map_entries + warps * (experts + 1) + 2 * experts + 1


def _cluster_lane_smem_ints(map_entries: int, warps: int, num_local: int, blocks: int) -> int:
    """cluster_lane_preprocess's dynamic shared memory: block_lane_preprocess's, then each expert's start for this
    block, then (from the next multiple of 4 ints: 16 bytes) a row per block of the cluster (its slots per expert,
    invalid count and 3 unused ints, stored there by that block in 16-byte pieces), then the 8-byte mbarrier they
    arrive on."""
    experts = 32 * experts_per_lane(num_local)
    ints = _block_lane_smem_ints(map_entries, warps, num_local) + experts
    return -(-ints // 4) * 4 + blocks * (experts + 4) + 2


def cluster_max_slots(blocks: int) -> int:
    """The most slots one cluster of ``blocks`` blocks takes (`BLOCK_THREADS` threads x the largest ipt each)."""
    return blocks * BLOCK_THREADS * CLUSTER_IPTS[-1]


def _cluster_shape(nk: int, blocks: int) -> tuple[int, int]:
    """``(ipt, warps per block)`` of cluster_lane_preprocess for ``nk`` slots over ``blocks`` blocks (``nk <=
    cluster_max_slots(blocks)``): the fewest slots per thread, then the fewest warps that hold them."""
    ipt = next(i for i in CLUSTER_IPTS if blocks * BLOCK_THREADS * i >= nk)
    return ipt, max(1, -(-nk // (blocks * 32 * ipt)))


def _cluster_blocks(nk: int, num_local: int, map_entries: int, smem_optin: int, max_cluster: int,
                    forced: int | None) -> int:
    """The blocks of the cluster that takes ``nk`` slots (0: none fits). ``max_cluster``: the widest cluster the
    device holds (0 without clusters); ``forced`` (benchmarks): that size or none. Past `CLUSTER_WIDE_MIN_SLOTS`
    the widest that fits, else 8."""
    if num_local > LANE_MAX_LOCAL or not BLOCK_OWNED_SLOTS < nk:
        return 0
    sizes = [b for b in CLUSTER_SIZES if b <= max_cluster and nk <= cluster_max_slots(b)]
    if forced is not None:
        sizes = [b for b in sizes if b == forced]
    elif nk <= CLUSTER_WIDE_MIN_SLOTS:
        sizes = sizes[:1]

    def smem_bytes(blocks: int) -> int:
        return _cluster_lane_smem_ints(map_entries, _cluster_shape(nk, blocks)[1], num_local, blocks) * 4

    fits = [b for b in sizes if smem_bytes(b) <= (smem_optin if b == CLUSTER_SIZES[0] else
                                                   min(smem_optin, CLUSTER_WIDE_SMEM_BYTES))]
    return fits[-1] if fits else 0


def _block_lane_fits(num_local: int, map_entries: int, warps: int, smem_optin: int) -> bool:
    """Whether block_lane_preprocess can run ``warps`` warps: at most `LANE_MAX_LOCAL` local experts, and its
    shared memory fits next to the map."""
    return num_local <= LANE_MAX_LOCAL and _block_lane_smem_ints(map_entries, warps, num_local) * 4 <= smem_optin


def _warp_smem_ints(map_entries: int, ipt: int, num_local: int) -> int:
    """warp_preprocess's dynamic shared memory: map, chunk counters ``[ipt, num_local]``, group starts."""
    return map_entries + ipt * num_local + num_local


def _place_smem_ints(window: int) -> int:
    return GRID_WARPS * window + window + 2 * TILE + SCRATCH_INTS


FUSED_GRID_PER_SM_BOUND = 2048 // GRID_THREADS
"""At most this many grid_fused blocks can be resident on an SM (2048 threads per SM): the bound of its
``col`` buffer, one int per block of the grid."""


PLACE_QUEUE = 32 * 8 + 32
"""grid_fused: the least entries of a warp's list of local slots (HC_PLACE_BUF): phase 3 reuses the list as
the queue of its re-read batches (8 chunks of 32 slots plus a carried remainder)."""
LIST_OFFSET_LIMIT = 1 << 22
"""grid_fused list entries are ``(slot offset in the warp's segment << 10) | key``: segments below 2**22, and keyed
stage entries ``(slot offset in the block's chunk << 10) | key``: no keyed stage for chunks of 2**22 slots or more."""


STAGE_MIN_CHUNK = 2 * TILE
"""grid_fused stages its placed slots only in chunks of at least this many slots. Measured on an H100 (GPU run 80,
same process, against the same plan without a stage, CUDA events): at one tile per block (N*K = 262144) the stage
cost 13.82 -> 15.20 us at 32 local experts (2% at 64, -2% at 128), while from two tiles on it won at every size
and EP: 1M 17.86 -> 17.22 / 21.18 -> 20.13 / 25.70 -> 22.34 us, 8M 62.11 -> 53.87 / 81.70 -> 63.30 / 128.19 ->
77.15 at 32 / 64 / 128 local experts."""


LIST_SHARE_MARGIN = 1.25
"""grid_fused keeps each warp's list this many times its expected local slots (``seg * num_local / E``) where
the stage can spare it (`_fused_layout`): a list that fills up leaves the rest of the warp's slots to a re-read."""
STAGE_SHARE_MARGIN = 2.0
"""... and only while the stage still holds this many times a block's expected local slots (the slots of a block
past its stage's end are stored straight to `sorted`, the costlier miss); where it cannot, the stage keeps that many
and the lists get what is left."""


def _fused_smem_ints(map_entries: int, num_local: int, num_sms: int, lists_and_stage: int = GRID_WARPS * PLACE_QUEUE
                     ) -> int:
    """grid_fused's dynamic shared memory (see the .cu for the layout): map, per-warp counts, tot/run/gs/bst,
    one column of per-block counts (sized for the largest co-resident grid), scratch, and ``lists_and_stage``
    ints: the per-warp lists of local slots (an int per entry), then the block's stage (an int per keyed entry,
    two offset entries per int)."""
    return (map_entries + GRID_WARPS * num_local + 4 * num_local + 2 + FUSED_GRID_PER_SM_BOUND * num_sms
            + SCRATCH_INTS + lists_and_stage)


def default_fused_occupancy(smem_bytes: int) -> int:
    """Blocks of grid_fused per SM for ``smem_bytes`` of dynamic shared memory, modelled for Hopper (the
    GPU path asks the driver instead): the launch bound, and shared memory with 1 KiB reserved per block."""
    return min(FUSED_MAX_BLOCKS_PER_SM, SMEM_PER_SM // (smem_bytes + 1024))


def _fused_layout(nk: int, bm: int, num_local: int, map_smem: int, smem_optin: int, num_sms: int,
                  occupancy: Callable[[int], int], staged: bool = True, local_share: float | None = None
                  ) -> tuple[int, int, int, int, str, int] | None:
    """``(grid_blocks, chunk, list_cap, stage_cap, stage_type, smem_bytes)`` of grid_fused, or ``None`` if it cannot
    run.

    The grid is as many blocks as can be co-resident with the smallest lists (capped by the number of tiles); chunks
    are whole tiles, balanced to within one tile. The shared memory that keeps that grid co-resident then goes first
    to the block's stage, up to its whole chunk (a block with more local slots stores those past the stage straight
    to `sorted`; no stage below `STAGE_MIN_CHUNK`), and the rest to the warps' lists, up to a whole segment each
    (then no slot is re-read from local_ids). ``staged=False`` (benchmarks): no stage, the lists take it all. The
    stage comes first because the scattered stores it saves cost most (GPU run 79, N*K = 8M: 10 / 27 / 59 us at 32 /
    64 / 128 local experts), while a full list costs only a re-read of local_ids from L2. With ``local_share`` (the
    expected fraction of local slots), the lists keep `LIST_SHARE_MARGIN` times a warp's expected local slots where
    the stage still holds `STAGE_SHARE_MARGIN` times a block's (without it: the whole chunk); where it cannot, the
    stage keeps that many and the lists get the rest.
    Keyed stage entries (`STAGE_KEYED`) where they hold that many; else offset-only ones (`STAGE_OFFSETS`, chunks of
    up to `OFFSETS_MAX_CHUNK`), twice as many: GPU run 96, in one process, 8M with every expert local 127.4 -> 102.4
    us, 128 of 256 local 76.2 -> 73.8 (16M: 165.9 -> 143.2).
    """
    if num_local > MAX_WINDOW:
        return None
    base = _fused_smem_ints(map_smem, num_local, num_sms) * 4
    if base > smem_optin:
        return None
    per_sm = occupancy(base)
    if per_sm < 1:
        return None
    tiles = max(1, -(-nk // TILE))
    per_block = -(-tiles // (per_sm * num_sms))
    if tiles > num_sms:
        # Two tiles per block rather than a second block on an SM: half the blocks at the grid barrier and
        # half the per-block counts to exchange. Measured on an H100 (GPU_RESULTS.md, run 16): N*K = 1M took
        # 17.1-17.7 us on 128 blocks of 2 tiles against 18.4-18.9 on 256 of 1 (graph 12.0 against 13.5-13.9);
        # at 2M and above the grids already have >= 2 tiles per block.
        per_block = max(per_block, 2)
    blocks = -(-tiles // per_block)
    chunk = per_block * TILE
    seg = chunk // GRID_WARPS
    if seg >= LIST_OFFSET_LIMIT:
        return None
    if not bm:
        return blocks, chunk, 0, 0, STAGE_KEYED, _fused_smem_ints(map_smem, num_local, num_sms, 0) * 4

    def fits(entries: int) -> bool:
        nbytes = _fused_smem_ints(map_smem, num_local, num_sms, entries) * 4
        return nbytes <= smem_optin and occupancy(nbytes) * num_sms >= blocks

    least = GRID_WARPS * PLACE_QUEUE  # fits(least) holds (the base above)
    most_list = max(PLACE_QUEUE, seg)
    # No stage for chunks of 2**22 slots or more: keyed entries cannot hold their offsets, and offsets stop far below
    stage_most = chunk if staged and STAGE_MIN_CHUNK <= chunk < LIST_OFFSET_LIMIT else 0
    lo, hi = least, GRID_WARPS * most_list + stage_most  # ints: lists and a keyed stage
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    wanted = -(-math.ceil(LIST_SHARE_MARGIN * (local_share or 0.0) * seg) // 32) * 32
    reserve = GRID_WARPS * min(most_list, max(PLACE_QUEUE, wanted))  # the lists' entries, all warps
    needed = chunk if local_share is None else min(chunk, math.ceil(STAGE_SHARE_MARGIN * local_share * chunk))

    def split(per_int: int) -> tuple[int, int, int]:
        """(list_cap, stage_cap, stage ints) with ``per_int`` stage entries per int of shared memory."""
        stage_cap = min(stage_most, (lo - least) * per_int)
        if stage_most and local_share is not None:
            # The lists get their share where the stage still holds `needed`; else the stage gets `needed` and the
            # lists what is left
            stage_cap = min(stage_most, max((lo - reserve) * per_int, min(stage_cap, needed)))
        stage_ints = -(-stage_cap // per_int)
        return min(most_list, (lo - stage_ints) // GRID_WARPS), stage_cap, stage_ints

    stage_type = STAGE_KEYED
    list_cap, stage_cap, stage_ints = split(1)
    if stage_most and stage_cap < needed and chunk <= OFFSETS_MAX_CHUNK:
        stage_type = STAGE_OFFSETS
        list_cap, stage_cap, stage_ints = split(2)
    return blocks, chunk, list_cap, stage_cap, stage_type, _fused_smem_ints(
        map_smem, num_local, num_sms, GRID_WARPS * list_cap + stage_ints) * 4


def check_block_m(block_m: object) -> int:
    """``block_m`` as an int >= 1 (``None`` -> 0: no aligned layout), or `ContractError` saying what to pass."""
    if block_m is None:
        return 0
    if isinstance(block_m, bool) or not isinstance(block_m, int) or block_m < 1:
        raise ContractError(f"block_m must be a positive int (the expert kernel's block size, e.g. 16) or None for no "
                            f"aligned layout, got {block_m!r}")
    return block_m


def plan_for(rows: int, top_k: int, id_dtype: torch.dtype, block_m: int | None, num_local: int, map_choice: MapChoice,
             path: str = "auto", smem_optin: int = DEFAULT_SMEM_OPTIN, num_sms: int = DEFAULT_NUM_SMS,
             fused_occupancy: Callable[[int], int] | None = default_fused_occupancy,
             two_phase_limit: int = TWO_PHASE_LIMIT, block_grid: int | None = None, lanes: bool = True,
             max_cluster: int = 0, cluster_blocks: int | None = None, staged: bool = True,
             share_lists: bool = True) -> Plan:
    """The launch plan for ``topk_ids [rows, top_k]`` of ``id_dtype``; raises `ContractError`/`ConfigError`.

    ``fused_occupancy(smem_bytes)`` gives grid_fused's co-resident blocks per SM (the driver's answer on a
    GPU); ``None`` means no cooperative launch on this device: the grid path takes the three launches.
    ``two_phase_limit`` (tests) moves the switch to grid_fused's two-barrier scan (`TWO_PHASE_LIMIT`);
    ``block_grid`` (tests, benchmarks) fixes the block path's number of blocks (`_block_grid`);
    ``lanes=False`` (benchmarks) keeps warp_preprocess / block_preprocess where the lane kernels would run;
    ``max_cluster`` is the widest thread-block cluster the device launches (0: none; 8 or 16, sm_90+): the block
    path then takes cluster_lane_preprocess past one block's share of slots (not with a fixed ``block_grid``);
    ``cluster_blocks`` (benchmarks) holds it to clusters of that many blocks; ``staged=False`` (benchmarks) gives
    grid_fused no stage: every placed slot is stored straight to `sorted` (`_fused_layout`); ``share_lists=False``
    (benchmarks) gives its stage all the shared memory it can take before the lists, whatever the share of local
    experts.
    """
    bm = check_block_m(block_m)
    if path not in PATHS:
        raise ConfigError(f"path must be one of {', '.join(PATHS)}, got {path!r}")
    if id_dtype not in (torch.int32, torch.int64):
        raise ContractError(f"topk_ids must be int32 or int64, got {id_dtype}")
    nk = rows * top_k
    if nk > INT32_MAX:
        raise ContractError(f"{rows} x {top_k} = {nk} slots is more than the int32 slot indices of the layout can "
                            "address (2**31 - 1); split the batch")
    capacity = aligned_capacity(nk, num_local, bm) if bm else 0
    if capacity > INT32_MAX:
        raise ContractError(f"the aligned layout for {nk} slots, {num_local} local experts and block_m={bm} needs "
                            f"{capacity} entries, past int32 indexing; use a smaller block_m or split the batch")
    map_smem = map_choice.size if map_choice.mode == MAP_SHARED else 0
    if max_cluster not in (0, *CLUSTER_SIZES) or cluster_blocks not in (None, *CLUSTER_SIZES):
        raise ConfigError(f"thread-block clusters have {' or '.join(map(str, CLUSTER_SIZES))} blocks here, got "
                          f"max_cluster={max_cluster!r}, cluster_blocks={cluster_blocks!r}")
    cluster = _cluster_blocks(nk, num_local, map_smem, smem_optin, max_cluster, cluster_blocks) \
        if lanes and block_grid is None else 0
    if path == "block" and nk > BLOCK_MAX_SLOTS and not cluster:
        most = (f"{cluster_max_slots(max_cluster)} slots as one thread-block cluster (at most {LANE_MAX_LOCAL} local "
                f"experts, this rank has {num_local}) and {BLOCK_MAX_SLOTS} otherwise") if max_cluster else \
            f"{BLOCK_MAX_SLOTS} slots (blocks of {BLOCK_THREADS} threads x {BLOCK_IPTS[-1]})"
        raise ConfigError(f"path=block handles at most {most}, got {rows} x {top_k} = {nk}; use path=auto or path=grid")
    warp_ipt = next((i for i in WARP_IPTS if 32 * i >= nk), 0)
    warp_ok = bool(warp_ipt) and num_local <= WARP_MAX_LOCAL and \
        _warp_smem_ints(map_smem, warp_ipt, num_local) * 4 <= smem_optin
    if path == "warp" and not warp_ok:
        raise ConfigError(f"path=warp handles at most {WARP_MAX_SLOTS} slots and {WARP_MAX_LOCAL} local experts "
                          f"(one warp), got {rows} x {top_k} = {nk} slots and {num_local} local experts; use path=auto")
    if path == "auto":
        block_lane_ok = lanes and _block_lane_fits(num_local, map_smem, BLOCK_THREADS // 32, smem_optin)
        block_max = CLUSTER_AUTO_MAX if cluster else BLOCK_LANE_AUTO_MAX if block_lane_ok else BLOCK_PATH_AUTO_MAX
        chosen = "warp" if warp_ok and nk <= WARP_PATH_AUTO_MAX else ("block" if nk <= block_max else "grid")
    else:
        chosen = path
    if chosen == "warp":
        lanes = lanes and num_local <= LANE_MAX_LOCAL and warp_ipt in LANE_IPTS
        smem_ints = map_smem if lanes else _warp_smem_ints(map_smem, warp_ipt, num_local)
        return Plan(rows=rows, top_k=top_k, id_dtype=id_dtype, block_m=bm, num_local=num_local, map=map_choice,
                    path="warp", capacity=capacity, window=max(1, num_local), windows=1, ipt=warp_ipt,
                    active_warps=1, block_threads=32, tiles=1, smem_block_bytes=smem_ints * 4, smem_count_bytes=0,
                    smem_place_bytes=0, lanes=lanes)
    if chosen == "block" and cluster:
        ipt, warps = _cluster_shape(nk, cluster)
        return Plan(rows=rows, top_k=top_k, id_dtype=id_dtype, block_m=bm, num_local=num_local, map=map_choice,
                    path="block", capacity=capacity, window=max(1, num_local), windows=1, ipt=ipt, active_warps=warps,
                    block_threads=32 * warps, tiles=1, grid_blocks=cluster,
                    smem_block_bytes=_cluster_lane_smem_ints(map_smem, warps, num_local, cluster) * 4,
                    smem_count_bytes=0,
                    smem_place_bytes=0, lanes=True, cluster=True)
    window = max(1, min(num_local, MAX_WINDOW))
    ipt = next(i for i in BLOCK_IPTS if BLOCK_THREADS * i >= nk) if chosen == "block" else 0
    active_warps = -(-nk // (32 * ipt)) if chosen == "block" else 0
    block_blocks, sub, owned_rows, vrows = 0, 0, 0, 0
    block_lanes = False
    if chosen == "block":
        id_name = "int32" if id_dtype == torch.int32 else "int64"
        block_lanes = lanes and _block_lane_fits(num_local, map_smem, max(1, active_warps), smem_optin)
    if block_lanes:
        block_blocks, sub, owned_rows = _block_grid(nk, ipt, active_warps, id_name, num_sms, block_grid, False)
    elif chosen == "block":
        block_blocks, sub, owned_rows = _block_grid(nk, ipt, active_warps, id_name, num_sms, block_grid)
        vrows, slots = active_warps * (ipt // sub), active_warps * 32 * ipt

        def smem_ints(window: int, vrows: int) -> int:
            return _block_smem_ints(map_smem, window, vrows, slots)

        # A row of counters per warp instead of per chunk where the table would be large or would not fit next to
        # the map, then a smaller window until the counters fit (only with many local experts or huge
        # forced-shared maps).
        if sub < ipt and (vrows * window > BLOCK_FINE_MAX_COUNTERS or smem_ints(window, vrows) * 4 > smem_optin):
            block_blocks, sub, owned_rows = _block_grid(nk, ipt, active_warps, id_name, num_sms, block_grid, False)
            vrows = active_warps
        while window > MIN_WINDOW and smem_ints(window, vrows) * 4 > smem_optin:
            window = max(MIN_WINDOW, window // 2)
        if smem_ints(window, vrows) * 4 > smem_optin:
            raise ConfigError(f"the block kernel needs {smem_ints(window, vrows) * 4} "
                              f"bytes of shared memory, more than the {smem_optin} this GPU gives a block; "
                              "use map_in=global or path=grid")
    windows = max(1, -(-num_local // window))
    tiles = max(1, -(-nk // TILE))
    # Only as many threads as hold slots or (block_preprocess) handle an expert of the window: tiny batches run
    # on one warp. block_lane_preprocess's lanes stand for the experts, and its shared memory holds a row per
    # launched warp.
    block_threads = 0
    if chosen == "block":
        expert_threads = 0 if block_lanes else -(-window // 32) * 32
        block_threads = min(BLOCK_THREADS, max(32 * active_warps, expert_threads, 32))
    fused = None
    if chosen == "grid" and fused_occupancy is not None:
        share = None
        if share_lists:
            share = 1.0 if map_choice.mode == MAP_NONE or not map_choice.size else min(1.0, num_local / map_choice.size)
        fused = _fused_layout(nk, bm, num_local, map_smem, smem_optin, num_sms, fused_occupancy, staged, share)
    grid_blocks, chunk, list_cap, stage_cap, stage_type, smem_fused = fused or (block_blocks, 0, 0, 0, STAGE_KEYED, 0)
    keys_in_smem = bool(list_cap) and 2 * list_cap >= chunk // GRID_WARPS
    two_phase = fused is not None and fused_reads_per_block(grid_blocks, num_local) > two_phase_limit
    return Plan(rows=rows, top_k=top_k, id_dtype=id_dtype, block_m=bm, num_local=num_local, map=map_choice,
                path=chosen, capacity=capacity, window=window, windows=windows, ipt=ipt, active_warps=active_warps,
                block_threads=block_threads, tiles=tiles, fused=fused is not None, grid_blocks=grid_blocks,
                sub=sub, owned_rows=owned_rows,
                chunk=chunk, keys_in_smem=keys_in_smem, list_cap=list_cap, stage_cap=stage_cap, stage_type=stage_type,
                smem_fused_bytes=smem_fused,
                two_phase=two_phase,
                group_blocks=FUSED_GROUP_BLOCKS if fused is not None and not two_phase else 0,
                smem_block_bytes=_block_lane_smem_ints(map_smem, max(1, active_warps), num_local) * 4 if block_lanes
                else _block_smem_ints(map_smem, window, vrows, active_warps * 32 * ipt) * 4 if chosen == "block" else 0,
                smem_count_bytes=(map_smem + window + SCRATCH_INTS) * 4 if chosen == "grid" and not fused else 0,
                smem_place_bytes=_place_smem_ints(window) * 4 if chosen == "grid" and bm and not fused else 0,
                lanes=block_lanes)


def moved_bytes(plan: Plan) -> int:
    """The fewest bytes the preprocess must move through device memory (the bandwidth goal's numerator).

    Read every id once, write local_ids, counts, the invalid counter and, with ``block_m``, every entry of
    sorted_slot_ids and block_expert_ids plus the total. The map itself is not counted (it is small and
    cached).
    """
    nk = plan.num_slots
    id_bytes = 4 if plan.id_dtype == torch.int32 else 8
    aligned = (plan.capacity + plan.num_blocks + 1) * 4 if plan.block_m else 0
    return nk * id_bytes + nk * 4 + plan.num_local * 4 + 4 + aligned


def design_bytes(plan: Plan) -> int:
    """The device-memory traffic this plan's kernels actually cause, by design (a model, not a measurement).

    `moved_bytes` plus what the design adds: grid_fused exchanges per-block counts (written once, and read back
    from L2 through the group sums and each group's blocks, or scanned in place) and re-reads local_ids past a
    warp's full list of local slots (counted unless ``keys_in_smem``, i.e. unless the lists hold half a segment:
    then as if every slot were local); the split grid path writes and re-reads a byte key per slot (or re-reads
    local_ids), and per-tile counts.
    Every block's copy of a shared-memory map is read from L2 and not counted.
    """
    nk = plan.num_slots
    extra = 0
    if plan.path == "grid" and plan.fused:
        hist = plan.num_local * plan.grid_blocks * 4
        seg = plan.chunk // GRID_WARPS
        reread = 0 if plan.keys_in_smem or not plan.block_m else nk * 4 * max(0, seg - plan.list_cap) // seg
        extra = hist * (3 if plan.two_phase else 2) + reread
    elif plan.path == "grid":
        keys = 2 * plan.keys8_bytes if plan.keys8_bytes else (nk * 4 if plan.block_m else 0)
        extra = plan.windows * (2 * plan.window * plan.tiles * 4) + keys
    return moved_bytes(plan) + extra
