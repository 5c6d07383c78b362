"""``head_pgd_``'s backends against its definition, the autograd loop ``lpa_kernels.head_pgd.naive``.

Every comparison runs the same steps three ways: the backend, the definition in float64 (the truth) and
the definition in the backend's dtype (PyTorch's own error, which sets the tolerance). The targets are
the reference backend (the loop on PyTorch ops, ``torch_kernels.py``), the Triton interpreter on the
CPU and, on a GPU machine, both fast backends (Triton and the CUDA C++ kernel, ``-m gpu``);
tests/cuda/test_emulated_kernels.py runs the CUDA C++ kernel on the CPU as well.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lpa_kernels.head_pgd.cuda_kernels as cuda_kernels
import lpa_kernels.head_pgd.loop as head_loop
import lpa_kernels.head_pgd.torch_kernels as head_torch
import lpa_kernels.head_pgd.triton_kernels as head_triton
from lpa_kernels import _checks, head_pgd_
from lpa_kernels.head_pgd import cost, naive
from lpa_kernels.backend import interpreting
from lpa_kernels.confidence import confidence_direction
from tests.helpers import DTYPES, KERNEL_TARGETS, assert_close_to_reference, make_labels

# The reference backend (the PGD loop on PyTorch ops) and the fast backends.
TARGETS = [pytest.param(("reference", "cpu"), id="torch-cpu"), *KERNEL_TARGETS]


def make_problem(batch, num_classes, features, dtype=torch.float32, device="cpu", bias=True, labels=None):
    """Random ``(h, labels, weight, bias, delta)``; logits of order one so the softmax is not saturated."""
    h = torch.randn(batch, features, device=device).to(dtype)
    weight = (torch.randn(num_classes, features, device=device) / features**0.5).to(dtype)
    b = torch.randn(num_classes, device=device).to(dtype) if bias else None
    y = make_labels(batch, num_classes, device) if labels is None else labels.to(device)
    delta = (0.05 * torch.randn(num_classes, features, device=device)).to(dtype)
    return h, y, weight, b, delta


def _cpu64(t):
    return None if t is None else t.detach().cpu().double()


def definition(h, y, weight, bias, delta, steps, step_size, eps, direction, norm, mode):
    """``naive.head_pgd_`` (the autograd loop) with ``head_pgd_``'s argument forms; updates ``delta``."""
    confidence = isinstance(direction, str)
    step, radius, sign = _checks.check_pgd_hyperparameters(delta, step_size, eps, 1.0 if confidence else direction, norm)
    # the definition's cross_entropy takes int64 labels only
    return naive.head_pgd_(h, y.long(), weight, bias, delta, steps, step, radius, direction if confidence else sign,
                           norm, mode)


