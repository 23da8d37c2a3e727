"""Print, as JSON, the FlashInfer API surface the plugin relies on (run as a script with either FlashInfer on sys.path).

Used by ``test_fi_fake_fidelity.py`` to check the fake against a real install.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import sys

CALLABLES = [
    ("flashinfer.comm", "MoeAlltoAll.__init__"),
    ("flashinfer.comm", "MoeAlltoAll.dispatch"),
    ("flashinfer.comm", "MoeAlltoAll.combine"),
    ("flashinfer.comm", "MoeAlltoAll.get_combine_payload_tensor_in_workspace"),
    ("flashinfer.comm", "moe_a2a_get_workspace_size_per_rank"),
    ("flashinfer.comm", "Mapping.__init__"),
    ("flashinfer.comm.mnnvl", "TorchDistBackend.__init__"),
    ("flashinfer.comm.trtllm_moe_alltoall", "get_moe_alltoall_module"),
    ("flashinfer.comm.trtllm_moe_alltoall", "moe_a2a_wrap_payload_tensor_in_workspace"),
    ("flashinfer.utils", "device_support_pdl"),
    ("flashinfer.jit.comm", "gen_moe_alltoall_module"),
    ("flashinfer.moe_ep", "NVLinkOneSidedAlltoAll.__init__"),
    ("flashinfer.moe_ep", "NVLinkOneSidedAlltoAll.dispatch"),
    ("flashinfer.moe_ep", "NVLinkOneSidedAlltoAll.combine"),
    ("flashinfer.moe_ep", "NVLinkOneSidedAlltoAll.get_combine_input_buffer"),
]
OPS = ["moe_a2a_dispatch", "moe_a2a_sanitize_expert_ids", "moe_a2a_combine_into"]
"""Ops of ``get_moe_alltoall_module()`` (loads the JIT module: checked where it is built, i.e. on GPU hosts)."""
RECORDS = [
    ("flashinfer.comm.mnnvl", "MnnvlConfig"),
    ("flashinfer.moe_ep", "BootstrapConfig"),
    ("flashinfer.moe_ep", "MoEEpCommParams"),
    ("flashinfer.moe_ep", "NVLinkOneSidedConfig"),
]
ATTRIBUTES = [
    ("flashinfer.comm", "MoeAlltoAll._METAINFO_INDEX"),
    ("flashinfer.comm", "MoeAlltoAll._init_constants"),
    ("flashinfer.moe_ep", "NVLinkOneSidedAlltoAll.alltoall"),
    ("flashinfer.comm.mnnvl", "TorchDistBackend.allgather"),
    ("flashinfer.comm.mnnvl", "TorchDistBackend.Split"),
]


def _get(module: str, path: str):
    obj = importlib.import_module(module)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _params(fn) -> list[list[str]]:
    sig = inspect.signature(fn)
    return [[p.name, p.kind.name, "-" if p.default is inspect.Parameter.empty else repr(p.default)]
            for p in sig.parameters.values()]


def main() -> None:
    out: dict = {"file": importlib.import_module("flashinfer").__file__, "callables": {}, "records": {},
                 "attributes": {}}
    for module, path in CALLABLES:
        try:
            out["callables"][f"{module}:{path}"] = _params(_get(module, path))
        except Exception as exc:
            out["callables"][f"{module}:{path}"] = f"missing: {type(exc).__name__}: {exc}"
    try:
        from flashinfer.comm.trtllm_moe_alltoall import get_moe_alltoall_module

        ops = get_moe_alltoall_module()
    except Exception as exc:  # no built module on this machine: the ops cannot be listed
        ops = None
        missing = f"missing: {type(exc).__name__}: {exc}"
    for name in OPS:
        key = f"flashinfer.comm.trtllm_moe_alltoall:get_moe_alltoall_module().{name}"
        out["callables"][key] = _params(getattr(ops, name)) if ops is not None else missing
    for module, path in RECORDS:
        try:
            out["records"][f"{module}:{path}"] = [f.name for f in dataclasses.fields(_get(module, path))]
        except Exception as exc:
            out["records"][f"{module}:{path}"] = f"missing: {type(exc).__name__}: {exc}"
    for module, path in ATTRIBUTES:
        try:
            _get(module, path.rsplit(".", 1)[0])
            cls = _get(module, path.rsplit(".", 1)[0])
            out["attributes"][f"{module}:{path}"] = path.rsplit(".", 1)[1] in dir(cls)
        except Exception as exc:
            out["attributes"][f"{module}:{path}"] = f"missing: {type(exc).__name__}: {exc}"
    json.dump(out, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
