"""Pure rules of the one-sided layout: expert ownership, payload order, bytes per token, ``R``.

Nothing here imports FlashInfer or touches a GPU, so every rule is tested on
the CPU. The numbers are those of FlashInfer's ``MoeAlltoAll`` kernels
(flashinfer-python 0.6.16 - 0.7.2):

* the dispatch kernel sends a token to rank ``id // (E / ep_size)`` for each of
  its experts (once per rank), so the layer's placement must be exactly that
  contiguous partition;
* payload planes are packed back to back in the workspace and the kernel checks
  that each one starts at a multiple of its element size, which holds when the
  payloads are sorted by element size, largest first;
* at most 6 payloads, ``top_k <= 22`` and ``ep_size <= 64``;
* ``runtime_max_tokens_per_rank`` (``R``) must be ``> 0`` and
  ``<= max_num_tokens`` of the workspace.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hostcore.errors import ContractError
from hostcore.placement import ExpertPlacement

MAX_TOP_K = 22
MAX_EP_SIZE = 64
MAX_PAYLOADS = 6
ID_BYTES = 4  # top-k ids travel as int32
WEIGHT_BYTES = 4  # top-k weights travel as fp32


def flashinfer_owner(expert: int, global_num_experts: int, ep_size: int) -> int:
    """The rank FlashInfer's dispatch sends expert ``expert`` to (``E % ep_size == 0`` assumed)."""
    return expert // (global_num_experts // ep_size)


def describe_placement(placement: ExpertPlacement) -> str:
    """A short name for a placement in error messages ("round-robin", "contiguous", "custom")."""
    e, ep = placement.global_num_experts, placement.ep_size
    if placement.owner == ExpertPlacement.round_robin(e, ep).owner:
        kind = "round-robin"
    elif placement.owner == ExpertPlacement.contiguous(e, ep).owner:
        kind = "contiguous"
    else:
        kind = "custom"
    return f"{kind} placement of E={e} experts on {ep} ranks"


def check_partition(placement: ExpertPlacement, ep_size: int) -> None:
    """Raise `ContractError` unless FlashInfer's kernel would send every expert's tokens to its owner.

    FlashInfer computes the owner as ``id // (E / ep_size)``, so the layer needs
    ``E % ep_size == 0`` and ``placement.owner[e] == e // (E / ep_size)`` for every
    ``e``. Local ids may still be renumbered by an expert map.
    """
    e = placement.global_num_experts
    what = describe_placement(placement)
    fix = ("Use ExpertPlacement.contiguous(E, ep_size) with E divisible by ep_size (an expert map may still "
           "renumber local experts), or dispatch=torch_a2a, which follows any placement.")
    if placement.ep_size != ep_size:
        raise ContractError(f"dispatch=flashinfer_onesided: the {what} is for ep_size={placement.ep_size}, "
                            f"but the EP group has {ep_size} ranks. Build the placement for the group's size.")
    if e % ep_size:
        raise ContractError(f"dispatch=flashinfer_onesided needs E divisible by ep_size: FlashInfer sends expert i "
                            f"to rank i // (E / ep_size), but the {what} has E % ep_size = {e % ep_size}. {fix}")
    per_rank = e // ep_size
    for expert, owner in enumerate(placement.owner):
        want = expert // per_rank
        if owner != want:
            raise ContractError(
                f"dispatch=flashinfer_onesided cannot serve the {what}: expert {expert} lives on rank {owner}, "
                f"but FlashInfer's kernel sends its tokens to rank {want} (= {expert} // (E / ep_size) = "
                f"{expert} // {per_rank}), so they would be computed by the wrong rank. {fix}")


def check_limits(ep_size: int, top_k: int, global_num_experts: int, max_tokens_per_rank: int) -> None:
    """Raise `ContractError` when the layer's shape is outside what the kernels support."""
    if ep_size < 2:
        raise ContractError(f"dispatch=flashinfer_onesided needs an EP group of >= 2 ranks, got ep_size={ep_size}; "
                            "use dispatch=local for a single rank")
    if ep_size > MAX_EP_SIZE:
        raise ContractError(f"FlashInfer's one-sided all-to-all supports ep_size <= {MAX_EP_SIZE}, got {ep_size}; "
                            "use dispatch=torch_a2a")
    if not 1 <= top_k <= MAX_TOP_K:
        raise ContractError(f"FlashInfer's one-sided all-to-all supports 1 <= top_k <= {MAX_TOP_K}, got {top_k}; "
                            "use dispatch=torch_a2a")
    if top_k > global_num_experts:
        raise ContractError(f"top_k={top_k} exceeds the number of experts E={global_num_experts}")
    if max_tokens_per_rank < 1:
        raise ContractError(f"max_tokens_per_rank must be >= 1 (it sizes the workspace), got {max_tokens_per_rank}")


@dataclass(frozen=True)
class PayloadBytes:
    """Per-token bytes the workspace reserves: what dispatch sends and what combine returns."""

    hidden: int
    top_k: int
    extra: int  # room for prepare's scales (0 when it does not quantize)
    combine: int

    @property
    def dispatch(self) -> int:
        return self.hidden + self.top_k * (ID_BYTES + WEIGHT_BYTES) + self.extra


def payload_bytes(hidden_size: int, top_k: int, dtype: torch.dtype, extra_bytes_per_token: int = 0) -> PayloadBytes:
    """Bytes per token for a layer whose activations are ``dtype`` (hidden and expert output)."""
    if extra_bytes_per_token < 0:
        raise ContractError(f"scale_bytes_per_token must be >= 0, got {extra_bytes_per_token}")
    row = hidden_size * torch.empty((), dtype=dtype).element_size()
    return PayloadBytes(hidden=row, top_k=top_k, extra=extra_bytes_per_token, combine=row)


def payload_order(element_sizes: Sequence[int], row_bytes: Sequence[int]) -> list[int]:
    """Indices of the payloads in the order to hand them to ``MoeAlltoAll.dispatch``.

    Largest element size first, so every plane starts at a multiple of its
    element size (the kernel refuses otherwise); among equal element sizes the
    wider row first, so the big hidden plane starts at the 128-byte aligned
    base and keeps 16-byte vector copies. Stable, so the result is deterministic.
    """
    if len(element_sizes) != len(row_bytes):
        raise ValueError("element_sizes and row_bytes must have one entry per payload")
    if len(element_sizes) > MAX_PAYLOADS:
        raise ContractError(f"FlashInfer's dispatch takes at most {MAX_PAYLOADS} payloads, got {len(element_sizes)}")
    return sorted(range(len(element_sizes)), key=lambda i: (-element_sizes[i], -row_bytes[i]))


def check_rows_per_rank(rows: int, tokens: int, max_tokens_per_rank: int, agreed: bool) -> None:
    """Raise `ContractError` unless ``tokens <= rows <= max_tokens_per_rank``.

    ``agreed`` says ``rows`` came from the all-reduce (so every rank raises
    together) rather than from the caller.
    """
    source = "the largest token count in the EP group" if agreed else "rows_per_rank"
    if rows < 0:
        raise ContractError(f"rows_per_rank must be >= 0, got {rows}")
    if rows > max_tokens_per_rank:
        raise ContractError(f"{source} R={rows} exceeds max_tokens_per_rank={max_tokens_per_rank}, which sized "
                            "FlashInfer's workspace: rebuild the layer with a larger max_tokens_per_rank, or split "
                            "the batch")
    if tokens > rows:
        raise ContractError(f"this rank has T={tokens} tokens but rows_per_rank R={rows}: R must be >= the "
                            "largest token count in the EP group (pass None to agree on it)")
