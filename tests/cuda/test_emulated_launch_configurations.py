"""Every CUDA launch of the public ops is one a GPU accepts, over edge and extreme shapes.

A launch with an empty grid, more than 65535 blocks along y or z, or a block over 1024 threads fails
on a GPU only ("invalid configuration argument"). The CUDA emulation refuses such launches too
(emulation/emu.h); here it only checks them (``LPA_EMU_LAUNCH=configure``: nothing runs, so shapes
too large to emulate cost nothing and the values are not compared; test_emulated_kernels.py checks
them at sizes it can run). Each op runs through its public function with ``backend="cuda"``, forward
and backward, at empty and one-sample batches, one class and 70,000 (more blocks than grid y or z
allow), one feature and wide rows, on every delta layout.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import lpa_kernels
from lpa_kernels.head_pgd import loop as head_loop
from tests.cuda.test_emulated_kernels import pytestmark  # noqa: F401 (the same skip: g++ and the CUDA headers)
from tests.head_pgd.test_head_pgd import make_problem

BATCHES = (0, 1, 37)
# (classes, features per sample, delta shape per class); K = 70,000 with few features (its (K, D) state stays small)
LAYOUTS = {
    "full": ((6, 5, 5), (6, 5, 5)), "channel": ((6, 5, 5), (6, 1, 1)), "last_dim": ((3, 4097), (4097,)),
    "one_feature": ((1,), (1,)),
}
CLASSES = (1, 3, 70_000)


@pytest.fixture()
def configure_only(cuda_backend_on_cpu, monkeypatch):
    monkeypatch.setenv("LPA_EMU_LAUNCH", "configure")
    monkeypatch.setenv("LPA_POISON", "0")


def _labels(batch: int, classes: int) -> torch.Tensor:
    return torch.randint(0, classes, (batch,)) if batch else torch.zeros(0, dtype=torch.int64)


@pytest.mark.parametrize("batch, classes, layout", [
    (b, k, name) for b, k, name in itertools.product(BATCHES, CLASSES, LAYOUTS)
    if k < 70_000 or name in ("channel", "one_feature")])
def test_perturb_class_grad_and_pgd_launches(configure_only, batch, classes, layout):
    features, per_class = LAYOUTS[layout]
    h = torch.randn(batch, *features, requires_grad=True)
    delta = torch.zeros(classes, *per_class, requires_grad=True)
    labels = _labels(batch, classes)
    for mode in ("add", "scale"):
        out = lpa_kernels.perturb(h, labels, delta, mode, backend="cuda")
        torch.autograd.grad(out, (h, delta), torch.ones_like(out))
        lpa_kernels.class_grad(out.detach(), labels, classes, delta.shape, h=h.detach(), mode=mode, backend="cuda")
        for norm in ("linf", "l2"):
            lpa_kernels.class_grad_pgd_step_(delta.detach().clone(), out.detach(), labels, 0.1, 0.3, 1.0, norm,
                                             h=h.detach(), mode=mode, backend="cuda")
    for norm in ("linf", "l2"):
        lpa_kernels.pgd_step_(delta.detach().clone(), torch.ones_like(delta), 0.1, 0.3, 1.0, norm, backend="cuda")


# the class-space form keeps (K, K) buffers, so it never serves K = 70,000 (loop.use_class_space)
@pytest.mark.parametrize("batch, classes, features, form", [
    (b, k, d, form) for b, k, d, form in itertools.product(BATCHES, CLASSES, (1, 1000), ("rows", "class_space"))
    if k < 70_000 or (d == 1 and form == "rows")])
def test_head_pgd_launches(configure_only, monkeypatch, batch, classes, features, form):
    monkeypatch.setattr(head_loop, "use_class_space", lambda *a: form == "class_space" and a[4] == "add")
    h, weight = torch.randn(batch, features), torch.randn(classes, features)
    labels = _labels(batch, classes)
    for direction, norm in (("confidence", "l2"), (1.0, "linf"), (1.0, "l2")):
        lpa_kernels.head_pgd_(h, labels, weight, torch.zeros(classes), torch.zeros(classes, features), 2, 0.1, 0.3,
                              direction, norm, "add", backend="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch, rows, in_features, out_features, classes", [
    (0, 1, 8, 8, 3), (1, 1, 1, 1, 1), (5, 3, 33, 70, 3), (2, 1, 8, 64 * 65535, 2), (3, 2, 8, 5, 70_000)])
def test_linear_perturb_launches(configure_only, dtype, batch, rows, in_features, out_features, classes):
    """float32 (a torch GEMM, then the epilogue kernel) and bfloat16 (the tensor-core GEMM with the epilogue
    fused): up to 64 x 65535 output features, the most the 16-bit GEMM's column tiles (grid y) reach."""
    x = torch.randn(batch, rows, in_features).to(dtype).requires_grad_()
    weight = torch.randn(out_features, in_features).to(dtype).requires_grad_()
    delta = torch.zeros(classes, out_features, requires_grad=True)
    out = lpa_kernels.linear_perturb(x, weight, None, _labels(batch, classes), delta, "gelu", "scale", backend="cuda")
    torch.autograd.grad(out, (x, weight, delta), torch.ones_like(out))


