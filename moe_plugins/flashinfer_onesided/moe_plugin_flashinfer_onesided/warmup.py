"""Explicit warm-up of FlashInfer's first-use JIT build, with visible progress.

FlashInfer compiles its all-to-all kernels with nvcc the first time they are
used (measured 127-181 s on fresh H100/H200 hosts) into its cache
(``~/.cache/flashinfer``, or under ``$FLASHINFER_WORKSPACE_BASE``) and reuses
the built module afterwards, as long as the flashinfer sources sit at the same
path. Without a warm-up that build happens silently inside the first layer
build, on every rank at once, and looks like a hang. `warm_up` runs it ahead
(once per host, no GPU collectives, no torch.distributed) and reports:

* which module and where it lives, and whether a built copy was found;
* a heartbeat line every ``heartbeat_s`` seconds while nvcc runs, plus ninja's
  own command lines when the build is cold;
* the time it took.

The layer build calls `ensure_built` too, which says nothing when the module
is already built and prints the same progress otherwise.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import _flashinfer

EXPECTED_COLD_BUILD_S = "2-3 minutes (127-181 s measured on H100/H200 hosts)"


def _stderr(line: str) -> None:
    print(f"[flashinfer_onesided] {line}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class WarmUpReport:
    """What `warm_up` did."""

    flashinfer_version: str
    module: str
    library: str
    was_built: bool  # an artifact existed before (ninja then only checks it is up to date)
    seconds: float


def warm_up(*, log: Callable[[str], None] = _stderr, heartbeat_s: float = 10.0) -> WarmUpReport:
    """Build (or find) FlashInfer's NVLink one-sided all-to-all module and load it; return a `WarmUpReport`.

    Safe to run concurrently from several processes (FlashInfer's file lock
    serialises the build; the others then find it built). Raises
    `hostcore.errors.BackendUnavailableError` when FlashInfer is missing or too
    old, and FlashInfer's ``RuntimeError`` (with nvcc's output) when the build
    fails. Needs nvcc and ninja only when nothing is built yet.
    """
    start = time.monotonic()
    version = _flashinfer.installed_version() or "?"
    module = _flashinfer.alltoall_jit_module()
    was_built = module.built
    log(f"flashinfer {version}: all-to-all kernels '{module.name}' at {module.library}")
    if was_built:
        log("found a built module; checking it is up to date")
    else:
        log(f"not built yet: compiling with nvcc, takes {EXPECTED_COLD_BUILD_S}; later runs reuse it")
    with _heartbeat(log, heartbeat_s, "compiling" if not was_built else "checking"):
        module.build(verbose=not was_built)
        _flashinfer.load_alltoall_module()
    seconds = time.monotonic() - start
    log(f"ready in {seconds:.1f} s: {module.library}")
    return WarmUpReport(version, module.name, str(module.library), was_built, seconds)


def ensure_built(log: Callable[[str], None] = _stderr, heartbeat_s: float = 10.0) -> None:
    """Quiet when the module is already built; otherwise `warm_up` with its progress lines."""
    module = _flashinfer.alltoall_jit_module()
    if module.built:
        return
    log("FlashInfer's all-to-all kernels are not built yet (run the flashinfer_onesided warm-up ahead to "
        "avoid this wait at layer build)")
    warm_up(log=log, heartbeat_s=heartbeat_s)


class _heartbeat:
    """Context manager printing ``"<what>... N s"`` every ``every`` seconds from a daemon thread."""

    def __init__(self, log: Callable[[str], None], every: float, what: str) -> None:
        self.log, self.every, self.what = log, every, what
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.wait(self.every):
            self.log(f"  {self.what}... {time.monotonic() - start:.0f} s")

    def __enter__(self) -> _heartbeat:
        if self.every > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
