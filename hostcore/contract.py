"""The data contract between the stages of an expert-parallel MoE layer.

One forward of a layer on each rank of an expert-parallel (EP) group of
``ep_size`` ranks runs::

    prepare -> dispatch -> preprocess -> experts -> combine

and every stage hands the next one the tensors described here. Shapes use
``T`` local tokens, ``H`` hidden size, ``K`` top-k, ``E`` global experts,
``R`` rows per source rank after dispatch (``runtime_max_tokens_per_rank``).

Router output (input of prepare)
    ``hidden [T, H]`` (bf16, fp16 or fp32), ``topk_ids [T, K]`` (int32 or
    int64 *global* expert ids) and ``topk_weights [T, K]`` (fp32). Routers may
    emit ids outside ``[0, E)`` (``-1`` for skipped tokens): prepare must
    neutralise them (see `hostcore.backends.prepare`).

Prepared tokens (`PreparedTokens`, prepare -> dispatch)
    Same shapes, ``topk_ids`` int32 with every id in ``[0, E)``.

Received layout (`ReceivedTokens`, dispatch -> preprocess/experts)
    Rank-major ``[ep_size, R, ...]``: row ``[s, i]`` is the ``i``-th token that
    source rank ``s`` sent to this rank. In each source slice the real rows come
    first (``rows_per_source[s]`` of them), then padding rows up to ``R``.
    Real rows keep *global* ids, including experts owned by other ranks. The
    top-k ids of every padding row all equal the sentinel; its hidden states and
    weights are stale memory (never read them as data). Order of the real rows
    within a slice is unspecified.

Expert map
    ``int32[E + g]`` on the compute device: global id -> local id on this rank,
    ``-1`` for experts of other ranks. ``g`` trailing *guard slots* (all ``-1``)
    may be appended by a sentinel strategy (``guard_slot``) so that its sentinel
    indexes a real entry. Without an expert map (``ep_size == 1``, no remap)
    global ids are local ids.

Sentinel contract (`sentinel_verdict`)
    With an expert map: ``0 <= s < len(expert_map)`` and ``expert_map[s] == -1``
    on the receiving rank, so a kernel that indexes the map before filtering
    reads a real entry that says "not mine". Without one: ``s >= E``, so a
    kernel that bound-checks against ``E`` skips it. ``-1`` satisfies neither:
    ``expert_map[-1]`` reads before the table in CUDA and wraps to the last entry
    in torch (vLLM PR #42034).

Local routing (`LocalRouting`, preprocess -> experts)
    ``local_ids [N, K]`` int32 (``N = ep_size * R``): the local expert id of each
    slot, ``-1`` where this rank computes nothing (non-local expert, padding,
    invalid id). ``expert_counts int32[num_local_experts]`` counts the slots per
    local expert. Optionally the aligned block layout (`AlignedLayout`) that a
    block-GEMM expert kernel consumes.

Expert output (experts -> combine)
    ``[N, H]`` in the activation dtype: row ``n`` holds
    ``sum_k topk_weights[n, k] * FFN_{local_ids[n, k]}(hidden[n])`` over the
    slots with ``local_ids >= 0`` (zero when there is none). Router weights are
    applied here: combine is an unweighted sum over target ranks.

Memory ownership
    Prepare returns new tensors or views of its inputs. Dispatch owns the
    received buffers: they stay valid until its ``combine`` returns, and may be
    reused by the next dispatch. Preprocess and experts return tensors they
    allocated (or preallocated workspaces that stay valid until their next
    call). Combine returns a fresh ``[T, H]`` tensor owned by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from .errors import ContractError

ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ID_DTYPES = (torch.int32, torch.int64)


class Stage(str, Enum):
    """The stages a backend configuration picks an implementation for, in pipeline order."""

    PREPARE = "prepare"
    DISPATCH = "dispatch"
    PREPROCESS = "preprocess"
    EXPERTS = "experts"
    SENTINEL = "sentinel"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class PreparedTokens:
    """What prepare hands to dispatch; see the module docstring."""

    hidden: torch.Tensor  # [T, H], activation dtype
    topk_ids: torch.Tensor  # [T, K] int32, all in [0, E)
    topk_weights: torch.Tensor  # [T, K] fp32
    scales: torch.Tensor | None = None  # [T, S] when prepare quantizes hidden


@dataclass(frozen=True)
class ReceivedTokens:
    """What dispatch hands to preprocess and experts: the rank-major padded layout.

    ``rows_per_source`` is ``int32[ep_size]`` on the device when the dispatch
    knows it (``torch_a2a`` does), else ``None``: consumers must not rely on it to
    find padding, the sentinel is the marker.
    """

    hidden: torch.Tensor  # [ep_size, R, H]
    topk_ids: torch.Tensor  # [ep_size, R, K] int32
    topk_weights: torch.Tensor  # [ep_size, R, K] fp32
    sentinel: int
    rows_per_source: torch.Tensor | None = None
    scales: torch.Tensor | None = None

    @property
    def ep_size(self) -> int:
        return int(self.topk_ids.shape[0])

    @property
    def rows_per_rank(self) -> int:
        return int(self.topk_ids.shape[1])

    def flat(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views ``hidden [N, H]``, ``topk_ids [N, K]``, ``topk_weights [N, K]`` with ``N = ep_size * R``."""
        n = self.ep_size * self.rows_per_rank
        return (self.hidden.reshape(n, -1), self.topk_ids.reshape(n, -1), self.topk_weights.reshape(n, -1))


