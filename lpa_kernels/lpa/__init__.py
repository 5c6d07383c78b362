"""LPA training machinery: split a model at a layer and train it with LPA, LPL or a baseline.

    from lpa_kernels.lpa import LPAConfig, build_method
    method = build_method("lpa", model, num_classes=10, layer="layer2", config=LPAConfig(steps=0))
    for x, y in loader:
        loss, logits = method.training_loss(x, y)
        optimizer.zero_grad(); loss.backward(); method.after_backward(); optimizer.step()

The training methods, direction policies and radius policies are registries (``METHODS``,
``DIRECTIONS``, ``RADII``; see ``lpa_kernels.lpa.registry``): a new policy is one function and one
registration in ``policies.py``, and ``lpa-train`` / ``lpa-bench`` offer it from then on.

``model`` itself is left as it was: ``model.eval(); model(x)`` evaluates without perturbation. For
data-parallel training wrap ``method.as_module()`` (whose ``forward(x, y)`` is ``training_loss``) in
``DistributedDataParallel``; the method keeps the per-class deltas identical on every rank.
"""

from lpa_kernels.lpa.config import LPAConfig
from lpa_kernels.lpa.methods import METHODS, Method, build_method
from lpa_kernels.lpa.policies import DIRECTIONS, RADII, ClassInputs
from lpa_kernels.lpa.split import Split, trace_split

__all__ = ["ClassInputs", "DIRECTIONS", "LPAConfig", "METHODS", "Method", "RADII", "Split", "build_method", "trace_split"]
