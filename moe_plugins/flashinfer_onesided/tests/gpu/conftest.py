"""GPU suite of flashinfer_onesided: run under ``torchrun --nproc-per-node N -m pytest <this dir>``.

Outside torchrun, or with fewer than 2 GPUs, every test here is skipped (the
CPU suite stays green). Under torchrun, one process group (``cpu:gloo,
cuda:nccl``) serves the whole session, each rank on GPU ``LOCAL_RANK``.

Collectives and hangs: every rank runs the same tests in the same order, and
the tests never assert between two collectives (a rank that stopped early
would leave the others waiting inside FlashInfer's kernels); they collect
problems and `Ranks.verdict` gathers them from every rank before failing all
ranks together. With ``FI_GPU_RESULTS=<dir>`` each rank writes
``gpu-tests-ep<N>-rank<r>.json`` (outcome per test) there.
"""

from __future__ import annotations

import datetime
import json
import os
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Never NVLink multicast (NVLS) in this project: set before torch.distributed or FlashInfer start.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import pytest
import torch

HERE = Path(__file__).resolve().parent


DRY_RUN = os.environ.get("FI_GPU_DRY_RUN") == "1"


def _skip_reason() -> str | None:
    world = int(os.environ.get("WORLD_SIZE", "0"))
    if world < 2:
        return "GPU suite: run under torchrun --nproc-per-node N (N >= 2)"
    if DRY_RUN:
        return None
    if not torch.cuda.is_available():
        return "GPU suite: no CUDA device"
    if torch.cuda.device_count() < int(os.environ.get("LOCAL_WORLD_SIZE", world)):
        return f"GPU suite: {torch.cuda.device_count()} GPUs for {world} local ranks"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _skip_reason()
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            item.add_marker(pytest.mark.multigpu)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@dataclass
class Ranks:
    """This process's place in the EP group (the default process group) and the problem collector."""

    rank: int
    world: int
    device: torch.device
    problems: list[str] = field(default_factory=list)

    def expect(self, ok: bool, what: str) -> bool:
        if not ok:
            self.problems.append(what)
        return ok

    def attempt(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a local (non-collective) check; an exception becomes a problem instead of stopping this rank."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            self.problems.append(f"{what}: {type(exc).__name__}: {exc}")
            return None

    def verdict(self) -> None:
        """Gather every rank's problems; fail all ranks together if any rank has one."""
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, self.problems)
        self.problems = []
        lines = [f"rank {r}: {p}" for r, ps in enumerate(gathered) for p in ps]
        if lines:
            pytest.fail("\n".join(lines[:40]) + (f"\n... {len(lines) - 40} more" if len(lines) > 40 else ""),
                        pytrace=False)


@pytest.fixture(scope="session")
def ranks() -> Iterator[Ranks]:
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if DRY_RUN:
        import fi_testlib
        from moe_plugin_flashinfer_onesided import dispatch

        fi_testlib.use_fake_flashinfer()
        dispatch._require_cuda = lambda device: torch.device(device)  # the fake runs on CPU tensors
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
        device = torch.device("cpu")
    else:
        torch.cuda.set_device(local)
        dist.init_process_group("cpu:gloo,cuda:nccl", timeout=datetime.timedelta(seconds=300))
        device = torch.device("cuda", local)
    yield Ranks(dist.get_rank(), dist.get_world_size(), device)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture
def cuda_only(ranks: Ranks) -> None:
    if ranks.device.type != "cuda":
        pytest.skip("needs CUDA (dry run on CPU)")


_RESULTS: list[dict[str, Any]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "test_gpu_" not in report.nodeid.split("::", 1)[0]:
        return
    if report.when == "call" or report.outcome != "passed":
        text = "" if report.passed else (report.longreprtext or "")[-2000:]
        _RESULTS.append({"test": report.nodeid.split("::", 1)[-1], "when": report.when, "outcome": report.outcome,
                         "seconds": round(report.duration, 3), "detail": text,
                         **({"measured": dict(report.user_properties)} if report.user_properties else {})})


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    out = os.environ.get("FI_GPU_RESULTS")
    if not out or "WORLD_SIZE" not in os.environ:
        return
    try:
        path = Path(out) / f"gpu-tests-ep{os.environ['WORLD_SIZE']}-rank{os.environ.get('RANK', '0')}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        summary = {"exitstatus": int(exitstatus), "time": time.strftime("%Y-%m-%d %H:%M:%S"), "dry_run": DRY_RUN,
                   "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                   "results": _RESULTS}
        path.write_text(json.dumps(summary, indent=1))
    except Exception:
        traceback.print_exc()
