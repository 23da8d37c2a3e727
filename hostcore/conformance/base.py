"""What every contract class shares: naming the backend, building it, skipping it, seeding cases.

A subclass sets ``backend`` (the registered name) and optionally ``options``
(as in the config string), ``device`` and ``plugin`` (the import path of a
plugin module to register on top of the installed ones, for a plugin under
development that is not installed yet). The autouse fixture `_hostcore_backend`
resolves the backend once per test: a name that is not registered fails the
test with the registry's message (installed names, closest match); a backend
whose ``availability()`` gives a reason, or a CUDA device on a machine without
one, skips it with that reason.
"""

from __future__ import annotations

import importlib
import random
from collections.abc import Mapping
from typing import Any, ClassVar

import pytest
import torch

from ..config import BackendChoice
from ..contract import Stage
from ..errors import ConfigError
from ..hookspecs import Backend, BuildContext, OptionValue
from ..registry import Registry

_PLUGIN_REGISTRIES: dict[str, Registry] = {}


def registry_with(base: Registry, plugin: str | None) -> Registry:
    """``base``, or (when ``plugin`` names a module) a fresh discovery plus that module, cached per path."""
    if plugin is None:
        return base
    if plugin not in _PLUGIN_REGISTRIES:
        registry = Registry.discover()
        record = registry.add_plugin(importlib.import_module(plugin), plugin)
        if record.error:
            raise ConfigError(f"conformance kit: plugin module {plugin!r} could not be registered: {record.error}")
        _PLUGIN_REGISTRIES[plugin] = registry
    return _PLUGIN_REGISTRIES[plugin]


class ContractBase:
    """Base of the contract classes; not collected by pytest (no ``Test`` prefix)."""

    stage: ClassVar[Stage]
    backend: ClassVar[str | None] = None
    options: ClassVar[Mapping[str, OptionValue]] = {}
    device: ClassVar[str] = "cpu"
    plugin: ClassVar[str | None] = None

    registry: Registry
    seed: int
    spec: Backend

    @pytest.fixture(autouse=True)
    def _hostcore_backend(self, request: pytest.FixtureRequest, hostcore_registry: Registry, hostcore_seed: int) -> None:
        self.setup_backend(hostcore_registry, hostcore_seed, request.node.name)

    def setup_backend(self, registry: Registry, seed: int, test_name: str) -> None:
        """Resolve the backend (fail if unknown, skip if it cannot run here); what the autouse fixture does."""
        cls = type(self)
        if not cls.backend:
            pytest.fail(f"{cls.__name__} must name the {cls.stage} backend it tests: set `backend = \"<name>\"` "
                        "on the class (the name the plugin registers)", pytrace=False)
        try:
            self.registry = registry_with(registry, cls.plugin)
            self.spec = self.registry.get(cls.stage, cls.backend)
        except ConfigError as exc:
            pytest.fail(f"conformance kit: {exc}", pytrace=False)
        reason = self.spec.availability()
        if reason:
            pytest.skip(f"{cls.stage} backend {cls.backend!r} ({self.spec.distribution}) cannot run here: {reason}")
        if torch.device(cls.device).type == "cuda" and not torch.cuda.is_available():
            pytest.skip(f"device {cls.device!r} requested but no CUDA GPU is available")
        self.seed = seed
        self._test_name = test_name

    def rng(self, *tags: object) -> random.Random:
        """A `random.Random` seeded by ``--hostcore-seed``, the test and ``tags``: reproducible per case."""
        return random.Random(f"{self.seed}:{type(self).__name__}:{self._test_name}:{':'.join(map(str, tags))}")

    @staticmethod
    def torch_gen(rng: random.Random) -> torch.Generator:
        """A CPU `torch.Generator` seeded from ``rng``."""
        return torch.Generator().manual_seed(rng.getrandbits(62))

    def where(self, case: str) -> str:
        """Suffix for failure messages: how to reproduce this case."""
        return f" [{case}; {self._test_name}, --hostcore-seed {self.seed}]"

    def build(self, ctx: BuildContext, **overrides: OptionValue) -> Any:
        """The backend under test, built through the registry with ``options`` (``overrides`` win)."""
        choice = BackendChoice.of(type(self).backend, **{**dict(type(self).options), **overrides})  # type: ignore[arg-type]
        return self.registry.build(type(self).stage, choice, ctx)

    def build_host(self, stage: Stage, name: str, ctx: BuildContext, **options: OptionValue) -> Any:
        """A host reference backend (e.g. the ``torch`` preprocess), built through the same registry."""
        return self.registry.build(stage, BackendChoice.of(name, **options), ctx)
