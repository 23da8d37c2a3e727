"""A third party uses the kit from an installed throwaway package.

The package is built and installed by pip (into a private ``--target`` folder,
so this environment is untouched) with its own ``hostcore.plugins`` entry point;
its tests subclass the contract classes in a few lines and run in a fresh
pytest process where the kit arrives through hostcore's ``pytest11`` entry point
and the backends through discovery (also in the dispatch test's spawned ranks).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

PYPROJECT = """
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "thirdparty-ep"
version = "0.3.0"
dependencies = ["hostcore"]

[project.entry-points."hostcore.plugins"]
thirdparty = "thirdparty_ep"
"""

PLUGIN = '''
"""A third-party plugin: a sentinel, a preprocess and a dispatch (the latter two reuse the host's)."""
from hostcore import Backend, Stage, Verdict, hookimpl, sentinel_verdict
from hostcore.backends.dispatch_torch import TorchAllToAllDispatch
from hostcore.backends.preprocess_torch import TorchPreprocess
from hostcore.errors import UnsafeSentinelError

hostcore_api_version = 1


class LastFree:
    """The last -1 entry of the map (E without a map); refuses when there is none."""
    name = "tp_last_free"

    def __init__(self, ctx):
        pass

    def _pick(self, local):
        if local.expert_map is None:
            return local.global_num_experts
        free = (local.expert_map[: local.global_num_experts] == -1).nonzero()
        return int(free[-1]) if free.numel() else None

    def verdict(self, local):
        s = self._pick(local)
        if s is None:
            return Verdict(False, "every expert is local: nothing to pick")
        return sentinel_verdict(s, local.global_num_experts, local.expert_map)

    def choose(self, local):
        v = self.verdict(local)
        if not v.ok:
            raise UnsafeSentinelError(f"tp_last_free: {v.reason}; use sentinel=auto")
        return self._pick(local), local


@hookimpl
def hostcore_register_sentinel(register):
    register(Backend(Stage.SENTINEL, "tp_last_free", LastFree, "last non-local id"))


@hookimpl
def hostcore_register_preprocess(register):
    register(Backend(Stage.PREPROCESS, "tp_preprocess", TorchPreprocess, "the host's, re-registered"))


@hookimpl
def hostcore_register_dispatch(register):
    register(Backend(Stage.DISPATCH, "tp_a2a", TorchAllToAllDispatch, "the host's, re-registered"))
'''

TESTS = '''
from hostcore.conformance import DispatchContract, PreprocessContract, SentinelContract


class TestLastFree(SentinelContract):
    backend = "tp_last_free"


class TestPreprocess(PreprocessContract):
    backend = "tp_preprocess"
    cases = 4


class TestDispatch(DispatchContract):
    backend = "tp_a2a"
    ep_sizes = (1,)  # the spawned rank finds tp_a2a through the installed entry point
'''


def test_an_installed_third_party_package_runs_the_kit(tmp_path: Path) -> None:
    src = tmp_path / "thirdparty-ep"
    (src / "thirdparty_ep").mkdir(parents=True)
    (src / "pyproject.toml").write_text(PYPROJECT)
    (src / "thirdparty_ep" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                              "--no-deps", "--no-build-isolation", "--target", str(site), str(src)],
                             capture_output=True, text=True, timeout=300, check=False)
    assert install.returncode == 0, install.stderr
    assert list(site.glob("thirdparty_ep-0.3.0.dist-info/entry_points.txt"))
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_thirdparty.py").write_text(TESTS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    env.pop("HOSTCORE_PLUGINS", None)
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--hostcore-seed", "3",
                          "test_thirdparty.py"], cwd=project, env=env, capture_output=True, text=True, timeout=300, check=False)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "hostcore conformance seed: 3" in out
    assert "14 passed" in out, out  # 5 sentinel + 5 preprocess + 4 dispatch tests
