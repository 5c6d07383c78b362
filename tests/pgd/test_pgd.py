"""pgd_step_ and class_grad_pgd_step_ against the float64 reference, per backend x dtype x norm.

Every problem includes a class with an exactly-zero gradient (absent from the batch for the fused
op) whose delta starts outside the eps-ball: it must come back bit for bit, unprojected.

``pgd_step_`` runs one program per class, or over (feature block, class) programs when few classes hold
long rows (``split_block`` of the fast backends); ``GRID_TARGETS`` run each fast backend with both grids
(``split`` forces it at every width over 16, with 5 to 8 blocks per row, the last ragged: few enough
programs for the CPU interpreter).
"""

from __future__ import annotations

import pytest
import torch

from lpa_kernels import class_grad_pgd_step_, pgd_step_
from lpa_kernels._common import delta_layout
from lpa_kernels.pgd import backends, cuda_kernels, naive, split, triton_kernels
from tests.helpers import DTYPES, KERNEL_TARGETS, assert_close_to_reference
from tests.perturb.test_perturb import FEW_PRESENT, LAYOUTS, MANY_CLASSES, MODES, TARGETS, absent_classes

NORMS = ("linf", "l2")
K = 5
IDLE = 3  # the class with a zero gradient
GRID_KERNEL_TARGETS = [pytest.param((*p.values[0], grid), id=f"{p.id}-{grid}", marks=p.marks)
                       for p in KERNEL_TARGETS for grid in ("per_class", "split")]
GRID_TARGETS = [pytest.param(("reference", "cpu", None), id="reference"), *GRID_KERNEL_TARGETS]


def use_grid(monkeypatch, target) -> tuple[str, str]:
    """Makes the fast backends' ``pgd_step`` take ``target``'s grid; returns ``(backend, device)``."""
    backend, device, grid = target
    if grid is not None:
        def split_block(k, d, dev):
            block = 1 << max((d - 1).bit_length() - 3, 4)  # a power of two >= 16, about d / 8
            return block if grid == "split" and d > block else None
        for launchers in (triton_kernels, cuda_kernels):
            monkeypatch.setattr(launchers, "split_block", split_block)
    return backend, device


def hyperparameters(per_class: bool, device):
    """``(step_size, eps, direction)``: Python floats, or ``(K,)`` tensors with mixed signs."""
    if not per_class:
        return 0.3, 1.5, -1.0
    return (torch.rand(K, device=device) * 0.5, torch.rand(K, device=device) + 0.5,
            torch.tensor([1.0, -1.0, 1.0, -1.0, 0.5], device=device))


def reference_step(fn, delta, *tensors_and_rest, step_size, eps, direction, **kw):
    """``fn`` (a naive op) on a float64 copy of ``delta`` and float64 inputs; returns the new delta."""
    as64 = lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    per_class = [torch.as_tensor(v, dtype=torch.float64, device=delta.device).expand(K).contiguous()
                 for v in (step_size, eps, direction)]
    new = delta.double().clone()
    args = [as64(t) for t in tensors_and_rest]
    return fn(new, *args, *per_class, **{k: as64(v) for k, v in kw.items()})


def lowp_step(fn, delta, *tensors_and_rest, step_size, eps, direction, **kw):
    """The same naive op on the low-precision inputs (its float32 arithmetic rounded to delta.dtype)."""
    per_class = [torch.as_tensor(v, dtype=torch.float32, device=delta.device).expand(K).contiguous()
                 for v in (step_size, eps, direction)]
    return fn(delta.clone(), *tensors_and_rest, *per_class, **kw)


