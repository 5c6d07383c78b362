"""The shape set of ``lpa-bench static`` (issue 10), and the launch plan that records its launches.

Each case is one op call at a realistic size; its ``id`` is the variant name the compiled kernels and
the roofline rows carry. Inputs are ``torch.empty`` (nothing is computed: the recorder stands in for
the launches), so even the 32000-class head costs only address space. Public ops are called with
``backend="triton"`` (the recorder lets CPU tensors through), except the ``linear_perturb`` backward
epilogue, whose launcher is called directly (the op's backward would also run two GEMMs on the CPU).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

INSPECT = True  # resource usage and PTX/SASS facts for every kernel
SETUP = "setup"  # the variant of launches that only prepare a case (e.g. the forward before a backward)


def without_tma(case_id: str) -> str:
    """The variant of a ``linear_perturb`` forward case's launches on a GPU without TMA (sm_80)."""
    return f"{case_id} without TMA"


@dataclass(frozen=True)
class Case:
    id: str
    op: str
    pass_: str  # "fwd" or "bwd" (for in-place ops: the call)
    dtype: str
    sizes: dict = field(hash=False)
    layout: str = ""  # perturb: "channel" (delta (K, C, 1, 1)) or "last_dim" (delta (K, D))
    variant: dict = field(default_factory=dict, hash=False)


def _cases() -> list[Case]:
    cases = []
    for dtype in ("float32", "bfloat16"):
        for layout, sizes in (("channel", dict(B=256, C=512, H=14, W=14, K=100)),
                              ("last_dim", dict(B=4096, D=4096, K=1000))):
            for pass_ in ("fwd", "bwd"):
                cases.append(Case(f"perturb {pass_} {layout} {dtype}", "perturb", pass_, dtype, sizes, layout,
                                  {"mode": "add"}))
    for dtype in ("bfloat16", "float16"):
        cases.append(Case(f"linear_perturb fwd {dtype}", "linear_perturb", "fwd", dtype,
                          dict(B=8192, IN=4096, OUT=4096, K=1000), variant={"activation": "relu", "mode": "add"}))
    cases.append(Case("linear_perturb bwd bfloat16", "linear_perturb", "bwd", "bfloat16",
                      dict(B=8192, IN=4096, OUT=4096, K=1000), variant={"activation": "relu", "mode": "add"}))
    # the form a GPU takes (head_pgd/cost.py): class space at (128, 640, 100) (its one-launch fused steps)
    # and (1024, 2048, 1000) (its fused softmax + per-class sum, the update writing the 16-bit iterate); rows
    # at (4096, 4096, 32000)
    for sizes in (dict(B=128, D=640, K=100, T=3), dict(B=1024, D=2048, K=1000, T=3), dict(B=4096, D=4096, K=32000, T=3)):
        cases.append(Case(f"head_pgd_ B={sizes['B']} K={sizes['K']} bfloat16", "head_pgd_", "fwd", "bfloat16",
                          sizes, variant={"norm": "l2", "mode": "add"}))
    for K in (10, 1000):
        for norm in ("linf", "l2"):
            # K = 10, D = 4096: issue 13's few-class target (the grid fills the device)
            D, named = (4096, " D=4096") if K == 10 else (2048, "")
            cases.append(Case(f"pgd_step_ K={K}{named} {norm}", "pgd_step_", "fwd", "float32", dict(K=K, D=D),
                              variant={"norm": norm}))
            cases.append(Case(f"class_grad_pgd_step_ K={K} {norm} bfloat16", "class_grad_pgd_step_", "fwd",
                              "bfloat16", dict(B=1024, D=2048, K=K), variant={"norm": norm, "mode": "add"}))
    return cases


CASES = _cases()


