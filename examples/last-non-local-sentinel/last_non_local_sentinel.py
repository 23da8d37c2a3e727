"""An example third-party sentinel strategy: the last global id whose expert-map entry is -1."""

from __future__ import annotations

from hostcore import Backend, BuildContext, Option, Stage, Verdict, hookimpl, sentinel_verdict
from hostcore.errors import UnsafeSentinelError
from hostcore.placement import LocalExperts

hostcore_api_version = 1


class LastNonLocal:
    name = "last_non_local"

    def __init__(self, ctx: BuildContext, allow_unsafe: bool = False) -> None:
        self.allow_unsafe = allow_unsafe

    def _sentinel(self, local: LocalExperts) -> int:
        if local.expert_map is None:
            return local.global_num_experts  # no map: any id >= E is skipped by a bound check
        non_local = (local.expert_map[: local.global_num_experts] == -1).nonzero()
        return int(non_local[-1]) if non_local.numel() else -1

    def verdict(self, local: LocalExperts) -> Verdict:
        return sentinel_verdict(self._sentinel(local), local.global_num_experts, local.expert_map)

    def choose(self, local: LocalExperts) -> tuple[int, LocalExperts]:
        verdict = self.verdict(local)
        if not verdict and not self.allow_unsafe:
            raise UnsafeSentinelError(f"last_non_local: {verdict.reason}; use sentinel=auto on this layout")
        return self._sentinel(local), local


@hookimpl
def hostcore_register_sentinel(register):
    register(Backend(Stage.SENTINEL, "last_non_local", LastNonLocal, "the last expert_map entry equal to -1",
                     {"allow_unsafe": Option(bool, False, "return it even when it breaks the contract")}))
