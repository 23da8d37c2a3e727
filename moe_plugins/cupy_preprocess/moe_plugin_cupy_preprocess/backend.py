"""The preprocess stage object of backend ``cupy`` (`hostcore.hookspecs.PreprocessStage`).

``preprocess(topk_ids [N, K] int32/int64, block_m=None) -> LocalRouting`` maps global expert ids to
local ids through the rank's expert map (or the contiguous local range without one), counts the slots
per local expert and, with ``block_m``, builds the aligned block layout documented in
`hostcore.contract.AlignedLayout`, with the same contents as the torch reference (slots of one expert
in increasing slot order). Modes (option ``mode``):

``safe`` (default)
    Ids outside the map (``< 0`` or ``>= len(expert_map)``; without a map, negative ids) become -1 and
    are counted in ``LocalRouting.invalid_count``, an ``int32[1]`` device tensor written by the kernels:
    the host reads it only when the caller asks. No host sync, no allocation with preallocated buffers.
``checked``
    As safe, then reads the counter (a host sync) and raises `ContractError` naming the offending
    ``[row, slot]`` positions. For debugging.
``faithful``
    Reads the map without bounds checks, like vLLM's ``preprocessTopkIdKernel``, to reproduce the
    padding bug: an id of -1 reads the word before the table. With the map in global memory it is one of 64
    zero words placed before the device copy of the map, so every -1 padding slot becomes a slot of local
    expert 0: silent misrouting, every time (``map_in=global`` is the reliable reproduction). With the map in
    shared memory it is the last word of the shared memory the driver reserves below the kernel's allocation,
    which is whatever the hardware left there: usually 0 on the H100/H200 we measured (the same misrouting),
    but after some other kernels other words, different per block, or -1 (GPU_RESULTS.md, runs 69-73).
    Ids past the end of the map or below -64 read outside the table: undefined, as upstream (the torch
    reference raises for ids past the end instead). ``invalid_count`` is ``None``. Values read outside
    ``[0, num_local)`` are written to ``local_ids`` as read but left out of counts and layout.

Ownership: ``preprocess`` returns freshly allocated tensors (the caching allocator's, safe under
``torch.cuda.graph`` too); ``preprocess_into`` writes preallocated `PreprocessBuffers` and returns views
of them (valid until their next use). The expert map is copied to the device at build time; rebuild the
stage when the map changes (EPLB).
"""

from __future__ import annotations

from typing import Any

import torch

from hostcore.contract import LocalRouting
from hostcore.errors import BackendUnavailableError, ConfigError, ContractError
from hostcore.hookspecs import BuildContext

from . import jit
from .buffers import PreprocessBuffers, map_with_head
from .launch import ID_TYPES, KernelSet, Sequence, build_sequence, sequence_for, sequence_key
from .plan import MAP_GLOBAL, PATHS, MapChoice, Plan, check_block_m, choose_map, plan_for
from .validate import as_tensor, check_contiguous_for_capture, check_topk_ids, normalize_device

MODES = ("safe", "checked", "faithful")


