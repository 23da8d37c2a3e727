"""Fake of ``flashinfer.comm.comm_backend``: the torch.distributed communicator adapter."""

from __future__ import annotations

from typing import Any


class TorchDistBackend:
    """Same surface as FlashInfer's: Get_rank, Get_size, allgather, bcast, barrier, Split."""

    instances = 0

    def __init__(self, group: Any | None = None):
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized. "
                               "Please call torch.distributed.init_process_group() first.")
        self._group = group
        self._dist = dist
        TorchDistBackend.instances += 1

    def Get_rank(self) -> int:
        return self._dist.get_rank(self._group)

    def Get_size(self) -> int:
        return self._dist.get_world_size(self._group)

    def allgather(self, data: Any) -> tuple[Any, ...]:
        out = [None] * self.Get_size()
        self._dist.all_gather_object(out, data, group=self._group)
        return tuple(out)

    def bcast(self, data: Any, root: int) -> Any:
        objs = [data]
        src = self._dist.get_global_rank(self._group, root) if self._group is not None else root
        self._dist.broadcast_object_list(objs, src=src, group=self._group)
        return objs[0]

    def barrier(self) -> None:
        self._dist.barrier(group=self._group)

    def Split(self, color: int, key: int) -> "TorchDistBackend":
        # As the real one: the full color partition on every rank, then new_subgroups_by_enumeration (which every
        # rank of the *world* must enter), then a barrier on the parent group.
        info = self.allgather((color, key, self.Get_rank()))
        colors = sorted({c for c, _, _ in info})
        partition = [[r for _, r in sorted((k, r) for c, k, r in info if c == col)] for col in colors]
        cur_group, _ = self._dist.new_subgroups_by_enumeration(partition)
        self.barrier()
        return TorchDistBackend(group=cur_group)
