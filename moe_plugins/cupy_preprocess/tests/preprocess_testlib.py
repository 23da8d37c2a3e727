"""Inputs, references and checks shared by the emulator (CPU) and GPU tests of the cupy preprocess.

Inputs follow the received layout of `hostcore.contract`: ``[ep_size, R, K]`` rank-major, each source
slice has a random number of real rows (random global ids in ``[0, E)``) followed by padding rows whose
ids all equal the sentinel; flattened to ``[ep_size * R, K]``. Sentinels are built as the sentinel
strategies of moe-plugin-sentinel define them (the plugin itself is not needed):

``non_local``     the first expert-map entry equal to -1 (needs a non-local expert)
``guard_slot``    E, with the map extended by one trailing -1 guard slot
``out_of_range``  E, without a map (contiguous placement)
``negative``      -1 (breaks the contract; for safe counting and faithful misrouting)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hostcore.contract import LocalRouting, aligned_capacity
from hostcore.hookspecs import BuildContext
from hostcore.placement import ExpertPlacement, LocalExperts

from moe_plugin_cupy_preprocess.buffers import PreprocessBuffers
from moe_plugin_cupy_preprocess.plan import FUSED_SYNC_INTS, FUSED_SYNC_STRIDE, FUSED_TAIL_QUEUES, GRID_THREADS, Plan

SENTINELS = ("non_local", "guard_slot", "out_of_range", "negative")
POISON = -777_777  # written into every output before a run: any survivor is an unwritten entry
GUARD = 12_345_678  # fills the words around each buffer: any change is an out-of-bounds write
TAIL_PIECE = 512  # HC_TAIL_PIECE in csrc/preprocess.cu: entries of the `sorted` tail per grid_fused piece
GUARD_WORDS = 64


@dataclass(frozen=True)
class Case:
    placement: ExpertPlacement
    rank: int
    local: LocalExperts
    sentinel: int
    ids: torch.Tensor  # [ep_size * R, K]
    real_rows: int


def make_local(num_experts: int, ep_size: int, rank: int, sentinel_kind: str, round_robin: bool = False,
               device: torch.device | str = "cpu") -> tuple[ExpertPlacement, LocalExperts, int]:
    """Placement, the rank's view after the sentinel strategy, and the sentinel."""
    placement = (ExpertPlacement.round_robin if round_robin else ExpertPlacement.contiguous)(num_experts, ep_size)
    if sentinel_kind == "out_of_range":
        return placement, placement.local_experts(rank, use_map=False, device=device), num_experts
    local = placement.local_experts(rank, use_map=True, device=device)
    table = local.expert_map.to("cpu")
    if sentinel_kind == "non_local":
        nonlocal_ids = (table == -1).nonzero()
        if nonlocal_ids.numel() == 0:
            raise ValueError("non_local needs a non-local expert (ep_size > 1)")
        return placement, local, int(nonlocal_ids[0])
    if sentinel_kind == "guard_slot":
        extended = torch.cat([table, torch.tensor([-1], dtype=torch.int32)]).to(device)
        return placement, local.with_map(extended), num_experts
    if sentinel_kind == "negative":
        return placement, local, -1
    raise ValueError(f"unknown sentinel kind {sentinel_kind!r}")


def make_ids(num_experts: int, ep_size: int, rows_per_rank: int, top_k: int, sentinel: int, generator: torch.Generator,
             dtype: torch.dtype = torch.int32, min_padding: int = 0, min_real: int = 0) -> tuple[torch.Tensor, int]:
    """Fresh random received ids ``[ep_size * R, K]`` (CPU) and the number of real rows: every source slice has a
    random number of real rows, at least ``min_real``, then padding rows, at least ``min_padding``."""
    ids = torch.randint(0, num_experts, (ep_size, rows_per_rank, top_k), generator=generator, dtype=torch.int64)
    real = torch.randint(min_real, rows_per_rank + 1 - min_padding, (ep_size,), generator=generator)
    for s in range(ep_size):
        ids[s, int(real[s]):] = sentinel
    return ids.reshape(ep_size * rows_per_rank, top_k).to(dtype), int(real.sum())


def make_case(num_experts: int, ep_size: int, rank: int, sentinel_kind: str, rows_per_rank: int, top_k: int,
              seed: int, dtype: torch.dtype = torch.int32, round_robin: bool = False,
              device: torch.device | str = "cpu", min_padding: int = 0, min_real: int = 0) -> Case:
    generator = torch.Generator().manual_seed(seed)
    placement, local, sentinel = make_local(num_experts, ep_size, rank, sentinel_kind, round_robin, device)
    ids, real = make_ids(num_experts, ep_size, rows_per_rank, top_k, sentinel, generator, dtype, min_padding, min_real)
    return Case(placement, rank, local, sentinel, ids.to(device), real)


def context(placement: ExpertPlacement, rank: int, local: LocalExperts, device: torch.device | str,
            top_k: int = 8, sentinel: int | None = None) -> BuildContext:
    return BuildContext(rank=rank, ep_size=placement.ep_size, device=torch.device(device), placement=placement,
                        local=local, hidden_size=64, top_k=top_k, dtype=torch.bfloat16, max_tokens_per_rank=64,
                        sentinel=sentinel)


