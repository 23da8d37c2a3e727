"""Fake of ``flashinfer.comm.trtllm_moe_alltoall``: ``MoeAlltoAll`` emulated over a torch.distributed group.

See the package docstring for what is emulated. Where the real code raises a
TVM check error the fake raises ``RuntimeError`` with the same text; Python
``assert``s stay ``assert``s. One deliberate addition: combine refuses an ``R``
different from its dispatch's (the real kernel would silently read garbage),
so plugin bugs surface in tests.
"""

from __future__ import annotations

import functools
import warnings
from collections import Counter
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import torch

from ..jit.comm import gen_moe_alltoall_module
from ..tllm_enums import SfLayout

K_MAX_TOP_K = 22
K_MAX_PAYLOADS = 6
K_MAX_RANKS = 64
INT32 = 4

METAINFO_NAMES = ["FLAG_VAL_OFFSET_INDEX", "LOCAL_TOKEN_COUNTER_OFFSET_INDEX", "SEND_COUNTERS_OFFSET_INDEX",
                  "RECV_COUNTERS_OFFSET_INDEX", "DISPATCH_COMPLETION_FLAGS_OFFSET_INDEX",
                  "COMBINE_COMPLETION_FLAGS_OFFSET_INDEX", "TOPK_TARGET_RANKS_OFFSET_INDEX",
                  "TOPK_SEND_INDICES_OFFSET_INDEX", "EPLB_GATHERED_STATS_OFFSET_INDEX", "PAYLOAD_DATA_OFFSET_INDEX"]

STATS: Counter = Counter()
"""Calls seen in this process: instances, dispatch, combine, combine_in_workspace, combine_staged."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise RuntimeError(msg)


def _align(x: int, a: int = 128) -> int:
    return (x + a - 1) // a * a


def _offsets(ep: int, max_tokens: int, eplb: int = 0) -> list[int]:
    """The C++ ``calculateOffsets``: the aux region's fields, then where the payload planes start."""
    out, off = [], 0
    out.append(off); off += INT32                      # flag_val
    out.append(off); off += INT32                      # local token counter
    out.append(off); off += ep * INT32                 # send counters
    out.append(off); off += ep * INT32                 # recv counters
    off = _align(off); out.append(off); off += ep * INT32   # dispatch completion flags
    off = _align(off); out.append(off); off += ep * INT32   # combine completion flags
    off = _align(off); out.append(off); off += max_tokens * K_MAX_TOP_K * INT32
    off = _align(off); out.append(off); off += max_tokens * K_MAX_TOP_K * INT32
    off = _align(off); out.append(off); off += ep * eplb * INT32
    off = _align(off); out.append(off)
    return out


@functools.cache
def get_moe_alltoall_module(backend: str = "trtllm") -> SimpleNamespace:
    """Builds the fake JIT module on first use (silently, as the real one does), then returns its ops."""
    if backend != "trtllm":
        raise ValueError(f"the fake only has the trtllm backend, got {backend!r}")
    spec = gen_moe_alltoall_module("legacy")
    module = spec.build_and_load()
    return SimpleNamespace(
        module=module,
        moe_a2a_dispatch=_op_dispatch,
        moe_a2a_combine=_op_combine,
        moe_a2a_combine_into=_op_combine_into,
        moe_a2a_sanitize_expert_ids=_op_sanitize_expert_ids,
        moe_a2a_get_aux_data_size=lambda ep, max_tokens, eplb=0: _offsets(ep, max_tokens, eplb)[-1],
        moe_a2a_get_metainfo_index_pairs=lambda: ([f"MOE_A2A_{n}" for n in METAINFO_NAMES],
                                                  list(range(len(METAINFO_NAMES)))),
    )


def moe_a2a_get_workspace_size_per_rank(ep_size: int, max_num_tokens: int, total_dispatch_payload_size_per_token: int,
                                        combine_payload_size_per_token: int, eplb_stats_num_experts: int = 0, *,
                                        backend: str = "trtllm") -> int:
    aux = get_moe_alltoall_module(backend).moe_a2a_get_aux_data_size(ep_size, max_num_tokens, eplb_stats_num_experts)
    return (_align(aux) + _align(ep_size * max_num_tokens * total_dispatch_payload_size_per_token)
            + _align(ep_size * max_num_tokens * combine_payload_size_per_token))


