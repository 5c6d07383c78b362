"""What is benchmarked for each op: shapes, inputs, the plain-PyTorch peer, and the bytes and flops.

Every op is timed through the public API with each backend, and against peers:
- ``eager``: the op written plainly in PyTorch in the input dtype (e.g. ``h + delta[y]``), with its
  autograd backward;
- ``compile``: ``torch.compile`` of that same plain function;
- ``matmul`` (``linear_perturb`` and ``head_pgd_``): the bare GEMMs of the same shape, the SPEC's yardstick.
Peers use their op's byte and flop counts, so their rates compare with the kernels' directly.

Byte counts are the bytes that must move, each tensor counted once (``s`` = element size, 8 bytes per
int64 label); ``fwd+bwd`` counts the forward's and the backward's bytes. The formulas are written out
in benchmarks/README.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import lpa_kernels

LABEL_BYTES = 8
STEP_SIZE, EPS = 0.01, 0.1


# ---- the plain PyTorch peers (module-level functions, so torch.compile caches one graph per op) ----

def perturb_eager(h, labels, delta, mode: str):
    picked = delta[labels]
    return h + picked if mode == "add" else h * (1 + picked)


def class_grad_eager(grad_out, labels, num_classes: int):
    total = grad_out.new_zeros((num_classes, grad_out.shape[1]), dtype=torch.float32)
    return total.index_add_(0, labels, grad_out.float())


def pgd_step_eager(delta, grad, norm: str):
    if norm == "linf":
        return delta.add_(grad.sign(), alpha=STEP_SIZE).clamp_(-EPS, EPS)
    moved = delta + STEP_SIZE * grad / (torch.linalg.vector_norm(grad, dim=1, keepdim=True) + 1e-12)
    shrink = (EPS / torch.linalg.vector_norm(moved, dim=1, keepdim=True)).clamp(max=1.0)
    return delta.copy_(moved * shrink)


def class_grad_pgd_step_eager(delta, grad_out, labels, norm: str):
    return pgd_step_eager(delta, class_grad_eager(grad_out, labels, delta.shape[0]), norm)


def head_pgd_autograd(h, labels, weight, bias, delta, steps: int, norm: str):
    """``steps`` PGD steps as a user writes them with autograd, in the inputs' dtype: per step the summed
    cross-entropy of ``(h + delta[y]) @ W.T + b`` (one GEMM), its gradient in delta by
    ``torch.autograd.grad`` (one more GEMM: nothing asks for W's), and the plain update of delta."""
    for _ in range(steps):
        with torch.enable_grad():
            d = delta.detach().requires_grad_(True)
            logits = F.linear(h + d[labels], weight, bias)
            (grad,) = torch.autograd.grad(F.cross_entropy(logits.float(), labels, reduction="sum"), d)
        pgd_step_eager(delta, grad, norm)
    return delta


def linear_perturb_eager(x, weight, bias, labels, delta):
    return torch.relu(F.linear(x, weight, bias)) + delta[labels]


def matmul_bare(x, weight):
    return torch.matmul(x, weight.t())


# ---- the ops ----

@dataclass(frozen=True)
class OpBench:
    """One benchmarked op. ``shapes[tier]`` lists the sizes for a tier ("quick", "cpu", "gpu");
    ``call(impl, inputs, variant)`` returns the forward as a no-argument callable for a backend name or
    a peer; ``diff`` names the inputs the backward differentiates (empty for in-place ops)."""

    name: str
    bound: str  # "memory" or "compute": which roofline applies
    shapes: dict
    variants: Callable[[str], list]
    make_inputs: Callable[[dict, torch.dtype, torch.device], dict]
    call: Callable[[str, dict, dict], Callable[[], object]]
    nbytes: Callable[[str, dict, int, dict], int]
    flops: Callable[[str, dict, dict], int]
    peers: tuple = ("eager", "compile")
    diff: tuple = ()

    @property
    def passes(self) -> tuple:
        return ("fwd", "bwd", "fwd+bwd") if self.diff else ("fwd",)


_COMPILED: dict = {}


def compiled(fn):
    """``torch.compile(fn)``, made once per function (shapes after the first recompile as dynamic).

    Donated buffers are turned off: the ``bwd`` pass re-runs one backward with ``retain_graph``, which
    a backward compiled with donated (freed-early) buffers refuses."""
    if fn not in _COMPILED:
        import torch._dynamo
        import torch._functorch.config

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        if hasattr(torch._functorch.config, "donated_buffer"):
            torch._functorch.config.donated_buffer = False
        _COMPILED[fn] = torch.compile(fn)
    return _COMPILED[fn]


def _peer(impl: str, plain, **kwargs):
    fn = compiled(plain) if impl == "compile" else plain
    return lambda: fn(**kwargs)


def _randn(shape, dtype, device, scale=1.0, grad=False):
    return (torch.randn(shape, device=device, dtype=torch.float32) * scale).to(dtype).requires_grad_(grad)


def _labels(batch, num_classes, device):
    return torch.randint(0, num_classes, (batch,), device=device)


# perturb ------------------------------------------------------------------------------------------

def _perturb_inputs(shape, dtype, device):
    b, d, k = shape["B"], shape["D"], shape["K"]
    return {"h": _randn((b, d), dtype, device, grad=True), "labels": _labels(b, k, device),
            "delta": _randn((k, d), dtype, device, 0.1, grad=True)}


def _perturb_call(impl, t, v):
    if impl in ("eager", "compile"):
        return _peer(impl, perturb_eager, h=t["h"], labels=t["labels"], delta=t["delta"], mode=v["mode"])
    return lambda: lpa_kernels.perturb(t["h"], t["labels"], t["delta"], mode=v["mode"], backend=impl)


def _perturb_bytes(pass_, sh, s, v):
    b, d, k = sh["B"], sh["D"], sh["K"]
    fwd = (2 * b * d + k * d) * s + b * LABEL_BYTES  # read h, write h~, read delta, labels
    if v["mode"] == "add":  # grad_h is grad_out itself: read g, write grad_delta
        bwd = (b * d + k * d) * s + b * LABEL_BYTES
    else:  # read g, h and delta, write grad_h and grad_delta
        bwd = (3 * b * d + 2 * k * d) * s + b * LABEL_BYTES
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


def _perturb_flops(pass_, sh, v):
    n = sh["B"] * sh["D"]
    fwd, bwd = (n, n) if v["mode"] == "add" else (2 * n, 3 * n)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


PERTURB_SHAPES = {
    "quick": [dict(B=64, D=32, K=5), dict(B=256, D=128, K=10)],
    "cpu": [dict(B=256, D=256, K=10), dict(B=4096, D=1024, K=100), dict(B=16384, D=1024, K=1000)],
    "gpu": [dict(B=256, D=256, K=10), dict(B=4096, D=1024, K=100), dict(B=16384, D=4096, K=1000),
            dict(B=65536, D=4096, K=1000), dict(B=65536, D=8192, K=10000)],
}

PERTURB = OpBench(
    "perturb", "memory", PERTURB_SHAPES,
    lambda tier: [{"mode": "add"}] + ([] if tier == "quick" else [{"mode": "scale"}]),
    _perturb_inputs, _perturb_call, _perturb_bytes, _perturb_flops, diff=("h", "delta"),
)


# class_grad ---------------------------------------------------------------------------------------

def _class_grad_inputs(shape, dtype, device):
    b, d, k = shape["B"], shape["D"], shape["K"]
    return {"grad_out": _randn((b, d), dtype, device), "labels": _labels(b, k, device), "K": k}


def _class_grad_call(impl, t, v):
    if impl in ("eager", "compile"):
        return _peer(impl, class_grad_eager, grad_out=t["grad_out"], labels=t["labels"], num_classes=t["K"])
    shape = (t["K"], t["grad_out"].shape[1])
    return lambda: lpa_kernels.class_grad(t["grad_out"], t["labels"], t["K"], shape, backend=impl)


CLASS_GRAD = OpBench(
    "class_grad", "memory", PERTURB_SHAPES, lambda tier: [{}], _class_grad_inputs, _class_grad_call,
    # read grad_out, labels; write the float32 (K, D) sums
    lambda p, sh, s, v: sh["B"] * sh["D"] * s + sh["B"] * LABEL_BYTES + 4 * sh["K"] * sh["D"],
    lambda p, sh, v: sh["B"] * sh["D"],
)


# pgd_step_ and class_grad_pgd_step_ ---------------------------------------------------------------

def _norms(tier):
    return [{"norm": "linf"}] + ([] if tier == "quick" else [{"norm": "l2"}])


def _pgd_inputs(shape, dtype, device):
    k, d = shape["K"], shape["D"]
    return {"delta": _randn((k, d), dtype, device, 0.01), "grad": _randn((k, d), dtype, device)}


def _pgd_call(impl, t, v):
    if impl in ("eager", "compile"):
        return _peer(impl, pgd_step_eager, delta=t["delta"], grad=t["grad"], norm=v["norm"])
    return lambda: lpa_kernels.pgd_step_(t["delta"], t["grad"], STEP_SIZE, EPS, norm=v["norm"], backend=impl)


def _pgd_flops(sh, v):
    return (3 if v["norm"] == "linf" else 6) * sh["K"] * sh["D"]


PGD_STEP = OpBench(
    "pgd_step_", "memory",
    {"quick": [dict(K=5, D=32), dict(K=10, D=128)], "cpu": [dict(K=10, D=256), dict(K=1000, D=1024)],
     "gpu": [dict(K=10, D=256), dict(K=1000, D=4096), dict(K=10000, D=8192)]},
    _norms, _pgd_inputs, _pgd_call,
    lambda p, sh, s, v: 3 * sh["K"] * sh["D"] * s,  # read delta and grad, write delta
    lambda p, sh, v: _pgd_flops(sh, v),
)


def _cgpgd_inputs(shape, dtype, device):
    b, d, k = shape["B"], shape["D"], shape["K"]
    return {"delta": _randn((k, d), dtype, device, 0.01), "grad_out": _randn((b, d), dtype, device),
            "labels": _labels(b, k, device)}


def _cgpgd_call(impl, t, v):
    if impl in ("eager", "compile"):
        return _peer(impl, class_grad_pgd_step_eager, delta=t["delta"], grad_out=t["grad_out"], labels=t["labels"], norm=v["norm"])
    return lambda: lpa_kernels.class_grad_pgd_step_(
        t["delta"], t["grad_out"], t["labels"], STEP_SIZE, EPS, norm=v["norm"], backend=impl)


CLASS_GRAD_PGD_STEP = OpBench(
    "class_grad_pgd_step_", "memory", PERTURB_SHAPES, _norms, _cgpgd_inputs, _cgpgd_call,
    # read grad_out and labels, read and write delta
    lambda p, sh, s, v: (sh["B"] * sh["D"] + 2 * sh["K"] * sh["D"]) * s + sh["B"] * LABEL_BYTES,
    lambda p, sh, v: sh["B"] * sh["D"] + _pgd_flops(sh, v),
)


# linear_perturb -----------------------------------------------------------------------------------

def _linear_inputs(shape, dtype, device):
    b, i, o, k = shape["B"], shape["IN"], shape["OUT"], shape["K"]
    return {"x": _randn((b, i), dtype, device, grad=True), "weight": _randn((o, i), dtype, device, i**-0.5, grad=True),
            "bias": _randn((o,), dtype, device, 0.1, grad=True), "labels": _labels(b, k, device),
            "delta": _randn((k, o), dtype, device, 0.1, grad=True)}


def _linear_call(impl, t, v):
    if impl == "matmul":
        return lambda: matmul_bare(t["x"], t["weight"])
    if impl in ("eager", "compile"):
        return _peer(impl, linear_perturb_eager, x=t["x"], weight=t["weight"], bias=t["bias"], labels=t["labels"], delta=t["delta"])
    return lambda: lpa_kernels.linear_perturb(t["x"], t["weight"], t["bias"], t["labels"], t["delta"],
                                              activation=v["activation"], mode=v["mode"], backend=impl)


def _linear_bytes(pass_, sh, s, v):
    b, i, o, k = sh["B"], sh["IN"], sh["OUT"], sh["K"]
    fwd = (b * i + o * i + o + k * o + b * o) * s + b * LABEL_BYTES  # read x, W, bias, delta; write out
    # read g, the saved pre-activation, x, W; write grad_x, grad_W, grad_bias, grad_delta
    bwd = (2 * b * o + 2 * b * i + 2 * o * i + o + k * o) * s + b * LABEL_BYTES
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


def _linear_flops(pass_, sh, v):
    gemm = 2 * sh["B"] * sh["IN"] * sh["OUT"]
    return {"fwd": gemm, "bwd": 2 * gemm, "fwd+bwd": 3 * gemm}[pass_]


LINEAR_SHAPES = {
    "quick": [dict(B=32, IN=16, OUT=24, K=5), dict(B=64, IN=32, OUT=48, K=10)],
    "cpu": [dict(B=256, IN=256, OUT=512, K=10), dict(B=1024, IN=512, OUT=1024, K=100)],
    # a ResNet-50 head-sized layer, then LLM MLP up-projections (tokens x d_model -> d_ff)
    "gpu": [dict(B=1024, IN=2048, OUT=2048, K=100), dict(B=4096, IN=4096, OUT=4096, K=1000),
            dict(B=8192, IN=4096, OUT=11008, K=1000), dict(B=16384, IN=4096, OUT=14336, K=1000)],
}

LINEAR_PERTURB = OpBench(
    "linear_perturb", "compute", LINEAR_SHAPES, lambda tier: [{"activation": "relu", "mode": "add"}],
    _linear_inputs, _linear_call, _linear_bytes, _linear_flops,
    peers=("eager", "compile", "matmul"), diff=("x", "weight", "bias", "delta"),
)


# head_pgd_ ----------------------------------------------------------------------------------------

def _head_inputs(shape, dtype, device):
    b, d, k = shape["B"], shape["D"], shape["K"]
    return {"h": _randn((b, d), dtype, device), "labels": _labels(b, k, device),
            "weight": _randn((k, d), dtype, device, d**-0.5), "bias": _randn((k,), dtype, device, 0.1),
            "delta": _randn((k, d), dtype, device, 0.01)}


def head_gemms_bare(h, weight, steps: int):
    """The rows form's two GEMMs per PGD step, ``(h @ W.T) @ W``, with nothing else: the yardstick."""
    for _ in range(steps):
        torch.mm(torch.mm(h, weight.t()), weight)


def _head_call(impl, t, v):
    if impl == "matmul":
        return lambda: head_gemms_bare(t["h"], t["weight"], t["T"])
    if impl == "eager":
        return _peer(impl, head_pgd_autograd, h=t["h"], labels=t["labels"], weight=t["weight"], bias=t["bias"],
                     delta=t["delta"], steps=t["T"], norm=v["norm"])
    return lambda: lpa_kernels.head_pgd_(t["h"], t["labels"], t["weight"], t["bias"], t["delta"], t["T"], STEP_SIZE,
                                         EPS, norm=v["norm"], mode=v["mode"], backend=impl)


def _head_inputs_with_steps(shape, dtype, device):
    return {**_head_inputs(shape, dtype, device), "T": shape["T"]}


HEAD_PGD = OpBench(
    "head_pgd_", "compute",
    {"quick": [dict(B=32, D=16, K=5, T=3), dict(B=64, D=32, K=10, T=3)],
     "cpu": [dict(B=256, D=128, K=10, T=5), dict(B=1024, D=512, K=100, T=5)],
     # SPEC/issue 11 shapes: a CIFAR-100 head, an ImageNet head, an LLM-vocabulary head. T = 1 rows give
     # eager's one autograd PGD step, which T = 3 of the fast paths should beat.
     "gpu": [dict(B=b, D=d, K=k, T=t) for b, d, k in [(128, 640, 100), (1024, 2048, 1000), (4096, 4096, 32000)]
             for t in (1, 3)]},
    lambda tier: [{"norm": "l2", "mode": "add"}], _head_inputs_with_steps, _head_call,
    # read h, W, bias and labels, read and write delta (the minimum, whatever the number of steps)
    lambda p, sh, s, v: (sh["B"] * sh["D"] + 3 * sh["K"] * sh["D"] + sh["K"]) * s + sh["B"] * LABEL_BYTES,
    # per step: logits (2BDK) and the gradient (softmax - onehot) @ W (2BKD)
    lambda p, sh, v: 4 * sh["B"] * sh["D"] * sh["K"] * sh["T"],
    # eager: the autograd loop (head_pgd_autograd); matmul: the bare GEMMs. The reference backend is the
    # library's own PyTorch-op loop without autograd (loop.py), or its host C++ kernel on the CPU.
    peers=("eager", "matmul"),
)

OPS = {op.name: op for op in (PERTURB, LINEAR_PERTURB, HEAD_PGD, CLASS_GRAD, PGD_STEP, CLASS_GRAD_PGD_STEP)}
