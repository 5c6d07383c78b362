"""The training step's label check, done on the device: no host read, so the step never waits for the GPU.

The public ops range-check their labels on the host (a synchronous ``ValueError``, SPEC section 2). A
training step cannot afford that read, so ``LabelGuard.check`` instead returns

- ``safe (B,)``: the labels clamped into ``[0, K)``, which every op and the loss of that step use (no
  kernel indexes out of range, whatever the labels), and
- ``ok``: a 0-d bool device tensor, False when some label lies outside ``[0, K)``. The method gates its
  updates on it (a bad batch leaves delta, the class statistics and the policies as they were, and its
  loss has a zero gradient),

and remembers the label range of the last bad batch. ``LabelGuard.raise_if_bad`` reads that record back
(one host read) and raises the ``ValueError`` naming the bad labels; the method calls it where it
synchronises anyway (``Method.sync``, ``stats``, ``state_dict``), and a training loop calls
``Method.sync`` where it reads the loss for logging, or once per epoch at the latest.
"""

from __future__ import annotations

import torch

from lpa_kernels import _checks


class LabelGuard:
    """Device-side label range check for ``num_classes`` classes (see the module docstring)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self._bad_range = None  # (2,) int64 on the labels' device: (min, max) of the last bad batch, or (0, 0)

    def check(self, labels: object, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(safe (B,) labels, ok 0-d bool)`` for one training batch of ``batch`` samples. The dtype and
        shape are checked on the host (metadata, no sync) and raise at once, like the public ops."""
        labels = _checks.check_labels(labels, batch, self.num_classes, values=False)
        if self._bad_range is None or self._bad_range.device != labels.device:
            self._bad_range = torch.zeros(2, dtype=torch.int64, device=labels.device)
        safe = labels.clamp(0, self.num_classes - 1)
        ok = (safe == labels).all()  # True for an empty batch
        if labels.numel():
            extremes = torch.stack(torch.aminmax(labels)).to(torch.int64)  # (min, max)
            # in place (out=): a CUDA graph replaying the step keeps the record across replays
            torch.where(ok, self._bad_range, extremes, out=self._bad_range)
        return safe, ok

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
