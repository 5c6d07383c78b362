"""A small run of every CUDA C++ kernel, checked against the reference, for compute-sanitizer:

    compute-sanitizer --tool memcheck  python benchmarks/sanitize_cuda.py
    compute-sanitizer --tool racecheck python benchmarks/sanitize_cuda.py
    compute-sanitizer --tool initcheck python benchmarks/sanitize_cuda.py

Sizes are odd (no multiple of any block or vector width) and small, so a sanitizer run takes seconds.
Exits non-zero when a result differs from the float64 reference or the backend is unavailable.
"""

from __future__ import annotations

import os
import sys

import torch

from lpa_kernels import backend_info, class_grad, class_grad_pgd_step_, head_pgd_, linear_perturb, perturb, pgd_step_
from lpa_kernels.head_pgd import naive as head_naive
from lpa_kernels.linear_perturb import naive as linear_naive
from lpa_kernels.perturb import naive
from lpa_kernels.pgd import naive as pgd_naive

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 4e-2}
failures: list[str] = []


def check(what: str, actual: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> None:
    a, r = actual.detach().double().cpu(), reference.detach().double().cpu()
    error = (a - r).abs().max().item() if a.numel() else 0.0
    bound = TOLERANCE[dtype] * max(r.abs().max().item() if r.numel() else 0.0, 1.0)
    status = "ok" if error <= bound else "MISMATCH"
    print(f"{status:8s} {what:60s} max error {error:.2e} (bound {bound:.2e})")
    if status != "ok":
        failures.append(what)


def per_class(values, k, device):
    return [torch.full((k,), v, device=device, dtype=torch.float64) for v in values]


def run(dtype: torch.dtype, device: str = "cuda") -> None:
    name = str(dtype).removeprefix("torch.")
    labels = torch.randint(0, 3, (5,), device=device)
    h = torch.randn(5, 3, 3, 5, device=device).to(dtype)
    grad_out = torch.randn_like(h)
    for delta_shape in [(3, 3, 3, 5), (3, 3, 1, 1), (3, 5)]:
        for mode in ("add", "scale"):
            delta = (0.1 * torch.randn(delta_shape, device=device)).to(dtype).requires_grad_()
            hh = h.clone().requires_grad_()
            out = perturb(hh, labels, delta, mode, backend="cuda")
            grad_h, grad_delta = torch.autograd.grad(out, (hh, delta), grad_out)
            h64, d64 = h.double().requires_grad_(), delta.detach().double().requires_grad_()
            ref = naive.perturb(h64, labels, d64, mode)
            ref_h, ref_d = torch.autograd.grad(ref, (h64, d64), grad_out.double())
            tag = f"perturb {name} {mode} delta{delta_shape}"
            check(tag + " forward", out, ref, dtype)
            check(tag + " grad_h", grad_h, ref_h, dtype)
            check(tag + " grad_delta", grad_delta, ref_d, dtype)
            cg = class_grad(grad_out, labels, 3, delta_shape, h=h, mode=mode, backend="cuda")
            check(f"class_grad {name} {mode} delta{delta_shape}", cg,
                  naive.class_grad(grad_out.double(), labels, 3, delta_shape, h=h.double(), mode=mode), dtype)
            for norm in ("linf", "l2"):
                d = (0.1 * torch.randn(delta_shape, device=device)).to(dtype)
                ref_d = pgd_naive.class_grad_pgd_step_(d.double(), grad_out.double(), labels, *per_class((0.05, 0.3, 1.0), 3, device),
                                                       norm, h=h.double(), mode=mode)
                class_grad_pgd_step_(d, grad_out, labels, 0.05, 0.3, 1.0, norm, h=h, mode=mode, backend="cuda")
                check(f"class_grad_pgd_step_ {name} {mode} {norm} delta{delta_shape}", d, ref_d, dtype)
    for norm in ("linf", "l2"):
        d, g = (0.1 * torch.randn(3, 7, device=device)).to(dtype), torch.randn(3, 7, device=device).to(dtype)
        g[1] = 0  # an absent class keeps its delta
        ref_d = pgd_naive.pgd_step_(d.double(), g.double(), *per_class((0.05, 0.3, -1.0), 3, device), norm)
        pgd_step_(d, g, 0.05, 0.3, -1.0, norm, backend="cuda")
        check(f"pgd_step_ {name} {norm}", d, ref_d, dtype)
    for activation in ("none", "relu", "gelu", "gelu_tanh", "silu"):
        for mode in ("add", "scale"):
            x = torch.randn(3, 5, 19, device=device).to(dtype).requires_grad_()
            w = (torch.randn(21, 19, device=device) / 19**0.5).to(dtype).requires_grad_()
            b = torch.randn(21, device=device).to(dtype).requires_grad_()
            delta = (0.1 * torch.randn(3, 21, device=device)).to(dtype).requires_grad_()
            lab = labels[:3]
            out = linear_perturb(x, w, b, lab, delta, activation, mode, backend="cuda")
            g = torch.randn_like(out)
            grads = torch.autograd.grad(out, (x, w, b, delta), g)
            inputs = [t.detach().double().requires_grad_() for t in (x, w, b, delta)]
            ref = linear_naive.linear_perturb(inputs[0], inputs[1], inputs[2], lab, inputs[3], activation, mode)
            ref_grads = torch.autograd.grad(ref, inputs, g.double())
            tag = f"linear_perturb {name} {activation} {mode}"
            check(tag + " forward", out, ref, dtype)
            for what, a, r in zip(("x", "weight", "bias", "delta"), grads, ref_grads):
                check(f"{tag} grad_{what}", a, r, dtype)


def run_linear_cutlass(dtype: torch.dtype, gemm: str, device: str = "cuda") -> None:
    """A CUTLASS GEMM (LPA_CUDA_LINEAR_GEMM=gemm: "cutlass" is the sm_90a kernel on sm_90, "cutlass_sm80"
    the multistage one): M = 15, in = 24 (16-byte loadable rows, every tile ragged), N = 21 (one-element
    stores) and 22 (paired stores), with the preact store."""
    name = str(dtype).removeprefix("torch.")
    labels = torch.randint(0, 3, (3,), device=device)
    x = torch.randn(3, 5, 24, device=device).to(dtype).requires_grad_()  # a grad is wanted: preact is stored
    os.environ["LPA_CUDA_LINEAR_GEMM"] = gemm
    try:
        for n in (21, 22):
            w = (torch.randn(n, 24, device=device) / 24**0.5).to(dtype)
            b = torch.randn(n, device=device).to(dtype)
            delta = (0.1 * torch.randn(3, n, device=device)).to(dtype)
            for activation in ("none", "relu", "gelu", "gelu_tanh", "silu"):
                for mode in ("add", "scale"):
                    out = linear_perturb(x, w, b, labels, delta, activation, mode, backend="cuda")
                    ref = linear_naive.linear_perturb(x.double(), w.double(), b.double(), labels, delta.double(),
                                                      activation, mode)
                    check(f"linear_perturb {gemm} {name} N={n} {activation} {mode} forward", out, ref, dtype)
    finally:
        del os.environ["LPA_CUDA_LINEAR_GEMM"]


def run_head_pgd(dtype: torch.dtype, device: str = "cuda") -> None:
    """11 classes (a full chunk of 8 and a ragged one), 13 samples, 37 features; class 10 absent."""
    name = str(dtype).removeprefix("torch.")
    labels = torch.randint(0, 10, (13,), device=device)
    h = torch.randn(13, 37, device=device).to(dtype)
    w = (torch.randn(11, 37, device=device) / 37**0.5).to(dtype)
    b = torch.randn(11, device=device).to(dtype)
    for mode in ("add", "scale"):
        for norm in ("linf", "l2"):
            d = (0.05 * torch.randn(11, 37, device=device)).to(dtype)
            ref_d = head_naive.head_pgd_(h.double(), labels, w.double(), b.double(), d.double(), 2,
                                         *per_class((0.1, 0.3), 11, device), "confidence", norm, mode)
            head_pgd_(h, labels, w, b, d, 2, 0.1, 0.3, "confidence", norm, mode, backend="cuda")
            check(f"head_pgd_ {name} {mode} {norm}", d, ref_d, dtype)


def cutlass_gemms() -> list[str]:
    """The LPA_CUDA_LINEAR_GEMM values whose CUTLASS kernel is built and runs on this GPU."""
    built = backend_info()["cuda_linear_gemm"]
    capability = torch.cuda.get_device_capability()
    gemms = ["cutlass"] if built["cutlass_sm90"]["built"] and capability == (9, 0) else []
    if built["cutlass_sm80"]["built"] and (capability[0] == 8 or capability == (9, 0)):
        gemms.append("cutlass_sm80")
    return gemms


def main() -> int:
    info = backend_info()["cuda"]
    if not info["available"]:
        print(f"the CUDA backend is not available: {info['reason']}")
        return 2
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        run(dtype)
        run_head_pgd(dtype)
        if dtype != torch.float32:
            for gemm in cutlass_gemms():
                run_linear_cutlass(dtype, gemm)
    torch.cuda.synchronize()
    print(f"{len(failures)} mismatches" + (": " + ", ".join(failures) if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
