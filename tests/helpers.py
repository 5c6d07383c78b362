"""Shared test tools: the tolerance rule, the kernel targets, random inputs.

Tolerance rule: a kernel's largest error against a float64 reference may be at most twice the error
PyTorch itself makes computing the same thing in the same dtype (``lowp``), and never needs to be
smaller than a floor relative to the result's magnitude. A fixed absolute tolerance would hide bugs in
large reductions, so none is used.
"""

from __future__ import annotations

import pytest
import torch

from lpa_kernels.backend import _old_interpreter_reason, interpreting

RELATIVE_FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# (backend, device) pairs that run kernels: the Triton interpreter on the CPU, and on a GPU machine
# both fast backends on the device. GPU-only targets carry the ``gpu`` mark.
KERNEL_TARGETS = [
    pytest.param(("triton", "cpu"), id="triton-interp", marks=pytest.mark.skipif(
        not interpreting() or bool(_old_interpreter_reason()),
        reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (set by conftest without a GPU) and triton>=3.9")),
    pytest.param(("triton", "cuda"), id="triton-gpu", marks=pytest.mark.gpu),
    pytest.param(("cuda", "cuda"), id="cuda-gpu", marks=pytest.mark.gpu),
]


def assert_close_to_reference(actual: torch.Tensor, reference64: torch.Tensor, lowp: torch.Tensor | None = None,
                              what: str = "result") -> None:
    """``actual`` equals the float64 ``reference64`` within the tolerance rule; NaN where and only where
    the reference has NaN (an unwritten, NaN-poisoned cell fails here)."""
    assert actual.shape == reference64.shape, f"{what}: shape {tuple(actual.shape)} != reference {tuple(reference64.shape)}"
    a, r = actual.detach().double().cpu(), reference64.detach().double().cpu()
    nan_a, nan_r = torch.isnan(a), torch.isnan(r)
    assert torch.equal(nan_a, nan_r), f"{what}: {int((nan_a != nan_r).sum())} cells differ in NaN-ness from the reference (unwritten output?)"
    if a.numel() == 0:
        return
    err = (a - r).abs().nan_to_num(0.0).max().item()
    scale = r.abs().nan_to_num(0.0).max().item()
    tol = RELATIVE_FLOOR[actual.dtype] * max(scale, 1e-30)
    if lowp is not None:
        tol = max(tol, 2 * (lowp.detach().double().cpu() - r).abs().nan_to_num(0.0).max().item())
    assert err <= tol, f"{what} ({actual.dtype}): max error {err:.3e} against the float64 reference exceeds tolerance {tol:.3e} (scale {scale:.3e})"


def make_labels(batch: int, num_classes: int, device="cpu", dtype=torch.int64) -> torch.Tensor:
    return torch.randint(0, num_classes, (batch,), device=device, dtype=dtype)
