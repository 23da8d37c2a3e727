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
gen_moe_alltoall_module`` for the JIT build. ``tests/test_fi_fake_fidelity.py``
checks these signatures against an installed FlashInfer.
"""

from __future__ import annotations

import dataclasses
import importlib
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


class OneSidedAllToAll:
    """Dispatch/combine of one EP group through one FlashInfer API; see the module docstring.

    ``dispatch`` returns workspace views ``[ep_size, R, *]`` that stay valid
    until `combine`. ``recv_counts`` is an ``int32[ep_size]`` view of the
    per-source counts FlashInfer keeps in this rank's workspace, or ``None``.
    """

    api: str
    workspace_size_per_rank: int
    recv_counts: torch.Tensor | None

    def dispatch(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 scales: torch.Tensor | None, rows_per_rank: int) -> list[torch.Tensor | None]:
        raise NotImplementedError

    def combine_input_buffer(self, rows_per_rank: int) -> torch.Tensor:
        raise NotImplementedError

    def combine(self, payload: torch.Tensor, rows_per_rank: int, in_workspace: bool,
                output: torch.Tensor) -> torch.Tensor:
        """Sum each local token's rows back into ``output`` (``[T, H]``, allocated by the caller with torch, so
        its memory comes from torch's allocator: the CUDA-graph pool while capturing) and return it."""
        raise NotImplementedError


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


class _MoeAlltoAllPath(OneSidedAllToAll):
    api = "moe_alltoall"

    def __init__(self, geometry: Geometry, group: Any, sentinel: int) -> None:
        from flashinfer.comm import Mapping, MoeAlltoAll
        from flashinfer.comm.mnnvl import MnnvlConfig

        g = geometry
        self.sentinel = sentinel
        self.hidden_size, self.dtype = g.hidden_size, g.dtype
        self.workspace_size_per_rank = workspace_size_per_rank(g)
        mapping = Mapping(world_size=g.ep_size, rank=g.ep_rank, gpus_per_node=g.ep_size, tp_size=g.ep_size,
                          moe_ep_size=g.ep_size)
        with warnings.catch_warnings():
            # MoeAlltoAll warns that it is deprecated in favour of moe_ep; we only land here when moe_ep cannot
            # serve this group (see choose_api), so the warning would only confuse users.
            warnings.filterwarnings("ignore", message=".*MoeAlltoAll is deprecated.*")
            self._a2a = MoeAlltoAll(mapping, max_num_tokens=g.max_tokens_per_rank, top_k=g.top_k,
                                    num_experts=g.global_num_experts,
                                    workspace_size_per_rank=self.workspace_size_per_rank,
                                    mnnvl_config=MnnvlConfig(comm_backend=_torch_backend(group)))
        self.recv_counts = _recv_counts_view(self._a2a, g.ep_size, g.ep_rank)
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
        recv = self._a2a.dispatch(topk_ids, [tensors[i] for i in order], rows_per_rank,
                                  invalid_token_expert_id=self.sentinel, expert_id_payload_index=ids_index)
        out: list[torch.Tensor | None] = [None, None, None, None]
        for position, i in enumerate(order):
            out[i] = recv[position]
        return out

    def combine_input_buffer(self, rows_per_rank: int) -> torch.Tensor:
        return self._a2a.get_combine_payload_tensor_in_workspace(rows_per_rank, self.hidden_size, self.dtype)

    def combine(self, payload: torch.Tensor, rows_per_rank: int, in_workspace: bool,
                output: torch.Tensor) -> torch.Tensor:
        return self._a2a.combine(payload, rows_per_rank, payload_in_workspace=in_workspace, output=output)


class _MoeEpPath(OneSidedAllToAll):
    api = "moe_ep"

    def __init__(self, geometry: Geometry, group: Any, sentinel: int, device: torch.device) -> None:
        from flashinfer.moe_ep import (
            BootstrapConfig,
            MoEEpCommParams,
            NVLinkOneSidedAlltoAll,
            NVLinkOneSidedConfig,
        )

        g = geometry
        self.ep_size = g.ep_size
        boot_args: dict[str, Any] = {"world_size": g.ep_size, "rank": g.ep_rank, "process_group": group}
        if "device" in {f.name for f in dataclasses.fields(BootstrapConfig)} and device.index is not None:
            boot_args["device"] = device.index
        params = MoEEpCommParams(num_experts=g.global_num_experts, top_k=g.top_k,
                                 max_tokens_per_rank=g.max_tokens_per_rank, hidden_size=g.hidden_size,
                                 dtype=g.dtype, invalid_expert_id=sentinel)
        config = NVLinkOneSidedConfig(extra_payload_bytes_per_token=g.bytes.extra,
                                      comm_backend=_torch_backend(group))
        self._comm = NVLinkOneSidedAlltoAll(BootstrapConfig(**boot_args), params, config)
        a2a = self._comm.alltoall  # the MoeAlltoAll it wraps: workspace size and counters
        self.workspace_size_per_rank = int(a2a.workspace_size_per_rank)
        self.recv_counts = _recv_counts_view(a2a, g.ep_size, g.ep_rank)
        self.dtype = g.dtype

    def dispatch(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 scales: torch.Tensor | None, rows_per_rank: int) -> list[torch.Tensor | None]:
        res = self._comm.dispatch(hidden, topk_ids, topk_weights, hidden_states_scale=scales,
                                  max_tokens_per_rank=rows_per_rank)
        shape = (self.ep_size, rows_per_rank, -1)
        sc = res.hidden_states_scale
        return [res.hidden_states.view(shape), res.topk_ids.view(shape), res.topk_weights.view(shape),
                None if sc is None else sc.view(shape)]

    def combine_input_buffer(self, rows_per_rank: int) -> torch.Tensor:
        return self._comm.get_combine_input_buffer(self.dtype).view(self.ep_size, rows_per_rank, -1)

    def combine(self, payload: torch.Tensor, rows_per_rank: int, in_workspace: bool,
                output: torch.Tensor) -> torch.Tensor:
        # NVLinkOneSidedAlltoAll finds out itself whether payload is its combine buffer (by data pointer).
        return self._comm.combine(payload, output=output)


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
        return _MoeEpPath(geometry, group, sentinel, device)
    if api == "moe_alltoall":
        return _MoeAlltoAllPath(geometry, group, sentinel)
    raise ContractError(f"unknown FlashInfer API {api!r}; expected moe_ep or moe_alltoall")


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
