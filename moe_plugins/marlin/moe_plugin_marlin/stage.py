"""`MarlinExperts`: the ``marlin`` experts stage (W4A16 GPTQ MoE on CUDA through our kernels).

Build (``factory(ctx, block_m=0)``) validates the weights, packs them into
the tile layout on the GPU (`moe_plugin_marlin.layout`) and compiles the
kernels (`moe_plugin_marlin.jit`). Each `compute` then runs

1. the aligned block layout: ``routing.aligned`` when its ``block_m`` is the
   one this call wants, else our one-CTA align kernel on ``routing.local_ids``;
2. GEMM1 on w13 with ``silu(gate) * up`` fused -> ``inter [N*K, I]``;
3. GEMM2 on w2 with the router weight multiplied in -> fp32 ``slot_out [N*K, H]``;
4. the sum over each row's local top-k slots -> ``out [N, H]`` (activation dtype).

Slots with local id -1 (non-local experts, padding rows, invalid ids) are in
no block, so no weight is read and no work is spent for them; padding rows'
hidden states and router weights are never read. Nothing syncs with the host
and nothing is allocated once the workspace is large enough: the whole call
can be captured in a CUDA graph after one warm-up call at the largest ``N``
(or `reserve`). The returned tensor is a view of a workspace owned by the
stage, valid until its next `compute`.
"""

from __future__ import annotations

import torch

from hostcore.contract import AlignedLayout, LocalRouting, aligned_capacity
from hostcore.errors import BackendUnavailableError, ContractError
from hostcore.hookspecs import BuildContext
from hostcore.quant import QuantizedExperts

from . import kernels
from .jit import MAX_LOCAL_EXPERTS, TileConfig, availability, kernel_set
from .layout import MarlinWeights, prepare_experts

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
BLOCK_M_CHOICES = (0, 16, 32, 64)


