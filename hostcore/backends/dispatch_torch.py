"""Dispatch backends ``local`` (one rank, no collectives) and ``torch_a2a`` (torch.distributed).

``torch_a2a`` produces exactly the padded rank-major layout of one-sided
dispatches (`hostcore.contract`): every rank sends ``R`` rows to every rank,
the tokens bound there first and padding after, in one ``all_to_all_single``
of packed bytes (hidden, ids, weights per row, so any backend, gloo included,
moves bf16; each destination's slice ends with a header row that carries its
row count). The receiver writes the
sentinel into every top-k slot of the padding rows; their hidden and weights
stay stale, as on real one-sided dispatches. Combine sends the ``[ep, R, H]``
expert output back the same way and sums, per token, the rows of the ranks it
went to (fp32 accumulation).

``R`` (``rows_per_rank``) must be the same on every rank; when the caller does
not pass it, dispatch agrees on it with an all-reduce of the local token
counts, which costs a collective and (on GPUs) a host sync.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..contract import PreparedTokens, ReceivedTokens
from ..errors import ContractError
from ..hookspecs import BuildContext


def _check_rows(tokens: PreparedTokens, rows_per_rank: int | None) -> None:
    t = tokens.hidden.shape[0]
    if rows_per_rank is not None and t > rows_per_rank:
        raise ContractError(f"this rank has T={t} tokens but rows_per_rank R={rows_per_rank}: "
                            "R must be >= the largest token count in the EP group (pass None to agree on it)")


class LocalDispatch:
    """``ep_size == 1``: the received layout is this rank's tokens, padded to ``R``."""

    def __init__(self, ctx: BuildContext) -> None:
        if ctx.ep_size != 1:
            raise ContractError(f"dispatch=local runs one rank only, but ep_size={ctx.ep_size}; use dispatch=torch_a2a")
        self.sentinel = _sentinel(ctx)
        self._tokens: int | None = None

    def dispatch(self, tokens: PreparedTokens, rows_per_rank: int | None = None) -> ReceivedTokens:
        if self._tokens is not None:
            raise ContractError("dispatch called twice without combine: every dispatch must be followed by its combine")
        _check_rows(tokens, rows_per_rank)
        t, k = tokens.topk_ids.shape
        r = t if rows_per_rank is None else rows_per_rank
        hidden = tokens.hidden.new_empty((1, r, tokens.hidden.shape[1]))
        hidden[0, :t] = tokens.hidden
        ids = torch.full((1, r, k), self.sentinel, dtype=torch.int32, device=tokens.topk_ids.device)
        ids[0, :t] = tokens.topk_ids
        weights = tokens.topk_weights.new_empty((1, r, k))
        weights[0, :t] = tokens.topk_weights
        self._tokens = t
        counts = torch.tensor([t], dtype=torch.int32, device=ids.device)
        return ReceivedTokens(hidden, ids, weights, self.sentinel, counts)

    def combine(self, expert_out: torch.Tensor) -> torch.Tensor:
        if self._tokens is None:
            raise ContractError("combine called without a preceding dispatch")
        tokens, self._tokens = self._tokens, None
        return expert_out[0, :tokens].clone()