def reference(case: Case, block_m: int | None, mode: str = "safe") -> LocalRouting:
    """The host's torch reference on the CPU (a different implementation, on another device)."""
    from hostcore.backends.preprocess_torch import TorchPreprocess

    local = case.local
    if local.expert_map is not None:
        local = local.with_map(local.expert_map.to("cpu"))
    ctx = context(case.placement, case.rank, local, "cpu", top_k=case.ids.shape[1], sentinel=case.sentinel)
    return TorchPreprocess(ctx, mode=mode).preprocess(case.ids.to("cpu"), block_m)


def buffers_from(plan: Plan, alloc: Callable[[int, bool], torch.Tensor]) -> PreprocessBuffers:
    """`PreprocessBuffers` for ``plan`` whose every tensor comes from ``alloc(n, zero)`` (n int32 words, zeroed
    when ``zero``: the grid path's sync words); keys8 is a byte view of whole words."""
    ws = plan.workspace_ints()
    keys8 = alloc(-(-ws["keys8_bytes"] // 4), False).view(torch.uint8)[: ws["keys8_bytes"]]
    return PreprocessBuffers(
        plan=plan, local_ids=alloc(plan.num_slots, False).view(plan.rows, plan.top_k),
        expert_counts=alloc(plan.num_local, False), invalid_count=alloc(1, False),
        sorted_slot_ids=alloc(plan.capacity, False), block_expert_ids=alloc(plan.num_blocks, False),
        num_slots_post_padded=alloc(1 if plan.block_m else 0, False), tile_hist=alloc(ws["tile_hist"], False),
        tile_invalid=alloc(ws["tile_invalid"], False), group_start=alloc(ws["group_start"], False),
        done=alloc(ws["done"], True), keys8=keys8)


def guarded_buffers(plan: Plan, device: torch.device | str) -> tuple[PreprocessBuffers, list[torch.Tensor]]:
    """Buffers whose every tensor is poisoned and sits between GUARD words; returns (buffers, backing tensors)."""
    backing: list[torch.Tensor] = []

    def alloc(n: int, zero: bool) -> torch.Tensor:
        store = torch.full((n + 2 * GUARD_WORDS,), GUARD, dtype=torch.int32, device=device)
        store[GUARD_WORDS:GUARD_WORDS + n] = 0 if zero else POISON
        backing.append(store)
        return store[GUARD_WORDS:GUARD_WORDS + n]

    return buffers_from(plan, alloc), backing


def separate_buffers(plan: Plan, device: torch.device | str) -> PreprocessBuffers:
    """Buffers in allocations of their own, uninitialised but for the sync words: for compute-sanitizer, whose
    memcheck then knows each buffer's bounds and initcheck its unwritten words (`PreprocessBuffers.allocate`
    carves all of them from one allocation)."""
    def alloc(n: int, zero: bool) -> torch.Tensor:
        return (torch.zeros if zero else torch.empty)(n, dtype=torch.int32, device=device)

    return buffers_from(plan, alloc)


def check_sync_words(buffers: PreprocessBuffers, launches: int | None = None) -> None:
    """The grid path's ``done`` words after ``launches`` launches (``None``: some number) on fresh buffers.

    Three-launch path: the done counter is back at 0. ``grid_fused``: the 64-bit barrier count is a multiple
    of the grid (exactly grid x barriers per launch x launches when ``launches`` is given); with a
    layout every warp of the grid asked its tail queue's counter once past the queue's last piece; with group
    sums, the last launch's half holds the sums of its per-block counts and the other half is zero (ready for
    the next launch).
    """
    plan = buffers.plan
    if not buffers.done.numel():
        return
    if not plan.fused:
        assert int(buffers.done[0]) == 0, "the three-launch path's done counter must be left at 0"
        return
    words = buffers.done.cpu()
    arrivals = int(words[:2].view(torch.int64))
    per_launch = plan.grid_blocks * (2 if plan.two_phase else 1)
    assert arrivals % plan.grid_blocks == 0 and arrivals > 0, f"barrier count {arrivals}, grid {plan.grid_blocks}"
    if launches is not None:
        assert arrivals == launches * per_launch, f"barrier count {arrivals} after {launches} launches of {per_launch}"
    if plan.fused_groups:
        groups, num_local, grid = plan.fused_groups, plan.num_local, plan.grid_blocks
        sums = words[FUSED_SYNC_INTS:FUSED_SYNC_INTS + 2 * groups * num_local].view(2, groups, num_local)
        last = (arrivals // grid - 1) % 2
        per_block = torch.zeros(num_local, groups * plan.group_blocks, dtype=torch.int32)
        per_block[:, :grid] = buffers.tile_hist.cpu().view(num_local, grid)
        expected = per_block.view(num_local, groups, plan.group_blocks).sum(-1, dtype=torch.int32).T
        assert torch.equal(sums[last], expected), "the last launch's group sums are not the sums of its block counts"
        assert not sums[1 - last].any(), "the next launch's half of the group sums was not zeroed"
    if plan.block_m:  # a queue's counter starts at its warps; each warp asks once past the end
        total = int(buffers.num_slots_post_padded)
        misaligned = (buffers.sorted_slot_ids.data_ptr() + 4 * total) % 16
        head = min(plan.capacity, total + (16 - misaligned) % 16 // 4)
        pieces = -(-(plan.capacity - head) // TAIL_PIECE)
        warps = plan.grid_blocks * GRID_THREADS // 32
        queues = min(FUSED_TAIL_QUEUES, warps)  # a one-block grid serves 16 queues
        per_queue = -(-pieces // queues)
        for q in range(FUSED_TAIL_QUEUES):
            served = q < queues
            mine, queue_warps = max(0, min(per_queue, pieces - q * per_queue)), len(range(q, warps, queues))
            # With a piece per warp, each warp's first one is taken unasked; else every piece is asked for.
            expected = mine + queue_warps + (queue_warps if mine < queue_warps else 0) if served else 0
            got = int(words[FUSED_SYNC_STRIDE * (1 + q)])
            assert got == expected, f"tail queue {q}: counter {got}, expected {expected} (pieces {pieces})"


def check_guards(backing: list[torch.Tensor]) -> None:
    for i, store in enumerate(backing):
        head, tail = store[:GUARD_WORDS], store[-GUARD_WORDS:]
        assert bool((head == GUARD).all()) and bool((tail == GUARD).all()), f"buffer {i}: a write outside its bounds"


def assert_matches(got: LocalRouting, ref: LocalRouting, block_m: int | None, what: str = "") -> None:
    """Every output equal to the reference's (the layout entry for entry), nothing left unwritten.

    Compares on the CPU, wherever either side was computed.
    """
    where = f" ({what})" if what else ""

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        return torch.equal(a.cpu(), b.cpu())

    assert same(got.local_ids, ref.local_ids), f"local_ids differ{where}"
    assert same(got.expert_counts, ref.expert_counts), f"expert_counts differ{where}"
    if ref.invalid_count is not None:
        assert got.invalid_count is not None, f"invalid_count missing{where}"
        assert int(got.invalid_count.cpu()) == int(ref.invalid_count.cpu()), f"invalid_count differs{where}"
    if block_m is None:
        assert got.aligned is None
        return
    g, r = got.aligned, ref.aligned
    assert int(g.num_slots_post_padded.cpu()) == int(r.num_slots_post_padded.cpu()), \
        f"num_slots_post_padded differs{where}"
    assert same(g.sorted_slot_ids, r.sorted_slot_ids), f"sorted_slot_ids differ{where}"
    assert same(g.block_expert_ids, r.block_expert_ids), f"block_expert_ids differ{where}"
    assert g.block_m == block_m


def assert_layout_valid(routing: LocalRouting, block_m: int) -> None:
    """The aligned layout is a permutation of the local slots, grouped, padded and labelled as documented."""
    flat = routing.local_ids.reshape(-1).cpu()
    n = flat.numel()
    layout = routing.aligned
    counts = routing.expert_counts.cpu()
    sorted_ids = layout.sorted_slot_ids.cpu()
    blocks = layout.block_expert_ids.cpu()
    total = int(layout.num_slots_post_padded.cpu())
    assert sorted_ids.numel() == aligned_capacity(n, counts.numel(), block_m)
    assert total % block_m == 0 and total <= sorted_ids.numel()
    used = sorted_ids[:total]
    real = used[used < n]
    local_slots = (flat >= 0) & (flat < counts.numel())
    assert torch.equal(torch.sort(real.long()).values, local_slots.nonzero().reshape(-1)), "each local slot exactly once"
    assert bool((sorted_ids[total:] == n).all()) and bool((used >= 0).all()) and bool((used <= n).all())
    assert bool((blocks[total // block_m:] == -1).all())
    labels = blocks[: total // block_m]
    assert bool((labels[1:] >= labels[:-1]).all()), "blocks in increasing expert order"
    expected = torch.repeat_interleave(torch.arange(counts.numel()), (counts + block_m - 1) // block_m)
    assert torch.equal(labels.long(), expected), "each expert gets ceil(count / block_m) blocks"
    position_label = labels.long().repeat_interleave(block_m)
    is_real = used < n
    assert bool((flat[used[is_real].long()] == position_label[is_real]).all()), "a slot sits in another expert's block"
    per_group = torch.zeros(counts.numel(), dtype=torch.int64).index_add_(0, position_label[is_real],
                                                                         torch.ones_like(position_label[is_real]))
    assert torch.equal(per_group, counts.long()), "each group holds exactly its expert's slots"
    # Within a group the real slots come first (padding only at its end), in increasing slot order.
    same = position_label[1:] == position_label[:-1]
    assert not bool((same & ~is_real[:-1] & is_real[1:]).any()), "padding before a real slot inside a group"
    both = same & is_real[:-1] & is_real[1:]
    assert bool((used[1:][both] > used[:-1][both]).all()), "slots of an expert in increasing slot order"
