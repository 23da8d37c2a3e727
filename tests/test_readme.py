"""The README's Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_layer_example_runs_and_matches_the_dense_reference() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (example,) = [b for b in blocks if "EPMoELayer(" in b]
    scope: dict = {}
    exec(compile(example, str(README), "exec"), scope)
    from hostcore.workload import dense_reference

    out, router, shape = scope["out"], scope["router"], scope["shape"]
    assert out.shape == (16, 256)
    ref = dense_reference(router, shape, seed=0, compute_dtype=torch.float64)
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-6
