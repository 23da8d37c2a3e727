"""The one module that talks to FlashInfer: a FlashInfer upgrade touches this file only.

Two FlashInfer entry points run the same NVLink one-sided kernels:

``moe_ep``
    ``flashinfer.moe_ep.NVLinkOneSidedAlltoAll`` (0.7.1+), the successor. It
    fixes the payload order (hidden, scales, ids, weights) and takes the
    padding id at construction in ``MoEEpCommParams.invalid_expert_id``, which
    it refuses inside ``[0, E)``: the ``non_local`` sentinel (a real expert id
    that is not local on the receiving rank, vLLM PR #42034's fix) cannot go
    through it.
``moe_alltoall``
    ``flashinfer.comm.MoeAlltoAll`` (0.6.16+; deprecated in 0.7.1 but still the
    implementation underneath). Takes any padding id per dispatch.

Both allocate the workspace (a ``MoeAlltoAll``; ``moe_ep`` wraps one). Per
forward, whichever allocated it, the adapter calls FlashInfer's all-to-all ops
(``moe_a2a_dispatch``, ``moe_a2a_sanitize_expert_ids``,
``moe_a2a_combine_into``: the ops both classes call underneath) on that
workspace directly, skipping the classes' per-call Python (`_OpCalls`); with a
FlashInfer whose ops have other signatures it calls ``MoeAlltoAll``'s methods.

`choose_api` picks one for the whole EP group (every rank must make the same
collective calls, so the choice cannot differ between ranks): ``moe_ep`` when
every rank has it and every rank's sentinel is outside ``[0, E)``, else
``moe_alltoall``. Both are wrapped in `OneSidedAllToAll`, whose methods speak
in the stage's terms (hidden, ids, weights, scales; ``[ep_size, R, ...]``).

Communicator: ``MnnvlConfig(comm_backend=...)`` with FlashInfer's
``TorchDistBackend`` over the EP group (`_GroupComm`), so the memory-handle
exchange runs over torch.distributed (no MPI), on EP groups smaller than the
world too. On one host
without an NVLink fabric FlashInfer >= 0.6.16 exchanges POSIX file descriptors
over AF_UNIX sockets in the temp dir; nothing here uses NVLink multicast.

Facts from the 0.7.2.post1 sources this relies on (re-check on upgrade):
``MoeAlltoAll(mapping, max_num_tokens, top_k, num_experts,
workspace_size_per_rank=, mnnvl_config=)``; ``dispatch(ids, payloads, R,
invalid_token_expert_id=, expert_id_payload_index=)`` returning one
``[ep, R, *]`` workspace view per payload; ``combine(payload, R,
payload_in_workspace=)`` returning a new ``[T, H]``;
``get_combine_payload_tensor_in_workspace(R, H, dtype)``;
``moe_a2a_get_workspace_size_per_rank(ep, max_tokens, dispatch_bytes,
combine_bytes)``; the metainfo index ``RECV_COUNTERS_OFFSET_INDEX`` (int32
per source rank in this rank's workspace); ``flashinfer.jit.comm.
gen_moe_alltoall_module`` for the JIT build; ``trtllm_moe_alltoall.
get_moe_alltoall_module()`` returning the ops with the parameters in
`_OP_PARAMS`, ``moe_a2a_dispatch`` returning ``(recv_offsets, recv_sizes,
combine_payload_offset, ...)`` with offsets fixed by ``R`` and the payload row
sizes, and ``moe_a2a_wrap_payload_tensor_in_workspace``. ``tests/test_fi_fake_fidelity.py``
checks these signatures against an installed FlashInfer.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from hostcore.errors import BackendUnavailableError, ContractError

from .layout import PayloadBytes, payload_order

DISTRIBUTION = "flashinfer-python"
MIN_VERSION = (0, 6, 16)
TESTED_VERSION = "0.7.2.post1"
APIS = ("auto", "moe_ep", "moe_alltoall")


def installed_version() -> str | None:
    """The installed flashinfer-python version (from metadata, without importing it), or ``None``."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None


