"""Launch plan (see ``compile_worker``): the float32 ``linear_perturb`` forward GEMM recorded with torch's
TF32 switch (``torch.backends.cuda.matmul.allow_tf32``) on and off, at a small shape (the switch, not
the shape, decides the instructions). The budget test compiles both for sm_90a and checks that the
first runs on TF32 tensor cores and the second on FP32 CUDA cores (IEEE fp32, as torch.matmul).
"""

from __future__ import annotations

INSPECT = True
SIZES = dict(M=256, IN=256, OUT=256, K=10)


def variant(allow_tf32: bool) -> str:
    return f"linear_perturb fwd float32 allow_tf32={allow_tf32}"


def _forward(allow_tf32: bool) -> None:
    import torch

    from lpa_kernels.linear_perturb import triton_kernels as linear

    s = SIZES
    x, w, b = torch.empty(s["M"], s["IN"]), torch.empty(s["OUT"], s["IN"]), torch.empty(s["OUT"])
    labels, delta = torch.randint(0, s["K"], (s["M"],)), torch.empty(s["K"], s["OUT"])
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    try:
        linear.linear_perturb_forward(x, w, b, labels, 1, delta, "relu", "add", True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def record(recorder) -> None:
    for allow_tf32 in (True, False):
        recorder.call(variant(allow_tf32), _forward, allow_tf32)


def configs_to_compile(arch, archs, launch):
    return launch.configs or [None]  # the autotuner may pick any of them
