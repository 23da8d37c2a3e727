"""The ``hostcore`` command line: ``hostcore plugins`` and ``hostcore run``."""
