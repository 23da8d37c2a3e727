"""Plugin discovery and the typed registry of named backends.

Plugins are found through the entry-point group ``hostcore.plugins`` (the host's
own backends included, as the entry point ``hostcore``). ``HOSTCORE_PLUGINS``,
when set, is a comma-separated allowlist of entry-point names (empty: load
none). A plugin that fails to import, declares another `HOST_API_VERSION`,
raises while registering, or registers a name another plugin already holds is
recorded in `Registry.failures` and skipped whole; the others keep working.
"""

from __future__ import annotations

import difflib
import os
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from importlib import metadata
from typing import Any

import pluggy

from .config import BackendChoice
from .contract import Stage
from .errors import BackendUnavailableError, ConfigError, PluginError
from .hookspecs import HOST_API_VERSION, PROJECT, Backend, BuildContext, HostcoreSpec, Option, OptionValue

ENTRY_POINT_GROUP = "hostcore.plugins"
ALLOWLIST_ENV = "HOSTCORE_PLUGINS"

KNOWN_DISTRIBUTIONS: Mapping[tuple[Stage, str], str] = {
    (Stage.DISPATCH, "flashinfer_onesided"): "moe-plugin-flashinfer-onesided",
    (Stage.PREPROCESS, "cupy"): "moe-plugin-cupy-preprocess",
    (Stage.EXPERTS, "marlin"): "moe-plugin-marlin",
    **{(Stage.SENTINEL, name): "moe-plugin-sentinel"
       for name in ("negative", "out_of_range", "non_local", "guard_slot", "auto")},
}
"""Backends published by this project: an unknown name among these gets a pip command."""

_HOOKS = {stage: f"hostcore_register_{stage.value}" for stage in Stage}


@dataclass(frozen=True)
class PluginRecord:
    """A loaded plugin, or one that failed (``error`` set)."""

    name: str
    distribution: str
    version: str
    error: str = ""


class Registry:
    """Backends by stage and name, built once from the installed plugins."""

    def __init__(self) -> None:
        self._pm = pluggy.PluginManager(PROJECT)
        self._pm.add_hookspecs(HostcoreSpec)
        self.backends: dict[Stage, dict[str, Backend]] = {stage: {} for stage in Stage}
        self.plugins: list[PluginRecord] = []
        self.failures: list[PluginRecord] = []
        self.skipped: list[str] = []

    @classmethod
    def discover(cls, allowlist: Iterable[str] | None = None) -> Registry:
        """Load every ``hostcore.plugins`` entry point (limited by ``allowlist`` or ``$HOSTCORE_PLUGINS``)."""
        registry = cls()
        if allowlist is None and ALLOWLIST_ENV in os.environ:
            allowlist = [n.strip() for n in os.environ[ALLOWLIST_ENV].split(",") if n.strip()]
        allowed = None if allowlist is None else set(allowlist)
        seen: set[tuple[str, str]] = set()
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name):
            if (ep.name, ep.value) in seen:
                continue  # the same distribution visible twice on sys.path
            seen.add((ep.name, ep.value))
            dist = ep.dist.name if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else "?"
            if allowed is not None and ep.name not in allowed:
                registry.skipped.append(ep.name)
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin must not take the others down
                registry.failures.append(PluginRecord(ep.name, dist, version, _describe(exc, f"importing {ep.value}")))
                continue
            registry.add_plugin(plugin, ep.name, dist, version)
        return registry

    def add_plugin(self, plugin: Any, name: str, distribution: str = "", version: str = "") -> PluginRecord:
        """Register one plugin object or module; return its record (``error`` set if it was refused)."""
        declared = getattr(plugin, "hostcore_api_version", None)
        if declared != HOST_API_VERSION:
            why = ("does not declare hostcore_api_version" if declared is None
                   else f"declares hostcore_api_version = {declared!r}")
            return self._fail(PluginRecord(name, distribution, version,
                                           f"{why}; this hostcore provides API {HOST_API_VERSION}. Install a release of "
                                           f"{distribution or name} built for hostcore API {HOST_API_VERSION}, or a "
                                           f"hostcore that provides API {declared}"))
        try:
            self._pm.register(plugin, name=name)
        except Exception as exc:
            return self._fail(PluginRecord(name, distribution, version, _describe(exc, "registering its hooks")))
        others = [p for p in self._pm.get_plugins() if p is not plugin]
        collected: list[Backend] = []
        try:
            for stage, hook in _HOOKS.items():
                caller = self._pm.subset_hook_caller(hook, remove_plugins=others)
                caller(register=lambda b, stage=stage: collected.append(_checked(b, stage, name)))
        except Exception as exc:
            self._pm.unregister(plugin)
            return self._fail(PluginRecord(name, distribution, version, _describe(exc, "calling its register hooks")))
        clashes = [b for b in collected if b.name in self.backends[b.stage]]
        if clashes:
            self._pm.unregister(plugin)
            b = clashes[0]
            holder = self.backends[b.stage][b.name]
            return self._fail(PluginRecord(name, distribution, version,
                                           f"{b.stage} backend {b.name!r} is already registered by {holder.distribution}; "
                                           f"uninstall one of them or exclude one with {ALLOWLIST_ENV}"))
        for b in collected:
            self.backends[b.stage][b.name] = replace(b, distribution=distribution or name, version=version)
        record = PluginRecord(name, distribution, version)
        self.plugins.append(record)
        return record

    def _fail(self, record: PluginRecord) -> PluginRecord:
        self.failures.append(record)
        return record

    def names(self, stage: Stage) -> list[str]:
        return sorted(self.backends[stage])

    def get(self, stage: Stage, name: str) -> Backend:
        """The backend, or `ConfigError` listing the installed names, the closest match and what to install."""
        try:
            return self.backends[stage][name]
        except KeyError:
            pass
        installed = self.names(stage)
        lines = [f"unknown {stage} backend {name!r}. Installed {stage} backends: {', '.join(installed) or 'none'}."]
        close = difflib.get_close_matches(name, installed, n=1)
        if close:
            lines.append(f"Did you mean {close[0]!r}?")
        dist = KNOWN_DISTRIBUTIONS.get((stage, name))
        if dist:
            lines.append(f"{name!r} is provided by {dist}: pip install {dist}")
        for failure in self.failures:
            lines.append(f"Note: plugin {failure.name!r} ({failure.distribution}) failed to load: {failure.error}")
        if self.skipped:
            lines.append(f"Note: {ALLOWLIST_ENV} excludes the installed plugins {', '.join(self.skipped)}")
        raise ConfigError("\n".join(lines))

    def build(self, stage: Stage, choice: BackendChoice, ctx: BuildContext) -> Any:
        """Validate ``choice``'s options, check availability, and call the factory once."""
        backend = self.get(stage, choice.name)
        reason = backend.availability()
        if reason:
            raise BackendUnavailableError(f"{stage} backend {backend.name!r} ({backend.distribution}) cannot run here: {reason}")
        options = coerce_options(backend, choice.option_dict)
        return backend.factory(ctx, **options)