# -- the ops (the real ones are C++ kernels reading each other's mapped workspaces) --------------------

@dataclass
class _Exchange:
    """What the real kernels keep in the workspace's aux region between dispatch and combine."""

    local_num_tokens: int
    rows: int
    send_plan: list[list[int]]  # per target rank: my token indices in slot order
    combine_offset: int  # where this dispatch put the combine region (after its payload planes)


_BY_WORKSPACE: dict[int, "MoeAlltoAll"] = {}
"""Workspace address -> its MoeAlltoAll (its communicator stands in for the NVLink mappings)."""


def _owner_of(workspace: torch.Tensor) -> "MoeAlltoAll":
    a2a = _BY_WORKSPACE.get(workspace.data_ptr())
    _check(a2a is not None, "workspace was not initialized by moe_a2a_initialize")
    return a2a


def _op_dispatch(token_selected_experts: torch.Tensor, input_payloads: list[torch.Tensor], workspace: torch.Tensor,
                 metainfo: torch.Tensor, runtime_max_tokens_per_rank: int, ep_rank: int, ep_size: int, top_k: int,
                 num_experts: int, enable_pdl: bool, eplb_local_stats: Optional[torch.Tensor] = None,
                 enable_rank_mask: bool = False, active_rank_mask: Optional[torch.Tensor] = None):
    a2a = _owner_of(workspace)
    r = runtime_max_tokens_per_rank
    ids = token_selected_experts
    _check(ids.dtype == torch.int32 and ids.dim() == 2, "token_selected_experts must be a 2D int32 tensor")
    _check(ids.is_contiguous(), "token_selected_experts must be contiguous")
    t, k = ids.shape
    _check(k == top_k, "token_selected_experts must have top_k columns")
    _check(0 < len(input_payloads) <= K_MAX_PAYLOADS, f"num_payloads must be in (0, {K_MAX_PAYLOADS}]")
    for i, p in enumerate(input_payloads):
        _check(p.is_contiguous(), f"payload {i} must be contiguous")
        _check(p.dim() == 2, f"payload {i} must be 2D")
        _check(p.shape[0] == t, f"payload {i} first dimension must match local_num_tokens")
    _check(r > 0, "runtimeMaxTokensPerRank > 0")
    _check(num_experts >= ep_size, "num_experts must be >= ep_size")
    _check(0 < top_k <= K_MAX_TOP_K, "topK must be in (0, kMaxTopK]")
    total, sizes = 0, []
    for i, p in enumerate(input_payloads):
        nbytes = ep_size * r * p.shape[1] * p.element_size()
        sizes.append(nbytes)
        total += nbytes
        _check(total % p.element_size() == 0,
               f"Misaligned payload buffer {i} with element size {p.element_size()}. Consider reordering "
               "payloads by largest to smallest element size")
    base = int(metainfo[-1])
    per_rank = workspace.shape[1]
    _check(per_rank >= base + total, f"workspace size per rank insufficient, need {base + total} bytes but has "
                                     f"{per_rank}")

    # Sender side: each token goes once to each rank owning one of its experts; slots in random order.
    a2a._epoch += 1
    plan: list[list[int]] = [[] for _ in range(ep_size)]
    for tok, row in enumerate(ids.tolist()):
        for d in dict.fromkeys(_owner(e, num_experts, ep_size) for e in row):
            plan[d].append(tok)
    gen = torch.Generator().manual_seed(7919 * a2a._epoch + ep_rank)
    plan = [[toks[j] for j in torch.randperm(len(toks), generator=gen).tolist()] for toks in plan]
    everyone = a2a._comm.allgather((plan, [p.clone() for p in input_payloads]))

    # Receiver side: write what each source sent here into this rank's planes, then the counters.
    local = workspace[ep_rank]
    views, off = [], base
    for i, p in enumerate(input_payloads):
        views.append(local[off: off + sizes[i]].view(p.dtype).view(ep_size, r, -1))
        off += sizes[i]
    counts = _recv_counts(workspace, metainfo, ep_rank, ep_size)
    for s, (src_plan, src_payloads) in enumerate(everyone):
        rows = src_plan[ep_rank]
        counts[s] = len(rows)
        for view, src in zip(views, src_payloads):
            if rows:
                view[s, : len(rows)] = src[torch.tensor(rows, dtype=torch.long)]
    a2a._exchange = _Exchange(t, r, plan, _align(off))
    STATS["dispatch"] += 1
    rank_offset = ep_rank * workspace.stride(0)
    offsets = [rank_offset + base + sum(sizes[:i]) for i in range(len(sizes))]
    return offsets, sizes, _align(off), -1, 0