class CupyPreprocess:
    """Fused expert-map preprocess on CuPy RawKernels; see the module docstring for modes and ownership."""

    def __init__(self, ctx: BuildContext, mode: str = "safe", map_in: str = "auto", path: str = "auto",
                 clusters: bool = True, *, kernels: KernelSet | None = None, max_cluster: int | None = None) -> None:
        """Build for ``ctx`` (its device, placement and map). ``clusters=False`` keeps the block path off the
        thread-block cluster kernel on GPUs that have clusters. ``kernels`` and ``max_cluster`` are for tests and
        benchmarks only: another `KernelSet` (a CPU emulation of the kernels, which runs on ``ctx.device`` as given
        with no GPU or CuPy; or `jit.kernels_from_source` of another version of the source), and the widest cluster
        the plans may take (at most the device's, `jit.Kernels.max_cluster`)."""
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if path not in PATHS:
            raise ConfigError(f"path must be one of {', '.join(PATHS)}, got {path!r}")
        if kernels is None:
            from . import availability_reason

            reason = availability_reason()
            if reason:
                raise BackendUnavailableError(f"preprocess backend 'cupy' cannot run here: {reason}")
            self.device = normalize_device(ctx.device)
            kernels = jit.kernels(self.device.index)
        else:
            self.device = torch.device(ctx.device)
        self.mode = mode
        self.path = path
        widest = kernels.max_cluster if max_cluster is None else min(max_cluster, kernels.max_cluster)
        self.max_cluster = widest if clusters else 0  # the widest thread-block cluster the plans may take
        self.local = ctx.local
        self.kernels = kernels
        table = ctx.local.expert_map
        self.map: MapChoice = choose_map(None if table is None else int(table.numel()), map_in, self.kernels.smem_optin)
        self.device_map: torch.Tensor | None = None
        if table is not None:
            self._map_storage, self.device_map = map_with_head(table, self.device)
        self._plans: dict[tuple[int, int, torch.dtype, int], Plan] = {}
        # preprocess(): one launch sequence per plan key, re-pointed at each call's new buffers (Sequence.rebase)
        self._fresh: dict[tuple[int, int, torch.dtype, int], Sequence] = {}
        # This stage's entry in a buffers' launch cache (one buffers object may serve several stages).
        self._key = sequence_key(self.kernels, self.device_map, self.map, self.local.first, mode == "faithful")

    @property
    def map_on_global(self) -> bool:
        return self.map.mode == MAP_GLOBAL

    def plan(self, rows: int, top_k: int, id_dtype: torch.dtype, block_m: int | None) -> Plan:
        """The (cached) launch plan for ``topk_ids [rows, top_k]`` of ``id_dtype``."""
        return self._plan((rows, top_k, id_dtype, check_block_m(block_m)))

    def _plan(self, key: tuple[int, int, torch.dtype, int]) -> Plan:
        """`plan` for ``(rows, top_k, id_dtype, block_m)`` with block_m already checked (0: no layout)."""
        rows, top_k, id_dtype, block_m = key
        found = self._plans.get(key)
        if found is None:
            occupancy = self.kernels.fused_occupancy(ID_TYPES[id_dtype]) if id_dtype in ID_TYPES else None
            found = self._plans[key] = plan_for(rows, top_k, id_dtype, block_m or None, self.local.count, self.map,
                                                self.path, self.kernels.smem_optin, self.kernels.num_sms, occupancy,
                                                max_cluster=self.max_cluster)
        return found

    def make_buffers(self, rows: int, top_k: int, block_m: int | None = None,
                     id_dtype: torch.dtype = torch.int32) -> PreprocessBuffers:
        """Preallocate outputs and workspace for ``topk_ids [rows, top_k]`` (for `preprocess_into` / CUDA graphs)."""
        return PreprocessBuffers.allocate(self.plan(rows, top_k, id_dtype, block_m), self.device)

    def preprocess(self, topk_ids: Any, block_m: int | None = None) -> LocalRouting:
        """Global ids ``[N, K]`` -> `LocalRouting` in new tensors. ``checked`` mode syncs; the others do not.

        The new tensors are views of one allocation per call (`PreprocessBuffers.allocate`). The stage keeps one
        launch sequence per input signature and points it at each call's allocation: a stage is not meant to
        be called from several threads at once.
        """
        ids = as_tensor(topk_ids)
        check_topk_ids(ids, self.device)
        ids = ids.contiguous()
        key = (ids.shape[0], ids.shape[1], ids.dtype, check_block_m(block_m))
        out = PreprocessBuffers.allocate(self._plan(key), self.device)
        seq = self._fresh.get(key)
        if seq is None:  # built for this allocation only (not kept in its launch cache: it moves with every call)
            seq = self._fresh[key] = build_sequence(self.kernels, out.plan, self.device_map, self.map, self.local.first,
                                                    self.mode == "faithful", out, ids.get_device())
            seq.track_slab(out.slab)
        else:
            seq.rebase(out.slab)
        self._launch(seq, ids, out)
        return out.routing(count_invalid=self.mode != "faithful")

    def preprocess_into(self, topk_ids: Any, buffers: PreprocessBuffers) -> LocalRouting:
        """Like `preprocess`, into preallocated ``buffers``: no allocation, no sync (except ``checked``).

        ``topk_ids`` must be contiguous and have the shape and dtype the buffers were made for. The full
        argument checks run once per buffers (and whenever the ids' shape, dtype, device or contiguity
        differ from what they last accepted); later calls with the same signature only compare it.
        """
        ids = topk_ids if type(topk_ids) is torch.Tensor else as_tensor(topk_ids)
        seq = buffers.launch_cache.get(self._key)
        if seq is None or not (ids.shape == seq.shape and ids.dtype is seq.dtype and ids.get_device() == seq.device_index
                               and ids.is_contiguous()):
            seq = self._validated_sequence(ids, buffers)
        self._launch(seq, ids, buffers)
        if seq.routing is None:  # views of the buffers: the same object serves every call
            seq.routing = buffers.routing(count_invalid=self.mode != "faithful")
        return seq.routing

    def _validated_sequence(self, ids: torch.Tensor, buffers: PreprocessBuffers) -> Sequence:
        """Check ``ids`` against the stage and ``buffers`` (the slow path of `preprocess_into`), then
        return the buffers' launch sequence for this stage, cached under ``self._key``."""
        check_topk_ids(ids, self.device)
        check_contiguous_for_capture(ids)
        plan = buffers.plan
        if (tuple(ids.shape), ids.dtype) != ((plan.rows, plan.top_k), plan.id_dtype):
            raise ContractError(f"these buffers were made for topk_ids {plan.id_dtype} [{plan.rows}, {plan.top_k}], got "
                                f"{ids.dtype} {list(ids.shape)}; make buffers for this shape with make_buffers()")
        if buffers.local_ids.device != self.device:
            raise ContractError(f"the buffers are on {buffers.local_ids.device}, this stage runs on {self.device}")
        return self._sequence(ids, buffers)

    def _sequence(self, ids: torch.Tensor, out: PreprocessBuffers) -> Sequence:
        return sequence_for(self.kernels, out.plan, self.device_map, self.map, self.local.first,
                            self.mode == "faithful", out, ids.get_device())

    def _launch(self, seq: Sequence, ids: torch.Tensor, out: PreprocessBuffers) -> None:
        """Run ``seq`` (for ``out``) on ``ids``; in checked mode, then read the invalid count (a sync)."""
        seq.set_ids(ids.data_ptr())
        self.kernels.run(seq.steps)
        if self.mode == "checked":
            self._raise_on_invalid(ids, out.invalid_count)

    def _raise_on_invalid(self, ids: torch.Tensor, invalid: torch.Tensor) -> None:
        count = int(invalid.item())  # the documented sync of checked mode
        if count == 0:
            return
        if self.device_map is None:
            bad = ids < 0
            what = (f"negative ids (without an expert map a padding sentinel must be >= "
                    f"E={self.local.global_num_experts})")
        else:
            size = self.map.size
            bad = (ids < 0) | (ids >= size)
            what = (f"ids outside the expert map int32[{size}]: the padding sentinel must satisfy 0 <= s < "
                    "len(expert_map) and expert_map[s] == -1 (choose sentinel=auto)")
        positions = bad.nonzero().tolist()
        shown = ", ".join(f"[{r}, {k}]={int(ids[r, k])}" for r, k in positions[:8])
        more = f" (and {count - 8} more)" if count > 8 else ""
        raise ContractError(f"preprocess(mode=checked): {count} {what}; at [row, slot]=id: {shown}{more}")