def case_calls(case: Case, device: str = "cpu") -> list[tuple[str, Callable[[], object]]]:
    """The calls that make up ``case``, in order, each with the variant its launches belong to: ``SETUP``
    (what only prepares the case, e.g. the forward before a backward), ``case.id`` (what the roofline
    models) and, for a ``linear_perturb`` forward, ``without_tma(case.id)``. On the CPU the inputs are
    ``torch.empty`` (the calls are recorded, not run); on a GPU they are random, so the calls can be
    timed (each may run again: backward calls keep the graph, in-place steps stay within eps)."""
    import torch

    import lpa_kernels as lpa
    from lpa_kernels.linear_perturb import triton_kernels as linear

    dtype, s, gpu = getattr(torch, case.dtype), case.sizes, device != "cpu"

    def empty(*shape, dt=dtype, grad=False):
        t = torch.randn(shape, dtype=dt, device=device) if gpu else torch.empty(shape, dtype=dt)
        return t.requires_grad_(grad)

    labels = lambda B: torch.randint(0, s["K"], (B,), device=device)  # noqa: E731
    zeros = lambda *shape: torch.zeros(shape, device=device)  # noqa: E731
    if case.op == "perturb":
        feature_shape, delta_shape = (((s["C"], s["H"], s["W"]), (s["C"], 1, 1)) if case.layout == "channel"
                                      else ((s["D"],), (s["D"],)))
        h, delta = empty(s["B"], *feature_shape, grad=True), empty(s["K"], *delta_shape, dt=torch.float32, grad=True)
        y = labels(s["B"])
        if case.pass_ == "fwd":
            def forward():
                with torch.no_grad():
                    return lpa.perturb(h, y, delta, backend="triton")
            return [(case.id, forward)]
        state = {}
        def setup():
            state["out"] = lpa.perturb(h, y, delta, backend="triton")
            state["grad"] = torch.empty_like(state["out"])
        backward = lambda: torch.autograd.grad(state["out"], (h, delta), state["grad"], retain_graph=True)  # noqa: E731
        return [(SETUP, setup), (case.id, backward)]
    if case.op == "linear_perturb":
        x, w, b = empty(s["B"], s["IN"]), empty(s["OUT"], s["IN"]), empty(s["OUT"])
        delta, y = empty(s["K"], s["OUT"], dt=torch.float32), labels(s["B"])
        if case.pass_ == "bwd":
            grad_out, preact = empty(s["B"], s["OUT"]), empty(s["B"], s["OUT"])
            return [(case.id, lambda: linear.linear_perturb_backward_epilogue(
                grad_out, preact, y, 1, delta, case.variant["activation"], case.variant["mode"]))]
        delta_x = delta.to(dtype)
        forward = lambda: linear.linear_perturb_forward(  # noqa: E731
            x, w, b, y, 1, delta_x, case.variant["activation"], case.variant["mode"], True)

        def forward_without_tma():  # pre-Hopper GPUs, and unaligned operands on any
            tma_capable, linear.tma_capable = linear.tma_capable, lambda device: False
            try:
                return forward()
            finally:
                linear.tma_capable = tma_capable
        return [(case.id, forward), (without_tma(case.id), forward_without_tma)]  # an H100: the TMA kernel
    if case.op == "head_pgd_":
        h, y, weight, bias, delta = empty(s["B"], s["D"]), labels(s["B"]), empty(s["K"], s["D"]), empty(s["K"]), \
            zeros(s["K"], s["D"])
        return [(case.id, lambda: lpa.head_pgd_(h, y, weight, bias, delta, steps=s["T"], step_size=0.1, eps=1.0,
                                                norm=case.variant["norm"], backend="triton"))]
    if case.op == "pgd_step_":
        delta, grad = zeros(s["K"], s["D"]), empty(s["K"], s["D"])
        return [(case.id, lambda: lpa.pgd_step_(delta, grad, step_size=0.1, eps=1.0, norm=case.variant["norm"],
                                                backend="triton"))]
    if case.op == "class_grad_pgd_step_":
        delta, grad_out, y = zeros(s["K"], s["D"]), empty(s["B"], s["D"]), labels(s["B"])
        return [(case.id, lambda: lpa.class_grad_pgd_step_(delta, grad_out, y, step_size=0.1, eps=1.0,
                                                           norm=case.variant["norm"], backend="triton"))]
    raise ValueError(case.op)


def _call_case(case: Case, recorder) -> None:
    for variant, call in case_calls(case):
        recorder.count(variant, call)


def record(recorder) -> None:
    for case in CASES:
        recorder.call(case.id, _call_case, case, recorder)


# Which archs to compile is the caller's choice (``compile_worker.run(..., archs)``); every autotune
# config is compiled everywhere, since any of them may win on the GPU.
def configs_to_compile(arch, archs, launch):
    if launch.variant == SETUP or (arch < 90 and "_tma_" in launch.name):  # no TMA before sm_90
        return []
    return launch.configs or [None]
