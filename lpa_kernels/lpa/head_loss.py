"""The single-pass LPA step's loss at the classifier, in class space (the reference backend's CPU path).

Where the perturbed layer feeds the final ``nn.Linear(D, K)`` (weight ``W (K, D)``, bias ``b``) directly and
delta is a full ``(K, D)`` added perturbation, the training forward's logits are

    z_b = W (h_b + delta[y_b]) + b = logits0_b + E[y_b],    logits0 = W h + b,    E = delta W^T  (K, K),

so the step runs the classifier (the model's own module) on the unperturbed ``h`` and adds a class-indexed
row. The backward follows: with ``g = dL/dz (B, K)`` and ``S (K, K)`` its sums over the samples of each class,

    dL/dlogits0 = g,    dL/d delta = S W    (the class-summed gradient in h + delta[y]),
    dL/dW = g^T h (the Linear's own backward) + S^T delta,

the perturbed forward's quantities up to rounding, without the ``(B, D)`` perturbed activations: on small
CPU steps each ``(B, D)`` pass of the perturbation costs more than its arithmetic (the caches are cold after
the GEMMs), and this form's extra work is ``3 K^2 D`` multiply-adds on ``(K, D)`` rows. One autograd node
does the shift, the cross-entropy and the class statistics (forward, one host C++ call) and the three
gradients (backward, one call). ``serves`` says when: LPA alone on the reference backend's host kernels
(float32/float64 CPU tensors, grad mode on, no autocast, labels checked on the host, no hooks on the
classifier: they would see ``h`` and the unperturbed logits), add mode,
``K * K <= 4 * B`` (the ``K x K x D`` products against the perturbation's ``(B, D)`` passes), single pass
(delta's gradient goes to its leaf, the class statistics into the step's buffer). Measured on the CPU
(``lpa-bench`` MLP tier, in one process with it switched on and off): the T = 0 step's ratio to ERM's
1.19x -> 1.10x. A T-step training forward perturbs a constant delta, which costs less: no gain measured there.
``definition`` is the same loss in PyTorch ops (run where the kernels do not take the tensors); under
``create_graph=True`` the backward writes the gradients' formulas in PyTorch ops, which autograd records.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_hooks

from lpa_kernels import _host_ext
from lpa_kernels.perturb.op import scaled_grad
from lpa_kernels.step_update import naive as step_naive

# class space when K * K <= CLASSES_SQUARED_PER_SAMPLE * B (module docstring)
CLASSES_SQUARED_PER_SAMPLE = 4


def definition(logits0: torch.Tensor, labels: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
               shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, z)``: ``z (B, K) = logits0 + (delta @ weight.T)[labels]``, the perturbed logits, and the mean
    cross-entropy of ``z + shift`` (``shift (K,)``: logit adjustment, or None). The rows of the classes absent
    from ``labels`` are left out of the product, as the perturbed forward never reads them (a NaN there
    reaches no gradient)."""
    labels = labels.long()
    z = _perturbed_logits(logits0, labels, delta, weight)[0]
    return F.cross_entropy(z if shift is None else z + shift, labels), z


def _perturbed_logits(logits0: torch.Tensor, labels: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor):
    """``(z, rows, present)``: ``definition``'s ``z`` from int64 ``labels``, ``rows (K, D)`` delta with the absent
    classes' rows zero, ``present (K,)`` bool the classes present in ``labels``."""
    present = torch.zeros(delta.shape[0], dtype=torch.bool, device=labels.device).index_fill_(0, labels, True)
    rows = torch.where(present[:, None], delta, 0)
    return logits0 + (rows @ weight.T).index_select(0, labels), rows, present


def serves(h: torch.Tensor, head: nn.Linear, num_classes: int, mode: str) -> bool:
    """Whether the class-space loss serves a training batch of activations ``h`` feeding ``head`` (module
    docstring); the delta is checked apart (``serves_delta``)."""
    return (mode == "add" and torch.is_grad_enabled() and type(h) is torch.Tensor and h.dim() == 2
            and h.dtype in (torch.float32, torch.float64) and h.is_cpu and not torch.is_autocast_enabled("cpu")
            and head.in_features == h.shape[1] and head.out_features == num_classes
            and type(head.weight) in (torch.Tensor, nn.Parameter) and head.weight.dtype == h.dtype
            and num_classes * num_classes <= CLASSES_SQUARED_PER_SAMPLE * h.shape[0] and not _hooked(head)
            and _host_ext.may_run())


