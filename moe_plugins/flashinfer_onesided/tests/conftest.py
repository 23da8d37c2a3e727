"""Make the helpers (``fi_testlib``) and the plugin importable without installing anything.

The repository runs pytest with ``--import-mode=importlib``, which does not put
test directories on ``sys.path``; the rank processes of ``run_ranks`` also need
these paths (spawn copies the parent's ``sys.path``).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for path in (HERE, HERE.parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
