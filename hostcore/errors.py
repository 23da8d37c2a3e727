"""Exception types raised by the host core.

Every error a user can cause says what was wrong, what was expected and what to
do next; the classes exist so callers can catch one family without parsing text.
"""

from __future__ import annotations


class HostcoreError(Exception):
    """Base class of every error raised on purpose by hostcore and its plugins."""


class ConfigError(HostcoreError, ValueError):
    """A backend configuration string or option is malformed or names no backend."""


class PluginError(HostcoreError):
    """A plugin could not be loaded, declared an incompatible API, or clashed with another."""


class ContractError(HostcoreError, ValueError):
    """Tensors handed between stages break the data contract (`hostcore.contract`)."""


class UnsafeSentinelError(ContractError):
    """The configured padding sentinel would be read through the expert map out of contract."""


class BackendUnavailableError(HostcoreError, RuntimeError):
    """A backend was selected that cannot run on this machine (no GPU, missing library...)."""