def release_tuple(version: str) -> tuple[int, ...]:
    """``"0.7.2.post1"`` -> ``(0, 7, 2)``; unparsable versions give ``()`` (treated as too old)."""
    match = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", version)
    if not match:
        return ()
    return tuple(int(x) for x in match.groups(default="0"))


def version_problem(version: str | None) -> str | None:
    """``None`` when ``version`` is usable, else what is wrong and what to install."""
    need = ".".join(map(str, MIN_VERSION))
    if version is None:
        # This code runs, so the plugin is installed; only its FlashInfer dependency is missing
        # (e.g. installed with --no-deps on a machine without a GPU).
        return f"needs {DISTRIBUTION}>={need}: pip install '{DISTRIBUTION}>={need}'"
    if release_tuple(version) < MIN_VERSION:
        return (f"needs {DISTRIBUTION}>={need} (single-host POSIX-fd memory handles), found {version}: "
                f"pip install -U '{DISTRIBUTION}>={need}'")
    return None


def import_flashinfer() -> Any:
    """Import ``flashinfer.comm`` or raise `BackendUnavailableError` saying what to install."""
    problem = version_problem(installed_version())
    if problem:
        raise BackendUnavailableError(f"dispatch=flashinfer_onesided {problem}")
    try:
        return importlib.import_module("flashinfer.comm")
    except Exception as exc:  # a broken install (missing cuda-bindings, tvm-ffi...) must say so, not crash later
        raise BackendUnavailableError(
            f"dispatch=flashinfer_onesided could not import flashinfer.comm ({type(exc).__name__}: {exc}); "
            f"reinstall with: pip install --force-reinstall '{DISTRIBUTION}>={'.'.join(map(str, MIN_VERSION))}'"
        ) from exc


def has_moe_ep() -> bool:
    """Whether ``flashinfer.moe_ep.NVLinkOneSidedAlltoAll`` (the successor API) imports here."""
    try:
        module = importlib.import_module("flashinfer.moe_ep")
    except Exception:
        return False
    return all(hasattr(module, n) for n in ("NVLinkOneSidedAlltoAll", "BootstrapConfig", "MoEEpCommParams",
                                            "NVLinkOneSidedConfig"))


def moe_ep_accepts(sentinel: int, global_num_experts: int) -> bool:
    """``MoEEpCommParams`` refuses an ``invalid_expert_id`` inside ``[0, E)``."""
    return not 0 <= sentinel < global_num_experts


def choose_api(requested: str, moe_ep_on_rank: Sequence[bool], sentinel_on_rank: Sequence[int],
               global_num_experts: int) -> tuple[str, str]:
    """The API the whole group uses, and why. Pure: every rank computes the same from the gathered facts.

    ``requested`` is the backend option ``api``: ``auto``, ``moe_ep`` or ``moe_alltoall``.
    """
    if requested not in APIS:
        raise ContractError(f"option api must be one of {', '.join(APIS)}, got {requested!r}")
    missing = [r for r, ok in enumerate(moe_ep_on_rank) if not ok]
    in_range = [(r, s) for r, s in enumerate(sentinel_on_rank) if not moe_ep_accepts(s, global_num_experts)]
    if requested == "moe_alltoall":
        return "moe_alltoall", "requested with api=moe_alltoall"
    if requested == "moe_ep":
        if missing:
            raise BackendUnavailableError(
                f"api=moe_ep needs flashinfer.moe_ep.NVLinkOneSidedAlltoAll (flashinfer-python >= 0.7.1), missing "
                f"on ranks {missing}; upgrade FlashInfer or use api=auto")
        if in_range:
            r, s = in_range[0]
            raise ContractError(
                f"api=moe_ep takes the padding id in MoEEpCommParams.invalid_expert_id, which must lie outside "
                f"[0, E={global_num_experts}), but rank {r}'s sentinel is {s} (sentinels per rank: "
                f"{list(sentinel_on_rank)}). Use api=auto or api=moe_alltoall for in-range sentinels such as "
                "non_local, or sentinel=guard_slot")
        return "moe_ep", "requested with api=moe_ep"
    if missing:
        return "moe_alltoall", f"flashinfer.moe_ep.NVLinkOneSidedAlltoAll is missing on ranks {missing}"
    if in_range:
        return "moe_alltoall", (f"sentinel {in_range[0][1]} on rank {in_range[0][0]} is inside [0, E), which "
                                "moe_ep refuses")
    return "moe_ep", "successor API available and every sentinel is outside [0, E)"


