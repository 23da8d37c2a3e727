"""Hook specifications: how a plugin adds named backends for each stage.

A plugin is a module (or object) named by an entry point in the group
``hostcore.plugins``. It declares ``hostcore_api_version`` (an int, see
`HOST_API_VERSION`) and implements any of the ``hostcore_register_*`` hooks
below with `hookimpl`. Each hook receives a ``register`` callable and calls it
once per backend with a `Backend` record::

    from hostcore import Backend, Stage, hookimpl

    hostcore_api_version = 1

    @hookimpl
    def hostcore_register_sentinel(register):
        register(Backend(Stage.SENTINEL, "my_sentinel", MySentinel, "what it does"))

The host calls the hooks once, when the registry is built. A layer resolves its
configuration once, when it is built: it calls each selected backend's
``factory(ctx, **options)`` and keeps the returned object; every forward calls
those objects' methods directly, never through the hook caller. The objects'
methods are the per-stage contracts documented by the protocols below (shapes
and dtypes as in `hostcore.contract`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import pluggy
import torch

from .contract import LocalRouting, PreparedTokens, ReceivedTokens, Stage, Verdict

if TYPE_CHECKING:
    from .placement import ExpertPlacement, LocalExperts
    from .quant import QuantizedExperts

PROJECT = "hostcore"
HOST_API_VERSION = 1
"""Major version of the plugin API; a plugin declaring another is refused."""

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

OptionValue = bool | int | float | str


@dataclass(frozen=True)
class Option:
    """One option a backend accepts in the config string (``name(key=value)``)."""

    type: type  # bool, int, float or str
    default: OptionValue
    help: str
    choices: tuple[OptionValue, ...] | None = None


@dataclass(frozen=True)
class BuildContext:
    """Everything a factory may need to build its stage object for one rank of one layer.

    ``local`` is the rank's placement after the sentinel strategy ran (its map may
    carry guard slots). ``sentinel`` is the chosen padding id (``None`` while the
    sentinel itself is being built). ``weights`` holds this rank's local experts
    only (experts stage). ``group`` is the EP process group (``None``: the default
    group, or no distributed run when ``ep_size == 1``).
    """

    rank: int
    ep_size: int
    device: torch.device
    placement: ExpertPlacement
    local: LocalExperts
    hidden_size: int
    top_k: int
    dtype: torch.dtype
    max_tokens_per_rank: int
    group: Any = None
    sentinel: int | None = None
    weights: QuantizedExperts | None = None


@dataclass(frozen=True)
class Backend:
    """A named implementation of one stage, as a plugin registers it.

    ``factory(ctx: BuildContext, **options)`` returns the stage object (see the
    protocols below). ``availability()`` returns ``None`` when the backend can run
    on this machine, else the reason it cannot (e.g. "needs a CUDA GPU"); it is
    cheap and must not raise. ``warm_up()``, when given, does the slow first-use
    work ahead of time (a JIT build, a kernel compile), shows its progress on
    stderr and returns a one-line summary; ``hostcore warmup`` calls it.
    ``distribution`` and ``version`` are filled in by the registry from the entry
    point's metadata.
    """

    stage: Stage
    name: str
    factory: Callable[..., Any]
    summary: str
    options: Mapping[str, Option] = field(default_factory=dict)
    availability: Callable[[], str | None] = lambda: None
    warm_up: Callable[[], str] | None = None
    distribution: str = ""
    version: str = ""


Register = Callable[[Backend], None]


class HostcoreSpec:
    """The hooks. Each is called once per registry build with a ``register`` callable."""

    @hookspec
    def hostcore_register_prepare(self, register: Register) -> None:
        """Register prepare backends: factories of `PrepareStage` objects."""

    @hookspec
    def hostcore_register_dispatch(self, register: Register) -> None:
        """Register dispatch backends: factories of `DispatchStage` objects (dispatch and its combine)."""

    @hookspec
    def hostcore_register_preprocess(self, register: Register) -> None:
        """Register preprocess backends: factories of `PreprocessStage` objects."""

    @hookspec
    def hostcore_register_experts(self, register: Register) -> None:
        """Register expert-compute backends: factories of `ExpertsStage` objects."""

    @hookspec
    def hostcore_register_sentinel(self, register: Register) -> None:
        """Register sentinel strategies: factories of `SentinelStrategy` objects."""


@runtime_checkable
class PrepareStage(Protocol):
    def prepare(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> PreparedTokens:
        """Router output ``[T, H]``, ``[T, K]`` int32/int64, ``[T, K]`` float -> `PreparedTokens`.

        Must neutralise router-invalid slots (ids outside ``[0, E)``) so that no
        such id travels: they leave with weight 0 and an id that adds no traffic.
        No host sync.
        """
        ...


@runtime_checkable
class DispatchStage(Protocol):
    def dispatch(self, tokens: PreparedTokens, rows_per_rank: int | None = None) -> ReceivedTokens:
        """Send each token to the ranks owning its experts; return the received layout.

        A collective: every rank of the group calls it, also with ``T == 0``.
        ``rows_per_rank`` is ``R``, the same on every rank, >= the largest ``T``
        in the group; ``None`` lets the dispatch agree on it (which may cost a
        collective). Padding rows carry the layer's sentinel in every top-k slot.
        Each token goes at most once to each rank. The received buffers are owned
        by the dispatch and stay valid until `combine` returns.
        """
        ...

    # Optional: ``combine_input_buffer() -> [ep_size, R, H]``, valid between a dispatch and its combine; expert
    # output written there is combined without a copy (one-sided dispatches own such a workspace).

    def combine(self, expert_out: torch.Tensor) -> torch.Tensor:
        """``[ep_size, R, H]`` expert output on this rank -> ``[T, H]`` for this rank's tokens.

        A collective paired with the last `dispatch`: row ``t`` of the result is
        the unweighted sum, over the ranks token ``t`` was sent to, of the rows
        those ranks computed for it. Returns a new tensor owned by the caller.
        """
        ...


@runtime_checkable
class PreprocessStage(Protocol):
    def preprocess(self, topk_ids: torch.Tensor, block_m: int | None = None) -> LocalRouting:
        """Global ids ``[N, K]`` (int32, as received: real ids and sentinels) -> `LocalRouting`.

        ``local_ids[n, k]`` is the local id of ``topk_ids[n, k]`` on this rank, or
        -1 when it is not local, is the sentinel or lies outside the map. With
        ``block_m`` also returns the `AlignedLayout` for that block size. No host
        sync except in a mode documented to raise on bad ids.
        """
        ...


@runtime_checkable
class ExpertsStage(Protocol):
    block_m: int | None
    """The aligned-layout block size this backend wants from preprocess, or ``None``."""

    def compute(self, hidden: torch.Tensor, topk_weights: torch.Tensor, routing: LocalRouting,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden [N, H]``, ``topk_weights [N, K]`` fp32, routing -> ``[N, H]`` in hidden's dtype.

        Row ``n`` = ``sum_k topk_weights[n, k] * w2_e(silu(gate_e x) * up_e x)`` over
        the slots whose local id ``e >= 0``; rows with no such slot are 0. Must not
        read weights of, or spend work on, slots with local id -1.

        ``out`` is optional for a backend to accept: a contiguous ``[N, H]`` tensor
        in hidden's dtype to write the result into (and return). The layer passes
        the dispatch's combine buffer there when the dispatch has one, so combine
        needs no copy.
        """
        ...


@runtime_checkable
class SentinelStrategy(Protocol):
    name: str

    def verdict(self, local: LocalExperts) -> Verdict:
        """Whether this strategy's sentinel satisfies the contract on a rank with this placement, and why."""
        ...

    def choose(self, local: LocalExperts) -> tuple[int, LocalExperts]:
        """The sentinel for this receiving rank and the placement the preprocess must use.

        May return a placement whose map is extended by guard slots. Raises
        `hostcore.errors.UnsafeSentinelError` when the verdict fails and unsafe
        sentinels were not explicitly allowed. Runs at build time and whenever the
        expert map changes, never per forward.
        """
        ...
