"""Fake of ``flashinfer.comm.mnnvl``: only what the plugin touches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .comm_backend import TorchDistBackend  # noqa: F401  (re-exported like the real module)


@dataclass
class MnnvlConfig:
    comm_backend: Optional[Any] = None
    allocation_granularity: int = 0
    fabric_page_size: int = 1 << 29