@dataclass(frozen=True)
class Geometry:
    """What sizes the workspace; identical on every rank of the group except ``ep_rank``."""

    ep_size: int
    ep_rank: int
    global_num_experts: int
    top_k: int
    max_tokens_per_rank: int
    hidden_size: int
    dtype: torch.dtype
    bytes: PayloadBytes

    def shared(self) -> dict[str, Any]:
        """The fields every rank must agree on (for the build-time cross-check)."""
        return {"ep_size": self.ep_size, "global_num_experts": self.global_num_experts, "top_k": self.top_k,
                "max_tokens_per_rank": self.max_tokens_per_rank, "hidden_size": self.hidden_size,
                "dtype": str(self.dtype), "dispatch_bytes": self.bytes.dispatch, "combine_bytes": self.bytes.combine}


def workspace_size_per_rank(geometry: Geometry) -> int:
    """Bytes of workspace per rank, from FlashInfer's own helper (loads the JIT module for the aux size)."""
    from flashinfer.comm import moe_a2a_get_workspace_size_per_rank

    return int(moe_a2a_get_workspace_size_per_rank(geometry.ep_size, geometry.max_tokens_per_rank,
                                                   geometry.bytes.dispatch, geometry.bytes.combine))


def _recv_counts_view(a2a: Any, ep_size: int, ep_rank: int) -> torch.Tensor | None:
    """This rank's ``recv_counters`` in the workspace (written by each source during dispatch), if locatable."""
    try:
        index = type(a2a)._METAINFO_INDEX["RECV_COUNTERS_OFFSET_INDEX"]
        offset = int(a2a.metainfo[index])
        return a2a.workspace[ep_rank, offset: offset + 4 * ep_size].view(torch.int32)
    except Exception:  # an internal detail: without it, rows_per_source is simply None (the contract allows it)
        return None


class _GroupComm:
    """FlashInfer's ``CommBackend`` over one torch.distributed group (``None``: the default group); no MPI.

    Delegates to FlashInfer's ``TorchDistBackend`` except for one thing: when
    ``MoeAlltoAll`` allocates its workspace it calls ``Split(0, rank)``, a split
    into the group itself, and ``TorchDistBackend.Split`` builds a new process
    group for it with ``new_subgroups_by_enumeration``, which every rank of the
    *world* must enter. With an EP group smaller than the world that hangs, and
    it costs a new process group per build. A split that keeps the group as it
    is (one color, keys in rank order) returns this communicator instead; any
    other split goes to FlashInfer's.
    """

    def __init__(self, group: Any) -> None:
        from flashinfer.comm.mnnvl import TorchDistBackend

        self._inner = TorchDistBackend(group=group)

    def Get_rank(self) -> int:
        return self._inner.Get_rank()

    def Get_size(self) -> int:
        return self._inner.Get_size()

    def allgather(self, data: Any) -> tuple[Any, ...]:
        return self._inner.allgather(data)

    def bcast(self, data: Any, root: int) -> Any:
        return self._inner.bcast(data, root)

    def barrier(self) -> None:
        self._inner.barrier()

    def Split(self, color: int, key: int) -> Any:
        everyone = self.allgather((color, key))
        if len({c for c, _ in everyone}) == 1 and sorted(range(len(everyone)), key=lambda r: everyone[r][1]) == \
                list(range(len(everyone))):
            return self
        return self._inner.Split(color, key)


