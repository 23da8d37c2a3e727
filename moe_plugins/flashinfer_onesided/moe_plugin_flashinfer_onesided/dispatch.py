"""The ``flashinfer_onesided`` dispatch stage: a drop-in for ``torch_a2a`` on FlashInfer's one-sided kernels.

Layout (`hostcore.contract`): ``dispatch`` returns FlashInfer's workspace views
``[ep_size, R, ...]``; row ``[s, i]`` is the ``i``-th token source ``s`` sent
here, real rows first, and FlashInfer's sanitize kernel writes this rank's
sentinel (``BuildContext.sentinel``, chosen by the sentinel strategy for this
receiving rank) into every top-k slot of the padding rows. ``rows_per_source``
is a view of FlashInfer's per-source receive counters (``None`` if a FlashInfer
version hides them). The views stay valid until `combine` returns and are
overwritten by the next dispatch.

``R`` (``rows_per_rank``): pass it when the caller knows it (no collective, no
host sync); with ``None`` the ranks agree on ``max(T)`` with an all-reduce and
a host sync. ``R = 0`` (every rank has 0 tokens, as every rank sees the same
``R``) skips both collectives on every rank, since FlashInfer needs ``R > 0``.

CUDA graphs: capture ``dispatch -> expert compute -> combine`` on every rank
with a fixed ``rows_per_rank`` and fixed token count ``T`` (FlashInfer bakes
both into the launches), after one eager warm-up step; replay on every rank in
lockstep. `moe_plugin_flashinfer_onesided.graphs.GraphedDispatchCombine` does
exactly that. Passing ``rows_per_rank=None`` while capturing raises.

Errors: caller mistakes that every rank makes alike (shapes, dtypes,
``rows_per_rank > max_tokens_per_rank``) raise on every rank before any
collective. A mistake on one rank only (``T > rows_per_rank`` there) raises on
that rank and leaves the others waiting inside FlashInfer's kernel, as with
any collective; a bad expert output in `combine` is reported after this rank
took part with zeros, so the others finish.

Zero-copy combine: an expert stage that writes its output into
`combine_input_buffer()` (a workspace view) saves FlashInfer's staging copy;
any other ``[ep_size, R, H]`` tensor is copied into the workspace by FlashInfer.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from hostcore.contract import PreparedTokens, ReceivedTokens
from hostcore.errors import ContractError
from hostcore.hookspecs import BuildContext

from . import _flashinfer, layout, warmup


class _Pending(NamedTuple):
    """State between a dispatch and its combine (a tuple: it is made on every forward)."""

    tokens: int
    rows: int


class FlashInferOneSidedDispatch:
    """Dispatch and combine of one EP group on one rank; see the module docstring.

    Built by `build` (the backend factory). ``api`` says which FlashInfer entry
    point runs it and ``api_reason`` why; ``workspace_bytes`` is FlashInfer's
    workspace per rank.
    """

    def __init__(self, a2a: _flashinfer.OneSidedAllToAll, geometry: _flashinfer.Geometry, sentinel: int,
                 group: Any, device: torch.device, api_reason: str = "", rows_per_source: bool = True) -> None:
        self._a2a = a2a
        self.geometry = geometry
        self.sentinel = sentinel
        self.group = group
        self.device = device
        self.api = a2a.api
        self.api_reason = api_reason
        self.workspace_bytes = a2a.workspace_size_per_rank
        self._rows_per_source = a2a.recv_counts if rows_per_source else None
        # NCCL reduces device tensors, gloo host tensors: agree on R where the group's backend can.
        backend = str(dist.get_backend(group)) if dist.is_initialized() else "gloo"
        self._reduce_device = device if "nccl" in backend and device.type == "cuda" else torch.device("cpu")
        self._pending: _Pending | None = None
        self._combine_buffer: torch.Tensor | None = None
        self._accepted: set[tuple[Any, ...]] = set()  # input signatures that passed `_validate`

    def __repr__(self) -> str:
        g = self.geometry
        return (f"FlashInferOneSidedDispatch(api={self.api}, rank={g.ep_rank}/{g.ep_size}, sentinel={self.sentinel}, "
                f"workspace={self.workspace_bytes / 2**20:.1f} MiB/rank)")

    # -- dispatch -------------------------------------------------------------------------------------

    def dispatch(self, tokens: PreparedTokens, rows_per_rank: int | None = None) -> ReceivedTokens:
        """`hostcore.hookspecs.DispatchStage.dispatch`; a collective, also with ``T == 0``."""
        if self._pending is not None:
            raise ContractError("dispatch called twice without combine: every dispatch must be followed by its "
                                "combine (FlashInfer's workspace holds one exchange at a time)")
        hidden, ids, weights, scales = self._checked(tokens)
        t = hidden.shape[0]
        agreed = rows_per_rank is None
        rows = self._agree_rows(t) if agreed else int(rows_per_rank)
        layout.check_rows_per_rank(rows, t, self.geometry.max_tokens_per_rank, agreed)
        if rows == 0:
            self._pending = _Pending(0, 0)
            return self._empty(scales)
        recv = self._a2a.dispatch(hidden, ids, weights, scales, rows)
        self._pending = _Pending(t, rows)
        return ReceivedTokens(recv[0], recv[1], recv[2], self.sentinel, self._rows_per_source, recv[3])

    def _checked(self, tokens: PreparedTokens) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                        torch.Tensor | None]:
        """Metadata checks only (no device sync); contiguous tensors as FlashInfer requires.

        The checks depend only on shapes, dtypes and devices: a signature that passed once is not checked
        again (the per-forward cost is then one tuple and a set lookup).
        """
        hidden, ids, weights, scales = tokens.hidden, tokens.topk_ids, tokens.topk_weights, tokens.scales
        signature = (hidden.shape, hidden.dtype, hidden.device, ids.shape, ids.dtype, ids.device, weights.shape,
                     weights.dtype, weights.device, None if scales is None else (scales.shape, scales.dtype))
        if signature not in self._accepted:
            self._validate(hidden, ids, weights, scales)
            if len(self._accepted) < 256:  # bounded: a server sees a handful of token counts per layer
                self._accepted.add(signature)
        return (hidden.contiguous(), ids.contiguous(), weights.contiguous(),
                None if scales is None else scales.contiguous())

    def _validate(self, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                  scales: torch.Tensor | None) -> None:
        g = self.geometry
        if hidden.dim() != 2 or hidden.shape[1] != g.hidden_size:
            raise ContractError(f"hidden must be [T, H={g.hidden_size}], got {tuple(hidden.shape)}")
        t = hidden.shape[0]
        if ids.dtype != torch.int32 or tuple(ids.shape) != (t, g.top_k):
            raise ContractError(f"topk_ids must be int32 [T={t}, K={g.top_k}] (prepare's output), "
                                f"got {ids.dtype} {tuple(ids.shape)}")
        if weights.dtype != torch.float32 or weights.shape != ids.shape:
            raise ContractError(f"topk_weights must be fp32 [T={t}, K={g.top_k}], got {weights.dtype} "
                                f"{tuple(weights.shape)}")
        row = hidden.shape[1] * hidden.element_size()
        if scales is None:
            if hidden.dtype != g.dtype:
                raise ContractError(f"hidden is {hidden.dtype}, but the layer (and FlashInfer's workspace) was built "
                                    f"for {g.dtype}; build the layer with dtype={hidden.dtype}")
        else:
            if scales.dim() != 2 or scales.shape[0] != t:
                raise ContractError(f"scales must be [T={t}, S], got {tuple(scales.shape)}")
            row += scales.shape[1] * scales.element_size()
            if row > g.bytes.hidden + g.bytes.extra:
                raise ContractError(
                    f"quantized hidden + scales take {row} bytes per token, but the workspace reserves "
                    f"{g.bytes.hidden + g.bytes.extra} ({g.bytes.hidden} for hidden, {g.bytes.extra} for scales); "
                    f"build the dispatch with flashinfer_onesided(scale_bytes_per_token={row - g.bytes.hidden})")
        for name, x in (("hidden", hidden), ("topk_ids", ids), ("topk_weights", weights)):
            if x.device != self.device:
                raise ContractError(f"{name} is on {x.device}, but this dispatch was built for {self.device}")

    def _agree_rows(self, tokens: int) -> int:
        """``max(T)`` over the group: one all-reduce and a host sync (callers that know ``R`` pass it)."""
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise ContractError("rows_per_rank=None while capturing a CUDA graph: agreeing on R needs a host sync. "
                                "Pass a fixed rows_per_rank (>= the largest token count) when capturing")
        local = torch.tensor([tokens], dtype=torch.int64, device=self._reduce_device)
        dist.all_reduce(local, op=dist.ReduceOp.MAX, group=self.group)
        return int(local.item())

    def _empty(self, scales: torch.Tensor | None) -> ReceivedTokens:
        g, dev = self.geometry, self.device
        ep = g.ep_size
        return ReceivedTokens(
            torch.empty((ep, 0, g.hidden_size), dtype=g.dtype, device=dev),
            torch.empty((ep, 0, g.top_k), dtype=torch.int32, device=dev),
            torch.empty((ep, 0, g.top_k), dtype=torch.float32, device=dev),
            self.sentinel,
            torch.zeros(ep, dtype=torch.int32, device=dev),
            None if scales is None else scales.new_empty((ep, 0, scales.shape[1])))

    # -- combine --------------------------------------------------------------------------------------

    def combine_input_buffer(self) -> torch.Tensor:
        """The ``[ep_size, R, H]`` workspace view to write expert output into for a copy-free combine.

        Valid between a dispatch and its combine.
        """
        if self._pending is None:
            raise ContractError("combine_input_buffer() is valid only between dispatch and combine")
        g = self.geometry
        if self._pending.rows == 0:
            return torch.empty((g.ep_size, 0, g.hidden_size), dtype=g.dtype, device=self.device)
        self._combine_buffer = self._a2a.combine_input_buffer(self._pending.rows)
        return self._combine_buffer

    def _combine_problem(self, expert_out: torch.Tensor, want: tuple[int, int, int]) -> str:
        g = self.geometry
        if tuple(expert_out.shape) != want:
            return f"combine expects expert output [ep_size, R, H] = {list(want)}, got {list(expert_out.shape)}"
        if expert_out.dtype != g.dtype:
            return (f"combine expects expert output in the layer's dtype {g.dtype} (FlashInfer's workspace is "
                    f"sized for it), got {expert_out.dtype}")
        return f"expert output is on {expert_out.device}, but this dispatch runs on {self.device}"

    def combine(self, expert_out: torch.Tensor) -> torch.Tensor:
        """`hostcore.hookspecs.DispatchStage.combine`: ``[ep_size, R, H]`` -> new ``[T, H]``; a collective."""
        pending = self._pending
        if pending is None:
            raise ContractError("combine called without a preceding dispatch")
        g = self.geometry
        want = (g.ep_size, pending.rows, g.hidden_size)
        problem = None
        if expert_out.shape != want or expert_out.dtype != g.dtype or expert_out.device != self.device:
            problem = self._combine_problem(expert_out, want)
        buffer, self._combine_buffer, self._pending = self._combine_buffer, None, None
        if problem is not None:
            # The other ranks are already in (or heading to) the combine collective: take part with zeros so
            # nobody waits forever, then report the caller's mistake.
            if pending.rows:
                self._a2a.combine(torch.zeros(want, dtype=g.dtype, device=self.device), pending.rows, False,
                                  torch.empty((pending.tokens, g.hidden_size), dtype=g.dtype, device=self.device))
            raise ContractError(problem)
        if pending.rows == 0:
            return torch.empty((0, g.hidden_size), dtype=g.dtype, device=self.device)
        in_workspace = buffer is not None and expert_out.data_ptr() == buffer.data_ptr()
        output = torch.empty((pending.tokens, g.hidden_size), dtype=g.dtype, device=self.device)
        return self._a2a.combine(expert_out.contiguous(), pending.rows, in_workspace, output)


# -- factory ------------------------------------------------------------------------------------------


def build(ctx: BuildContext, api: str = "auto", scale_bytes_per_token: int = 0,
          rows_per_source: bool = True) -> FlashInferOneSidedDispatch:
    """The backend factory: validate the layer, agree across the group, allocate FlashInfer's workspace.

    A collective over ``ctx.group`` (every rank of the EP group builds its
    layer together): one ``all_gather_object`` to cross-check the shapes and
    pick the FlashInfer API for the whole group, then FlashInfer's workspace
    allocation and memory-handle exchange. Every check that can fail before
    them depends only on values all ranks share, so all ranks fail together.
    """
    if ctx.sentinel is None:
        raise ContractError("a dispatch is built after the sentinel strategy: BuildContext.sentinel must be set")
    sentinel = int(ctx.sentinel)
    if not -(2**31) <= sentinel < 2**31:
        raise ContractError(f"the sentinel {sentinel} does not fit the int32 top-k ids")
    layout.check_limits(ctx.ep_size, ctx.top_k, ctx.placement.global_num_experts, max(1, ctx.max_tokens_per_rank))
    layout.check_partition(ctx.placement, ctx.ep_size)
    device = _require_cuda(ctx.device)
    _check_group(ctx)
    geometry = _flashinfer.Geometry(
        ep_size=ctx.ep_size, ep_rank=ctx.rank, global_num_experts=ctx.placement.global_num_experts,
        top_k=ctx.top_k, max_tokens_per_rank=max(1, ctx.max_tokens_per_rank), hidden_size=ctx.hidden_size,
        dtype=ctx.dtype, bytes=layout.payload_bytes(ctx.hidden_size, ctx.top_k, ctx.dtype, scale_bytes_per_token))
    _flashinfer.import_flashinfer()
    with _device_scope(device):
        warmup.ensure_built(log=_rank_log(ctx.rank))
        facts = {"geometry": geometry.shared(), "moe_ep": _flashinfer.has_moe_ep(), "sentinel": sentinel,
                 "flashinfer": _flashinfer.installed_version()}
        everyone: list[Any] = [None] * ctx.ep_size
        dist.all_gather_object(everyone, facts, group=ctx.group)
        _check_agreement(everyone)
        chosen, why = _flashinfer.choose_api(api, [f["moe_ep"] for f in everyone], [f["sentinel"] for f in everyone],
                                             geometry.global_num_experts)
        try:
            a2a = _flashinfer.open_alltoall(chosen, geometry, ctx.group, sentinel, device)
        except RuntimeError as exc:
            # moe_ep's NVML check (all NVLinks up) refuses on every rank alike, before allocating anything;
            # with api=auto the group then takes the same kernels through MoeAlltoAll.
            if api != "auto" or chosen != "moe_ep" or _flashinfer.NVLINK_REFUSAL not in str(exc):
                raise
            chosen, why = "moe_alltoall", f"moe_ep refused this host ({exc})"
            a2a = _flashinfer.open_alltoall(chosen, geometry, ctx.group, sentinel, device)
    return FlashInferOneSidedDispatch(a2a, geometry, sentinel, ctx.group, device, why, rows_per_source)


def _require_cuda(device: torch.device) -> torch.device:
    """FlashInfer's kernels run on CUDA devices only; pin an index-less ``cuda`` to the current device."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ContractError(f"dispatch=flashinfer_onesided runs on CUDA GPUs, but this layer is on {device}; "
                            "use dispatch=torch_a2a on the CPU")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _device_scope(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    # FlashInfer maps the workspace on the *current* CUDA device: make it the layer's device.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check_group(ctx: BuildContext) -> None:
    if not dist.is_initialized():
        raise ContractError(f"dispatch=flashinfer_onesided with ep_size={ctx.ep_size} needs torch.distributed "
                            "initialised (run under torchrun or `hostcore run --ranks N`)")
    size, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
    if size != ctx.ep_size or rank != ctx.rank:
        raise ContractError(f"the EP group has {size} ranks and this process is rank {rank} in it, but the layer was "
                            f"built for ep_size={ctx.ep_size}, rank={ctx.rank}; pass the EP group as "
                            "BuildContext.group (None means the default group)")


def _check_agreement(facts: list[dict[str, Any]]) -> None:
    """Every rank must size the workspace alike (a mismatch gives NaNs or hangs inside FlashInfer)."""
    first = facts[0]["geometry"]
    for rank, f in enumerate(facts[1:], start=1):
        diff = {k: (first[k], v) for k, v in f["geometry"].items() if first.get(k) != v}
        if diff:
            shown = ", ".join(f"{k}: rank 0 has {a}, rank {rank} has {b}" for k, (a, b) in diff.items())
            raise ContractError(f"the EP group's ranks disagree on the layer's shape ({shown}); every rank must "
                                "build the layer with the same shapes and max_tokens_per_rank")
    versions = {f["flashinfer"] for f in facts}
    if len(versions) > 1:
        raise ContractError(f"the EP group's ranks run different flashinfer-python versions {sorted(map(str, versions))}; "
                            "install one version everywhere")


def _rank_log(rank: int) -> Any:
    def log(line: str) -> None:
        if rank == 0:  # every rank waits on the same build (FlashInfer's file lock); one voice is enough
            print(f"[flashinfer_onesided] {line}", file=sys.stderr, flush=True)
    return log
