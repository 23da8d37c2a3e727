"""Plugin discovery from installed entry-point metadata, failures that stay contained, and error messages."""

from __future__ import annotations

import pytest
import torch

from hostcore import BackendChoice, Stage
from hostcore.errors import BackendUnavailableError, ConfigError
from hostcore.registry import ALLOWLIST_ENV, Registry

GOOD = """
from hostcore import Backend, Option, Stage, hookimpl
hostcore_api_version = 1

class Greedy:
    def __init__(self, ctx, level=1):
        self.level = level

@hookimpl
def hostcore_register_preprocess(register):
    register(Backend(Stage.PREPROCESS, "thirdparty_pre", Greedy, "a third-party preprocess",
                     {"level": Option(int, 1, "how greedy", (1, 2, 3))}))

@hookimpl
def hostcore_register_experts(register):
    register(Backend(Stage.EXPERTS, "needs_gpu", object, "never runs here", availability=lambda: "needs a CUDA GPU"))
"""


def test_host_backends_come_from_their_entry_point() -> None:
    registry = Registry.discover()
    assert {"passthrough"} <= set(registry.names(Stage.PREPARE))
    assert {"local", "torch_a2a"} <= set(registry.names(Stage.DISPATCH))
    backend = registry.get(Stage.DISPATCH, "torch_a2a")
    assert backend.distribution == "hostcore" and backend.version


def test_third_party_plugin_is_discovered(install_plugin) -> None:
    install_plugin("acme-moe", "acme_moe", GOOD, version="2.3")
    registry = Registry.discover()
    backend = registry.get(Stage.PREPROCESS, "thirdparty_pre")
    assert (backend.distribution, backend.version) == ("acme-moe", "2.3")
    assert backend.factory(None, level=2).level == 2


def test_plugin_raising_on_import_is_reported_and_others_work(install_plugin) -> None:
    install_plugin("acme-moe", "acme_moe", GOOD)
    install_plugin("broken-moe", "broken_moe", "raise RuntimeError('boom: missing libfoo.so')\n")
    registry = Registry.discover()
    assert "thirdparty_pre" in registry.names(Stage.PREPROCESS)
    (failure,) = [f for f in registry.failures if f.name == "broken_moe"]
    assert failure.name == "broken_moe" and failure.distribution == "broken-moe"
    assert "RuntimeError" in failure.error and "boom: missing libfoo.so" in failure.error
    with pytest.raises(ConfigError, match="broken_moe.*failed to load"):
        registry.get(Stage.EXPERTS, "whatever")


@pytest.mark.parametrize("declared, expected", [("", "does not declare hostcore_api_version"),
                                                ("hostcore_api_version = 2\n", "declares hostcore_api_version = 2")])
def test_incompatible_api_version_is_refused(install_plugin, declared: str, expected: str) -> None:
    source = declared + "from hostcore import hookimpl\n"
    install_plugin("future-moe", "future_moe", source)
    registry = Registry.discover()
    (failure,) = [f for f in registry.failures if f.name == "future_moe"]
    assert expected in failure.error and "this hostcore provides API 1" in failure.error


def test_plugin_raising_in_its_hook_is_contained(install_plugin) -> None:
    install_plugin("acme-moe", "acme_moe", GOOD)
    install_plugin("flaky-moe", "flaky_moe", """
from hostcore import hookimpl
hostcore_api_version = 1
@hookimpl
def hostcore_register_dispatch(register):
    raise ValueError("cannot find NVLink")
""")
    registry = Registry.discover()
    (failure,) = [f for f in registry.failures if f.distribution in ("flaky-moe", "acme-moe")]
    assert failure.name == "flaky_moe" and "cannot find NVLink" in failure.error
    assert "thirdparty_pre" in registry.names(Stage.PREPROCESS)


def test_name_clash_keeps_the_first_and_reports_the_second(install_plugin) -> None:
    install_plugin("acme-moe", "acme_moe", GOOD)
    install_plugin("copycat-moe", "zz_copycat", GOOD.replace("needs_gpu", "other"))
    registry = Registry.discover()
    assert registry.get(Stage.PREPROCESS, "thirdparty_pre").distribution == "acme-moe"
    (failure,) = [f for f in registry.failures if f.name == "zz_copycat"]
    assert "already registered by acme-moe" in failure.error
    assert "other" not in registry.names(Stage.EXPERTS), "a refused plugin registers nothing"


def test_allowlist_limits_autoload(install_plugin, monkeypatch: pytest.MonkeyPatch) -> None:
    install_plugin("acme-moe", "acme_moe", GOOD)
    monkeypatch.setenv(ALLOWLIST_ENV, "hostcore")
    registry = Registry.discover()
    assert "thirdparty_pre" not in registry.names(Stage.PREPROCESS)
    assert "acme_moe" in registry.skipped
    with pytest.raises(ConfigError, match=f"{ALLOWLIST_ENV} excludes the installed plugins .*acme_moe"):
        registry.get(Stage.PREPROCESS, "thirdparty_pre")
    monkeypatch.setenv(ALLOWLIST_ENV, "")
    assert Registry.discover().names(Stage.DISPATCH) == []


def test_unknown_name_lists_installed_and_closest() -> None:
    registry = Registry.discover(allowlist=["hostcore"])
    with pytest.raises(ConfigError) as info:
        registry.get(Stage.DISPATCH, "torch_a2")
    message = str(info.value)
    assert "Installed dispatch backends: local, torch_a2a" in message
    assert "Did you mean 'torch_a2a'?" in message


def test_unknown_name_of_ours_gives_the_pip_command() -> None:
    registry = Registry.discover(allowlist=["hostcore"])  # as on a machine without our GPU plugins
    with pytest.raises(ConfigError, match="'marlin' is provided by moe-plugin-marlin: pip install moe-plugin-marlin"):
        registry.get(Stage.EXPERTS, "marlin")


def test_options_are_checked(install_plugin) -> None:
    install_plugin("acme-moe", "acme_moe", GOOD)
    registry = Registry.discover()
    with pytest.raises(ConfigError, match="has no option 'levle'. Did you mean 'level'"):
        registry.build(Stage.PREPROCESS, BackendChoice.of("thirdparty_pre", levle=2), None)
    with pytest.raises(ConfigError, match="must be int, got 'high'"):
        registry.build(Stage.PREPROCESS, BackendChoice.of("thirdparty_pre", level="high"), None)
    with pytest.raises(ConfigError, match="must be one of 1, 2, 3, got 7"):
        registry.build(Stage.PREPROCESS, BackendChoice.of("thirdparty_pre", level=7), None)
    assert registry.build(Stage.PREPROCESS, BackendChoice.of("thirdparty_pre", level=3), None).level == 3


def test_unavailable_backend_says_why(install_plugin) -> None:
    install_plugin("acme-moe", "acme_moe", GOOD)
    registry = Registry.discover()
    with pytest.raises(BackendUnavailableError, match="'needs_gpu' \\(acme-moe\\) cannot run here: needs a CUDA GPU"):
        registry.build(Stage.EXPERTS, BackendChoice("needs_gpu"), None)


def test_in_process_plugin_object() -> None:
    """A host can also register an object directly (e.g. a backend defined in the serving engine)."""
    from hostcore import Backend, hookimpl

    class Plugin:
        hostcore_api_version = 1

        @hookimpl
        def hostcore_register_experts(self, register):
            register(Backend(Stage.EXPERTS, "inline", lambda ctx: torch.nn.Identity(), "inline"))

    registry = Registry.discover()
    assert not registry.add_plugin(Plugin(), "inline").error
    assert "inline" in registry.names(Stage.EXPERTS)