def _torch_backend(group: Any) -> Any:
    return _GroupComm(group)


class _MethodCalls:
    """Per-forward calls through ``MoeAlltoAll``'s methods: FlashInfer versions whose ops differ from 0.7.2's."""

    def __init__(self, a2a: Any, sentinel: int, hidden_size: int, dtype: torch.dtype) -> None:
        self._a2a, self._sentinel, self._hidden_size, self._dtype = a2a, sentinel, hidden_size, dtype

    def dispatch(self, ids: torch.Tensor, payloads: list[torch.Tensor], rows: int, ids_index: int,
                 layout_key: Any) -> list[torch.Tensor]:
        return self._a2a.dispatch(ids, payloads, rows, invalid_token_expert_id=self._sentinel,
                                  expert_id_payload_index=ids_index)

    def combine_buffer(self, rows: int) -> torch.Tensor:
        return self._a2a.get_combine_payload_tensor_in_workspace(rows, self._hidden_size, self._dtype)

    def combine(self, payload: torch.Tensor, rows: int, in_workspace: bool, output: torch.Tensor) -> torch.Tensor:
        return self._a2a.combine(payload, rows, payload_in_workspace=in_workspace, output=output)


_OP_PARAMS = {
    "moe_a2a_dispatch": ("token_selected_experts", "input_payloads", "workspace", "metainfo",
                         "runtime_max_tokens_per_rank", "ep_rank", "ep_size", "top_k", "num_experts", "enable_pdl",
                         "eplb_local_stats", "enable_rank_mask", "active_rank_mask"),
    "moe_a2a_sanitize_expert_ids": ("expert_ids", "workspace", "metainfo", "ep_rank", "invalid_expert_id",
                                    "enable_pdl"),
    "moe_a2a_combine_into": ("payload", "local_num_tokens", "workspace", "metainfo", "runtime_max_tokens_per_rank",
                             "ep_rank", "ep_size", "top_k", "combine_payload_offset", "payload_in_workspace",
                             "output_dtype", "output_scales", "output_scalar_scale", "sf_layout",
                             "use_low_precision", "enable_pdl", "enable_rank_mask", "active_rank_mask", "output"),
}
"""The parameters of FlashInfer 0.7.2's all-to-all ops, in order, as `_OpCalls` passes them positionally."""


def _alltoall_ops() -> Any:
    """The namespace of FlashInfer's all-to-all ops (the loaded JIT module, cached by FlashInfer)."""
    from flashinfer.comm import trtllm_moe_alltoall as m

    try:
        return m.get_moe_alltoall_module("trtllm")
    except TypeError:  # 0.6.x: one module, no backend argument
        return m.get_moe_alltoall_module()


def _ops_match(ops: Any) -> bool:
    """Whether every op `_OpCalls` uses exists with exactly 0.7.2's parameters."""
    for name, params in _OP_PARAMS.items():
        fn = getattr(ops, name, None)
        try:
            if fn is None or tuple(inspect.signature(fn).parameters) != params:
                return False
        except (TypeError, ValueError):  # no introspectable signature
            return False
    return True


_MAX_CACHED_LAYOUTS = 1024
"""Receive layouts `_OpCalls` keeps (a few views each); past that it starts over."""


