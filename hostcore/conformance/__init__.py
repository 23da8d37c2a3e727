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

Classes (each documents its checks and the attributes a subclass may set):

- `SentinelContract`: verdict vs `hostcore.contract.sentinel_verdict`, safe choices hold, determinism.
- `PreprocessContract`: ``local_ids``/``expert_counts`` equal the host ``torch`` preprocess (safe mode),
  aligned layouts valid (`check_aligned_layout`), invalid ids skipped and counted.
- `ExpertsContract`: output equals `hostcore.backends.experts_torch.moe_reference` in float64 within
  ``rtol``; rows with no local slot exactly 0.
- `DispatchContract`: spawned ``ep_size`` ranks; received layout, each token once per owner rank,
  exact combine, dispatch twice without combine refused.

Common attributes: ``backend`` (required), ``options``, ``device`` (``"cpu"``), ``plugin`` (import path of a
plugin module to register on top of the installed ones, e.g. before it is pip-installed).
Reusable pieces: `check_aligned_layout`, `hostcore.conformance.layouts`, `hostcore.conformance.data`, and
hypothesis strategies in `hostcore.conformance.strategies`.
"""

from .checks import check_aligned_layout, check_expert_counts, relative_error
from .dispatch import DispatchContract
from .experts import ExpertsContract
from .layouts import KINDS, Layout, auto_sentinel, make_layout, random_layout, valid_sentinels
from .preprocess import PreprocessContract
from .sentinel import SentinelContract

__all__ = [
    "KINDS", "DispatchContract", "ExpertsContract", "Layout", "PreprocessContract", "SentinelContract",
    "auto_sentinel", "check_aligned_layout", "check_expert_counts", "make_layout", "random_layout",
    "relative_error", "valid_sentinels",
]