def coerce_options(backend: Backend, given: Mapping[str, OptionValue]) -> dict[str, OptionValue]:
    """Defaults filled in and values checked against the backend's declared options."""
    out = {key: opt.default for key, opt in backend.options.items()}
    for key, value in given.items():
        if key not in backend.options:
            accepted = ", ".join(f"{k} ({o.help})" for k, o in backend.options.items()) or "none"
            close = difflib.get_close_matches(key, list(backend.options), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{backend.stage} backend {backend.name!r} has no option {key!r}.{hint} Accepted: {accepted}")
        out[key] = _coerce(backend, key, backend.options[key], value)
    return out


def _coerce(backend: Backend, key: str, opt: Option, value: OptionValue) -> OptionValue:
    where = f"option {key!r} of {backend.stage} backend {backend.name!r}"
    if opt.type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, opt.type) or (opt.type is int and isinstance(value, bool)):
        raise ConfigError(f"{where} must be {opt.type.__name__}, got {value!r}")
    if opt.choices is not None and value not in opt.choices:
        raise ConfigError(f"{where} must be one of {', '.join(map(str, opt.choices))}, got {value!r}")
    return value


def _checked(backend: Any, stage: Stage, plugin: str) -> Backend:
    if not isinstance(backend, Backend):
        raise PluginError(f"plugin {plugin!r} registered {backend!r}; register() takes a hostcore.Backend")
    if backend.stage != stage:
        raise PluginError(f"plugin {plugin!r} registered {backend.stage} backend {backend.name!r} from the {stage} hook")
    return backend


def _describe(exc: BaseException, doing: str) -> str:
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" at {frame.filename}:{frame.lineno}" if frame else ""
    return f"{type(exc).__name__} while {doing}: {exc}{at}"


_default: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, discovered on first use."""
    global _default
    if _default is None:
        _default = Registry.discover()
    return _default


def reset_registry() -> None:
    """Forget the process-wide registry (after installing plugins, or changing ``HOSTCORE_PLUGINS``)."""
    global _default
    _default = None
