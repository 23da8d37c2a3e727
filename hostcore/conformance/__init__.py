"""Conformance kit: the host's contract tests, runnable by any plugin against its own backends.

Subclass the class for your stage in a test module and name your backend::

    from hostcore.conformance import SentinelContract

    class TestMySentinel(SentinelContract):
        backend = "my_sentinel"
        options = {}          # config options, as in the config string

The kit is a pytest plugin (entry point ``pytest11``), so its fixtures and the
``--hostcore-seed`` option are there in any test session once hostcore is
installed. Backends that cannot run on this machine (their ``availability()``
gives a reason) are skipped with that reason.
"""
