"""The five strategies pass the host's conformance kit (negative/out_of_range only with allow_unsafe:
the kit checks their verdicts agree with the contract, and a safe build refuses what breaks it)."""

from __future__ import annotations

from hostcore.conformance import SentinelContract


class TestAuto(SentinelContract):
    backend = "auto"


class TestGuardSlot(SentinelContract):
    backend = "guard_slot"


class TestNonLocal(SentinelContract):
    backend = "non_local"


class TestNonLocalUnsafe(SentinelContract):
    backend = "non_local"
    options = {"allow_unsafe": True}


class TestOutOfRange(SentinelContract):
    backend = "out_of_range"


class TestOutOfRangeUnsafe(SentinelContract):
    backend = "out_of_range"
    options = {"allow_unsafe": True}


class TestNegative(SentinelContract):
    backend = "negative"


class TestNegativeUnsafe(SentinelContract):
    backend = "negative"
    options = {"allow_unsafe": True}
