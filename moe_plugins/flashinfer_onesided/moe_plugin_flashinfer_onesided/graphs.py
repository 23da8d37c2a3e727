"""CUDA-graph capture of ``dispatch -> expert compute -> combine`` with a fixed ``R``.

FlashInfer's dispatch and combine are graph-safe once ``R`` (``rows_per_rank``)
and the local token count ``T`` are fixed: both are baked into the launches,
the workspace addresses are static, and the cross-rank completion flags use a
device-side epoch that advances on every replay. What it takes:

1. every rank builds the same `GraphedDispatchCombine` (same ``R``; each its
   own ``T``), which runs one eager step on a side stream (FlashInfer's JIT
   module loads, the allocator warms up) and then captures one step;
2. every rank replays in lockstep (a replay is a collective, like an eager
   step): copy the new inputs into the static ones and call `replay`.

The received layout and the output are static tensors overwritten by each
replay. Different ``T`` need different graphs (capture one per token bucket).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hostcore import cuda_graphs
from hostcore.contract import PreparedTokens, ReceivedTokens
from hostcore.errors import ContractError

from .dispatch import FlashInferOneSidedDispatch

ExpertFn = Callable[[ReceivedTokens], torch.Tensor]
"""Received layout -> expert output ``[ep_size, R, H]`` (graph-capturable: no host syncs)."""


class GraphedDispatchCombine:
    """One captured step on one rank; see the module docstring.

    ``tokens`` are the static inputs (their storage is what `replay` reads);
    ``expert_fn`` maps the received layout to the expert output.
    """

    def __init__(self, stage: FlashInferOneSidedDispatch, tokens: PreparedTokens, rows_per_rank: int,
                 expert_fn: ExpertFn, warmup_steps: int = 1) -> None:
        if rows_per_rank < 1:
            raise ContractError(f"a captured step needs rows_per_rank >= 1 (FlashInfer needs R > 0), got "
                                f"{rows_per_rank}")
        self.stage, self.tokens, self.rows_per_rank, self.expert_fn = stage, tokens, rows_per_rank, expert_fn
        self.graph, (self.output, self.received) = cuda_graphs.capture(self._step, warmup_steps, stage.device)

    def _step(self) -> tuple[torch.Tensor, ReceivedTokens]:
        received = self.stage.dispatch(self.tokens, self.rows_per_rank)
        return self.stage.combine(self.expert_fn(received)), received

    def replay(self, tokens: PreparedTokens | None = None) -> torch.Tensor:
        """Copy ``tokens`` (same shapes) into the static inputs if given, replay, return the static output."""
        if tokens is not None:
            for name in ("hidden", "topk_ids", "topk_weights", "scales"):
                src, dst = getattr(tokens, name), getattr(self.tokens, name)
                if (src is None) != (dst is None) or (src is not None and src.shape != dst.shape):
                    raise ContractError(f"replay needs {name} shaped like the captured one "
                                        f"({None if dst is None else tuple(dst.shape)}), got "
                                        f"{None if src is None else tuple(src.shape)}")
                if src is not None:
                    dst.copy_(src)
        self.graph.replay()
        return self.output
