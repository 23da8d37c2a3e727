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


@dataclass
class _A2AState:
    phase: str = "idle"
    local_num_tokens: Optional[int] = None
    combine_payload_offset: Optional[int] = None
    rows: Optional[int] = None
    send_plan: Optional[list[list[int]]] = None  # per target rank: my token indices in slot order


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
        comm.barrier()
        STATS["instances"] += 1

    # -- helpers ---------------------------------------------------------------------------------------

    def _local(self) -> torch.Tensor:
        return self.workspace[self.ep_rank]

    def _view(self, offset: int, nbytes: int, dtype: torch.dtype, leading: list[int]) -> torch.Tensor:
        return self._local()[offset: offset + nbytes].view(dtype).view(*leading, -1)

    # -- dispatch --------------------------------------------------------------------------------------

    def dispatch(self, token_selected_experts: torch.Tensor, input_payloads: list[torch.Tensor],
                 runtime_max_tokens_per_rank: int, invalid_token_expert_id: Optional[int] = None,
                 expert_id_payload_index: Optional[int] = None, eplb_local_stats: Optional[torch.Tensor] = None,
                 active_rank_mask: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        assert self._state.phase == "idle", "dispatch called twice without combine"
        r = runtime_max_tokens_per_rank
        assert r <= self.max_num_tokens, "runtime_max_tokens_per_rank exceeds max_num_tokens"
        ids = token_selected_experts
        _check(ids.dtype == torch.int32 and ids.dim() == 2, "token_selected_experts must be a 2D int32 tensor")
        _check(ids.is_contiguous(), "token_selected_experts must be contiguous")
        t, k = ids.shape
        _check(k == self.top_k, "token_selected_experts must have top_k columns")
        _check(0 < len(input_payloads) <= K_MAX_PAYLOADS, f"num_payloads must be in (0, {K_MAX_PAYLOADS}]")
        for i, p in enumerate(input_payloads):
            _check(p.is_contiguous(), f"payload {i} must be contiguous")
            _check(p.dim() == 2, f"payload {i} must be 2D")
            _check(p.shape[0] == t, f"payload {i} first dimension must match local_num_tokens")
        _check(r > 0, "runtimeMaxTokensPerRank > 0")
        _check(self.num_experts >= self.ep_size, "num_experts must be >= ep_size")
        _check(0 < self.top_k <= K_MAX_TOP_K, "topK must be in (0, kMaxTopK]")
        total, sizes = 0, []
        for i, p in enumerate(input_payloads):
            nbytes = self.ep_size * r * p.shape[1] * p.element_size()
            sizes.append(nbytes)
            total += nbytes
            _check(total % p.element_size() == 0,
                   f"Misaligned payload buffer {i} with element size {p.element_size()}. Consider reordering "
                   "payloads by largest to smallest element size")
        base = int(self.metainfo[-1])
        _check(self.workspace_size_per_rank >= base + total,
               f"workspace size per rank insufficient, need {base + total} bytes but has "
               f"{self.workspace_size_per_rank}")
        if invalid_token_expert_id is not None:
            assert expert_id_payload_index is not None, \
                "expert_id_payload_index required when invalid_token_expert_id is set"

        # Sender side: each token goes once to each rank owning one of its experts; slots in random order.
        self._epoch += 1
        plan: list[list[int]] = [[] for _ in range(self.ep_size)]
        for tok, row in enumerate(ids.tolist()):
            for d in dict.fromkeys(_owner(e, self.num_experts, self.ep_size) for e in row):
                plan[d].append(tok)
        gen = torch.Generator().manual_seed(7919 * self._epoch + self.ep_rank)
        plan = [[toks[j] for j in torch.randperm(len(toks), generator=gen).tolist()] for toks in plan]
        everyone = self._comm.allgather((plan, [p.clone() for p in input_payloads]))

        # Receiver side: write what each source sent here into this rank's planes, then the counters.
        views, off = [], base
        for i, p in enumerate(input_payloads):
            views.append(self._view(off, sizes[i], p.dtype, [self.ep_size, r]))
            off += sizes[i]
        counts = self._view(int(self.metainfo[METAINFO_NAMES.index("RECV_COUNTERS_OFFSET_INDEX")]),
                            self.ep_size * INT32, torch.int32, [self.ep_size]).view(-1)
        for s, (src_plan, src_payloads) in enumerate(everyone):
            rows = src_plan[self.ep_rank]
            counts[s] = len(rows)
            for view, src in zip(views, src_payloads):
                if rows:
                    view[s, : len(rows)] = src[torch.tensor(rows, dtype=torch.long)]
        if invalid_token_expert_id is not None:
            recv_ids = views[expert_id_payload_index]
            for s in range(self.ep_size):
                recv_ids[s, int(counts[s]):] = invalid_token_expert_id
        self._state = _A2AState("dispatched", t, _align(off), r, plan)
        STATS["dispatch"] += 1
        return views

    # -- combine ---------------------------------------------------------------------------------------

    def get_combine_payload_tensor_in_workspace(self, runtime_max_tokens_per_rank: int, hidden_size: int,
                                                dtype: torch.dtype) -> torch.Tensor:
        if self._state.phase != "dispatched":
            raise RuntimeError("get_combine_payload_tensor_in_workspace called before successful dispatch")
        nbytes = self.ep_size * runtime_max_tokens_per_rank * hidden_size * torch.empty((), dtype=dtype).element_size()
        return self._view(self._state.combine_payload_offset, nbytes, dtype,
                          [self.ep_size, runtime_max_tokens_per_rank])

    def combine(self, payload: torch.Tensor, runtime_max_tokens_per_rank: int, payload_in_workspace: bool = False,
                output_dtype: Optional[torch.dtype] = None, output_scales: Optional[torch.Tensor] = None,
                output_scalar_scale: float = 1.0, sf_layout: SfLayout = SfLayout.layout_linear,
                output: Optional[torch.Tensor] = None, *,
                use_low_precision: bool = False, active_rank_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        assert self._state.phase == "dispatched", "combine called before successful dispatch"
        r = runtime_max_tokens_per_rank
        assert r <= self.max_num_tokens, "runtime_max_tokens_per_rank exceeds max_num_tokens"
        _check(payload.is_contiguous(), "payload must be contiguous")
        _check(payload.dim() == 3, "payload must be [ep_size, runtime_max_tokens_per_rank, hidden]")
        _check(payload.shape[0] == self.ep_size and payload.shape[1] == r, "payload must be [ep_size, R, hidden]")
        _check(r == self._state.rows, f"fake: combine R={r} differs from its dispatch's R={self._state.rows}")
        nbytes = payload.numel() * payload.element_size()
        offset = self._state.combine_payload_offset
        _check(offset + nbytes <= self.workspace_size_per_rank, "workspace insufficient for combine payload region")
        region = self._view(offset, nbytes, payload.dtype, [self.ep_size, r])
        if payload_in_workspace:
            _check(payload.data_ptr() == region.data_ptr(), "payload_in_workspace is True but tensor pointer mismatch")
            STATS["combine_in_workspace"] += 1
        else:
            region.copy_(payload)  # the staging copy the zero-copy variant avoids
            STATS["combine_staged"] += 1
        regions = self._comm.allgather(region.clone())
        t, h = self._state.local_num_tokens, payload.shape[2]
        acc = torch.zeros((t, h), dtype=torch.float32)
        for d, tokens in enumerate(self._state.send_plan):
            for slot, tok in enumerate(tokens):
                acc[tok] += regions[d][self.ep_rank, slot].float()
        result = acc.to(output_dtype or payload.dtype)
        if output is not None:
            if not output.is_contiguous():
                raise ValueError(f"output must be contiguous, got stride={output.stride()}")
            _check(tuple(output.shape) == (t, h) and output.dtype == result.dtype, "output shape/dtype mismatch")
            output.copy_(result)
            result = output
        self._state = _A2AState()
        STATS["combine"] += 1
        return result
