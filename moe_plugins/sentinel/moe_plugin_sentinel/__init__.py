"""moe-plugin-sentinel: padding-sentinel strategies for hostcore (entry point ``sentinel``).

Registers the strategies of `moe_plugin_sentinel.strategies` for the sentinel
stage. Each is built by ``factory(ctx, allow_unsafe=False)``; pick one with
``sentinel=<name>`` in the backend config string, e.g. ``sentinel=auto`` or
``sentinel=negative(allow_unsafe=true)`` to reproduce vLLM PR #42034.
"""

from __future__ import annotations

from collections.abc import Callable

from hostcore import Backend, BuildContext, Option, Stage, hookimpl
from hostcore.hookspecs import Register

from .strategies import STRATEGIES, Auto, GuardSlot, Negative, NonLocal, OutOfRange, SentinelBase

hostcore_api_version = 1

__all__ = ["STRATEGIES", "Auto", "GuardSlot", "Negative", "NonLocal", "OutOfRange", "SentinelBase",
           "hostcore_register_sentinel"]

OPTIONS = {
    "allow_unsafe": Option(bool, False, "return the sentinel even when it breaks the contract, "
                                        "to reproduce the padding bug on purpose"),
}

SUMMARIES = {
    "negative": "-1, the legacy sentinel: never valid, for reproducing vLLM PR #42034 only",
    "out_of_range": "global_num_experts: valid without an expert map; past the end of a map",
    "non_local": "the first expert_map entry equal to -1 (vLLM's fix); needs a non-local expert",
    "guard_slot": "global_num_experts with the map extended by one -1 entry: valid on every layout",
    "auto": "non_local if the map has a non-local expert, else guard_slot; out_of_range without a map",
}


def factory_of(cls: type[SentinelBase]) -> Callable[..., SentinelBase]:
    """The ``factory(ctx, allow_unsafe=False)`` the registry calls for strategy class ``cls``."""

    def build(ctx: BuildContext, allow_unsafe: bool = False) -> SentinelBase:
        return cls(allow_unsafe=allow_unsafe)

    build.__name__ = f"build_{cls.name}"
    build.__doc__ = f"Build the {cls.name!r} sentinel strategy; the build context is not needed."
    return build


@hookimpl
def hostcore_register_sentinel(register: Register) -> None:
    for name, cls in STRATEGIES.items():
        register(Backend(Stage.SENTINEL, name, factory_of(cls), SUMMARIES[name], OPTIONS))
