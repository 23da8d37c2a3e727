"""Workspace sizing: the bytes per token the plugin reserves, through FlashInfer's size helper (fake)."""

from __future__ import annotations

import pytest
import torch
from fi_testlib import expected_workspace_bytes
from moe_plugin_flashinfer_onesided import layout


def _geometry(ep: int, max_tokens: int, hidden: int, top_k: int, dtype: torch.dtype, extra: int = 0):
    from moe_plugin_flashinfer_onesided._flashinfer import Geometry

    return Geometry(ep_size=ep, ep_rank=0, global_num_experts=256, top_k=top_k, max_tokens_per_rank=max_tokens,
                    hidden_size=hidden, dtype=dtype, bytes=layout.payload_bytes(hidden, top_k, dtype, extra))


@pytest.mark.parametrize("ep,max_tokens,hidden,top_k,dtype,extra", [
    (8, 256, 7168, 8, torch.bfloat16, 0), (2, 1024, 4096, 2, torch.bfloat16, 0), (4, 64, 7168, 8, torch.float32, 0),
    (4, 128, 7168, 8, torch.bfloat16, 224),
])
def test_workspace_is_aux_plus_dispatch_plus_combine_planes(fake_flashinfer, ep, max_tokens, hidden, top_k, dtype,
                                                            extra) -> None:
    from moe_plugin_flashinfer_onesided._flashinfer import workspace_size_per_rank

    g = _geometry(ep, max_tokens, hidden, top_k, dtype, extra)
    itemsize = torch.empty((), dtype=dtype).element_size()
    want = expected_workspace_bytes(ep, max_tokens, hidden * itemsize + top_k * 8 + extra, hidden * itemsize)
    assert workspace_size_per_rank(g) == want


def test_deepseek_ep8_matches_the_published_figure(fake_flashinfer) -> None:
    from moe_plugin_flashinfer_onesided._flashinfer import workspace_size_per_rank

    mib = workspace_size_per_rank(_geometry(8, 256, 7168, 8, torch.bfloat16)) / 2**20
    assert 55.5 < mib < 57.0  # "about 56 MiB/rank for EP 8, hidden 7168 bf16, top-8, 256 max tokens"