def check_against_reference(target, h, y, weight, bias, delta, steps, step_size, eps, direction, norm, mode,
                            in_place=False):
    """Run the kernel on a copy of ``delta`` (on ``delta`` itself when ``in_place``) and compare the
    result with the float64 reference; returns it."""
    backend, _ = target
    start = delta.detach().cpu().clone()
    actual = delta if in_place else delta.clone()
    head_pgd_(h, y, weight, bias, actual, steps, step_size, eps, direction, norm, mode, backend=backend)

    cpu = lambda v: v.cpu() if isinstance(v, torch.Tensor) else v  # noqa: E731
    y = y.cpu()
    ref64 = start.to(torch.float64, copy=True)  # a copy also for float64: start seeds lowp below
    definition(_cpu64(h), y, _cpu64(weight), _cpu64(bias), ref64, steps, cpu(step_size), cpu(eps), cpu(direction),
               norm, mode)
    lowp = start.clone()
    definition(h.cpu(), y, weight.cpu(), None if bias is None else bias.cpu(), lowp, steps,
               cpu(step_size), cpu(eps), cpu(direction), norm, mode)
    assert_close_to_reference(actual, ref64, lowp, what=f"delta after {steps} {norm} steps ({mode}, direction {direction!r})")
    return actual


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["add", "scale"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("direction", [1.0, -1.0, "confidence"])
def test_matches_reference_every_mode_norm_dtype(target, dtype, mode, norm, direction):
    """Three steps, B = 37 and D = 20 (neither a multiple of any block), 5 classes, with bias."""
    problem = make_problem(37, 5, 20, dtype, target[1])
    check_against_reference(target, *problem, steps=3, step_size=0.1, eps=0.3, direction=direction, norm=norm, mode=mode)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("num_classes, mode", [(1, "add"), (1, "scale"), (2, "add"), (2, "scale"), (1000, "scale")])
def test_class_counts(target, num_classes, mode):
    """K = 1 (zero gradient: delta unchanged), K = 2, and K = 1000 (most classes absent, many K tiles).
    One step: the interpreter runs pgd_step's K programs one by one."""
    problem = make_problem(19, num_classes, 33, device=target[1])
    check_against_reference(target, *problem, steps=1, step_size=0.05, eps=0.2, direction="confidence", norm="l2", mode=mode)


def _reference_update_under_interpreter(monkeypatch):
    """Under the interpreter, the update is the reference pgd_step (pgd_step has its own tests): its
    K one-class programs, run one after another, take minutes for K = 10,000 and more."""
    if interpreting():
        monkeypatch.setattr(head_triton, "KERNELS", dataclasses.replace(head_triton.KERNELS, pgd_step=head_torch.pgd_step))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("num_classes, mode", [(10_000, "add"), (32_000, "scale")])
def test_large_class_counts(target, num_classes, mode, monkeypatch):
    """K = 10,000 and 32,000 (an LLM-vocabulary head) with 6 samples: the rows form, the softmax over
    several class tiles."""
    _reference_update_under_interpreter(monkeypatch)
    problem = make_problem(6, num_classes, 16, device=target[1])
    check_against_reference(target, *problem, steps=2, step_size=0.05, eps=0.2, direction="confidence", norm="linf", mode=mode)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("direction", [1.0, "confidence"])
def test_both_formulations_match_the_reference_and_each_other(target, dtype, direction, monkeypatch):
    """add mode, B = 67 >> K = 6: the class-space form (chosen by the rule; on the fast backends with a
    given direction all its steps in one launch, ``triton_fused.py`` / ``csrc/head_pgd_fused.cu``, and also in
    its launch-per-phase form) and the rows form (forced) each match the reference, and each other within the
    same tolerance."""
    problem = make_problem(67, 6, 29, dtype, target[1])
    assert head_loop.use_class_space(67, 29, 6, 3, "add", dtype, target[1] == "cuda"), "test setup: class space should run"
    args = dict(steps=3, step_size=0.1, eps=0.3, direction=direction, norm="l2", mode="add")
    class_space = check_against_reference(target, *problem, **args)
    fast = {"triton": head_triton, "cuda": cuda_kernels}.get(target[0])
    if fast is not None and direction != "confidence":
        with monkeypatch.context() as unfused:
            unfused.setattr(fast, "KERNELS", dataclasses.replace(fast.KERNELS, fused_class_space=None))
            check_against_reference(target, *problem, **args)
    monkeypatch.setattr(head_loop, "use_class_space", lambda *a: False)
    rows = check_against_reference(target, *problem, **args)
    lowp = problem[-1].cpu().clone()
    definition(*(t.cpu() if t is not None else None for t in problem[:4]), lowp, **args)
    assert_close_to_reference(class_space, rows.double(), None if dtype == torch.float32 else lowp,
                              what="class-space form against the rows form")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("mode", ["add", "scale"])
def test_rows_in_several_chunks(target, mode, monkeypatch):
    """A chunk budget of 4 classes x 16 rows: B = 37 runs as chunks of 16, 16 and 5 rows (ragged
    last chunk), with the confidence rule's probabilities written chunk by chunk."""
    monkeypatch.setattr(head_loop, "CHUNK_ELEMENTS", 64)
    monkeypatch.setattr(head_loop, "ROW_ALIGN", 8)
    assert head_loop.chunk_rows(37, 4) == 16
    problem = make_problem(37, 4, 21, device=target[1])
    check_against_reference(target, *problem, steps=2, step_size=0.1, eps=0.3, direction="confidence", norm="l2", mode=mode)


def test_formulation_rule_and_chunk_bound():
    """Class space only for add and when cheaper: on the CPU by FLOPs (many samples per class), on a GPU by
    the cost model of both forms' kernels, never with more buffer memory than the rows form; chunks bound
    the logits."""
    for on_gpu in (False, True):
        for dtype in (torch.bfloat16, torch.float32):
            assert head_loop.use_class_space(4096, 512, 100, 3, "add", dtype, on_gpu)
            assert not head_loop.use_class_space(4096, 512, 100, 3, "scale", dtype, on_gpu)
            assert not head_loop.use_class_space(128, 640, 1000, 3, "add", dtype, on_gpu)  # K >> B: rows
            # launches alone would favour class space at this tiny D, its (K, K) buffers do not
            assert not head_loop.use_class_space(32, 64, 1000, 3, "add", dtype, on_gpu)
            assert not head_loop.use_class_space(4096, 4096, 32_000, 3, "add", dtype, on_gpu)  # (B, K) over a chunk
            # B ~ K: about the same FLOPs, so the CPU takes rows; on a GPU the rows form's passes over (B, D)
            # and its per-class scratch rows make it the slower (head_pgd/cost.py)
            assert head_loop.use_class_space(1024, 2048, 1000, 3, "add", dtype, on_gpu) == on_gpu
    for batch, classes in [(4096, 32_000), (4096, 100_000), (100, 7), (1_000_000, 1000)]:
        rows = head_loop.chunk_rows(batch, classes)
        assert 1 <= rows <= batch and rows * classes <= max(head_loop.CHUNK_ELEMENTS, classes)
    assert head_loop.chunk_rows(4096, 100_000) % head_loop.ROW_ALIGN == 0


@pytest.mark.parametrize("batch, features, classes", [(1024, 2048, 1000), (4096, 4096, 32_000), (37, 5, 300)])
def test_cost_model_counts_each_forms_gemm_flops_and_launches(batch, features, classes):
    """``cost``'s kernels, which choose the form on a GPU, hold the loop's FLOPs (module docstring) and
    launches: rows ``4 B K D`` per step in two GEMMs per chunk plus perturb and softmax per chunk and one
    update; class space ``4 K^2 D`` per step in four launches, ``2 B K D`` once."""
    rows = head_loop.chunk_rows(batch, classes)
    chunks = -(-batch // rows)
    for g in (2, 4):
        kernels, n_gemms = cost.rows_step(batch, features, classes, g, rows)
        assert n_gemms == 2 * chunks and len(kernels) == 4 * chunks + 1
        assert sum(f for _, f in kernels) == 4 * batch * classes * features
        kernels, n_gemms = cost.class_space_step(batch, features, classes, g)
        assert n_gemms == 2 and len(kernels) == 4
        assert sum(f for _, f in kernels) == 4 * classes**2 * features
        assert sum(f for _, f in cost.class_space_setup(batch, features, classes, g)) == 2 * batch * classes * features


def test_gemm_precision_policy():
    """16-bit operands on tensor cores for l2; linf (signs) and 32/64-bit data in the accumulation dtype."""
    assert head_loop.gemm_dtype(torch.bfloat16, torch.float32, "l2") == torch.bfloat16
    assert head_loop.gemm_dtype(torch.float16, torch.float32, "l2") == torch.float16
    assert head_loop.gemm_dtype(torch.bfloat16, torch.float32, "linf") == torch.float32
    assert head_loop.gemm_dtype(torch.float32, torch.float32, "l2") == torch.float32
    assert head_loop.gemm_dtype(torch.float64, torch.float64, "l2") == torch.float64


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_several_batch_and_feature_tiles(target, norm):
    """B = 70, D = 300, K = 70: two batch tiles, two output-feature chunks, five contraction tiles and
    two class tiles, all ragged; int32 labels."""
    h, y, weight, bias, delta = make_problem(70, 70, 300, device=target[1])
    check_against_reference(target, h, y.int(), weight, bias, delta, steps=2, step_size=0.1, eps=0.3,
                            direction=1.0, norm=norm, mode="scale")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_per_class_tensors_and_no_bias(target, norm):
    """(K,) step sizes, radii and mixed-sign directions (one class 0: it must not move), bias None."""
    k = 7
    h, y, weight, _, delta = make_problem(40, k, 24, device=target[1], bias=False)
    step = torch.rand(k, device=target[1]) * 0.2 + 0.01
    eps = torch.rand(k, device=target[1]) * 0.5 + 0.05
    direction = torch.tensor([1.0, -1.0, 0.0, 1.0, -0.5, 1.0, -1.0], device=target[1])
    actual = check_against_reference(target, h, y, weight, None, delta, steps=3, step_size=step, eps=eps,
                                     direction=direction, norm=norm, mode="add")
    assert torch.equal(actual[2], delta[2]), "a class with direction 0 moved"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("direction", [1.0, "confidence"])
def test_absent_classes_keep_their_delta(target, direction):
    """Only classes 1, 4 and 5 of 8 occur in the batch: the other rows of delta stay bit-identical."""
    present = torch.tensor([1, 4, 5])
    labels = present[torch.randint(0, 3, (29,))]
    problem = make_problem(29, 8, 18, device=target[1], labels=labels)
    delta = problem[-1]
    actual = check_against_reference(target, *problem, steps=3, step_size=0.1, eps=0.3, direction=direction,
                                     norm="l2", mode="add")
    absent = [c for c in range(8) if c not in present.tolist()]
    assert torch.equal(actual[absent], delta[absent]), "an absent class's delta changed"
    assert not torch.equal(actual[present], delta[present]), "no present class moved"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("batch, steps", [(0, 3), (12, 0)])
def test_nothing_to_do_leaves_delta_unchanged(target, batch, steps):
    """B == 0 (no launch) or steps == 0: delta is untouched (no NaN from a poisoned buffer either)."""
    h, y, weight, bias, delta = make_problem(batch, 4, 10, device=target[1])
    before = delta.clone()
    head_pgd_(h, y, weight, bias, delta, steps, 0.1, 0.3, "confidence", backend=target[0])
    assert torch.equal(delta, before), f"delta changed with B={batch}, steps={steps}"


@pytest.mark.parametrize("target", TARGETS)
def test_confidence_signs_follow_lpl_rule(target):
    """One linf step from delta = 0 with a radius the step does not reach moves class c by exactly
    ``step * s_c * sign(g_c)``, where ``s_c`` is LPL's rule applied to the softmax and ``g_c`` the
    class-summed ``(softmax - onehot) @ W``, both computed here by hand in float64."""
    k, step = 6, 0.01
    h, y, weight, bias, _ = make_problem(45, k, 20, device=target[1])
    delta = torch.zeros(k, 20, device=target[1])
    head_pgd_(h, y, weight, bias, delta, 1, step, 1.0, "confidence", norm="linf", backend=target[0])

    h64, w64, b64, y_cpu = _cpu64(h), _cpu64(weight), _cpu64(bias), y.cpu()
    softmax = (h64 @ w64.T + b64).softmax(dim=1)
    p_true = softmax[torch.arange(len(y_cpu)), y_cpu]
    signs, _ = confidence_direction(p_true, y_cpu, k)
    assert (signs > 0).any() and (signs < 0).any(), "test setup: want both augmentation directions present"
    sample_grad = (softmax - torch.nn.functional.one_hot(y_cpu, k).double()) @ w64
    class_grad = torch.zeros(k, 20, dtype=torch.float64).index_add_(0, y_cpu, sample_grad)
    expected = step * signs.double()[:, None] * torch.sign(class_grad)
    assert_close_to_reference(delta, expected, what="delta after one confidence-directed linf step")


@pytest.mark.parametrize("target", TARGETS)
def test_non_contiguous_inputs(target):
    """h, weight and delta as strided views: the result lands in the caller's delta view."""
    h_full, y, w_full, bias, d_full = make_problem(23, 5, 40, device=target[1])
    h, weight, delta = h_full[:, ::2], w_full[:, ::2], d_full[:, ::2]
    assert not delta.is_contiguous()
    untouched = d_full[:, 1::2].clone()
    check_against_reference(target, h, y, weight, bias, delta, steps=2, step_size=0.1, eps=0.3,
                            direction=1.0, norm="l2", mode="add", in_place=True)
    assert torch.equal(d_full[:, 1::2], untouched), "entries outside the delta view changed"


BAD_INPUTS = {
    "weight shape": (dict(weight=torch.randn(4, 9)), "weight"),
    "delta shape": (dict(delta=torch.randn(3, 10)), "weight"),
    "negative steps": (dict(steps=-1), "steps"),
    "label out of range": (dict(labels=torch.tensor([0, 1, 4, 2, 0, 1])), "labels"),
    "unknown direction": (dict(direction="frequency"), "direction"),
    "bias shape": (dict(bias=torch.randn(5)), "bias"),
}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_raises_before_any_kernel(target, case, monkeypatch):
    """ValueError naming the argument, no launch, delta untouched."""
    def no_launch(*args, **kwargs):
        raise AssertionError("the kernel launcher ran on invalid input")

    for launchers in (head_torch, head_triton, cuda_kernels):
        monkeypatch.setattr(launchers, "head_pgd", no_launch)
    h, y, weight, bias, delta = make_problem(6, 4, 10, device=target[1])
    args = dict(h=h, labels=y, weight=weight, bias=bias, delta=delta, steps=2, step_size=0.1, eps=0.3,
                direction="confidence")
    change, argname = BAD_INPUTS[case]
    args.update({k: v.to(target[1]) if isinstance(v, torch.Tensor) else v for k, v in change.items()})
    before = args["delta"].clone()
    with pytest.raises(ValueError, match=argname):
        head_pgd_(**args, backend=target[0])
    assert torch.equal(args["delta"], before), "a rejected call changed delta"


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("direction", ["tensor", "confidence"])
def test_custom_op_passes_opcheck(target, direction):
    """Schema (delta mutated, nothing else), fake impl and AOT dispatch of ``lpa_kernels::head_pgd_``."""
    h, y, weight, bias, delta = make_problem(9, 3, 17, device=target[1])
    per_class = lambda v: torch.full((3,), v, device=target[1])  # noqa: E731
    sign = torch.tensor([1.0, -1.0, 1.0], device=target[1]) if direction == "tensor" else None
    args = (h, y, weight, bias, delta, 2, per_class(0.1), per_class(0.3), sign, "l2", "scale", target[0])
    torch.library.opcheck(torch.ops.lpa_kernels.head_pgd_.default, args)


def test_cuda_backend_on_cpu_tensors_says_why_it_is_unavailable():
    """backend='cuda' on CPU tensors is refused before any launch with the backend's reason (CPU
    tensors, no GPU or no extension; the emulated-kernel tests lift this to run the kernel on the CPU),
    and delta stays untouched."""
    h, y, weight, bias, delta = make_problem(5, 3, 8)
    before = delta.clone()
    with pytest.raises(ValueError, match=r"backend='cuda' is not available for a cpu tensor: .*(CUDA|cuda)"):
        head_pgd_(h, y, weight, bias, delta, 2, 0.1, 0.3, backend="cuda")
    assert torch.equal(delta, before), "a refused call changed delta"


@pytest.mark.parametrize("target", KERNEL_TARGETS[:2])  # Triton (the counter does not see the CUDA C++ launches)
@pytest.mark.parametrize("batch, classes, fused, per_step, dtype",
                         [(64, 4, True, 0, torch.float32), (64, 4, False, 4, torch.float32),
                          (64, 4, False, 4, torch.float16), (40, 100, True, 5, torch.float32),
                          (200, 200, True, 5, torch.float32)],
                         ids=["class-space-fused", "class-space", "class-space-16-bit", "rows", "rows-chunked-class-sum"])
def test_each_extra_step_launches_only_its_own_kernels(target, batch, classes, fused, per_step, dtype, monkeypatch):
    """What depends only on the call (label plan, buffers, the class-space logits, the rows form's launch
    plan and arrival counters) is set up once, so T = 3 launches exactly 2 steps' kernels more than T = 1.
    Class space, fused (a given direction, few classes): every step in the one launch (0); unfused: GEMM,
    the fused softmax + per-class sum, GEMM, update (4; with 16-bit GEMMs the update also writes the
    iterate's 16-bit copy the next shift GEMM takes, no cast of its own); rows, one chunk of rows: perturb,
    logits GEMM, softmax, GEMM, the fused class sum + update (5), also when the class sums are cut into
    chunks (B = 200: a chunk plan of about 9 launches, once per call)."""
    from lpa_bench.static.counting import LaunchCounter

    monkeypatch.setenv("LPA_POISON", "0")  # poisoning fills every new buffer: a launch that training never has
    if not fused:
        monkeypatch.setattr(head_triton, "KERNELS", dataclasses.replace(head_triton.KERNELS, fused_class_space=None))
    assert head_loop.use_class_space(batch, 32, classes, 1, "add", dtype, target[1] == "cuda") == (per_step in (0, 4)), \
        "test setup: wrong formulation"
    launches = {}
    for steps in (1, 3):
        h, y, weight, bias, delta = make_problem(batch, classes, 32, dtype, device=target[1])
        with LaunchCounter() as counter:
            head_pgd_(h, y, weight, bias, delta, steps, 0.1, 0.3, 1.0, "l2", "add", backend=target[0])
        launches[steps] = counter.summary()["aten_launches"] + counter.summary()["triton_launches"]
    assert launches[3] - launches[1] == 2 * per_step, launches


@pytest.mark.parametrize("target", KERNEL_TARGETS[:2])  # Triton (the counter does not see the CUDA C++ launches)
def test_a_16_bit_class_space_call_adds_only_the_iterates_cast(target, monkeypatch):
    """Class space with fp16 delta, h and W (B = 64, K = 4, unfused): one launch more than the float32 call,
    the float32 iterate's cast; the updates write the rounded iterate into delta itself (the shift GEMM's
    operand), so neither a rounded copy at set-up nor a copy back at the end."""
    from lpa_bench.static.counting import LaunchCounter

    monkeypatch.setenv("LPA_POISON", "0")
    monkeypatch.setattr(head_triton, "KERNELS", dataclasses.replace(head_triton.KERNELS, fused_class_space=None))
    launches = {}
    for dtype in (torch.float32, torch.float16):
        h, y, weight, bias, delta = make_problem(64, 4, 32, dtype, device=target[1])
        with LaunchCounter() as counter:
            head_pgd_(h, y, weight, bias, delta, 2, 0.1, 0.3, 1.0, "l2", "add", backend=target[0])
        launches[dtype] = counter.summary()["aten_launches"] + counter.summary()["triton_launches"]
    assert launches[torch.float16] == launches[torch.float32] + 1, launches


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_class_space_l2_step_of_a_class_gradient_near_the_norms_1e_12(target, fused, dtype, monkeypatch):
    """Logits of order one from h ~ 1e12 and W ~ 1e-12: each class's gradient S_c @ W has a norm near the L2
    step's 1e-12, where a positive scale of S_c changes the step (float16's per-class scale of its class
    sums, applied to every dtype, moved row norms from ~0.08 to ~0.04 here). The PyTorch-op loop (host
    kernels off) and the Triton kernels, one-launch and per-step, against the definition."""
    backend, device = target
    monkeypatch.setenv("LPA_HOST_KERNELS", "0")
    monkeypatch.setattr(head_loop, "use_class_space", lambda *args: True)
    if not fused:
        monkeypatch.setattr(head_triton, "KERNELS", dataclasses.replace(head_triton.KERNELS, fused_class_space=None))
    torch.manual_seed(0)
    labels = torch.arange(16) % 2
    h = (1e12 * torch.randn(16, 2, dtype=torch.float64)).to(device=device, dtype=dtype)
    weight = (1e-12 * torch.eye(2, dtype=torch.float64)).to(device=device, dtype=dtype)
    delta = torch.zeros(2, 2, device=device, dtype=dtype)
    check_against_reference(target, h, labels.to(device), weight, None, delta, 2, 0.1, 0.3, 1.0, "l2", "add")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("direction", [1.0, "confidence"])  # the one-launch class space, and the unfused one
def test_float16_class_space_with_more_samples_in_a_class_than_float16_holds(target, direction):
    check_float16_class_space_overflow(target, direction)


def check_float16_class_space_overflow(target, direction):
    """B = 70,000 float16 samples, 69,990 of class 0, whose logit is low: its class-space sum (about -n_0
    on the diagonal) would be -inf in float16, and S @ W with it, stepping along the infinities' sign
    pattern instead of the gradient (a wrong, often finite, update). Float16 sums are scaled per class by
    1 / 2^floor(log2 n_c) (HeadKernels.softmax_class_sum), which the step does not depend on here. PyTorch's own
    float16 loop overflows too, so the float64 definition alone is the yardstick: one L2 step of 0.1 must
    land within 2e-3 of it (a step along a wrong direction moves up to 0.2). Also used by the CUDA
    emulation tests."""
    backend, device = target
    labels = torch.zeros(70_000, dtype=torch.int64)
    labels[::7000] = 1
    h, y, weight, _, delta = make_problem(70_000, 2, 8, torch.float16, device, labels=labels)
    bias = torch.tensor([-8.0, 0.0], device=device, dtype=torch.float16)  # p_0 ~ 0: S_00 ~ -n_0 = -69,990
    assert head_loop.use_class_space(70_000, 8, 2, 1, "add", torch.float16, device == "cuda")
    actual = delta.clone()
    head_pgd_(h, y, weight, bias, actual, 1, 0.1, 10.0, direction, "l2", "add", backend=backend)
    expected = delta.cpu().double()
    definition(_cpu64(h), y.cpu(), _cpu64(weight), _cpu64(bias), expected, 1, 0.1, 10.0, direction, "l2", "add")
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual.cpu().double(), expected, rtol=0, atol=2e-3)


def check_float32_delta_with_float64_data_inside_eps(backend: str, device: str) -> None:
    """L2 steps on a float32 delta with float64 ``h`` and ``weight`` run in float64 and are rounded into delta
    after them: every class ends inside eps (the iterate's radius keeps delta's margin), in both forms
    (few samples per class: rows; many: class space) and with one step or several."""
    g = torch.Generator().manual_seed(5)
    for batch, classes, steps in ((4, 2, 2), (9, 5, 1), (64, 3, 3)):
        for _ in range(12):
            h = torch.randn(batch, 64, generator=g, dtype=torch.float64).to(device)
            weight = torch.randn(classes, 64, generator=g, dtype=torch.float64).to(device)
            labels = torch.randint(0, classes, (batch,), generator=g).to(device)
            delta = torch.zeros(classes, 64, device=device)
            eps = torch.full((classes,), 0.3, device=device)
            head_pgd_(h, labels, weight, None, delta, steps, 1.0, eps, 1.0, "l2", backend=backend)
            norms = delta.double().norm(dim=1)
            assert (norms <= eps.double()).all(), f"{batch, classes, steps}: worst by {(norms / 0.3).max() - 1:.2e}"


@pytest.mark.parametrize("target", TARGETS)
def test_l2_steps_of_a_float32_delta_with_float64_data_stay_inside_eps(target):
    check_float32_delta_with_float64_data_inside_eps(*target)