def _hooked(module: nn.Module) -> bool:
    """Whether hooks (the module's or global ones) may see or change the classifier's input, output or
    gradients: they would see ``h`` and the unperturbed logits there, which may change the result."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or _module_hooks._global_forward_hooks
                or _module_hooks._global_forward_pre_hooks or _module_hooks._global_backward_hooks
                or _module_hooks._global_backward_pre_hooks)


def serves_delta(delta: torch.Tensor, h: torch.Tensor) -> bool:
    """Whether the carried ``delta`` is the full ``(K, D)`` perturbation of ``h (B, D)`` in h's dtype."""
    return delta.dim() == 2 and delta.shape[1] == h.shape[1] and delta.dtype == h.dtype


def loss(logits0: torch.Tensor, labels: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
         shift: torch.Tensor | None, stats: torch.Tensor | None, grad_scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``definition``'s ``(loss, z)``, ``stats (3, K)`` (or None) increased by the class statistics of its
    log-softmax (``step_update.naive.class_stats_``), delta's gradient times ``grad_scale``. One host call
    each way where the kernels take these tensors, else ``definition``'s ops."""
    if _host_ext.serves_head_loss(logits0, labels, delta, weight, shift, stats):
        return _ClassSpaceLoss.apply(logits0, labels, delta, weight, shift, stats, grad_scale)
    result, z = definition(logits0, labels, scaled_grad(delta, grad_scale), weight, shift)
    if stats is not None:
        trained = z.detach() if shift is None else z.detach() + shift
        step_naive.class_stats_(stats, trained.log_softmax(dim=1), labels, None, accumulate=True)
    return result, z


class _ClassSpaceLoss(torch.autograd.Function):
    """``loss``'s autograd node on the host kernels (``forward(ctx, ...)`` form: the cheaper ``apply``). The
    backward reads a copy of delta taken in the forward (the single-pass update changes delta in place after
    the backward; a graph kept with ``retain_graph`` stays valid after it)."""

    @staticmethod
    def forward(ctx, logits0, labels, delta, weight, shift, stats, grad_scale: int):
        result, z, probs, delta_copy = _host_ext.head_loss_forward(logits0, labels, delta, weight, shift, stats)
        ctx.save_for_backward(logits0, probs, labels, delta_copy, weight, shift)
        ctx.grad_scale, ctx.delta, ctx.delta_version = grad_scale, delta, delta._version
        ctx.set_materialize_grads(False)  # None for an output nothing differentiates (usually the logits)
        return result, z

    @staticmethod
    def backward(ctx, grad_loss, grad_z):
        logits0, probs, labels, delta_copy, weight, shift = ctx.saved_tensors
        need_logits, _, need_delta, need_weight = ctx.needs_input_grad[:4]
        if grad_loss is None:
            grad_loss = probs.new_zeros(())
        if torch.is_grad_enabled():  # create_graph: the gradients' formulas in PyTorch ops, which autograd records
            return _recorded_backward(ctx, logits0, labels, weight, shift, grad_loss, grad_z)
        grad_logits0, grad_delta, grad_weight = _host_ext.head_loss_backward(
            probs, labels, delta_copy, weight, grad_loss.to(probs.dtype),
            None if grad_z is None else grad_z.to(probs.dtype).contiguous(), need_delta, need_weight, ctx.grad_scale)
        return grad_logits0 if need_logits else None, None, grad_delta, grad_weight, None, None, None


def _recorded_backward(ctx, logits0, labels, weight, shift, grad_loss, grad_z):
    """``_ClassSpaceLoss``'s gradients (module docstring) in PyTorch ops on the forward's own inputs, so that
    they are differentiable themselves (their graph reaches delta: it must be unchanged since the forward)."""
    delta = ctx.delta
    if delta._version != ctx.delta_version:
        raise RuntimeError("the class-space LPA loss was differentiated with create_graph=True after delta was "
                           "changed in place (after_backward): differentiate before the update")
    labels, classes = labels.long(), weight.shape[0]
    # what reaches delta through these formulas is scaled as its first-order gradient is (the perturbed
    # forward's node scales every gradient through it)
    z, rows, present = _perturbed_logits(logits0, labels, scaled_grad(delta, ctx.grad_scale), weight)
    g = (z if shift is None else z + shift).softmax(dim=1) - F.one_hot(labels, classes).to(z.dtype)
    g = g * (grad_loss / labels.shape[0])
    if grad_z is not None:
        g = g + grad_z
    sums = g.new_zeros(classes, classes).index_add(0, labels, g)  # S: the class sums of dL/dz
    grads = [g, None, torch.where(present[:, None], sums @ weight, 0) * ctx.grad_scale, sums.T @ rows]
    return tuple(grad if ctx.needs_input_grad[i] else None for i, grad in enumerate(grads)) + (None,) * 3
