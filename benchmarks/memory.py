"""Memory of a training-shaped ``linear_perturb`` forward + backward vs the eager chain.

Two measurements per implementation:
- ``saved_bytes`` (any device): the bytes autograd keeps between forward and backward beyond the
  inputs themselves, read with ``torch.autograd.graph.saved_tensors_hooks`` (each storage once);
- ``peak_bytes`` (GPU only, None on the CPU): ``torch.cuda.max_memory_allocated`` during forward +
  backward, above what the inputs and the output gradient already hold.
SPEC target: the fused op needs no more than the eager chain.
"""

from __future__ import annotations

from typing import Iterator

import torch

from lpa_bench.ops import LINEAR_PERTURB
from lpa_bench.report import FAST, all_met, dtype_name, new_row
from lpa_bench.runner import Budget, attempt

MEMORY_IMPLS = FAST + ("reference", "eager", "compile")
VARIANT = {"activation": "relu", "mode": "add"}
SHAPES = {
    "quick": [dict(B=64, IN=32, OUT=48, K=10)],
    "cpu": [dict(B=1024, IN=512, OUT=1024, K=100)],
    "gpu": [dict(B=1024, IN=2048, OUT=2048, K=100), dict(B=8192, IN=4096, OUT=11008, K=1000)],
}


def _saved_bytes(forward, inputs: list) -> tuple[int, torch.Tensor]:
    input_storages = {t.untyped_storage().data_ptr() for t in inputs}
    saved: dict = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in input_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return sum(saved.values()), out


def _measure(impl, inputs, device):
    forward = LINEAR_PERTURB.call(impl, inputs, VARIANT)
    wrt = [inputs[name] for name in LINEAR_PERTURB.diff]
    tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
    with torch.no_grad():
        grad_out = torch.randn_like(forward())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    saved, out = _saved_bytes(forward, tensors)
    grads = torch.autograd.grad(out, wrt, grad_out)
    del out, grads
    if device.type != "cuda":
        return saved, None
    torch.cuda.synchronize(device)
    return saved, torch.cuda.max_memory_allocated(device) - base


def memory_rows(tier: str, dtypes, impls, device: torch.device, budget: Budget) -> Iterator[dict]:
    """Per shape and dtype, the rows of every implementation (yielded together: each fast backend's target
    compares it with the eager chain's row)."""
    impls = [i for i in impls if i in MEMORY_IMPLS]
    for shape in SHAPES[tier]:
        for dtype in dtypes:
            inputs = LINEAR_PERTURB.make_inputs(shape, dtype, device)
            group = []
            for impl in impls:
                row = new_row(bench="memory", op="linear_perturb", **{"pass": "fwd+bwd"}, impl=impl, dtype=dtype_name(dtype),
                              shape=dict(shape), variant=dict(VARIANT),
                              notes=None if device.type == "cuda" else "peak_bytes needs a GPU (None on the CPU)")
                row["saved_bytes"], row["peak_bytes"] = attempt(row, budget, lambda: _measure(impl, inputs, device)) or (None, None)
                group.append(row)
            _targets(group)
            yield from group


def _targets(group: list) -> None:
    eager = next((r for r in group if r["impl"] == "eager"), None)
    for row in group:
        if row["impl"] not in FAST:
            continue
        row["target"] = "saved_bytes and peak_bytes <= the eager chain's"
        if eager is None:
            continue
        # a part not measured (peak_bytes on the CPU) leaves the target not measured, never met
        row["target_met"] = all_met([None if row[key] is None or eager[key] is None else row[key] <= eager[key]
                                  for key in ("saved_bytes", "peak_bytes")])
