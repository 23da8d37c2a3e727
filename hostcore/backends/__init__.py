"""The host's own reference backends, registered through the entry point ``hostcore`` like any plugin.

All are plain torch and run on the CPU and on GPUs:

========== ============= ==================================================
stage      name          what
========== ============= ==================================================
prepare    passthrough   no quantization; neutralises router-invalid slots
dispatch   local         ep_size 1, no collectives
dispatch   torch_a2a     padded one-sided layout over torch.distributed
preprocess torch         map lookup, counts, aligned layout; safe/checked/faithful
experts    torch         W4A16 GPTQ reference (dequantize + fp32/fp64 matmul)
========== ============= ==================================================
"""

from __future__ import annotations

from ..contract import Stage
from ..hookspecs import Backend, Option, Register, hookimpl
from .dispatch_torch import LocalDispatch, TorchAllToAllDispatch
from .experts_torch import COMPUTE_DTYPES, TorchExperts
from .prepare import PassthroughPrepare
from .preprocess_torch import MODES, TorchPreprocess

hostcore_api_version = 1


@hookimpl
def hostcore_register_prepare(register: Register) -> None:
    register(Backend(Stage.PREPARE, "passthrough", PassthroughPrepare,
                     "no quantization; router-invalid slots get weight 0 and a target that adds no traffic"))


@hookimpl
def hostcore_register_dispatch(register: Register) -> None:
    register(Backend(Stage.DISPATCH, "local", LocalDispatch, "one rank (ep_size 1): pad to R, no collectives"))
    register(Backend(Stage.DISPATCH, "torch_a2a", TorchAllToAllDispatch,
                     "padded rank-major layout over torch.distributed all_to_all (gloo, NCCL)"))


@hookimpl
def hostcore_register_preprocess(register: Register) -> None:
    register(Backend(Stage.PREPROCESS, "torch", TorchPreprocess,
                     "global -> local ids through the expert map, counts, aligned block layout",
                     {"mode": Option(str, "safe", "safe: skip and count bad ids; checked: raise; "
                                                  "faithful: unchecked lookup, reproduces the bug", MODES)}))


@hookimpl
def hostcore_register_experts(register: Register) -> None:
    register(Backend(Stage.EXPERTS, "torch", TorchExperts,
                     "W4A16 GPTQ int4 reference (dequantize, matmul in compute_dtype)",
                     {"compute_dtype": Option(str, "float32", "accumulation dtype", tuple(COMPUTE_DTYPES))}))