def test_linear_perturb_beyond_the_16_bit_gemms_grid_is_refused(configure_only):
    """One output feature past 64 x 65535 in bfloat16: a clear error instead of a launch the GPU refuses."""
    x, weight = torch.randn(2, 8).bfloat16(), torch.randn(64 * 65535 + 1, 8).bfloat16()
    with pytest.raises(ValueError, match="out_features too large"):
        lpa_kernels.linear_perturb(x, weight, None, torch.zeros(2, dtype=torch.int64), torch.zeros(2, 64 * 65535 + 1),
                                   "gelu", "add", backend="cuda")


def test_every_launch_fits_cuda_limits_at_100000_classes(configure_only):
    """K = 100,000 (an LLM-vocabulary head, issue 11's largest): the class reductions put the classes on
    the grid's x axis (up to 2^31 - 1 blocks; y and z stop at 65535, where K = 100,000 used to be refused),
    so head_pgd_'s rows form, class_grad, perturb's backward and class_grad_pgd_step_ launch. The emulation
    checks every launch's configuration against CUDA's limits without running its 100,000-odd blocks
    (LPA_EMU_LAUNCH=configure: the results are not computed here; the kernels' arithmetic is what the
    other tests check at small K, on the same grid layout)."""
    K = 100_000
    h, y, weight, bias, delta = make_problem(64, K, 8)
    assert not head_loop.use_class_space(64, 8, K, 3, "add", torch.float32, False), "test set-up: the rows form should run"
    lpa_kernels.head_pgd_(h, y, weight, bias, delta, 3, 0.1, 0.3, 1.0, "l2", "add", backend="cuda")
    grad_out = torch.randn(64, 8)
    lpa_kernels.class_grad(grad_out, y, K, (K, 8), backend="cuda")
    lpa_kernels.class_grad_pgd_step_(delta, grad_out, y, 0.1, 0.3, 1.0, "l2", backend="cuda")
    leaf = delta.clone().requires_grad_()
    lpa_kernels.perturb(h, y, leaf, "add", backend="cuda").sum().backward()


def test_a_class_reduction_grid_beyond_cuda_limits_is_refused(configure_only, launchers):
    """Group tiles go on the grid's y axis (at most 65535). Without 16-byte loads (a misaligned grad_out) a
    block covers 32 groups of one element: 65535 * 32 groups launch (only configured here, see above), one
    group more is refused with a clear error before any launch; aligned, 16-byte loads make the tiles 4x
    wider, so the same row launches."""
    D = 65535 * 32 + 1
    storage, labels = torch.zeros(D + 4), torch.zeros(1, dtype=torch.int64)

    def backward(groups, offset):
        grad_out = storage[offset:offset + groups].view(1, groups)
        return launchers.perturb_backward(grad_out, None, labels, None, 1, groups, 1, "add", False, torch.float32)

    backward(D - 1, 1)
    backward(D + 3, 0)  # aligned, D + 3 a multiple of 4
    with pytest.raises(ValueError, match="65535 group tiles"):
        backward(D, 1)