class _OpCalls:
    """Per-forward calls straight to FlashInfer's all-to-all ops on the workspace ``MoeAlltoAll`` allocated.

    The same kernels with the same arguments as ``MoeAlltoAll.dispatch``/``combine``, without their Python:
    phase asserts, API-logging wrappers, a PDL query per call and, above all, turning the offsets each
    dispatch returns into fresh views (an iteration over TVM-FFI arrays). Those offsets depend only on
    ``R`` and the payloads' row sizes (``moeA2ADispatchOp`` in FlashInfer's ``trtllm_moe_alltoall.cu``), so
    the views are built once per ``(R, payload layout)`` and reused: the result of later calls is not read.
    """

    def __init__(self, a2a: Any, ops: Any, sentinel: int, hidden_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        from flashinfer.comm.trtllm_moe_alltoall import moe_a2a_wrap_payload_tensor_in_workspace
        from flashinfer.utils import device_support_pdl

        self._wrap = moe_a2a_wrap_payload_tensor_in_workspace
        self._dispatch_op, self._sanitize_op = ops.moe_a2a_dispatch, ops.moe_a2a_sanitize_expert_ids
        self._combine_op = ops.moe_a2a_combine_into
        self._workspace, self._metainfo = a2a.workspace, a2a.metainfo
        self._rank, self._ep, self._top_k, self._experts = a2a.ep_rank, a2a.ep_size, a2a.top_k, a2a.num_experts
        self._sentinel, self._hidden_size, self._dtype = sentinel, hidden_size, dtype
        self._pdl = bool(device_support_pdl(device))  # what MoeAlltoAll passes (None -> detected per call)
        # (R, payload layout) -> (receive views, combine offset): both fixed by R and the payload row sizes.
        self._layouts: dict[tuple[int, Any], tuple[list[torch.Tensor], int]] = {}
        self._combine_views: dict[tuple[int, int], torch.Tensor] = {}
        self._combine_offset = -1  # of the last dispatch: the combine region starts after its payloads

    def dispatch(self, ids: torch.Tensor, payloads: list[torch.Tensor], rows: int, ids_index: int,
                 layout_key: Any) -> list[torch.Tensor]:
        result = self._dispatch_op(ids, payloads, self._workspace, self._metainfo, rows, self._rank, self._ep,
                                   self._top_k, self._experts, self._pdl, None, False, None)
        found = self._layouts.get((rows, layout_key))
        if found is None:
            offsets, sizes = result[0], result[1]
            views = [self._wrap(self._workspace, [self._ep, rows], int(o), int(o) + int(n), p.dtype)
                     for p, o, n in zip(payloads, offsets, sizes, strict=True)]
            if len(self._layouts) >= _MAX_CACHED_LAYOUTS:  # R agreed per batch can take many values: stay bounded
                self._layouts.clear()
                self._combine_views.clear()
            found = self._layouts[(rows, layout_key)] = (views, int(result[2]))
        views, self._combine_offset = found
        self._sanitize_op(views[ids_index], self._workspace, self._metainfo, self._rank, self._sentinel, self._pdl)
        return views

    def combine_buffer(self, rows: int) -> torch.Tensor:
        start = self._combine_offset
        view = self._combine_views.get((rows, start))
        if view is None:
            nbytes = self._ep * rows * self._hidden_size * self._dtype.itemsize
            view = self._combine_views[(rows, start)] = self._wrap(self._workspace[self._rank, :], [self._ep, rows],
                                                                   start, start + nbytes, self._dtype)
        return view

    def combine(self, payload: torch.Tensor, rows: int, in_workspace: bool, output: torch.Tensor) -> torch.Tensor:
        self._combine_op(payload, output.shape[0], self._workspace, self._metainfo, rows, self._rank, self._ep,
                         self._top_k, self._combine_offset, in_workspace, None, None, 1.0, None, False,
                         self._pdl, False, None, output)
        return output


class OneSidedAllToAll:
    """Dispatch/combine of one EP group on the workspace of one FlashInfer ``MoeAlltoAll``.

    ``api`` says which FlashInfer entry point allocated that workspace (``owner``;
    ``moe_ep`` wraps a ``MoeAlltoAll`` too, passed as ``a2a``); per forward both go through the same calls:
    `_OpCalls` where FlashInfer's ops have 0.7.2's signatures, else `_MethodCalls`
    (``calls`` names which). ``dispatch`` returns workspace views ``[ep_size, R, *]``
    in the order (hidden, ids, weights, scales) that stay valid until `combine`.
    ``recv_counts`` is an ``int32[ep_size]`` view of the per-source counts
    FlashInfer keeps in this rank's workspace, or ``None``.
    """

    def __init__(self, api: str, owner: Any, a2a: Any, sentinel: int, hidden_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.api = api
        self._owner = owner  # the FlashInfer object that owns the workspace: it must outlive every call
        self.workspace_size_per_rank = int(a2a.workspace_size_per_rank)
        self.recv_counts = _recv_counts_view(a2a, a2a.ep_size, a2a.ep_rank)
        ops = _alltoall_ops()
        if _ops_match(ops):
            self._calls: _OpCalls | _MethodCalls = _OpCalls(a2a, ops, sentinel, hidden_size, dtype, device)
        else:
            self._calls = _MethodCalls(a2a, sentinel, hidden_size, dtype)
        self.calls = "ops" if isinstance(self._calls, _OpCalls) else "methods"
        # Payload order per scales layout (None: no scales); hidden's width, ids and weights are fixed per
        # layer, so the order is computed once per key and a forward does one dict lookup.
        self._orders: dict[tuple[torch.dtype, torch.dtype, int] | None, tuple[list[int], int]] = {}

    def dispatch(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 scales: torch.Tensor | None, rows_per_rank: int) -> list[torch.Tensor | None]:
        tensors = (hidden, topk_ids, topk_weights) if scales is None else (hidden, topk_ids, topk_weights, scales)
        key = None if scales is None else (hidden.dtype, scales.dtype, scales.shape[1])
        entry = self._orders.get(key)
        if entry is None:
            order = payload_order([t.element_size() for t in tensors], [t.element_size() * t.shape[1] for t in tensors])
            entry = self._orders[key] = (order, order.index(1))
        order, ids_index = entry
        recv = self._calls.dispatch(topk_ids, [tensors[i] for i in order], rows_per_rank, ids_index, key)
        out: list[torch.Tensor | None] = [None, None, None, None]
        for position, i in enumerate(order):
            out[i] = recv[position]
        return out

    def combine_input_buffer(self, rows_per_rank: int) -> torch.Tensor:
        """The ``[ep_size, R, H]`` combine region of the workspace (valid between a dispatch and its combine)."""
        return self._calls.combine_buffer(rows_per_rank)

    def combine(self, payload: torch.Tensor, rows_per_rank: int, in_workspace: bool,
                output: torch.Tensor) -> torch.Tensor:
        """Sum each local token's rows back into ``output`` (``[T, H]``, allocated by the caller with torch, so
        its memory comes from torch's allocator: the CUDA-graph pool while capturing) and return it."""
        return self._calls.combine(payload, rows_per_rank, in_workspace, output)


def _open_moe_alltoall(g: Geometry, group: Any) -> Any:
    from flashinfer.comm import Mapping, MoeAlltoAll
    from flashinfer.comm.mnnvl import MnnvlConfig

    mapping = Mapping(world_size=g.ep_size, rank=g.ep_rank, gpus_per_node=g.ep_size, tp_size=g.ep_size,
                      moe_ep_size=g.ep_size)
    with warnings.catch_warnings():
        # MoeAlltoAll warns that it is deprecated in favour of moe_ep; we only land here when moe_ep cannot
        # serve this group (see choose_api), so the warning would only confuse users.
        warnings.filterwarnings("ignore", message=".*MoeAlltoAll is deprecated.*")
        return MoeAlltoAll(mapping, max_num_tokens=g.max_tokens_per_rank, top_k=g.top_k,
                           num_experts=g.global_num_experts, workspace_size_per_rank=workspace_size_per_rank(g),
                           mnnvl_config=MnnvlConfig(comm_backend=_torch_backend(group)))


def _open_moe_ep(g: Geometry, group: Any, sentinel: int, device: torch.device) -> Any:
    """``NVLinkOneSidedAlltoAll`` (its NVML check, then the allocation of the ``MoeAlltoAll`` it wraps)."""
    from flashinfer.moe_ep import BootstrapConfig, MoEEpCommParams, NVLinkOneSidedAlltoAll, NVLinkOneSidedConfig

    boot_args: dict[str, Any] = {"world_size": g.ep_size, "rank": g.ep_rank, "process_group": group}
    if "device" in {f.name for f in dataclasses.fields(BootstrapConfig)} and device.index is not None:
        boot_args["device"] = device.index
    params = MoEEpCommParams(num_experts=g.global_num_experts, top_k=g.top_k, max_tokens_per_rank=g.max_tokens_per_rank,
                             hidden_size=g.hidden_size, dtype=g.dtype, invalid_expert_id=sentinel)
    config = NVLinkOneSidedConfig(extra_payload_bytes_per_token=g.bytes.extra, comm_backend=_torch_backend(group))
    return NVLinkOneSidedAlltoAll(BootstrapConfig(**boot_args), params, config)


NVLINK_REFUSAL = "NVLink backends are not supported on EP ranks"
"""How ``NVLinkOneSidedAlltoAll`` refuses after its collective platform check (the same on every rank)."""


def open_alltoall(api: str, geometry: Geometry, group: Any, sentinel: int,
                  device: torch.device) -> OneSidedAllToAll:
    """Allocate the group's workspace through ``api`` (a collective: every rank of ``group`` calls it).

    ``moe_ep`` raises ``RuntimeError`` containing `NVLINK_REFUSAL` on every rank
    alike when its NVML check (every NVLink of every GPU up) fails on any rank,
    before allocating anything; callers may then fall back to ``moe_alltoall``.
    """
    if api == "moe_ep":
        owner = _open_moe_ep(geometry, group, sentinel, device)
        a2a = owner.alltoall
    elif api == "moe_alltoall":
        owner = a2a = _open_moe_alltoall(geometry, group)
    else:
        raise ContractError(f"unknown FlashInfer API {api!r}; expected moe_ep or moe_alltoall")
    return OneSidedAllToAll(api, owner, a2a, sentinel, geometry.hidden_size, geometry.dtype, device)


# --- JIT module (first-use nvcc build) -------------------------------------------------------------


@dataclass(frozen=True)
class JitModule:
    """FlashInfer's JIT spec of the all-to-all kernels, reduced to what the warm-up needs."""

    name: str
    library: Path
    spec: Any

    @property
    def built(self) -> bool:
        """An artifact exists (FlashInfer's ninja still re-checks that it is up to date)."""
        return bool(self.spec.is_compiled)

    @property
    def prebuilt(self) -> bool:
        """Shipped ahead of time (the flashinfer-jit-cache package): loaded as is, never compiled here."""
        return bool(getattr(self.spec, "is_aot", False))

    def build(self, verbose: bool) -> None:
        """Compile (or no-op when up to date) under FlashInfer's own file lock, so concurrent ranks build once."""
        if not self.prebuilt:
            self.spec.build(verbose=verbose, need_lock=True)


def alltoall_jit_module() -> JitModule:
    """The JIT spec of the kernels ``MoeAlltoAll`` uses (the default ``trtllm`` kernels)."""
    import_flashinfer()
    from flashinfer.jit.comm import gen_moe_alltoall_module

    try:
        spec = gen_moe_alltoall_module("legacy")  # 0.7.x: the target selects trtllm ("legacy") or cake kernels
    except TypeError:
        spec = gen_moe_alltoall_module()  # 0.6.x: one module, no target argument
    return JitModule(spec.name, Path(spec.get_library_path()), spec)


def load_alltoall_module() -> None:
    """Load the built module the way ``MoeAlltoAll`` does (FlashInfer caches it for the process)."""
    from flashinfer.comm import trtllm_moe_alltoall as m

    try:
        m.get_moe_alltoall_module("trtllm")
    except TypeError:
        m.get_moe_alltoall_module()
