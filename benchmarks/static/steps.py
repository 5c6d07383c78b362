"""Kernel launches and host reads per LPA training step (``counting.LaunchCounter``), for ERM and LPA
with T = 0, 1, 3 PGD steps, at the head and at an inner layer of an MLP and of a small CIFAR ResNet,
for ``backend="reference"`` and ``backend="triton"``.

The Triton backend runs on the CPU under Triton's interpreter, so the counts come from a subprocess
with ``TRITON_INTERPRET=1`` (set before the kernel modules are imported): :func:`run`. One warm-up
step runs first; the second step is counted. The counts are what the code does, whatever the shapes:
the model here is small (the counts do not depend on sizes, except where a launcher picks a
chunked reduction).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from lpa_bench.static.compile_worker import REPO

# The MLP of lpa-bench's training-step rows; "3" is the penultimate features (the upper network is
# the classifier: the fused head path), "1" the first hidden layer (an inner layer: perturb path).
# The ResNet is lpa-train's CIFAR ResNet (one block per stage): its pooled features feed the classifier
# (head path), its second stage is NCHW (inner layer).
MODELS = ("mlp", "resnet")
LAYERS = {"mlp": {"head": "3", "inner": "1"}, "resnet": {"head": "features.pool", "inner": "features.stage2"}}
SIZES = {"mlp": dict(B=64, IN=32, HIDDEN=64, K=10), "resnet": dict(B=16, SIDE=8, WIDTH=4, BLOCKS=1, K=10)}
METHODS = (("erm", None), ("lpa", 0), ("lpa", 1), ("lpa", 3))
BACKENDS = ("reference", "triton")


def _model_and_batch(model_name: str):
    import torch

    from lpa_bench.training import NETWORKS

    sizes = SIZES[model_name]
    model, input_shape = NETWORKS[model_name].build(sizes)
    return model, torch.randn(*input_shape), torch.randint(0, sizes["K"], (sizes["B"],)), sizes["K"]


def count_step(method_name: str, steps: int | None, layer: str, backend: str, model_name: str = "mlp") -> dict:
    import torch

    from lpa_bench.static.counting import LaunchCounter
    from lpa_bench.training import training_step
    from lpa_kernels.lpa.labels import device_label_check_only

    torch.manual_seed(0)
    model, x, y, num_classes = _model_and_batch(model_name)
    step, _ = training_step(method_name, steps, model, x, y, num_classes, layer=LAYERS[model_name][layer],
                            backend=backend)
    step()  # warm-up: lazily built state (momentum buffers, deltas) is not a per-step cost
    with device_label_check_only(), LaunchCounter() as counts:  # CPU labels standing in for GPU ones
        step()
    return {"model": model_name, "method": method_name, "steps": steps, "layer": layer, "backend": backend,
            **counts.summary()}


def count_upper(model_name: str) -> int:
    """Launches of one forward and backward of the upper network at the inner layer (the part an
    autograd PGD step re-runs): summed cross-entropy, gradient with respect to the layer's output."""
    import torch
    import torch.nn.functional as F

    from lpa_bench.static.counting import LaunchCounter
    from lpa_kernels.lpa.split import trace_split

    torch.manual_seed(0)
    model, x, y, _ = _model_and_batch(model_name)
    split = trace_split(model, LAYERS[model_name]["inner"])
    h, extras = split.lower(x)
    h = h.detach().requires_grad_(True)
    extras = tuple(e.detach() if isinstance(e, torch.Tensor) else e for e in extras)

    def upper_step():
        torch.autograd.grad(F.cross_entropy(split.upper(h, *extras), y, reduction="sum"), h)

    upper_step()
    with LaunchCounter() as counts:
        upper_step()
    summary = counts.summary()
    return summary["aten_launches"] + summary["triton_launches"]


def all_rows() -> list[dict]:
    """Every counted step; the inner-layer rows also carry ``upper_launches`` (:func:`count_upper`)."""
    rows = [count_step(name, steps, layer, backend, model) for model in MODELS for layer in LAYERS[model]
            for backend in BACKENDS for name, steps in METHODS]
    upper = {model: count_upper(model) for model in MODELS}
    for row in rows:
        if row["layer"] == "inner":
            row["upper_launches"] = upper[row["model"]]
    return rows


def run(timeout: float = 600) -> list[dict]:
    """:func:`all_rows` in a subprocess with the Triton interpreter on."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "LPA_POISON": "0", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-m", "lpa_bench.static.steps"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"step counting failed:\n{result.stderr[-6000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.stdout.write(json.dumps(all_rows()) + "\n")
