"""Fake of ``flashinfer.comm``: the names the plugin imports from it."""

from .mapping import Mapping
from .trtllm_moe_alltoall import MoeAlltoAll, moe_a2a_get_workspace_size_per_rank

__all__ = ["Mapping", "MoeAlltoAll", "moe_a2a_get_workspace_size_per_rank"]
