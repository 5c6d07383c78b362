"""``ClassPerturbation``: one learned perturbation per class, updated by single-pass PGD.

Usage inside a model (the labels reach the module in training)::

    self.lpa = ClassPerturbation(num_classes, (C, 1, 1), mode="add", eps=0.5)
    ...
    h = self.lpa(h, labels)                  # identity in eval mode or without labels
    ...
    loss.backward(); model.lpa.step(); optimizer.step()
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from lpa_kernels import _checks, perturb, pgd_step_
from lpa_kernels._common import compute_dtype
from lpa_kernels.backend import _check_name as check_backend_name

HALF_DTYPES = (torch.float16, torch.bfloat16)


def _relink_after_load(module: "ClassPerturbation", incompatible_keys) -> None:
    """``load_state_dict(..., assign=True)`` replaces the buffer itself (meta-device loading): the leaf
    follows. (A function, not a lambda: the module must pickle.)"""
    module._relink()


class ClassPerturbation(nn.Module):
    """Holds ``delta (K, *shape)`` as a buffer and applies ``perturb(h, labels, delta, mode)`` in training.

    ``shape`` is broadcastable to one sample's features ``F`` (full ``F``, channel-wise ``(C, 1, 1)`` or
    last-dim ``(1, .., D)``). In training the forward perturbs with a leaf view of delta that requires
    grad (made when delta is made or moved, never inside the forward, so the module compiles with
    ``torch.compile(fullgraph=True)``); the training backward leaves the class gradient on it (the fused
    backward computes it alongside ``grad_h``), the backwards of several forwards before one ``step`` sum
    there (gradient accumulation), and ``step()`` applies one ``pgd_step_`` (single-pass LPA) and clears
    it. In eval mode, or when no labels are given, the forward is the identity.

    ``delta`` stays in its own dtype when the model is converted to a 16-bit dtype (``model.half()``,
    ``.to(torch.bfloat16)``: PGD accumulates in it); other moves (device, ``.double()``) carry a pending
    class gradient along. Assigning a new ``delta`` drops a pending class gradient; a delta substituted by
    ``torch.func.functional_call`` is used as given (differentiable when it requires grad).
    """

    def __init__(
        self,
        num_classes: int,
        shape: Sequence[int],
        mode: str = "add",
        eps: float | torch.Tensor = 1.0,
        step_size: float | torch.Tensor = 0.25,
        direction: float | torch.Tensor = 1.0,
        norm: str = "l2",
        backend: str = "auto",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        _checks.check_count("num_classes", num_classes, 1)
        shape = _checks.check_shape("shape", shape)
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        self.mode = _checks.check_choice("mode", mode, _checks.MODES)
        self.norm = _checks.check_choice("norm", norm, _checks.NORMS)
        self.eps, self.step_size, self.direction = _checks.check_per_class_values(
            [("eps", eps, True, False, None), ("step_size", step_size, False, True, None),
             ("direction", direction, False, False, _checks.DIRECTION_BOUNDS)], num_classes, dtype=compute_dtype(dtype))
        self.backend = check_backend_name(backend)
        self.register_buffer("delta", torch.zeros((num_classes, *shape), dtype=dtype, device=device))
        self._relink()
        self.register_load_state_dict_post_hook(_relink_after_load)

    def _relink(self, grad: torch.Tensor | None = None) -> None:
        """Make the leaf training forwards perturb with (sharing the ``delta`` buffer's storage), holding
        ``grad`` (a pending class gradient carried over) when given."""
        self._live = self.delta.detach().requires_grad_(True)
        self._live_source = self.delta  # the buffer the leaf was made from
        self._live.grad = grad

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name == "delta" and "_live" in self.__dict__ and isinstance(value, torch.Tensor):
            self._relink()  # a new delta assigned: the leaf follows

    def __getstate__(self):
        # the leaf is remade on unpickling (pickle would not keep it a view of delta), with its pending gradient
        state = dict(self.__dict__)
        state["_pending_grad"] = state.pop("_live").grad
        del state["_live_source"]
        return state

    def __setstate__(self, state):
        grad = state.pop("_pending_grad")
        super().__setstate__(state)
        self._relink(grad)

    def _apply(self, fn, recurse=True):
        # .to()/.cuda()/.double() may give delta new storage: the leaf follows it, with a pending gradient
        before, grad = self.delta, self._live.grad
        result = super()._apply(fn, recurse)
        if self.delta.dtype in HALF_DTYPES and before.dtype not in HALF_DTYPES:  # model.half(): delta keeps its dtype
            self._buffers["delta"] = before.to(device=self.delta.device)
        self._relink(None if grad is None else grad.to(device=self.delta.device, dtype=self.delta.dtype))
        return result

    @property
    def num_classes(self) -> int:
        return self.delta.shape[0]

    def live_delta(self) -> torch.Tensor:
        """The delta a training forward uses: the leaf sharing delta's storage that collects the class
        gradient for ``step`` (a graph input under ``torch.compile``, not a tensor made in the graph), or the
        delta ``torch.func.functional_call`` substituted for the buffer, as given. The leaf is made anew, its
        pending gradient carried, when the buffer's storage was replaced in place (``delta.data = ...``;
        eager only: a traced graph has no addresses)."""
        if self.delta is not self._live_source:
            return self.delta
        if not torch.compiler.is_compiling() and self._live.data_ptr() != self.delta.data_ptr():
            grad = self._live.grad
            self._relink(None if grad is None else grad.to(device=self.delta.device, dtype=self.delta.dtype))
        return self._live

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if not self.training or labels is None:
            return h
        return perturb(h, labels, self.live_delta(), self.mode, backend=self.backend)

    def step(
        self,
        grad: torch.Tensor | None = None,
        step_size: float | torch.Tensor | None = None,
        eps: float | torch.Tensor | None = None,
        direction: float | torch.Tensor | None = None,
    ) -> bool:
        """One PGD step on delta from ``grad (K, *shape)`` (default: the class gradient the training
        backwards since the last step left, which the step then drops). Arguments left None take the module's
        settings. Returns False (and changes nothing) when there is no gradient, e.g. no backward ran since the
        last step. A bad argument raises before anything changes, the pending gradient included."""
        if grad is None:
            grad = self._live.grad
        if grad is None:
            return False
        pgd_step_(
            self.delta, grad,
            self.step_size if step_size is None else step_size,
            self.eps if eps is None else eps,
            self.direction if direction is None else direction,
            self.norm, backend=self.backend,
        )
        self._live.grad = None
        return True

    def reset(self) -> None:
        """Set every class's perturbation back to zero and drop a pending class gradient."""
        with torch.no_grad():
            self.delta.zero_()
        self._live.grad = None

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, shape={tuple(self.delta.shape[1:])}, mode={self.mode}, norm={self.norm}"