def _recv_counts(workspace: torch.Tensor, metainfo: torch.Tensor, ep_rank: int, ep_size: int) -> torch.Tensor:
    at = int(metainfo[METAINFO_NAMES.index("RECV_COUNTERS_OFFSET_INDEX")])
    return workspace[ep_rank, at: at + ep_size * INT32].view(torch.int32)


def _op_sanitize_expert_ids(expert_ids: torch.Tensor, workspace: torch.Tensor, metainfo: torch.Tensor, ep_rank: int,
                            invalid_expert_id: int, enable_pdl: bool) -> None:
    ep_size = workspace.shape[0]
    counts = _recv_counts(workspace, metainfo, ep_rank, ep_size)
    view = expert_ids.view(ep_size, -1, expert_ids.shape[-1])
    for s in range(ep_size):
        view[s, int(counts[s]):] = invalid_expert_id


def _op_combine_into(payload: torch.Tensor, local_num_tokens: int, workspace: torch.Tensor, metainfo: torch.Tensor,
                     runtime_max_tokens_per_rank: int, ep_rank: int, ep_size: int, top_k: int,
                     combine_payload_offset: int, payload_in_workspace: bool, output_dtype: Optional[torch.dtype],
                     output_scales: Optional[torch.Tensor], output_scalar_scale: float, sf_layout: Optional[SfLayout],
                     use_low_precision: bool, enable_pdl: bool, enable_rank_mask: bool,
                     active_rank_mask: Optional[torch.Tensor], output: torch.Tensor) -> None:
    a2a = _owner_of(workspace)
    exchange = a2a._exchange
    _check(exchange is not None, "fake: combine without a dispatch on this workspace")
    r = runtime_max_tokens_per_rank
    _check(payload.is_contiguous(), "payload must be contiguous")
    _check(payload.dim() == 3, "payload must be [ep_size, runtime_max_tokens_per_rank, hidden]")
    _check(payload.shape[0] == ep_size and payload.shape[1] == r, "payload must be [ep_size, R, hidden]")
    _check(r == exchange.rows, f"fake: combine R={r} differs from its dispatch's R={exchange.rows}")
    # Deliberate addition (the real kernel trusts the offset): a combine region other than the one its dispatch
    # laid out would overlap that dispatch's payload planes.
    _check(combine_payload_offset == exchange.combine_offset,
           f"fake: combine_payload_offset={combine_payload_offset} differs from its dispatch's {exchange.combine_offset}")
    _check(local_num_tokens == exchange.local_num_tokens,
           f"fake: combine local_num_tokens={local_num_tokens} differs from its dispatch's {exchange.local_num_tokens}")
    nbytes = payload.numel() * payload.element_size()
    per_rank = workspace.shape[1]
    _check(combine_payload_offset >= 0 and combine_payload_offset + nbytes <= per_rank,
           "workspace insufficient for combine payload region")
    region = workspace[ep_rank, combine_payload_offset: combine_payload_offset + nbytes].view(payload.dtype).view(
        ep_size, r, -1)
    if payload_in_workspace:
        _check(payload.data_ptr() == region.data_ptr(), "payload_in_workspace is True but tensor pointer mismatch")
        STATS["combine_in_workspace"] += 1
    else:
        region.copy_(payload)  # the staging copy the zero-copy variant avoids
        STATS["combine_staged"] += 1
    regions = a2a._comm.allgather(region.clone())
    t, h = local_num_tokens, payload.shape[2]
    acc = torch.zeros((t, h), dtype=torch.float32)
    for d, tokens in enumerate(exchange.send_plan):
        for slot, tok in enumerate(tokens):
            acc[tok] += regions[d][ep_rank, slot].float()
    result = acc.to(output_dtype or payload.dtype)
    _check(tuple(output.shape) == (t, h) and output.dtype == result.dtype, "output shape/dtype mismatch")
    output.copy_(result)
    a2a._exchange = None
    STATS["combine"] += 1