@dataclass(frozen=True)
class AlignedLayout:
    """Slots grouped by local expert and padded per expert to a multiple of ``block_m``.

    ``sorted_slot_ids int32[capacity]``: flat slot indices ``n * K + k`` into the
    ``[N, K]`` routing, grouped by local expert in increasing expert order; each
    group is padded to a multiple of ``block_m`` with the value ``N * K``
    (one past the last slot). ``block_expert_ids int32[capacity // block_m]``:
    the local expert of each block, ``-1`` for blocks past the end.
    ``num_slots_post_padded int32[1]``: how many entries of ``sorted_slot_ids``
    are used (a multiple of ``block_m``). ``capacity`` is a static upper bound
    (`aligned_capacity`) so buffers can be preallocated for CUDA graphs.
    """

    sorted_slot_ids: torch.Tensor
    block_expert_ids: torch.Tensor
    num_slots_post_padded: torch.Tensor
    block_m: int


def aligned_capacity(num_slots: int, num_local_experts: int, block_m: int) -> int:
    """Static upper bound on the entries of an `AlignedLayout` for ``num_slots`` slots.

    Each non-empty expert group wastes at most ``block_m - 1`` entries, and at
    most ``min(num_slots, num_local_experts)`` groups are non-empty.
    """
    if block_m <= 0:
        raise ContractError(f"block_m must be positive, got {block_m}")
    padded = num_slots + min(num_slots, num_local_experts) * (block_m - 1)
    return -(-padded // block_m) * block_m


@dataclass(frozen=True)
class LocalRouting:
    """What preprocess hands to experts; see the module docstring.

    ``invalid_count`` is an ``int32[1]`` device counter of ids found outside the
    expert map in ``safe`` mode (``None`` when the backend does not count); it is
    read on the host only when the caller asks, so the hot path never syncs.
    """

    local_ids: torch.Tensor  # [N, K] int32, -1 = skip
    expert_counts: torch.Tensor  # [num_local_experts] int32
    invalid_count: torch.Tensor | None = None
    aligned: AlignedLayout | None = None


@dataclass(frozen=True)
class Verdict:
    """Whether a sentinel satisfies the contract for one receiving rank, and why (not)."""

    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


def sentinel_verdict(sentinel: int, global_num_experts: int, expert_map: torch.Tensor | None) -> Verdict:
    """Check the sentinel contract (module docstring) for one receiving rank.

    ``expert_map`` is the map the preprocess will index (guard slots included),
    or ``None`` when the layer runs without one. Reads the map on the host: call
    at build time, never per forward.
    """
    e = global_num_experts
    if expert_map is None:
        if sentinel >= e:
            return Verdict(True, f"{sentinel} >= E={e}: a kernel that bound-checks against E skips it")
        if sentinel < 0:
            return Verdict(False, f"{sentinel} is negative: an unchecked kernel indexes expert {sentinel}, "
                                  "before the weight table (torch wraps it to the last expert)")
        return Verdict(False, f"{sentinel} is a real expert id in [0, {e}): padding rows would be computed by expert {sentinel}")
    table = expert_map.detach().to("cpu")
    n = int(table.numel())
    if sentinel < 0:
        wrapped = int(table[sentinel]) if -sentinel <= n else None
        where = (f"torch wraps it to expert_map[{n + sentinel}] = {wrapped}"
                 + (f", local expert {wrapped}: padding is misrouted" if wrapped is not None and wrapped >= 0 else ""))
        return Verdict(False, f"{sentinel} indexes before the expert map (a CUDA kernel reads out of bounds; {where})")
    if sentinel >= n:
        return Verdict(False, f"{sentinel} is past the end of the expert map int32[{n}]: "
                              "a kernel that indexes the map before filtering reads out of bounds")
    local = int(table[sentinel])
    if local != -1:
        return Verdict(False, f"expert_map[{sentinel}] = {local}: {sentinel} is a local expert on this rank, "
                              "so padding rows would be computed by it")
    return Verdict(True, f"expert_map[{sentinel}] = -1: a real entry that marks it non-local")


def check_expert_map(expert_map: torch.Tensor, global_num_experts: int) -> None:
    """Raise `ContractError` unless ``expert_map`` is a valid map for ``global_num_experts`` experts.

    Valid: 1-D int32, at least ``E`` entries, values ``-1`` or a local id, local
    ids ``0..L-1`` each used exactly once in the first ``E`` entries, and every
    guard slot past ``E`` equal to ``-1``.
    """
    if expert_map.dtype != torch.int32 or expert_map.dim() != 1:
        raise ContractError(f"expert_map must be a 1-D int32 tensor, got {expert_map.dtype} of shape {tuple(expert_map.shape)}; "
                            "build it with hostcore.layouts or cast with .to(torch.int32)")
    n = int(expert_map.numel())
    if n < global_num_experts:
        raise ContractError(f"expert_map has {n} entries but the layer has {global_num_experts} global experts: "
                            "it needs one entry per global expert (plus optional trailing -1 guard slots)")
    table = expert_map.detach().to("cpu")
    body, guard = table[:global_num_experts], table[global_num_experts:]
    if bool((guard != -1).any()):
        raise ContractError(f"guard slots expert_map[{global_num_experts}:] must all be -1, got {guard.tolist()}")
    bad = body[(body < -1)]
    if bad.numel():
        raise ContractError(f"expert_map values must be -1 or a local id >= 0, found {sorted(set(bad.tolist()))}")
    local = body[body >= 0]
    if sorted(local.tolist()) != list(range(int(local.numel()))):
        raise ContractError("the local ids in expert_map must be 0..L-1, each exactly once; "
                            f"got {sorted(local.tolist())}")


def num_local_experts(expert_map: torch.Tensor | None, global_num_experts: int) -> int:
    """Local experts on this rank: the non-negative entries of the map, or ``E`` without a map."""
    if expert_map is None:
        return global_num_experts
    return int((expert_map.detach().to("cpu") >= 0).sum())


def check_router_output(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
    """Raise `ContractError` unless the router output has the documented shapes and dtypes.

    Checks metadata only (no device sync): ids outside ``[0, E)`` are allowed here
    and neutralised by prepare.
    """
    if hidden.dim() != 2:
        raise ContractError(f"hidden must be [T, H], got shape {tuple(hidden.shape)}")
    if hidden.dtype not in ACTIVATION_DTYPES:
        raise ContractError(f"hidden must be bf16, fp16 or fp32, got {hidden.dtype}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != hidden.shape[0]:
        raise ContractError(f"topk_ids must be [T, K] with T={hidden.shape[0]} (the rows of hidden), got {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in ID_DTYPES:
        raise ContractError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if topk_weights.shape != topk_ids.shape:
        raise ContractError(f"topk_weights must have the shape of topk_ids {tuple(topk_ids.shape)}, got {tuple(topk_weights.shape)}")
    if not topk_weights.is_floating_point():
        raise ContractError(f"topk_weights must be floating point (fp32 preferred), got {topk_weights.dtype}")
    devices = {hidden.device, topk_ids.device, topk_weights.device}
    if len(devices) != 1:
        raise ContractError(f"hidden, topk_ids and topk_weights must be on one device, got {sorted(map(str, devices))}")


def check_received(received: ReceivedTokens, global_num_experts: int) -> None:
    """Raise `ContractError` unless ``received`` follows the received layout (syncs: tests and debugging only).

    Checks shapes, dtypes, that every padding row's ids all equal the sentinel,
    and that every real row's ids are global ids in ``[0, E)``. Needs
    ``rows_per_source``.
    """
    ids = received.topk_ids
    if ids.dim() != 3 or ids.dtype != torch.int32:
        raise ContractError(f"received topk_ids must be int32 [ep_size, R, K], got {ids.dtype} {tuple(ids.shape)}")
    ep, r, _ = ids.shape
    if received.hidden.shape[:2] != (ep, r) or received.topk_weights.shape != ids.shape:
        raise ContractError("received hidden/topk_weights must share the [ep_size, R] leading dims of topk_ids, got "
                            f"{tuple(received.hidden.shape)} and {tuple(received.topk_weights.shape)}")
    if received.rows_per_source is None:
        raise ContractError("check_received needs rows_per_source to tell real rows from padding")
    counts = received.rows_per_source.to("cpu").tolist()
    host_ids = ids.to("cpu")
    for s, n in enumerate(counts):
        if not 0 <= n <= r:
            raise ContractError(f"rows_per_source[{s}] = {n} is outside [0, R={r}]")
        real, pad = host_ids[s, :n], host_ids[s, n:]
        if pad.numel() and bool((pad != received.sentinel).any()):
            row = int((pad != received.sentinel).any(dim=1).nonzero()[0]) + n
            raise ContractError(f"padding row [{s}, {row}] has ids {host_ids[s, row].tolist()}, expected all {received.sentinel}")
        if real.numel() and bool(((real < 0) | (real >= global_num_experts)).any()):
            pos = ((real < 0) | (real >= global_num_experts)).nonzero()[0].tolist()
            raise ContractError(f"real row [{s}, {pos[0]}] carries id {int(real[pos[0], pos[1]])} outside [0, {global_num_experts})")
