"""``lpa-train`` in which one rank meets a bad label: ``torchrun ... -m tests.programs.faulty_rank RANK CALL ARGS``.

On rank ``RANK`` the ``CALL``-th training call (counting from 1) gets a label equal to the number of
classes; the label check runs on the device, so the method raises its ``ValueError`` at the epoch's end
(``method.sync``), on that rank only, while the other ranks carry on into the next collective. The
tests check that every rank then exits within a timeout.
"""

import os
import sys

from lpa_kernels.lpa.methods import Method
from lpa_programs.train import run_as_program


def _corrupt_on(rank: int, call: int) -> None:
    if int(os.environ.get("RANK", "0")) != rank:
        return
    real, calls = Method.training_loss, [0]

    def training_loss(self, x, y):
        calls[0] += 1
        if calls[0] == call:
            y = y.clone()
            y[0] = self.num_classes
        return real(self, x, y)

    Method.training_loss = training_loss


if __name__ == "__main__":
    _corrupt_on(int(sys.argv[1]), int(sys.argv[2]))
    run_as_program(sys.argv[3:])
