"""Fake of ``flashinfer.moe_ep``: ``NVLinkOneSidedAlltoAll`` and its config records, over the fake MoeAlltoAll.

Mirrors 0.7.2.post1's ``backends/split/comm/nvlink_one_sided``: payload order
``[hidden, (scales), ids, (weights)]``, the padding id fixed at construction
(``MoEEpCommParams.invalid_expert_id``, refused inside ``[0, num_experts)``),
``num_experts % ep_size == 0``, workspace sized from the params, views
flattened to ``[ep_size * R, ...]``, and combine detecting its own combine
buffer by data pointer.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..comm.comm_backend import TorchDistBackend
from ..comm.mapping import Mapping
from ..comm.mnnvl import MnnvlConfig
from ..comm.trtllm_moe_alltoall import MoeAlltoAll, moe_a2a_get_workspace_size_per_rank

STATS: Counter = Counter()


@dataclass(frozen=True)
class BootstrapConfig:
    world_size: int
    rank: int
    stream: int = 0
    auto_bootstrap: bool = True
    device: Optional[int] = field(default=None, kw_only=True)
    nccl_comm: Optional[int] = None
    process_group: Any = field(default=None, compare=False, hash=False)
    tcp_store: Any = None

    def __post_init__(self) -> None:
        if self.world_size <= 0:
            raise ValueError(f"world_size must be positive, got {self.world_size}")
        if not (0 <= self.rank < self.world_size):
            raise ValueError(f"rank {self.rank} not in [0, {self.world_size})")


@dataclass(frozen=True)
class MoEEpCommParams:
    num_experts: int
    top_k: int
    max_tokens_per_rank: int
    hidden_size: int
    dtype: Optional[torch.dtype] = None
    dispatch_format: Any = None
    invalid_expert_id: int = -1

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k", "max_tokens_per_rank", "hidden_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"MoEEpCommParams.{name} must be a positive int")
        if self.top_k > self.num_experts:
            raise ValueError("MoEEpCommParams.top_k exceeds num_experts")
        if 0 <= self.invalid_expert_id < self.num_experts:
            raise ValueError("MoEEpCommParams.invalid_expert_id must lie outside "
                             f"[0, num_experts={self.num_experts}), got {self.invalid_expert_id}")

    @property
    def token_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.dtype is None else self.dtype

    @property
    def dispatch_bytes_per_token(self) -> int:
        return self.hidden_size * self.token_dtype.itemsize


@dataclass
class NVLinkOneSidedConfig:
    backend_name: str = "nvlink_one_sided"
    extra_payload_bytes_per_token: int = 0
    eplb_stats_num_experts: int = 0
    enable_rank_mask: bool = False
    use_low_precision_combine: bool = False
    comm_backend: Any = None


@dataclass(frozen=True)
class MoEEpDispatchResult:
    hidden_states: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: Optional[torch.Tensor]
    tokens_per_rank: int
    hidden_states_scale: Optional[torch.Tensor] = None
    eplb_gathered_stats: Optional[torch.Tensor] = None


class NVLinkOneSidedAlltoAll:
    def __init__(self, bootstrap: BootstrapConfig, params: MoEEpCommParams,
                 config: Optional[NVLinkOneSidedConfig] = None) -> None:
        self.config = NVLinkOneSidedConfig() if config is None else config
        comm = self.config.comm_backend or TorchDistBackend(group=bootstrap.process_group)
        if comm.Get_size() != bootstrap.world_size or comm.Get_rank() != bootstrap.rank:
            raise ValueError("MNNVL communicator does not match the EP group")
        # The real one gathers each rank's NVML check (every NVLink up); FAKE_FLASHINFER_NO_NVLINK=1 fails it.
        verdicts = comm.allgather(os.environ.get("FAKE_FLASHINFER_NO_NVLINK") != "1")
        unsupported = [rank for rank, ok in enumerate(verdicts) if not ok]
        if unsupported:
            raise RuntimeError(f"NVLink backends are not supported on EP ranks {unsupported}; see their logs for the "
                               "reason")
        mapping = Mapping(world_size=bootstrap.world_size, rank=bootstrap.rank, gpus_per_node=bootstrap.world_size,
                          tp_size=bootstrap.world_size, moe_ep_size=bootstrap.world_size)
        self.bootstrap, self.params = bootstrap, params
        self.ep_rank, self.ep_size = bootstrap.rank, bootstrap.world_size
        if params.num_experts % self.ep_size != 0:
            raise ValueError(f"NVLinkOneSidedAlltoAll requires num_experts ({params.num_experts}) divisible by the "
                             f"EP size ({self.ep_size})")
        dispatch_bytes = (params.dispatch_bytes_per_token + params.top_k * 8
                          + self.config.extra_payload_bytes_per_token)
        combine_bytes = params.hidden_size * max(params.token_dtype.itemsize, 2)
        size = moe_a2a_get_workspace_size_per_rank(self.ep_size, params.max_tokens_per_rank, dispatch_bytes,
                                                   combine_bytes)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "MoeAlltoAll is deprecated", DeprecationWarning)
            self._alltoall: Optional[MoeAlltoAll] = MoeAlltoAll(
                mapping, max_num_tokens=params.max_tokens_per_rank, top_k=params.top_k,
                num_experts=params.num_experts, workspace_size_per_rank=size,
                mnnvl_config=MnnvlConfig(comm_backend=comm))
        self._tokens_per_rank: Optional[int] = None
        self._combine_buffer: Optional[torch.Tensor] = None
        STATS["instances"] += 1

    @property
    def alltoall(self) -> MoeAlltoAll:
        if self._alltoall is None:
            raise RuntimeError("NVLinkOneSidedAlltoAll has been destroyed")
        return self._alltoall

    def dispatch(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: Optional[torch.Tensor] = None, *, hidden_states_scale: Optional[torch.Tensor] = None,
                 max_tokens_per_rank: Optional[int] = None, eplb_local_stats: Optional[torch.Tensor] = None,
                 active_rank_mask: Optional[torch.Tensor] = None) -> MoEEpDispatchResult:
        if self._tokens_per_rank is not None:
            raise RuntimeError("dispatch called twice without an intervening combine")
        r = self.params.max_tokens_per_rank if max_tokens_per_rank is None else max_tokens_per_rank
        if not 0 < r <= self.params.max_tokens_per_rank:
            raise ValueError(f"max_tokens_per_rank={r} must be in (0, {self.params.max_tokens_per_rank}]")
        if topk_ids.dtype != torch.int32:
            topk_ids = topk_ids.to(torch.int32)
        payloads = [hidden_states]
        if hidden_states_scale is not None:
            payloads.append(hidden_states_scale)
        idx = len(payloads)
        payloads.append(topk_ids)
        if topk_weights is not None:
            payloads.append(topk_weights)
        recv = self.alltoall.dispatch(topk_ids, payloads, r, invalid_token_expert_id=self.params.invalid_expert_id,
                                      expert_id_payload_index=idx)
        self._tokens_per_rank = r
        recv = [x.flatten(0, 1) for x in recv]
        STATS["dispatch"] += 1
        return MoEEpDispatchResult(recv[0], recv[idx], recv[idx + 1] if topk_weights is not None else None, r,
                                   recv[1] if hidden_states_scale is not None else None)

    def get_combine_input_buffer(self, dtype: torch.dtype) -> torch.Tensor:
        if self._tokens_per_rank is None:
            raise RuntimeError("get_combine_input_buffer called before dispatch")
        buf = self.alltoall.get_combine_payload_tensor_in_workspace(self._tokens_per_rank, self.params.hidden_size,
                                                                   dtype).flatten(0, 1)
        self._combine_buffer = buf
        return buf

    def combine(self, expert_output: torch.Tensor, *, output: Optional[torch.Tensor] = None,
                active_rank_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        r = self._tokens_per_rank
        if r is None:
            raise RuntimeError("combine called before dispatch")
        if expert_output.dim() == 2:
            payload = expert_output.view(self.ep_size, r, -1)
        elif expert_output.dim() == 3:
            payload = expert_output
        else:
            raise ValueError(f"expert_output must be 2D or 3D, got shape {tuple(expert_output.shape)}")
        in_ws = self._combine_buffer is not None and expert_output.data_ptr() == self._combine_buffer.data_ptr()
        out = self.alltoall.combine(payload, r, payload_in_workspace=in_ws, output=output)
        self._tokens_per_rank = None
        self._combine_buffer = None
        STATS["combine"] += 1
        return out


__all__ = ["BootstrapConfig", "MoEEpCommParams", "MoEEpDispatchResult", "NVLinkOneSidedAlltoAll",
           "NVLinkOneSidedConfig"]
