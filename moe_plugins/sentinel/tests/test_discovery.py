"""The plugin as installed: entry-point metadata, registry discovery, options, config strings."""

from __future__ import annotations

from importlib import metadata

import pytest
from moe_plugin_sentinel.strategies import Negative

from hostcore import BackendChoice, ConfigError, Option, Registry, Stage, resolve_config
from hostcore.placement import ExpertPlacement

NAMES = ["auto", "guard_slot", "negative", "non_local", "out_of_range"]


def test_entry_point_metadata_names_the_plugin_module() -> None:
    eps = [ep for ep in metadata.entry_points(group="hostcore.plugins") if ep.name == "sentinel"]
    assert eps, "moe-plugin-sentinel is not installed: pip install -e moe_plugins/sentinel"
    assert {ep.value for ep in eps} == {"moe_plugin_sentinel"}
    assert {ep.dist.name for ep in eps} == {"moe-plugin-sentinel"}


def test_discover_lists_the_five_strategies_from_the_installed_distribution() -> None:
    registry = Registry.discover()
    assert not [f for f in registry.failures if f.name == "sentinel"]
    ours = [n for n in registry.names(Stage.SENTINEL) if registry.backends[Stage.SENTINEL][n].distribution ==
            "moe-plugin-sentinel"]
    assert ours == NAMES
    for name in NAMES:
        backend = registry.get(Stage.SENTINEL, name)
        assert backend.distribution == "moe-plugin-sentinel"
        assert backend.version == metadata.version("moe-plugin-sentinel")
        assert backend.availability() is None
        assert backend.options["allow_unsafe"] == Option(bool, False, backend.options["allow_unsafe"].help)
        assert backend.summary


def test_build_from_a_config_string() -> None:
    registry = Registry.discover()
    config = resolve_config("sentinel=negative(allow_unsafe=true)", environ={})
    strategy = registry.build(Stage.SENTINEL, config[Stage.SENTINEL], None)
    assert isinstance(strategy, Negative) and strategy.allow_unsafe
    local = ExpertPlacement.contiguous(4, 2).local_experts(0, use_map=True)
    assert strategy.choose(local) == (-1, local)
    default = registry.build(Stage.SENTINEL, resolve_config(None, environ={})[Stage.SENTINEL], None)
    assert default.name == "auto" and not default.allow_unsafe


def test_bad_option_names_the_accepted_ones() -> None:
    registry = Registry.discover()
    with pytest.raises(ConfigError, match="no option 'alow_unsafe'.*Did you mean 'allow_unsafe'"):
        registry.build(Stage.SENTINEL, BackendChoice.of("auto", alow_unsafe=True), None)
    with pytest.raises(ConfigError, match="must be bool"):
        registry.build(Stage.SENTINEL, BackendChoice.of("auto", allow_unsafe=1), None)


def test_excluded_by_the_allowlist_says_what_to_install() -> None:
    registry = Registry.discover(allowlist=["hostcore"])
    assert registry.names(Stage.SENTINEL) == []
    with pytest.raises(ConfigError, match="pip install moe-plugin-sentinel"):
        registry.get(Stage.SENTINEL, "guard_slot")