class MarlinExperts:
    """Experts stage ``marlin``; see the module docstring for what `compute` does.

    ``block_m`` (option): 0 picks 16/32/64 per call from the rows per active
    expert (the attribute, which the layer asks preprocess for, is then 16, the
    decode case); 16, 32 or 64 fixes it.
    """

    block_m: int | None

    def __init__(self, ctx: BuildContext, block_m: int = 0) -> None:
        reason = availability()
        if reason:
            raise BackendUnavailableError(f"experts backend 'marlin' cannot run here: {reason}")
        if block_m not in BLOCK_M_CHOICES:
            raise ContractError(f"block_m={block_m} is not supported by the marlin backend: use 0 (auto), 16, 32 or 64")
        device = torch.device(ctx.device)
        if device.type != "cuda":
            raise ContractError(f"the marlin experts backend runs on CUDA devices, got device {device}: "
                                "build the layer with device='cuda' (or use the torch experts backend on the CPU)")
        if ctx.dtype not in SUPPORTED_DTYPES:
            raise ContractError(f"the marlin experts backend takes bf16 or fp16 activations, got {ctx.dtype}: "
                                "cast hidden states to bf16/fp16 or use the torch experts backend for fp32")
        weights = ctx.weights
        if weights is None:
            raise ContractError("the marlin experts backend needs the rank's expert weights (BuildContext.weights)")
        if not isinstance(weights, (QuantizedExperts, MarlinWeights)):
            raise ContractError(f"BuildContext.weights must be QuantizedExperts (GPTQ uint4b8) or MarlinWeights, "
                                f"got {type(weights).__name__}")
        if weights.num_experts != ctx.local.count:
            raise ContractError(f"got weights for {weights.num_experts} experts but this rank has {ctx.local.count} "
                                "local experts: pass the local experts' weights in local-id order")
        if weights.num_experts > MAX_LOCAL_EXPERTS:
            raise ContractError(f"{weights.num_experts} local experts exceed the marlin backend's limit of "
                                f"{MAX_LOCAL_EXPERTS} per rank; use more EP ranks")
        if weights.hidden_size != ctx.hidden_size:
            raise ContractError(f"the weights have H={weights.hidden_size} but the layer has hidden_size={ctx.hidden_size}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.dtype = ctx.dtype
        self.top_k = ctx.top_k
        if isinstance(weights, MarlinWeights):
            if weights.scale_dtype != ctx.dtype:
                raise ContractError(f"MarlinWeights scales are {weights.scale_dtype} but activations are {ctx.dtype}: "
                                    "pack the weights with scale_dtype equal to the activation dtype")
            self.weights = weights if weights.device == device else _to(weights, device)
        else:
            self.weights = prepare_experts(weights, ctx.dtype, device)
        self.num_local = self.weights.num_experts
        self.hidden_size = self.weights.hidden_size
        self.intermediate_size = self.weights.intermediate_size
        self.group_size = self.weights.group_size
        self.fixed_block_m = block_m
        self.block_m = block_m or 16
        self.sm_count = torch.cuda.get_device_properties(device).multi_processor_count
        self.tile_override: dict[str, tuple[int, int]] = {}
        """Benchmark hook: ``{"gemm1"|"gemm2": (n_warps, k_splits)}`` forces a tile choice."""
        self._rows = 0
        self._slots = 0
        self.kernels = kernel_set(self.device.index, self.dtype == torch.bfloat16, self.group_size)
        self.reserve(max(1, ctx.max_tokens_per_rank) * max(1, ctx.ep_size), ctx.top_k)

    # -- workspaces ------------------------------------------------------------------------------
    def reserve(self, rows: int, top_k: int) -> None:
        """Grow the workspaces to serve ``rows`` rows of ``top_k`` slots (call before graph capture)."""
        slots = rows * top_k
        if rows <= self._rows and slots <= self._slots:
            return
        rows, slots = max(rows, self._rows), max(slots, self._slots)
        dev, h, i = self.device, self.hidden_size, self.intermediate_size
        self.inter = torch.empty((slots, i), dtype=self.dtype, device=dev)
        self.slot_out = torch.empty((slots, h), dtype=torch.float32, device=dev)
        self.out = torch.empty((rows, h), dtype=self.dtype, device=dev)
        entries = max(aligned_capacity(slots, self.num_local, bm) for bm in (16, 32, 64))
        self.sorted_slot_ids = torch.empty(entries, dtype=torch.int32, device=dev)
        self.block_expert_ids = torch.empty(entries // 16 + 1, dtype=torch.int32, device=dev)
        self.num_post_padded = torch.empty(1, dtype=torch.int32, device=dev)
        self._rows, self._slots = rows, slots

    # -- the forward -----------------------------------------------------------------------------
    def compute(self, hidden: torch.Tensor, topk_weights: torch.Tensor, routing: LocalRouting,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden [N, H]``, ``topk_weights [N, K]`` fp32, routing -> ``[N, H]`` (see the module docstring).

        ``out`` (optional, ``[N, H]`` contiguous, activation dtype, on the device)
        receives the result instead of the stage's workspace; it is returned.
        """
        local_ids = routing.local_ids
        self._check_inputs(hidden, topk_weights, local_ids)
        n, top_k = local_ids.shape
        h, i = self.hidden_size, self.intermediate_size
        if out is not None:
            if (tuple(out.shape) != (n, h) or out.dtype != self.dtype or out.device != self.device
                    or not out.is_contiguous()):
                raise ContractError(f"out must be a contiguous {self.dtype} tensor [N={n}, H={h}] on {self.device}, "
                                    f"got {out.dtype} {tuple(out.shape)} on {out.device}")
        if n == 0:
            return self.out[:0] if out is None else out
        self.reserve(n, top_k)
        slots = n * top_k
        if max(n * h, slots * i) >= 2**31:
            raise ContractError(f"N={n} rows x top-k {top_k} is too large for one call (the kernels index "
                                f"activations with 32-bit offsets: N*H and N*K*I must stay below 2^31); split the batch")
        bm = self.fixed_block_m or kernels.choose_block_m(slots, self.num_local)
        layout = routing.aligned
        if layout is not None and layout.block_m == bm:
            self._check_layout(layout, slots)
            sorted_ids, block_ids, npp = layout.sorted_slot_ids, layout.block_expert_ids, layout.num_slots_post_padded
            nblocks = block_ids.numel()
        else:
            sorted_ids, block_ids, npp = self.sorted_slot_ids, self.block_expert_ids, self.num_post_padded
            nblocks = kernels.launch_align(self.kernels, local_ids, self.num_local, bm, sorted_ids, block_ids, npp)
        ks, w = self.kernels, self.weights
        p1 = self.plan("gemm1", 2 * i, h, slots, bm, allow_split=False)
        p2 = self.plan("gemm2", h, i, slots, bm, allow_split=True)
        inter = self.inter[:slots]
        slot_out = self.slot_out[:slots]
        kernels.launch_gemm(ks, p1, False, hidden, top_k, h, 2 * i, w.w13, w.w13_scales, self.group_size,
                            self.num_local, sorted_ids, block_ids, npp, nblocks, slots, None, inter)
        if p2.k_splits > 1:  # GEMM2 adds its K splits into slot_out
            slot_out.zero_()
        kernels.launch_gemm(ks, p2, True, inter, 1, i, h, w.w2, w.w2_scales, self.group_size,
                            self.num_local, sorted_ids, block_ids, npp, nblocks, slots, topk_weights, slot_out)
        result = self.out[:n] if out is None else out
        kernels.launch_topk_sum(ks, slot_out, local_ids, top_k, h, self.num_local, result)
        return result

    def plan(self, which: str, n_out: int, k: int, slots: int, block_m: int, allow_split: bool) -> kernels.GemmPlan:
        """The launch plan of GEMM ``which`` (``"gemm1"`` or ``"gemm2"``; `tile_override` forces one)."""
        return kernels.plan_gemm(n_out, k, slots, self.num_local, block_m, self.sm_count, allow_split,
                                 self.tile_override.get(which))

    # -- validation (metadata only: no sync) -----------------------------------------------------
    def _check_inputs(self, hidden: torch.Tensor, topk_weights: torch.Tensor, local_ids: torch.Tensor) -> None:
        if hidden.dim() != 2 or hidden.shape[1] != self.hidden_size:
            raise ContractError(f"hidden must be [N, H={self.hidden_size}], got shape {tuple(hidden.shape)}")
        if hidden.dtype != self.dtype:
            raise ContractError(f"hidden is {hidden.dtype} but this marlin stage was built for {self.dtype}: "
                                "build the layer with the activation dtype you run")
        for name, t in (("hidden", hidden), ("topk_weights", topk_weights), ("local_ids", local_ids)):
            if t.device != self.device:
                raise ContractError(f"{name} is on {t.device}, the marlin stage's weights are on {self.device}")
            if not t.is_contiguous():
                raise ContractError(f"{name} must be contiguous (the kernels index raw rows); call .contiguous()")
        if hidden.data_ptr() % 16:
            raise ContractError("hidden must start on a 16-byte boundary (the kernels load 16-byte chunks); "
                                "pass a fresh tensor or .clone() the view")
        if local_ids.dtype != torch.int32 or local_ids.dim() != 2 or local_ids.shape[0] != hidden.shape[0]:
            raise ContractError(f"routing.local_ids must be int32 [N={hidden.shape[0]}, K], "
                                f"got {local_ids.dtype} {tuple(local_ids.shape)}")
        if topk_weights.dtype != torch.float32 or topk_weights.shape != local_ids.shape:
            raise ContractError(f"topk_weights must be float32 of shape {tuple(local_ids.shape)} (the local_ids'), "
                                f"got {topk_weights.dtype} {tuple(topk_weights.shape)}")

    def _check_layout(self, layout: AlignedLayout, slots: int) -> None:
        for name in ("sorted_slot_ids", "block_expert_ids", "num_slots_post_padded"):
            t = getattr(layout, name)
            if t.dtype != torch.int32 or t.device != self.device or not t.is_contiguous():
                raise ContractError(f"AlignedLayout.{name} must be a contiguous int32 tensor on {self.device}, "
                                    f"got {t.dtype} on {t.device}")
        if layout.sorted_slot_ids.numel() != layout.block_expert_ids.numel() * layout.block_m:
            raise ContractError(f"AlignedLayout has {layout.sorted_slot_ids.numel()} slot entries for "
                                f"{layout.block_expert_ids.numel()} blocks of {layout.block_m}: expected "
                                "len(sorted_slot_ids) == len(block_expert_ids) * block_m")


def _to(w: MarlinWeights, device: torch.device) -> MarlinWeights:
    return MarlinWeights(w.w13.to(device), w.w13_scales.to(device), w.w2.to(device), w.w2_scales.to(device),
                         w.group_size, w.hidden_size, w.intermediate_size, w.layout_version)


def describe_tiles(stage: MarlinExperts, rows: int, top_k: int) -> dict[str, object]:
    """The block size and tile plans `compute` would use for ``rows`` rows (for logs and benchmarks)."""
    slots = rows * top_k
    bm = stage.fixed_block_m or kernels.choose_block_m(slots, stage.num_local)
    h, i = stage.hidden_size, stage.intermediate_size
    p1 = stage.plan("gemm1", 2 * i, h, slots, bm, False)
    p2 = stage.plan("gemm2", h, i, slots, bm, True)

    def fmt(p: kernels.GemmPlan) -> str:
        c: TileConfig = p.cfg
        return f"bm{c.bm}/tn{c.tn}/tk{c.tk}" + (f"/split{p.k_splits}" if p.k_splits > 1 else "")

    return {"block_m": bm, "gemm1": fmt(p1), "gemm2": fmt(p2)}
