"""The ``hostcore`` command line: ``hostcore plugins``, ``hostcore run`` and ``hostcore warmup``."""
