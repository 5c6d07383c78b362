"""The training step's label check, done on the device: no host read, so the step never waits for the GPU.

The public ops range-check their labels on the host (a synchronous ``ValueError``, SPEC section 2). A
training step cannot afford that read, so ``LabelGuard.check`` instead returns a ``CheckedLabels``:

- ``safe (B,)``: the labels clamped into ``[0, K)``, which every op of that step uses (no kernel indexes
  out of range, whatever the labels);
- ``ok``: a 0-d bool device tensor, False when some label lies outside ``[0, K)``. The method gates its
  updates on it (a bad batch leaves delta, the class statistics and the policies as they were);
- ``loss_labels (B,)``: what the training cross-entropy reads: ``safe``, or for a bad batch the loss's
  ``ignore_index`` everywhere, so its mean loss is NaN with a zero gradient (no extra op on the loss);
- ``plan``: on the kernel backends, the step's ``_common.label_plan`` of ``safe``, built in the same
  launch as the check (``step_update``), which every kernel of the step reuses; None on the reference
  backend, which needs none,

and remembers the label range of the last bad batch. ``LabelGuard.raise_if_bad`` reads that record back
(one host read) and raises the ``ValueError`` naming the bad labels; the method calls it where it
synchronises anyway (``Method.sync``, ``stats``, ``state_dict``), and a training loop calls
``Method.sync`` where it reads the loss for logging, or once per epoch at the latest.

Labels that live in CPU memory cost nothing to read, so they are range-checked on the host at once, as
the public ops do: the call raises before anything changes (BatchNorm statistics and the optimiser
included). The exceptions: while ``torch.compile`` traces (a data-dependent raise would break the
graph), and inside :func:`device_label_check_only`, for tools whose CPU tensors stand in for GPU ones
(the launch and host-read counters) and for tests of the device path.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from lpa_kernels import _checks
from lpa_kernels.step_update.plan import checked_labels

_host_check_cpu_labels = True


@contextlib.contextmanager
def device_label_check_only():
    """Within the block, CPU labels are checked on the device only, like GPU labels (module docstring)."""
    global _host_check_cpu_labels
    previous, _host_check_cpu_labels = _host_check_cpu_labels, False
    try:
        yield
    finally:
        _host_check_cpu_labels = previous


class CheckedLabels(NamedTuple):
    """One training batch's labels after ``LabelGuard.check`` (module docstring). ``verified``: checked
    on the host, so ``ok`` is known True and updates need no gating on it."""

    safe: torch.Tensor
    ok: torch.Tensor
    loss_labels: torch.Tensor
    plan: torch.Tensor | None
    verified: bool


class LabelGuard:
    """Device-side label range check for ``num_classes`` classes (see the module docstring)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self._bad_range = None  # (2,) int64 on the labels' device: (min, max) of the last bad batch, or (0, 0)
        self._passed = None  # 0-d bool True on the labels' device: the verdict on labels checked on the host

    def check(self, labels: object, batch: int, backend: str) -> CheckedLabels:
        """The labels of one training batch of ``batch`` samples, checked for the resolved ``backend``.
        The dtype and shape are checked on the host (metadata, no sync) and raise at once, like the
        public ops; so do the values of CPU labels (module docstring), which then need no device-side
        check, only the plan on a kernel backend."""
        on_host = self._read_on_host(labels)
        labels = _checks.check_labels(labels, batch, self.num_classes, values=on_host)
        if self._bad_range is None or self._bad_range.device != labels.device:
            self._bad_range = torch.zeros(2, dtype=torch.int64, device=labels.device)
            self._passed = torch.ones((), dtype=torch.bool, device=labels.device)
        if on_host and backend == "reference":
            labels = labels.long()  # the cross-entropy of the loss and of the PGD steps reads int64 only
            return CheckedLabels(labels, self._passed, labels, None, True)
        safe, loss_labels, ok, plan = checked_labels(labels, self.num_classes, self._bad_range, backend)
        return CheckedLabels(safe, ok, loss_labels, plan, on_host)

    def check_on_host(self, labels: object, batch: int) -> None:
        """``check``'s host part alone: where a compiled step is about to run (whose graph cannot raise on
        values), CPU labels raise at the call, as in eager mode."""
        if self._read_on_host(labels):
            _checks.check_labels(labels, batch, self.num_classes)

    @staticmethod
    def _read_on_host(labels: object) -> bool:
        return (isinstance(labels, torch.Tensor) and labels.device.type == "cpu" and _host_check_cpu_labels
                and not torch.compiler.is_compiling())

    def raise_if_bad(self) -> None:
        """Raise ``ValueError`` if a batch checked since the last call had a label outside ``[0, K)``
        (one host read), naming the labels' range in the last such batch; the record is then cleared."""
        if self._bad_range is None:
            return
        lo, hi = self._bad_range.tolist()
        if lo < 0 or hi >= self.num_classes:
            self._bad_range.zero_()
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}) (num_classes={self.num_classes}), got a training "
                f"batch with values in [{lo}, {hi}]; that batch updated nothing (its loss had no gradient)")