@pytest.mark.parametrize("per_class", [False, True], ids=["scalar", "per_class"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("target", GRID_TARGETS)
def test_pgd_step_matches_reference(target, dtype, norm, per_class, monkeypatch):
    backend, device = use_grid(monkeypatch, target)
    delta = (2 * torch.randn(K, 3, 37, device=device)).to(dtype)  # most entries outside the ball
    grad = torch.randn(K, 3, 37, device=device).to(dtype)
    grad[IDLE] = 0
    grad[1, 0] = 0  # the first blocks of a moving class have a zero gradient: their entries are still clamped
    step_size, eps, direction = hyperparameters(per_class, device)
    ref = reference_step(naive.pgd_step_, delta, grad, step_size=step_size, eps=eps, direction=direction, norm=norm)
    lowp = lowp_step(naive.pgd_step_, delta, grad, step_size=step_size, eps=eps, direction=direction, norm=norm)
    got = delta.clone()
    returned = pgd_step_(got, grad, step_size, eps, direction, norm, backend=backend)
    assert returned is got, "pgd_step_ must return its delta argument"
    assert_close_to_reference(got, ref, lowp, what=f"pgd_step_ {norm} ({backend})")
    assert torch.equal(got[IDLE], delta[IDLE]), "a class with a zero gradient must keep its delta"


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("target", GRID_KERNEL_TARGETS)
def test_pgd_step_odd_sizes_nan_and_strided_delta(target, norm, monkeypatch):
    backend, device = use_grid(monkeypatch, target)
    sizes = [(1, 1), (1, 2500)] + ([(1000, 3)] if norm == "linf" else [])  # one class, D over a block, many
    for k, d in sizes:
        delta, grad = torch.randn(d, k, device=device).t(), torch.randn(k, d, device=device)  # strided delta
        step, eps = torch.rand(k, device=device) + 0.1, torch.rand(k, device=device) + 0.1
        ref = naive.pgd_step_(delta.double().clone(), grad.double(), step.double(), eps.double(), torch.ones(k, dtype=torch.float64, device=device), norm)
        assert_close_to_reference(pgd_step_(delta, grad, step, eps, 1.0, norm, backend=backend), ref, what=f"pgd_step_ K={k} D={d}")
    delta, grad = torch.randn(4, 6, device=device), torch.randn(4, 6, device=device)
    grad[1, 2] = float("nan")
    ref = naive.pgd_step_(delta.double().clone(), grad.double(), *(torch.full((4,), 0.5, dtype=torch.float64, device=device),) * 3, norm)
    assert_close_to_reference(pgd_step_(delta, grad, 0.5, 0.5, 0.5, norm, backend=backend), ref, what="NaN gradient")


@pytest.mark.parametrize("per_class", [False, True], ids=["scalar", "per_class"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("layout", ["full", "channel", "last_dim", "broadcast"])
@pytest.mark.parametrize("target", TARGETS)
def test_class_grad_pgd_step_matches_reference(target, layout, norm, mode, per_class):
    backend, device = target
    features, per_class_shape = LAYOUTS[layout]
    delta = 2 * torch.randn(K, *per_class_shape, device=device)
    grad_out, h = torch.randn(2, 9, *features, device=device)
    labels = torch.tensor([0, 1, 2, 4, 0, 4, 1, 0, 2], device=device)  # class IDLE is absent
    step_size, eps, direction = hyperparameters(per_class, device)
    ref = reference_step(naive.class_grad_pgd_step_, delta, grad_out, labels, step_size=step_size, eps=eps,
                         direction=direction, norm=norm, h=h, mode=mode)
    got = delta.clone()
    returned = class_grad_pgd_step_(got, grad_out, labels, step_size, eps, direction, norm, h=h, mode=mode, backend=backend)
    assert returned is got, "class_grad_pgd_step_ must return its delta argument"
    assert_close_to_reference(got, ref, what=f"class_grad_pgd_step_ {norm} {mode} ({backend})")
    assert torch.equal(got[IDLE], delta[IDLE]), "a class absent from the batch must keep its delta"


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("target", KERNEL_TARGETS)
def test_class_grad_pgd_step_low_precision_and_edge_batches(target, dtype, norm):
    backend, device = target
    for batch in (0, 1, 7):
        delta = torch.randn(K, 4, 1, 1, device=device).to(dtype)
        grad_out, h = torch.randn(2, batch, 4, 3, 5, device=device).to(dtype)
        labels = torch.randint(0, K, (batch,), device=device, dtype=torch.int32)
        kw = dict(step_size=0.2, eps=0.8, direction=1.0)
        ref = reference_step(naive.class_grad_pgd_step_, delta, grad_out, labels, **kw, norm=norm, h=h, mode="scale")
        lowp = lowp_step(naive.class_grad_pgd_step_, delta, grad_out, labels, **kw, norm=norm, h=h, mode="scale")
        got = class_grad_pgd_step_(delta.clone(), grad_out, labels, 0.2, 0.8, 1.0, norm, h=h, mode="scale", backend=backend)
        assert_close_to_reference(got, ref, lowp, what=f"class_grad_pgd_step_ B={batch} {dtype} {norm}")
        if batch == 0:
            assert torch.equal(got, delta), "an empty batch must leave delta unchanged"


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("features,per_class", [((2, 600), (600,)), ((40, 7, 7), (40, 1, 1))], ids=["last_dim", "channel"])
@pytest.mark.parametrize("target", KERNEL_TARGETS)
def test_class_grad_pgd_step_long_tailed_batch_over_many_feature_blocks(target, features, per_class, norm):
    """Class 0 holds most of the batch and a class row spans several feature blocks: the reduction runs
    over (chunk, feature block) programs, and the update of a class waits for its last block."""
    backend, device = target
    labels = torch.repeat_interleave(torch.arange(4), torch.tensor([60, 6, 2, 1]))[torch.randperm(69)].to(device)
    delta = 2 * torch.randn(K, *per_class, device=device)  # class 4 absent
    grad_out, h = torch.randn(2, 69, *features, device=device)
    kw = dict(step_size=0.2, eps=0.8, direction=-1.0)
    ref = reference_step(naive.class_grad_pgd_step_, delta, grad_out, labels, **kw, norm=norm, h=h, mode="scale")
    got = class_grad_pgd_step_(delta.clone(), grad_out, labels, 0.2, 0.8, -1.0, norm, h=h, mode="scale", backend=backend)
    assert_close_to_reference(got, ref, what=f"class_grad_pgd_step_ long-tailed {norm} ({backend})")
    assert torch.equal(got[4], delta[4]), "a class absent from the batch must keep its delta"


def check_prepared_step_repeats_like_fresh_calls(launchers, features, per_class, norm, device):
    """Three launches of one ``prepare_class_grad_pgd_step`` (new ``grad_out`` values each time, delta
    carried over) against three fresh ``class_grad_pgd_step`` calls, bit for bit after each, and the float64
    reference after the last. A long-tailed scale batch (class 0 split into chunks, class 4 absent) whose
    rows span several feature blocks uses every arrival counter: counters not back at zero after a launch
    would complete the next one's sums early, or never."""
    B = 69
    labels = torch.repeat_interleave(torch.arange(4), torch.tensor([60, 6, 2, 1]))[torch.randperm(B)].to(device)
    delta = 2 * torch.randn(K, *per_class, device=device)
    grads, h = torch.randn(3, B, *features, device=device), torch.randn(B, *features, device=device)
    step, eps = torch.rand(K, device=device) * 0.3, torch.rand(K, device=device) + 0.5
    direction = torch.tensor([1.0, -1.0, 1.0, -1.0, 0.5], device=device)
    inner = delta_layout(features, delta.shape)[1]
    prepared, fresh = delta.reshape(K, -1).clone(), delta.reshape(K, -1).clone()
    grad_out, flat_h = torch.empty(B, grads[0].numel() // B, device=device), h.reshape(B, -1)
    launch = launchers.prepare_class_grad_pgd_step(prepared, grad_out, labels, flat_h, inner, "scale", norm)
    ref = delta.double()
    for i, grad in enumerate(grads):
        grad_out.copy_(grad.reshape(B, -1))
        launch(step, eps, direction)
        launchers.class_grad_pgd_step(fresh, grad.reshape(B, -1).clone(), labels, flat_h, step, eps, direction, inner,
                                      "scale", norm)
        assert torch.equal(prepared, fresh), f"launch {i} of a prepared step differs from a fresh call"
        ref = naive.class_grad_pgd_step_(ref, grad.double(), labels, step.double(), eps.double(), direction.double(),
                                         norm, h=h.double(), mode="scale")
    assert_close_to_reference(prepared.view_as(delta), ref, what=f"3 prepared class_grad_pgd_step launches ({norm})")
    assert torch.equal(prepared[4], delta.reshape(K, -1)[4]), "a class absent from the batch must keep its delta"


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("features,per_class", [((2, 600), (600,)), ((40, 7, 7), (40, 1, 1))],
                         ids=["last_dim", "channel"])
@pytest.mark.parametrize("target", KERNEL_TARGETS)
def test_prepared_class_grad_pgd_step_repeats_like_fresh_calls(target, features, per_class, norm):
    backend, device = target
    check_prepared_step_repeats_like_fresh_calls({"triton": triton_kernels, "cuda": cuda_kernels}[backend], features,
                                                 per_class, norm, device)


def test_prepared_triton_step_splits_its_long_class_into_chunks():
    """The shapes of the test above take the chunked reduction on the CPU interpreter (class 0's 120
    rows, R = 2 per sample, in chunks of 64) over 3 feature blocks: both kinds of counters."""
    from lpa_kernels._triton_common import chunk_plan, reduction_tiling

    block_d, block_q, _, R = reduction_tiling(69, 1200, 600, 1)
    starts = torch.tensor([0, 60, 66, 68, 69])
    chunk = chunk_plan(starts, R, 69 * R, block_q, -(-600 // block_d))[0]
    assert 600 > block_d and chunk < 60 * R, (block_d, chunk)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("target", KERNEL_TARGETS)
def test_class_grad_pgd_step_with_far_more_classes_than_samples(target, norm):
    """K = 10,000 classes and 7 samples of 4 of them: only the classes present move; the others keep
    their delta bit for bit (deltas start outside the eps-ball, so a stray projection would show)."""
    backend, device = target
    delta = 2 * torch.randn(MANY_CLASSES, 13, device=device)
    grad_out, h = torch.randn(2, 7, 13, device=device)
    labels = torch.tensor(FEW_PRESENT, device=device)
    step, eps = torch.rand(MANY_CLASSES, device=device) * 0.5, torch.rand(MANY_CLASSES, device=device) + 0.5
    direction = torch.where(torch.rand(MANY_CLASSES, device=device) < 0.5, -1.0, 1.0)
    ref = naive.class_grad_pgd_step_(delta.double(), grad_out.double(), labels, step.double(), eps.double(),
                                     direction.double(), norm, h=h.double(), mode="scale")
    got = class_grad_pgd_step_(delta.clone(), grad_out, labels, step, eps, direction, norm, h=h, mode="scale", backend=backend)
    assert_close_to_reference(got, ref, what=f"class_grad_pgd_step_ K={MANY_CLASSES} {norm} ({backend})")
    absent = absent_classes(labels, MANY_CLASSES)
    assert torch.equal(got[absent], delta[absent]), "classes absent from the batch must keep their delta"


@pytest.mark.parametrize("target", KERNEL_TARGETS)
def test_opcheck_pgd_custom_ops(target):
    backend, device = target
    step, eps, direction = (torch.full((K,), v, device=device) for v in (0.3, 1.0, -1.0))
    delta, grad = torch.randn(K, 6, device=device), torch.randn(K, 6, device=device)
    grad_out, h = torch.randn(2, 7, 2, 6, device=device)
    labels = torch.randint(0, K, (7,), device=device)
    for norm in NORMS:
        torch.library.opcheck(torch.ops.lpa_kernels.pgd_step_, (delta.clone(), grad, step, eps, direction, norm, backend))
        for mode in MODES:
            torch.library.opcheck(
                torch.ops.lpa_kernels.class_grad_pgd_step_,
                (delta.clone(), grad_out, labels, h, step, eps, direction, 1, mode, norm, backend),
            )


# ----- L2 with non-finite and huge gradients, and the projection bound (issue 17) -----------------------
def inf_sign_pattern_step(delta, grad, step, eps):
    """The documented L2 step of a row holding Inf, in float64: along the normalised sign pattern of its
    Inf entries (finite entries 0), then projected onto the eps-ball."""
    pattern = torch.where(torch.isinf(grad), torch.sign(grad), 0.0).double()
    new = delta.double() + step * pattern / pattern.norm(dim=1, keepdim=True)
    return new * (eps / new.norm(dim=1, keepdim=True)).clamp(max=1)


# The kernels detect Inf entries by arithmetic on them (x - x, Inf / Inf): the CPU interpreter runs that
# through numpy, which warns; the compiled kernels compute the same values silently.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("target", GRID_TARGETS)
def test_l2_step_of_a_gradient_row_with_inf_entries_follows_their_sign_pattern(target, dtype, monkeypatch):
    backend, device = use_grid(monkeypatch, target)
    delta = 0.1 * torch.randn(4, 300, device=device, dtype=dtype)
    grad = torch.randn(4, 300, device=device, dtype=dtype)
    grad[0, 7] = float("inf")                                # one Inf entry
    grad[1, :5] = torch.tensor([float("inf"), -float("inf")] * 2 + [float("inf")])  # several, both signs
    grad[2, 299] = -float("inf")                             # the last entry, past a block boundary
    got = pgd_step_(delta.clone(), grad, 0.2, 0.5, 1.0, "l2", backend=backend)
    assert torch.isfinite(got).all(), "an Inf gradient entry must not write NaN or Inf into delta"
    expected = inf_sign_pattern_step(delta[:3], grad[:3], 0.2, 0.5)
    assert_close_to_reference(got[:3], expected, what=f"Inf rows ({backend})")
    one = lambda v: torch.full((1,), v, dtype=torch.float64, device=device)  # noqa: E731
    finite_row = naive.pgd_step_(delta[3:].double(), grad[3:].double(), one(0.2), one(0.5), one(1.0), "l2")
    assert_close_to_reference(got[3:], finite_row, what="the finite row next to them")


def check_non_finite_delta_rows(pgd_step, device, dtype=torch.float32) -> None:
    """A delta row holding +Inf, one holding -Inf and one holding NaN (ordinary gradients): the L2 step
    gives the definition's values, NaN where it has NaN (an Inf row moves to an Inf norm: projected, its
    Inf entries become NaN and the rest 0; a NaN row is not projected). ``pgd_step(delta, grad, step, eps,
    direction)`` with (K,) hyperparameters, in place. The split grid's norm expansion once made the Inf
    rows Inf - Inf = NaN and left them unprojected."""
    delta = 0.3 * torch.randn(4, 301, device=device, dtype=dtype)
    delta[0, 5], delta[1, 300], delta[2, 7] = float("inf"), -float("inf"), float("nan")
    grad = torch.randn(4, 301, device=device, dtype=dtype)
    hyper = [torch.full((4,), v, device=device, dtype=dtype) for v in (0.1, 1.0, 1.0)]
    expected = naive.pgd_step_(delta.double(), grad.double(), *(v.double() for v in hyper), "l2")
    pgd_step(delta, grad, *hyper)
    torch.testing.assert_close(delta.double(), expected, equal_nan=True, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("target", GRID_TARGETS)
def test_l2_step_of_delta_rows_holding_inf_or_nan_is_the_definitions(target, monkeypatch):
    backend, device = use_grid(monkeypatch, target)
    check_non_finite_delta_rows(lambda *args: pgd_step_(*args, "l2", backend=backend), device)


@pytest.mark.parametrize("target", GRID_TARGETS)
def test_l2_step_of_a_huge_finite_gradient_does_not_overflow_the_norm(target, monkeypatch):
    """float32 entries of 1e30: ||g||^2 = 1e62 overflows float32, yet g / ||g|| is an ordinary unit vector."""
    backend, device = use_grid(monkeypatch, target)
    delta, grad = torch.zeros(2, 50, device=device), torch.randn(2, 50, device=device)
    huge = grad * 1e30
    got = pgd_step_(delta.clone(), huge, 0.2, 10.0, 1.0, "l2", backend=backend)
    expected = 0.2 * grad.double() / grad.double().norm(dim=1, keepdim=True)
    assert_close_to_reference(got, expected, what=f"huge gradient ({backend})")


# (delta, grad) dtypes: a float32 delta stepped in float64 (a float64 gradient) is rounded into float32 after
# the projection, which float64's margin does not absorb: the margin is delta's dtype's
PROJECTION_DTYPES = [pytest.param((d, g), id=f"{str(d)[6:]}-delta-{str(g)[6:]}-grad") for d, g in
                     ((torch.float32, torch.float32), (torch.float64, torch.float64), (torch.float32, torch.float64))]


def check_l2_projection_inside_eps(step, dtypes, device) -> None:
    """Rows far outside the ball, rows one step outside it and rows on its surface, for several widths:
    after ``step(delta, grad, step_size, eps)`` (an L2 ``pgd_step_``), every row's norm (in float64, of the
    stored values) is at most eps."""
    delta_dtype, grad_dtype = dtypes
    for width in (1, 7, 300, 2500):
        k = 64
        eps = (torch.rand(k, device=device, dtype=delta_dtype) + 0.1) * torch.logspace(-3, 3, k, device=device,
                                                                                    dtype=delta_dtype)
        direction = torch.randn(k, width, device=device, dtype=delta_dtype)
        delta = direction / direction.norm(dim=1, keepdim=True) * eps[:, None]  # on the surface (rounded)
        delta[::3] *= 1000  # far outside
        grad = torch.randn(k, width, device=device, dtype=grad_dtype)
        for _ in range(2):  # the second step starts from rows projected by the first
            step(delta, grad, eps * 0.5, eps)
            norms = delta.double().norm(dim=1)
            assert (norms <= eps.double()).all(), \
                f"D={width}: {int((norms > eps.double()).sum())} classes above eps, worst by {(norms / eps.double()).max().item() - 1:.2e}"


@pytest.mark.parametrize("dtypes", PROJECTION_DTYPES)
@pytest.mark.parametrize("target", GRID_TARGETS)
def test_l2_projection_never_leaves_a_class_above_eps(target, dtypes, monkeypatch):
    backend, device = use_grid(monkeypatch, target)
    check_l2_projection_inside_eps(
        lambda delta, grad, step, eps: pgd_step_(delta, grad, step, eps, 1.0, "l2", backend=backend), dtypes, device)


@pytest.mark.parametrize("target", GRID_TARGETS)
def test_fused_l2_step_of_a_float32_delta_from_float64_gradients_stays_inside_eps(target, monkeypatch):
    check_fused_step_inside_eps(*use_grid(monkeypatch, target))


def check_fused_step_inside_eps(backend: str, device: str) -> None:
    """``class_grad_pgd_step_`` with float64 ``grad_out``: the step is computed in float64 and rounded into the
    float32 delta, which stays inside the ball (delta's margin)."""
    g = torch.Generator().manual_seed(3)
    for width in (7, 64, 300):
        k, batch = 6, 40
        labels = torch.randint(0, k, (batch,), generator=g).to(device)
        eps = (torch.rand(k, generator=g) + 0.1).to(device)
        for _ in range(8):
            delta = (torch.randn(k, width, generator=g) * 0.3).to(device)
            grad_out = torch.randn(batch, width, generator=g, dtype=torch.float64).to(device)
            class_grad_pgd_step_(delta, grad_out, labels, 1.0, eps, 1.0, "l2", backend=backend)
            norms = delta.double().norm(dim=1)
            assert (norms <= eps.double()).all(), f"D={width}: worst by {(norms / eps.double()).max().item() - 1:.2e}"


@pytest.mark.parametrize("target", GRID_KERNEL_TARGETS)
def test_float64_gradient_for_a_float32_delta_is_used_in_float64(target, monkeypatch):
    backend, device = use_grid(monkeypatch, target)
    delta, grad = torch.randn(K, 40, device=device), torch.randn(K, 40, device=device, dtype=torch.float64)
    grad[0] *= 1e300  # rounded to float32 first, it would become +-Inf and step along its sign pattern
    expected = reference_step(naive.pgd_step_, delta, grad, step_size=0.3, eps=1.0, direction=1.0, norm="l2")
    got = pgd_step_(delta.clone(), grad, 0.3, 1.0, 1.0, "l2", backend=backend)
    assert_close_to_reference(got, expected, what=f"float64 grad, float32 delta ({backend})")


@pytest.mark.parametrize("hyperparameters", ["floats", "tensors"])
def test_public_steps_read_the_device_back_at_most_once_per_check(hyperparameters):
    """Validation reads the three per-class hyperparameters back in one host read, none when they are
    Python floats; class_grad_pgd_step_ reads its labels' range in one more."""
    from lpa_bench.static.counting import LaunchCounter

    values = (0.3, 1.0, -1.0) if hyperparameters == "floats" else tuple(torch.full((K,), v) for v in (0.3, 1.0, -1.0))
    expected = 0 if hyperparameters == "floats" else 1
    delta, grad = torch.randn(K, 6), torch.randn(K, 6)
    grad_out, labels = torch.randn(7, 6), torch.randint(0, K, (7,))
    with LaunchCounter() as counts:
        pgd_step_(delta, grad, *values, "l2", backend="reference")
    assert counts.summary()["host_reads"] == expected, counts.summary()["host_read_kinds"]
    with LaunchCounter() as counts:
        class_grad_pgd_step_(delta, grad_out, labels, *values, "l2", backend="reference")
    assert counts.summary()["host_reads"] == expected + 1, counts.summary()["host_read_kinds"]


def test_split_grid_is_chosen_for_few_classes_with_long_rows():
    """2 programs per multiprocessor of an H100 (264): K = 10, D = 4096 splits into 128-entry blocks,
    320 programs; the training step's K = 10, D = 64 and K = 1000 rows keep one program per class."""
    assert split.split_block(10, 4096, 264) == 128
    assert 10 * -(-4096 // 128) >= 264
    assert split.split_block(10, 64, 264) is None
    assert split.split_block(1000, 2048, 264) is None
    assert split.split_block(1, 10**6, 264) == split.SPLIT_BLOCKS[1]


def check_rounded_copy(pgd_step, device, grad_dtype, norm, ok) -> None:
    """``pgd_step`` (a backend's launcher) with ``rounded``: the update of a float32 iterate is the one it
    makes without (from the same gradient values in float32), and ``rounded`` receives the new iterate in
    ``grad_dtype``, every row (the zero-gradient class's, a guarded class's, all of them for a bad batch).
    ``ok``: None (plain), or the guarded step's verdict."""
    D = 301
    delta = 0.3 * torch.randn(K, D, device=device)
    grad = torch.randn(K, D, device=device).to(grad_dtype)
    grad[IDLE] = 0
    grad[1, 5] = float("nan")  # propagates (plain), keeps its delta (guarded)
    step, eps, direction = (torch.rand(K, device=device) * 0.2, torch.rand(K, device=device) + 0.1,
                            torch.tensor([1.0, -1.0, 1.0, -1.0, 0.5], device=device))

    def guard():  # (a fresh skipped counter per call)
        return () if ok is None else (torch.tensor(ok, device=device), torch.zeros((), dtype=torch.int64, device=device))
    expected = delta.clone()
    pgd_step(expected, grad.float(), step, eps, direction, norm, *guard())
    rounded = torch.full((K, D), float("nan"), dtype=grad_dtype, device=device)
    pgd_step(delta, grad, step, eps, direction, norm, *guard(), rounded=rounded)
    torch.testing.assert_close(delta, expected, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(rounded, delta.to(grad_dtype), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("ok", [None, True, False], ids=["plain", "ok", "bad-labels"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("target", GRID_KERNEL_TARGETS)
def test_pgd_step_writes_the_new_iterate_rounded_when_asked(target, grad_dtype, norm, ok, monkeypatch):
    """``head_pgd_``'s class space steps a float32 iterate from its 16-bit gradient and multiplies the new
    iterate, in the GEMM dtype, in the next step: the update writes that copy in its own pass."""
    backend, device = use_grid(monkeypatch, target)
    check_rounded_copy(backends.launchers(backend).pgd_step, device, grad_dtype, norm, ok)
