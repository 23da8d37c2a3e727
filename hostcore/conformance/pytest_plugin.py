"""pytest plugin of the conformance kit (loaded through the ``pytest11`` entry point ``hostcore_conformance``).

Provides, in every pytest session once hostcore is installed:

``--hostcore-seed N``
    seed of the kit's random cases (default: ``$HOSTCORE_SEED`` or 0); failures
    print it so a case can be rerun.
``hostcore_seed`` fixture
    that seed (session scope).
``hostcore_registry`` fixture
    ``Registry.discover()`` of the installed plugins (session scope; honours
    ``$HOSTCORE_PLUGINS``). Override it in a test module to test backends
    registered by hand.
parametrization of the contract classes
    a test argument ``hostcore_dtype``, ``hostcore_shape`` or ``hostcore_ep_size``
    is parametrized from the class's ``dtypes``, ``shapes`` or ``ep_sizes``.

Disable with ``-p no:hostcore_conformance``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # plugin discovery runs only when a test asks for the registry
    from ..registry import Registry

SEED_ENV = "HOSTCORE_SEED"

_PARAMETRIZED = {
    "hostcore_dtype": ("dtypes", lambda d: str(d).replace("torch.", "")),
    "hostcore_shape": ("shapes", lambda s: "H{}-I{}-g{}".format(*s)),
    "hostcore_ep_size": ("ep_sizes", lambda e: f"ep{e}"),
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hostcore", "hostcore conformance kit")
    group.addoption("--hostcore-seed", type=int, default=None, metavar="N",
                    help=f"seed of the conformance kit's random cases (default ${SEED_ENV} or 0)")


def _seed(config: pytest.Config) -> int:
    value = config.getoption("hostcore_seed", default=None)
    if value is not None:
        return int(value)
    env = os.environ.get(SEED_ENV, "").strip()
    if not env:
        return 0
    try:
        return int(env)
    except ValueError:
        raise pytest.UsageError(f"${SEED_ENV}={env!r} is not an integer; set it to a seed such as 0, or unset it") from None


def pytest_report_header(config: pytest.Config) -> str:
    return f"hostcore conformance seed: {_seed(config)} (--hostcore-seed)"


@pytest.fixture(scope="session")
def hostcore_seed(pytestconfig: pytest.Config) -> int:
    return _seed(pytestconfig)


@pytest.fixture(scope="session")
def hostcore_registry() -> Registry:
    from ..registry import Registry

    return Registry.discover()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    cls = metafunc.cls
    for argname, (attribute, ident) in _PARAMETRIZED.items():
        if argname not in metafunc.fixturenames:
            continue
        values = list(getattr(cls, attribute, ()) if cls is not None else ())
        if not values:
            raise pytest.UsageError(f"{metafunc.function.__qualname__} takes {argname}, parametrized from the class "
                                    f"attribute `{attribute}`, which is missing or empty")
        metafunc.parametrize(argname, values, ids=[ident(v) for v in values])

