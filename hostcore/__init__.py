"""hostcore: the host core of an expert-parallel MoE layer whose stages are plugins.

Public API: the hook markers and records a plugin needs (`hookimpl`, `Backend`,
`Option`, `Stage`, `BuildContext`), the data contract (`hostcore.contract`),
configuration (`BackendConfig`, `resolve_config`), the registry
(`get_registry`) and the layer (`EPMoELayer`).
"""

from .config import BackendChoice, BackendConfig, resolve_config
from .contract import (AlignedLayout, LocalRouting, PreparedTokens, ReceivedTokens, Stage, Verdict,
                       sentinel_verdict)
from .errors import (BackendUnavailableError, ConfigError, ContractError, HostcoreError, PluginError,
                     UnsafeSentinelError)
from .hookspecs import HOST_API_VERSION, Backend, BuildContext, Option, hookimpl
from .layer import EPMoELayer
from .placement import ExpertPlacement, LocalExperts
from .quant import QuantizedExperts
from .registry import Registry, get_registry, reset_registry

__version__ = "0.1.0"

__all__ = [
    "HOST_API_VERSION", "AlignedLayout", "Backend", "BackendChoice", "BackendConfig", "BackendUnavailableError",
    "BuildContext", "ConfigError", "ContractError", "EPMoELayer", "ExpertPlacement", "HostcoreError", "LocalExperts",
    "LocalRouting", "Option", "PluginError", "PreparedTokens", "QuantizedExperts", "ReceivedTokens", "Registry",
    "Stage", "UnsafeSentinelError", "Verdict", "get_registry", "hookimpl", "reset_registry", "resolve_config",
    "sentinel_verdict",
]
