"""The installed ``hostcore`` command, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def hostcore(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "hostcore.cli.main", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_plugins_lists_every_stage_with_its_distribution() -> None:
    result = hostcore("plugins")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:5] == ["stage", "backend", "distribution", "version", "runs"]
    rows = {tuple(line.split()[:3]) for line in lines[2:]}
    assert ("dispatch", "torch_a2a", "(default)") in rows
    assert any(r[0] == "sentinel" and r[1] == "auto" for r in rows)
    assert "hostcore" in result.stdout and "moe-plugin-sentinel" in result.stdout


def test_run_sentinels_all_shows_the_bug_and_the_fix(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    result = hostcore("run", "--ranks", "4", "--sentinels", "all", "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["sentinel"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"negative", "out_of_range", "non_local", "guard_slot", "auto"}
    assert rows["negative"]["misrouted_rows"] > 0 and not rows["negative"]["ok"]
    assert not rows["out_of_range"]["ok"] and "past the end" in rows["out_of_range"]["errors"][0]
    for name in ("non_local", "guard_slot", "auto"):
        assert rows[name]["ok"] and rows[name]["misrouted_rows"] == 0 and rows[name]["rel_err"] < 1e-5
    assert "summary" in result.stdout and "local e1" in result.stdout


def test_run_refuses_an_unsafe_sentinel_and_names_unknown_backends() -> None:
    refused = hostcore("run", "--ranks", "2", "--backends", "sentinel=negative")
    assert refused.returncode == 1
    assert "refused at build" in refused.stdout and "allow_unsafe" in refused.stdout
    assert "Traceback" not in refused.stderr
    unknown = hostcore("run", "--backends", "dispatch=torch_a2")
    assert unknown.returncode == 2 and "Did you mean 'torch_a2a'?" in unknown.stderr


def test_env_var_picks_backends() -> None:
    result = hostcore("run", "--ranks", "1", "--tokens", "3", env_extra={"HOSTCORE_BACKENDS": "dispatch=local"})
    assert result.returncode == 0, result.stderr
    assert "dispatch=local" in result.stdout


def test_warmup_runs_each_backend_that_has_one(install_plugin, capsys) -> None:
    from hostcore.cli.main import main

    install_plugin("slow-moe", "slow_moe", """
from hostcore import Backend, Stage, hookimpl
hostcore_api_version = 1

def build_kernels():
    import sys
    print("compiling 1/1", file=sys.stderr)
    return "2 kernels compiled"

def explode():
    raise RuntimeError("nvcc not found")

@hookimpl
def hostcore_register_experts(register):
    register(Backend(Stage.EXPERTS, "slow", object, "needs a build", warm_up=build_kernels))
    register(Backend(Stage.EXPERTS, "broken", object, "build fails", warm_up=explode))
    register(Backend(Stage.EXPERTS, "gpu_only", object, "no GPU here", warm_up=build_kernels,
                     availability=lambda: "needs a CUDA GPU"))
""")
    assert main(["warmup", "--backends", "experts=slow"]) == 0
    out = capsys.readouterr()
    assert "done   experts=slow (slow-moe)" in out.out and "2 kernels compiled" in out.out
    assert "compiling 1/1" in out.err
    assert main(["warmup"]) == 1
    out = capsys.readouterr()
    assert "FAILED experts=broken" in out.err and "nvcc not found" in out.err
    assert "skip   experts=gpu_only (slow-moe): cannot run here: needs a CUDA GPU" in out.out
    assert main(["warmup", "--backends", "dispatch=torch_a2a"]) == 2
    assert "has no warm-up step" in capsys.readouterr().err


def test_run_refuses_a_layout_it_cannot_build_before_spawning() -> None:
    result = hostcore("run", "--ranks", "3", "--placement", "round_robin", "--no-expert-map")
    assert result.returncode == 2
    assert "needs a contiguous placement" in result.stderr and "Traceback" not in result.stderr
