"""The PGD loop of ``head_pgd_``, shared by every backend (Triton, CUDA C++ and, in PyTorch ops, the reference).

For ``logits = perturb(h, y, delta) @ W.T + b`` and summed cross-entropy, the gradient with respect to
the perturbed activations is ``(P - Y) @ W`` with ``P = softmax(logits)`` and ``Y = onehot(y)``, so one
PGD step needs no autograd: two GEMMs, a row-wise softmax and a per-class sum. The GEMMs go to cuBLAS
(``torch.mm``: tensor cores); a backend supplies the rest as :class:`HeadKernels`. Two formulations:

* **rows** (any mode): for each chunk of at most ``chunk_rows`` samples, ``h~ = perturb(h, y, delta)``,
  ``Z = h~ @ W.T + b`` (``chunk x K``), ``Z <- softmax(Z) - Y`` in place, ``G = Z @ W`` into a
  ``(B, D)`` buffer; then ``pgd``'s fused ``class_grad_pgd_step`` sums ``G`` per class (``* h_b`` for
  ``scale``) and updates the classes present, in one launch. Per step ``4 B K D`` FLOPs; extra memory
  ``chunk x K + B x D`` elements of the GEMM dtype.
* **class space** (``add`` only): the logits are affine in delta, ``Z_t = (h @ W.T + b) + E_t[y]`` with
  ``E_t = delta_t @ W.T (K x K)``, and the class-summed gradient is ``S_t @ W`` with
  ``S_t[c] = sum_{y_b = c} (P_b - Y_b)`` (``K x K``). ``h @ W.T + b`` is computed once for all steps, so a
  step costs ``4 K^2 D`` FLOPs plus two passes over ``B x K``, in four launches: the GEMM ``E_t``, one
  kernel for the softmax and its per-class sum (``softmax_class_sum``: no ``(B, K)`` probabilities),
  the GEMM ``S_t @ W`` and the update (with 16-bit GEMMs it also writes the iterate rounded to their
  dtype, the next ``E``'s operand, instead of a cast of its own). Extra memory ``B x K + 2 K x K`` (plus
  ``K x D``).

Over T steps the rows form does ``4 T B K D`` FLOPs and the class-space form ``2 B K D + 4 T K^2 D``, but
beside its GEMMs the rows form moves more memory per step (``h~``, the ``(B, D)`` sample gradients, a
scratch row per class present) in more launches. Class space runs when its ``B x K`` buffers fit in one
chunk and, on a GPU, ``cost``'s model of every kernel of both forms (bytes, FLOPs and launches on an H100)
says it is faster and its buffers are no larger than the rows form's (so never with ``K >> B``): at
``(B, D, K) = (1024, 2048, 1000)``, T = 3, the model prefers class space (about 0.63x the rows form's
time in bf16, 0.93x in float32) where FLOPs alone do not. On the CPU, where kernels run at their FLOP
rate and launch for free, FLOPs decide: class space when ``2 B + 4 T K < 4 T B`` (many samples per class).

With fewer samples than classes and a large delta (``compacts``: an LLM-vocabulary head; on the PyTorch
kernels, whose update costs every row of delta, whenever ``B < K``), the rows form runs on the rows of the
classes present: ``present_first`` lists them (then absent classes, to fill ``B``
rows) and gives each label its row, delta's ``B`` rows are gathered, the steps run on them as on a delta of
``B`` classes (the logits and the softmax still over all ``K``), and they are copied back. Classes do not
interact in the update, so the result is the full form's bit for bit, and the iterate, the update's
workspace and the class gradient are ``(B, D)``: at ``(B, D, K) = (4096, 4096, 100,000)`` in bf16 the
call's bound (``workspace_bytes``) is 0.39 GiB instead of 5.0 GiB. The training step's guard then copies
those rows only (not all of delta) and counts the other rows' non-finite values as the full guard would.

Precision: with 16-bit ``h`` and ``W`` and ``norm="l2"``, the GEMMs take 16-bit operands (tensor cores,
fp32 accumulation), the precision of an autograd PGD step on the same tensors. ``linf`` takes the sign
of every gradient entry, and rounding ``h~`` or ``P`` to 16 bits flips the sign of entries near zero,
moving them by ``2 * step_size``; so ``linf``, and float32/float64 data, run the GEMMs in the
accumulation dtype (float32 GEMMs use TF32 only when ``torch.backends.cuda.matmul.allow_tf32`` says so).
The per-class sums are deterministic (the segmented reductions of ``class_grad_pgd_step`` for the
rows form, a fixed per-class order for ``softmax_class_sum``), and the iterate stays in the accumulation
dtype between steps, rounded into ``delta`` once. Everything that depends only on the call (the label
plan, the buffers, the fused update's launch plan and arrival counters, ``h @ W.T + b``) is set up once
before the steps, so a step is its GEMMs and kernels only.

LPL's confidence rule is applied here, in PyTorch, once, from the first step's probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from lpa_kernels._common import class_order, compute_dtype, l2_iterate_eps, label_plan, new_output
from lpa_kernels.confidence import confidence_direction
from lpa_kernels.head_pgd import cost
from lpa_kernels.pgd.split import N_STATS

# Logits elements per chunk of rows (256 MiB in float32): bounds the rows form's (chunk, K) buffer, so
# K = 100,000 takes chunks of 640 rows instead of a (B, K) tensor.
CHUNK_ELEMENTS = 1 << 26
# Rows per chunk are a multiple of this when there are that many: full GEMM tiles.
ROW_ALIGN = 128
# The rows form keeps its per-class state (the iterate in the accumulation dtype, the fused update's
# workspace, the training step's guard copy) for the classes present only (at most B rows instead of K)
# when there are fewer samples than classes and delta has at least this many elements (a (K, D) float32
# buffer of 256 MiB): at (B, D, K) = (4096, 4096, 100,000) each such buffer would be 1.6 GB, 25 times its
# (B, D) counterpart. Below it, the gather, the label plan of the slots and the copy back
# (cost.COMPACT_LAUNCHES, once per call) cost more than the memory is worth.
COMPACT_MIN_ELEMENTS = 1 << 26


@dataclass(frozen=True)
class HeadKernels:
    """What a backend supplies (the launchers of its ``perturb`` and ``pgd`` kernels, plus two kernels).

    - ``perturb(h (n, D), labels (n,), delta (K, D), inner, mode) -> h~ (n, D)`` in ``h.dtype``;
    - ``prepare_class_grad_pgd_step(delta (K, D), rows (B, D), labels (B,), h (B, D) or None, inner, mode,
      norm, plan) -> launch(step, eps, direction)``, ``pgd``'s launcher contract with ``inner`` 1, prepared
      once per call: each ``launch`` is the in-place update of ``pgd_step`` on ``delta`` with the gradient
      ``sum_{y_b = c} rows_b`` (``* h_b`` for ``scale``) of the current ``rows``, summed deterministically in
      the accumulation dtype (``pgd``'s fused ``class_grad_pgd_step_``: classes absent from the batch are
      not touched);
    - ``softmax_xent_grad(out (n, K), logits (n, K), labels (n,), p_true (n,) or None)``:
      ``out = softmax(logits) - onehot(y)`` row by row (``out`` may be ``logits``), and the true class's
      probability into ``p_true`` when given;
    - ``softmax_class_sum(sums (K, K), logits (B, K), shift (K, K), labels (B,), order (B,), starts (K + 1,),
      p_true (B,) or None, scratch (2, B))``: ``sums[c] = s_c * sum_{y_b = c} softmax(logits_b + shift[c]) -
      onehot(c)`` accumulated in ``scratch``'s dtype (the accumulation dtype), rounded once into ``sums``,
      in a fixed order; float16 ``sums`` are scaled by ``s_c = 1 / 2^floor(log2 n_c)`` (``n_c`` the class's
      samples, ``torch_kernels.class_sum_scale``: exact, and the sums stay in [-2, 2], finite for any
      ``n_c``, as does ``S @ W``; the step does not depend on a positive per-class scale but through the
      L2 norm's 1e-12, which float16 gradients are far above; other dtypes hold any count unscaled, so
      their step is the definition's even for a gradient near that 1e-12); ``(order, starts)`` is ``_common.class_order`` of the labels; the true
      class's probability into ``p_true`` when given; ``scratch`` is the kernel's to overwrite;
    - ``pgd_step(delta, grad, step, eps, direction, norm, rounded=None)``: the in-place projected update
      (``grad`` in ``delta``'s dtype or the GEMM dtype); with ``rounded``, the new ``delta`` also into it
      (``pgd``'s launchers write it in the update's own pass where they can).

    ``uses_label_plan``: whether the kernels take the labels' ``label_plan`` (built once per call when the
    caller has none), or ignore it (the PyTorch kernels, which sum with ``index_add_``).
    ``updates_every_row``: whether the rows form's update costs ``K`` rows whatever the classes present
    (the PyTorch kernels); such kernels run on the classes present whenever ``B < K``.

    ``fused_class_space`` (optional): every step of the class-space form in one launch, when its
    ``serves(K, gemm dtype)`` says so and the direction is given (``triton_fused.py``):
    ``run(current (K, D) float32, base_logits (B, K), weight (K, D), labels, order, starts, step, eps,
    direction, steps, norm, ok, skipped)`` updates the iterate in place; with ``skipped`` (0-d int64; ``ok``
    0-d bool or None) under :func:`guarded`'s rule, applied in the same launch.
    """

    perturb: Callable[..., torch.Tensor]
    prepare_class_grad_pgd_step: Callable[..., Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]]
    softmax_xent_grad: Callable[..., None]
    softmax_class_sum: Callable[..., None]
    pgd_step: Callable[..., None]
    uses_label_plan: bool = True
    fused_class_space: "FusedClassSpace | None" = None
    updates_every_row: bool = False


class FusedClassSpace(NamedTuple):
    """``HeadKernels.fused_class_space``: ``serves(num_classes, gemm_dtype) -> bool`` and ``run``."""

    serves: Callable[[int, torch.dtype], bool]
    run: Callable[..., None]


def gemm_dtype(data: torch.dtype, acc: torch.dtype, norm: str) -> torch.dtype:
    """The GEMM operands' dtype: 16-bit data on tensor cores for ``l2``, else the accumulation dtype."""
    return data if norm == "l2" and data in (torch.float16, torch.bfloat16) else acc


def chunk_rows(batch: int, num_classes: int) -> int:
    """Rows per chunk of the rows form: ``chunk x K <= CHUNK_ELEMENTS``, a multiple of ``ROW_ALIGN``."""
    rows = max(1, CHUNK_ELEMENTS // max(num_classes, 1))
    if rows >= ROW_ALIGN:
        rows -= rows % ROW_ALIGN
    return min(batch, rows)


def compacts(batch: int, features: int, num_classes: int) -> bool:
    """Whether a rows-form call runs on the rows of the classes present (``present_first``) instead of
    delta's ``K`` rows: fewer samples than classes and at least ``COMPACT_MIN_ELEMENTS`` in delta."""
    return batch < num_classes and num_classes * features >= COMPACT_MIN_ELEMENTS


def present_first(labels: torch.Tensor, num_classes: int, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(classes (slots,), slot_labels (B,))`` int64, on the device (no host read): the classes present in
    ``labels`` in increasing order, then absent ones in increasing order up to ``slots`` (at least as many as
    are present, at most ``K``), and each label's index into ``classes``. The classes are distinct, so rows
    gathered by them go back with ``index_copy_`` exactly, the absent ones unchanged."""
    # uint8, not bool: CUDA sorts bool tensors only since torch 2.6
    absent = torch.ones(num_classes, dtype=torch.uint8, device=labels.device)
    absent.index_fill_(0, labels.to(torch.int64), 0)
    by_slot = torch.argsort(absent, stable=True)  # the class of each slot: present first
    slot_of_class = torch.empty_like(by_slot).scatter_(0, by_slot, torch.arange(num_classes, device=labels.device))
    return by_slot[:slots], slot_of_class[labels]


def runs_on_gpu(t: torch.Tensor) -> bool:
    """Whether ``use_class_space`` takes the GPU's rule for a call on ``t`` (``lpa-bench static``, which
    records on the CPU the launches a GPU would make, answers True)."""
    return t.is_cuda


def use_class_space(batch: int, features: int, num_classes: int, steps: int, mode: str, gemm: torch.dtype,
                    on_gpu: bool) -> bool:
    """Whether a call runs in class space (``add`` only, its ``(B, K)`` buffers within one chunk): on a GPU
    when ``cost`` models it faster than the rows form and its buffers are no larger than the rows form's;
    on the CPU by the FLOP rule (the module docstring). ``gemm``: the GEMM operands' dtype."""
    if mode != "add" or batch * num_classes > CHUNK_ELEMENTS:
        return False
    if not on_gpu:
        return 2 * batch + 4 * steps * num_classes < 4 * steps * batch
    g = gemm.itemsize
    sizes = batch, features, num_classes, g, max(g, 4)  # the accumulation dtype: float32, or float64's own
    if _form_bytes(True, *sizes) > _form_bytes(False, *sizes):
        return False
    rows, compact = chunk_rows(batch, num_classes), compacts(batch, features, num_classes)
    return (cost.call_seconds(True, batch, features, num_classes, steps, g, rows)
            < cost.call_seconds(False, batch, features, num_classes, steps, g, rows, compact))


def call_dtypes_and_form(h: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor, steps: int, mode: str,
                         norm: str) -> tuple[torch.dtype, torch.dtype, bool]:
    """``(accumulation dtype, GEMM dtype, class space?)`` of a call on these tensors."""
    acc = compute_dtype(h.dtype, weight.dtype, delta.dtype)
    gd = gemm_dtype(torch.promote_types(h.dtype, weight.dtype), acc, norm)
    return acc, gd, use_class_space(h.shape[0], h.shape[1], weight.shape[0], steps, mode, gd, runs_on_gpu(h))


def _form_bytes(class_space: bool, batch: int, features: int, classes: int, g: int, a: int) -> int:
    """The buffers of one form that the other does not have, for GEMM operands of ``g`` bytes and an
    accumulation dtype of ``a`` bytes (the rows form's per-class state for the rows ``state_rows`` says)."""
    if class_space:
        # base logits (B, K); shift and class probabilities (K, K); S @ W (K, D); the (2, B) scratch; the
        # iterate rounded to the GEMM dtype for the shift (K, D), when that is not acc (counted although a
        # delta already in the GEMM dtype is that buffer itself: the choice of form does not know delta's dtype)
        rounded = classes * features * g if g != a else 0
        return batch * classes * g + 2 * classes * classes * g + classes * features * g + 2 * batch * a + rounded
    rows, state = chunk_rows(batch, classes), state_rows(False, batch, features, classes)
    # logits (chunk, K); sample gradients (B, D); the chunk's perturbed h (chunk, D); the fused update's
    # workspace: at most another (K, D) in acc and N_STATS partials per class and tile of 32 groups (the
    # CUDA kernel's; the Triton one's are per class present)
    update = state * features * a + N_STATS * state * -(-features // 32) * a
    return rows * classes * g + batch * features * g + rows * features * g + update


def state_rows(class_space: bool, batch: int, features: int, classes: int) -> int:
    """The rows of delta a call keeps per-class state for: ``B`` when the rows form ``compacts``, else ``K``."""
    return batch if not class_space and compacts(batch, features, classes) else classes


def workspace_bytes(batch: int, features: int, classes: int, steps: int, mode: str, norm: str,
                    dtype: torch.dtype, acc: torch.dtype, on_gpu: bool = True) -> int:
    """Upper bound on the extra device memory of one call (every buffer counted as if alive at once),
    for ``h``, ``weight`` and ``delta`` in ``dtype`` on a GPU (or the CPU): the form's buffers in the GEMM
    dtype, the class gradient ``(K, D)`` and, for 16-bit ``delta``, the iterate ``(K, D)`` in ``acc``
    (``(B, D)`` each, plus delta's gathered rows, when the rows form ``compacts``); GEMM-dtype copies of
    ``h`` and ``weight`` when they differ from ``dtype``. Small ``(B,)``/``(K,)`` vectors are left out."""
    gd = gemm_dtype(dtype, acc, norm)
    g, a = gd.itemsize, acc.itemsize
    class_space = use_class_space(batch, features, classes, steps, mode, gd, on_gpu)
    state = state_rows(class_space, batch, features, classes)
    total = state * features * a  # the class gradient (class space: pgd_step's copy of a 16-bit one)
    if dtype != acc:
        total += state * features * a  # the iterate, kept in acc between steps
    if state != classes:
        total += state * features * dtype.itemsize  # delta's rows of the classes present
    if gd != dtype:
        total += (batch * features + classes * features) * g
    return total + _form_bytes(class_space, batch, features, classes, g, a)


def run_head_pgd(
    h: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    delta: torch.Tensor,
    steps: int,
    step: torch.Tensor,
    eps: torch.Tensor,
    direction: torch.Tensor | None,
    norm: str,
    mode: str,
    kernels: HeadKernels,
    plan: torch.Tensor | None = None,
    ok: torch.Tensor | None = None,
    skipped: torch.Tensor | None = None,
) -> None:
    """``steps`` PGD steps on ``delta (K, D)`` in place (validated, contiguous tensors on one device).

    ``h (B, D)``, ``labels (B,)``, ``weight (K, D)``, ``bias (K,)`` or None; ``step``, ``eps`` (K,);
    ``direction`` (K,) or None for LPL's confidence rule, fixed from the first step's softmax.
    ``plan``: ``_common.label_plan(labels, K)`` if the caller has it; else it is built here once for
    all the steps (the class sums of every step share one sort of the labels), whatever ``steps``, so
    that each step after the first costs only its own launches. With ``skipped`` (0-d int64), under the
    training step's guard (:func:`guarded`, ``ok`` 0-d bool or None), which the one-launch class space
    applies itself when its iterate is ``delta`` (float32); otherwise in torch ops around the steps.
    A rows-form call that ``compacts`` (on kernels that update every row, any with ``B < K``) runs on the
    rows of the classes present (``present_first``), gathered from ``delta`` and copied back after the
    steps, under a guard of those rows that restores and counts as the guard of all of ``delta`` would."""
    batch, num_classes = h.shape[0], weight.shape[0]
    acc, gd, class_space = call_dtypes_and_form(h, weight, delta, steps, mode, norm)
    fused = kernels.fused_class_space
    if not (batch and steps and class_space and direction is not None
            and acc == torch.float32 and fused is not None and fused.serves(num_classes, gd)):
        fused = None  # every class-space step in one launch: the classes do not interact once the direction is known
    on_present = kernels.updates_every_row and batch < num_classes or compacts(batch, h.shape[1], num_classes)
    if not (batch and steps and not class_space and on_present):
        if skipped is not None and (fused is None or delta.dtype != acc):
            guarded(delta, lambda: _steps(h, labels, weight, bias, delta, steps, step, eps, direction, norm, mode,
                                          kernels, plan, acc, gd, class_space, fused), ok, skipped)
        else:
            _steps(h, labels, weight, bias, delta, steps, step, eps, direction, norm, mode, kernels, plan, acc, gd,
                   class_space, fused, ok, skipped)
        return
    classes, row_labels = present_first(labels, num_classes, batch)
    rows = delta.index_select(0, classes)  # (B, D); the label plan is built anew for the slot labels
    picked = tuple(None if t is None else t.index_select(0, classes) for t in (step, eps, direction))
    run = lambda: _steps(h, labels, weight, bias, rows, steps, *picked, norm, mode, kernels, None, acc,  # noqa: E731
                         gd, False, None, row_labels=row_labels, classes=classes)
    if skipped is not None:
        # The guard on the rows the call updates; the others keep their values, and their non-finite ones
        # count as under the guard of all of delta.
        untouched = (~finite_rows(delta)).sum() - (~finite_rows(rows)).sum()
        skipped += untouched if ok is None else untouched * ok
        guarded(rows, run, ok, skipped)
    else:
        run()
    delta.index_copy_(0, classes, rows)


def _steps(h, labels, weight, bias, delta, steps, step, eps, direction, norm, mode, kernels: HeadKernels, plan, acc, gd,
           class_space: bool, fused: FusedClassSpace | None, ok=None, skipped=None, row_labels=None,
           classes=None) -> None:
    """:func:`run_head_pgd`'s steps, in ``fused`` (passed the guard) or in the form ``class_space`` says. With
    ``classes`` (the rows form only), ``delta``'s rows are those classes' (``present_first``), ``row_labels``
    index them and ``step``, ``eps``, ``direction`` are theirs; ``plan`` is ``row_labels``' then."""
    batch, num_classes = h.shape[0], weight.shape[0]
    if batch == 0 or steps == 0:
        return
    row_labels = labels if row_labels is None else row_labels
    if plan is None and kernels.uses_label_plan:
        plan = label_plan(row_labels, delta.shape[0])
    h, weight = h.to(gd), weight.to(gd)
    bias = None if bias is None else bias.to(gd)
    # The kernels' softmax runs in the GEMM dtype's accumulation dtype: its scratch and the probabilities
    # of the confidence rule are in that dtype.
    softmax_acc = compute_dtype(gd)
    current = delta if delta.dtype == acc else delta.to(acc)  # the iterate, in acc between steps
    eps = l2_iterate_eps(eps, delta.dtype, acc, norm)  # it is rounded into delta after the steps
    if fused is not None:
        order, starts = class_order(labels, num_classes, plan)
        fused.run(current, F.linear(h, weight, bias), weight, labels, order, starts, step, eps, direction, steps, norm,
                  ok, skipped)
    else:
        if class_space:
            form = _class_space(current, delta, h, labels, weight, bias, step, eps, norm, softmax_acc, kernels, plan)
        else:
            form = _row_chunks(current, h, labels, row_labels, weight, bias, step, eps, norm, mode, kernels, plan)
        p_true = new_output((batch,), softmax_acc, delta.device) if direction is None else None
        _pgd_loop(labels, num_classes, steps, direction, p_true, acc, form, classes)
        if form.rounds_into_delta:
            return
    if current is not delta:
        delta.copy_(current)  # rounded into delta once


def guarded(delta: torch.Tensor, run, ok: torch.Tensor | None, skipped: torch.Tensor) -> None:
    """``run()``, which updates ``delta (K, D)`` in place, under the training step's guard (the T steps
    have no hook between them, so it applies to their result): a class whose new row is not finite, or
    every class when ``ok`` (0-d bool, None: True) is False, gets its previous row back; the non-finite
    rows of an ok call are added to ``skipped`` (0-d int64) in place. No host read."""
    previous = delta.clone()
    run()
    finite = finite_rows(delta)
    keep = finite if ok is None else finite & ok
    delta.copy_(torch.where(keep[:, None], delta, previous))
    skipped += (~finite if ok is None else ~finite & ok).sum()


def finite_rows(t: torch.Tensor) -> torch.Tensor:
    """``(K,)`` bool: which rows of ``t (K, D)`` hold only finite values, without a ``(K, D)`` temporary for
    16- and 32-bit ``t``: a row's float64 sum is finite exactly when its values are (they cannot overflow
    it), NaN and infinities carry through."""
    if t.dtype == torch.float64:
        return torch.isfinite(t).all(dim=1)
    return torch.isfinite(t.sum(dim=1, dtype=torch.float64))


class Form(NamedTuple):
    """One formulation's step on the iterate ``current (K, D)`` it was built on, in two parts (the
    confidence rule's direction is fixed between them): ``gradient(p_true (B,) or None) -> g`` and
    ``update(g, direction)``, in place on ``current``; ``rounds_into_delta``: the update also writes the
    iterate rounded into delta, which then needs no copy back."""

    gradient: Callable[["torch.Tensor | None"], torch.Tensor]
    update: Callable[[torch.Tensor, torch.Tensor], None]
    rounds_into_delta: bool = False


def _class_space(current, delta, h, labels, weight, bias, step, eps, norm, softmax_acc, kernels: HeadKernels,
                 plan) -> Form:
    """The class-space form: ``g`` is the class gradient ``(K, D)`` in the GEMM dtype. ``delta``: the
    caller's, of which ``current`` is the iterate (a float32 copy of a 16-bit delta, or delta itself)."""
    (batch, features), num_classes = h.shape, weight.shape[0]
    base_logits = F.linear(h, weight, bias)  # (B, K), once for every step
    order, starts = class_order(labels, num_classes, plan) if kernels.uses_label_plan else (None, None)
    shift = new_output((num_classes, num_classes), weight.dtype, h.device)  # class c's samples' logit offset
    class_probs = new_output((num_classes, num_classes), weight.dtype, h.device)
    grad = new_output((num_classes, features), weight.dtype, h.device)
    scratch = new_output((2, batch), softmax_acc, h.device)
    # The iterate as the shift GEMM's operand, rewritten by every update: a delta of the GEMM dtype is that
    # already (current is its float32 copy) and, rewritten so, ends as the copy back would leave it; else
    # rounded once here.
    into_delta = weight.dtype != current.dtype and delta.dtype == weight.dtype
    rounded = None if weight.dtype == current.dtype else delta if into_delta else current.to(weight.dtype)

    def gradient(p_true: torch.Tensor | None) -> torch.Tensor:
        torch.mm(current if rounded is None else rounded, weight.t(), out=shift)
        kernels.softmax_class_sum(class_probs, base_logits, shift, labels, order, starts, p_true, scratch)
        return torch.mm(class_probs, weight, out=grad)

    return Form(gradient, lambda g, direction: kernels.pgd_step(current, g, step, eps, direction, norm,
                                                                rounded=rounded), into_delta)


def _row_chunks(current, h, labels, row_labels, weight, bias, step, eps, norm, mode, kernels: HeadKernels,
                plan) -> Form:
    """The rows form: ``g`` is the per-sample gradient ``(B, D)`` in the GEMM dtype; the update sums it
    per class (times ``h`` for ``scale``) and steps, in one launch, prepared here once (class order,
    launch plan, buffers), so that a step is its launches and nothing else. ``row_labels``: each sample's
    row of ``current`` (its class, or its slot when the call ``compacts``); ``labels``: its class."""
    (batch, features), num_classes = h.shape, weight.shape[0]
    rows = chunk_rows(batch, num_classes)
    logits = new_output((rows, num_classes), weight.dtype, h.device)
    sample_grad = new_output((batch, features), weight.dtype, h.device)  # d loss / d h~, row by row
    # once: the CUDA kernels take int64 labels, and would copy int32 ones each step
    labels, row_labels = labels.to(torch.int64), row_labels.to(torch.int64)
    update = kernels.prepare_class_grad_pgd_step(current, sample_grad, row_labels, h if mode == "scale" else None, 1,
                                                 mode, norm, plan)

    def gradient(p_true: torch.Tensor | None) -> torch.Tensor:
        for start in range(0, batch, rows):
            part = slice(start, min(batch, start + rows))
            part_labels = labels[part]
            h_tilde = kernels.perturb(h[part], row_labels[part], current, 1, mode)
            z = logits[: h_tilde.shape[0]]
            if bias is None:
                torch.mm(h_tilde, weight.t(), out=z)
            else:
                torch.addmm(bias, h_tilde, weight.t(), out=z)
            kernels.softmax_xent_grad(z, z, part_labels, None if p_true is None else p_true[part])
            torch.mm(z, weight, out=sample_grad[part])
        return sample_grad

    return Form(gradient, lambda g, direction: update(step, eps, direction))


def _pgd_loop(labels, num_classes, steps, direction, p_true, acc, form: Form, classes=None) -> None:
    """``steps`` PGD steps of ``form`` on its iterate; ``direction`` None means the confidence rule, from
    the first step's true-class probabilities written into ``p_true (B,)`` (taken at ``classes``, the
    iterate's rows, when given)."""
    for _ in range(steps):
        g = form.gradient(p_true)
        if direction is None:
            direction = confidence_direction(p_true, labels, num_classes)[0].to(acc)
            if classes is not None:
                direction = direction.index_select(0, classes)
            p_true = None  # the rule is fixed from the first step
        form.update(g, direction)