class TorchAllToAllDispatch:
    """Padded one-sided layout over ``torch.distributed.all_to_all_single``."""

    def __init__(self, ctx: BuildContext) -> None:
        self.ep_size = ctx.ep_size
        self.group = ctx.group
        if self.ep_size > 1 and not dist.is_initialized():
            raise ContractError(f"dispatch=torch_a2a with ep_size={self.ep_size} needs torch.distributed initialised "
                                "(run under torchrun or `hostcore run --ranks N`)")
        self.sentinel = _sentinel(ctx)
        self.owner = ctx.placement.owner_tensor(ctx.device)
        self._state: tuple[torch.Tensor, int, int, torch.dtype] | None = None

    def _agree_rows(self, t: int, device: torch.device) -> int:
        if self.ep_size == 1:
            return t
        local = torch.tensor([t], dtype=torch.int64, device=device)
        dist.all_reduce(local, op=dist.ReduceOp.MAX, group=self.group)
        return int(local.item())

    def dispatch(self, tokens: PreparedTokens, rows_per_rank: int | None = None) -> ReceivedTokens:
        if self._state is not None:
            raise ContractError("dispatch called twice without combine: every dispatch must be followed by its combine")
        _check_rows(tokens, rows_per_rank)
        hidden, ids, weights = tokens.hidden, tokens.topk_ids, tokens.topk_weights
        t, k = ids.shape
        h = hidden.shape[1]
        ep, device = self.ep_size, hidden.device
        r = self._agree_rows(t, device) if rows_per_rank is None else rows_per_rank
        # goes_to[t, d]: token t has at least one expert owned by rank d (sent once per rank).
        goes_to = torch.zeros((t, ep), dtype=torch.bool, device=device)
        goes_to.scatter_(1, self.owner[ids.long()].long(), True)
        position = torch.cumsum(goes_to.to(torch.int32), dim=0) - 1
        # Each destination's slice is R rows plus one header row carrying the row count, so one collective
        # moves both; row ``ep * (R + 1)`` is a dump for the (token, rank) pairs that send nothing.
        slice_rows = r + 1
        dummy = ep * slice_rows
        send_row = torch.where(goes_to, torch.arange(ep, device=device) * slice_rows + position, dummy)
        row = torch.cat([_bytes(hidden), _bytes(ids), _bytes(weights)], dim=1)
        width = row.shape[1]
        send = row.new_empty((dummy + 1, width))
        send.index_copy_(0, send_row.reshape(-1), row.repeat_interleave(ep, dim=0))
        send_counts = goes_to.sum(dim=0, dtype=torch.int32)
        send[:dummy].view(ep, slice_rows, width)[:, r, :4] = send_counts.view(ep, 1).view(torch.uint8)
        recv = torch.empty_like(send[:dummy])
        if ep == 1:
            recv.copy_(send[:dummy])
        else:
            dist.all_to_all_single(recv, send[:dummy], group=self.group)
        recv = recv.view(ep, slice_rows, width)
        recv_counts = recv[:, r, :4].contiguous().view(torch.int32).view(ep)
        hb = h * hidden.element_size()
        recv_hidden = recv[:, :r, :hb].contiguous().view(hidden.dtype)
        recv_ids = recv[:, :r, hb: hb + 4 * k].contiguous().view(torch.int32)
        recv_weights = recv[:, :r, hb + 4 * k:].contiguous().view(torch.float32)
        is_padding = torch.arange(r, device=device).view(1, r, 1) >= recv_counts.view(ep, 1, 1)
        recv_ids = torch.where(is_padding, self.sentinel, recv_ids)
        # Where combine finds each (token, rank) row in the returned [ep * R (+1 zero row), H] output.
        back_row = torch.where(goes_to, torch.arange(ep, device=device) * r + position, ep * r)
        self._state = (back_row, t, r, hidden.dtype)
        return ReceivedTokens(recv_hidden, recv_ids, recv_weights, self.sentinel, recv_counts)

    def combine(self, expert_out: torch.Tensor) -> torch.Tensor:
        if self._state is None:
            raise ContractError("combine called without a preceding dispatch")
        back_row, t, r, dtype = self._state
        self._state = None
        ep = self.ep_size
        if expert_out.shape[:2] != (ep, r):
            raise ContractError(f"combine expects expert output [ep_size={ep}, R={r}, H], got {tuple(expert_out.shape)}")
        h = expert_out.shape[2]
        flat = expert_out.reshape(ep * r, h).contiguous()
        back = torch.empty_like(flat)
        if ep == 1:
            back.copy_(flat)
        else:
            dist.all_to_all_single(_bytes(back), _bytes(flat), group=self.group)
        padded = torch.cat([back.to(torch.float32), back.new_zeros((1, h), dtype=torch.float32)])
        return padded[back_row.reshape(-1)].view(t, ep, h).sum(dim=1).to(dtype)


def _bytes(x: torch.Tensor) -> torch.Tensor:
    """A ``[rows, bytes]`` uint8 view of a contiguous 2-D tensor."""
    x = x.contiguous()
    return x.view(torch.uint8).view(x.shape[0], x.shape[1] * x.element_size())


def _sentinel(ctx: BuildContext) -> int:
    if ctx.sentinel is None:
        raise ContractError("a dispatch is built after the sentinel strategy: BuildContext.sentinel must be set")
    return ctx.sentinel