def _op_combine(payload: torch.Tensor, local_num_tokens: int, workspace: torch.Tensor, metainfo: torch.Tensor,
                runtime_max_tokens_per_rank: int, ep_rank: int, ep_size: int, top_k: int, combine_payload_offset: int,
                payload_in_workspace: bool = False, output_dtype: Optional[torch.dtype] = None,
                output_scales: Optional[torch.Tensor] = None, output_scalar_scale: float = 1.0,
                sf_layout: Optional[SfLayout] = None, use_low_precision: bool = False, enable_pdl: bool = True,
                enable_rank_mask: bool = False, active_rank_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    output = torch.empty((local_num_tokens, payload.shape[2]), dtype=output_dtype or payload.dtype)
    _op_combine_into(payload, local_num_tokens, workspace, metainfo, runtime_max_tokens_per_rank, ep_rank, ep_size,
                     top_k, combine_payload_offset, payload_in_workspace, output_dtype, output_scales,
                     output_scalar_scale, sf_layout, use_low_precision, enable_pdl, enable_rank_mask,
                     active_rank_mask, output)
    return output


# -- the public functional API (Python wrappers around the ops, as in the real module) -----------------

def moe_a2a_wrap_payload_tensor_in_workspace(workspace: torch.Tensor, leading_shape: list[int], slice_start: int,
                                             slice_end: int, dtype: torch.dtype) -> torch.Tensor:
    if workspace.ndim == 1:
        workspace = workspace.unsqueeze(0)
    base = workspace.view(dtype=torch.uint8)
    rank, start = divmod(slice_start, base.stride(0))
    return base[rank, start: start + slice_end - slice_start].view(dtype=dtype).view(*leading_shape, -1)


def moe_a2a_dispatch(token_selected_experts: torch.Tensor, input_payloads: list[torch.Tensor],
                     workspace: torch.Tensor, metainfo: torch.Tensor, runtime_max_tokens_per_rank: int, ep_rank: int,
                     ep_size: int, top_k: int, num_experts: int, enable_pdl: Optional[bool] = None,
                     eplb_local_stats: Optional[torch.Tensor] = None, enable_rank_mask: bool = False,
                     active_rank_mask: Optional[torch.Tensor] = None, *, backend: str = "trtllm",
                     recv_view_cache: Optional[dict] = None):
    offsets, sizes, combine_offset, _, _ = get_moe_alltoall_module(backend).moe_a2a_dispatch(
        token_selected_experts, input_payloads, workspace, metainfo, runtime_max_tokens_per_rank, ep_rank, ep_size,
        top_k, num_experts, bool(enable_pdl), eplb_local_stats, enable_rank_mask, active_rank_mask)
    views = [moe_a2a_wrap_payload_tensor_in_workspace(workspace, [ep_size, runtime_max_tokens_per_rank], o, o + n,
                                                      p.dtype)
             for p, o, n in zip(input_payloads, offsets, sizes, strict=True)]
    return views, combine_offset, None


def moe_a2a_sanitize_expert_ids(expert_ids: torch.Tensor, workspace: torch.Tensor, metainfo: torch.Tensor,
                                ep_rank: int, invalid_expert_id: int, enable_pdl: Optional[bool] = None, *,
                                backend: str = "trtllm"):
    return get_moe_alltoall_module(backend).moe_a2a_sanitize_expert_ids(expert_ids, workspace, metainfo, ep_rank,
                                                                        invalid_expert_id, bool(enable_pdl))


@dataclass
class _A2AState:
    phase: str = "idle"
    local_num_tokens: Optional[int] = None
    combine_payload_offset: Optional[int] = None


def _owner(expert: int, num_experts: int, ep: int) -> int:
    """The kernel's ``compute_target_rank_id`` (contiguous ceil/floor partition)."""
    base, rem = divmod(num_experts, ep)
    if rem == 0:
        return expert // base
    split = rem * (base + 1)
    return expert // (base + 1) if expert < split else rem + (expert - split) // base


class MoeAlltoAll:
    _WORKSPACE_CACHE: dict = {}
    _METAINFO_INDEX: Optional[dict] = None

    @classmethod
    def _init_constants(cls, backend: str = "trtllm") -> None:
        if cls._METAINFO_INDEX is None:
            names, values = get_moe_alltoall_module(backend).moe_a2a_get_metainfo_index_pairs()
            cls._METAINFO_INDEX = {n.replace("MOE_A2A_", ""): int(v) for n, v in zip(names, values)}

    @staticmethod
    def get_moe_workspace_size_per_rank(ep_size: int, top_k: int, max_num_tokens: int, hidden_size: int,
                                        extra_payload_bytes_per_token: int = 0, eplb_stats_num_experts: int = 0, *,
                                        backend: str = "trtllm") -> int:
        dispatch = hidden_size * 2 + top_k * 4 + top_k * 4 + extra_payload_bytes_per_token
        return moe_a2a_get_workspace_size_per_rank(ep_size, max_num_tokens, dispatch, hidden_size * 2,
                                                   eplb_stats_num_experts, backend=backend)

    def __init__(self, mapping, max_num_tokens: int, top_k: int, num_experts: int, workspace_size_per_rank: int = None,
                 hidden_size: int = None, mnnvl_config=None, eplb_stats_num_experts: int = 0,
                 enable_rank_mask: bool = False, *, backend: str = "trtllm"):
        warnings.warn("MoeAlltoAll is deprecated; use flashinfer.moe_ep.NVLinkOneSidedAlltoAll", DeprecationWarning,
                      stacklevel=2)
        get_moe_alltoall_module(backend)
        self._init_constants(backend)
        if workspace_size_per_rank is None:
            assert hidden_size is not None, "hidden_size must be provided if workspace_size_per_rank is not provided"
            workspace_size_per_rank = self.get_moe_workspace_size_per_rank(mapping.moe_ep_size, top_k, max_num_tokens,
                                                                           hidden_size)
        if not mnnvl_config:
            # The real default communicator is MPI (mpi4py), which the GPU hosts of this project do not run.
            raise ImportError("mpi4py is not installed")
        comm = mnnvl_config.comm_backend.Split(mapping.pp_rank * mapping.cp_size + mapping.cp_rank, mapping.tp_rank)
        sizes = comm.allgather(workspace_size_per_rank)
        assert all(x == workspace_size_per_rank for x in sizes), "Not all rank allocating same size."
        if not isinstance(top_k, int) or top_k <= 0:
            raise ValueError("top_k must be a positive int")
        if not isinstance(num_experts, int) or num_experts <= 0:
            raise ValueError("num_experts must be a positive int")
        self._comm = comm
        self._backend = backend
        self.workspace_size_per_rank = workspace_size_per_rank
        self.max_num_tokens = max_num_tokens
        self.ep_size = mapping.moe_ep_size
        self.ep_rank = mapping.moe_ep_rank
        self.top_k = top_k
        self.num_experts = num_experts
        assert comm.Get_size() == self.ep_size and comm.Get_rank() == self.ep_rank, "communicator/mapping mismatch"
        # Stale memory: random bytes, never cleared (padding rows of the real workspace hold old data too).
        gen = torch.Generator().manual_seed(1234 + self.ep_rank)
        self.workspace = torch.randint(0, 256, (self.ep_size, workspace_size_per_rank), dtype=torch.uint8,
                                       generator=gen)
        self.metainfo = torch.tensor(_offsets(self.ep_size, max_num_tokens, eplb_stats_num_experts), dtype=torch.int64)
        self.workspace[self.ep_rank, : int(self.metainfo[-1])] = 0  # moe_a2a_initialize zeroes the aux region
        self._state = _A2AState()
        self._epoch = 0
        self._exchange: Optional[_Exchange] = None
        _BY_WORKSPACE[self.workspace.data_ptr()] = self
        comm.barrier()
        STATS["instances"] += 1

    # -- dispatch / combine: phase checks around the functional API, as in the real class ----------------

    def dispatch(self, token_selected_experts: torch.Tensor, input_payloads: list[torch.Tensor],
                 runtime_max_tokens_per_rank: int, invalid_token_expert_id: Optional[int] = None,
                 expert_id_payload_index: Optional[int] = None, eplb_local_stats: Optional[torch.Tensor] = None,
                 active_rank_mask: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        assert self._state.phase == "idle", "dispatch called twice without combine"
        assert runtime_max_tokens_per_rank <= self.max_num_tokens, "runtime_max_tokens_per_rank exceeds max_num_tokens"
        views, combine_offset, _ = moe_a2a_dispatch(token_selected_experts, input_payloads, self.workspace,
                                                    self.metainfo, runtime_max_tokens_per_rank, self.ep_rank,
                                                    self.ep_size, self.top_k, self.num_experts,
                                                    backend=self._backend)
        self._state = _A2AState("dispatched", token_selected_experts.size(0), combine_offset)
        if invalid_token_expert_id is not None:
            assert expert_id_payload_index is not None, \
                "expert_id_payload_index required when invalid_token_expert_id is set"
            moe_a2a_sanitize_expert_ids(views[expert_id_payload_index], self.workspace, self.metainfo, self.ep_rank,
                                        invalid_token_expert_id, backend=self._backend)
        return views

    def get_combine_payload_tensor_in_workspace(self, runtime_max_tokens_per_rank: int, hidden_size: int,
                                                dtype: torch.dtype) -> torch.Tensor:
        if self._state.phase != "dispatched":
            raise RuntimeError("get_combine_payload_tensor_in_workspace called before successful dispatch")
        nbytes = self.ep_size * runtime_max_tokens_per_rank * hidden_size * torch.empty((), dtype=dtype).element_size()
        offset = self._state.combine_payload_offset
        return moe_a2a_wrap_payload_tensor_in_workspace(self.workspace[self.ep_rank, :],
                                                        [self.ep_size, runtime_max_tokens_per_rank], offset,
                                                        offset + nbytes, dtype)

    def combine(self, payload: torch.Tensor, runtime_max_tokens_per_rank: int, payload_in_workspace: bool = False,
                output_dtype: Optional[torch.dtype] = None, output_scales: Optional[torch.Tensor] = None,
                output_scalar_scale: float = 1.0, sf_layout: SfLayout = SfLayout.layout_linear,
                output: Optional[torch.Tensor] = None, *,
                use_low_precision: bool = False, active_rank_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        assert self._state.phase == "dispatched", "combine called before successful dispatch"
        assert runtime_max_tokens_per_rank <= self.max_num_tokens, "runtime_max_tokens_per_rank exceeds max_num_tokens"
        if output is not None and not output.is_contiguous():
            raise ValueError(f"output must be contiguous, got stride={output.stride()}")
        args = (payload, self._state.local_num_tokens, self.workspace, self.metainfo, runtime_max_tokens_per_rank,
                self.ep_rank, self.ep_size, self.top_k, self._state.combine_payload_offset, payload_in_workspace,
                output_dtype, output_scales, output_scalar_scale, sf_layout, use_low_precision, True, False, None)
        ops = get_moe_alltoall_module(self._backend)
        if output is None:
            output = ops.moe_a2a_combine(*args)
        else:
            ops.moe_a2a_combine_into(*args, output)
        self._state = _A2AState()
        return output
