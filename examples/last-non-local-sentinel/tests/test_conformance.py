"""The README's example plugin, checked by the host's conformance kit exactly as the README shows."""

from hostcore.conformance import SentinelContract


class TestLastNonLocal(SentinelContract):
    backend = "last_non_local"
