"""One training step of an MLP and of a CIFAR ResNet (``NETWORKS``), plain (``erm``) vs LPA (or the methods
``--train-methods`` names, with the ``--direction`` / ``--radius`` policies) with T = 0, 1, 3 PGD steps, at
each of the network's timed layers.

The methods come from ``lpa_kernels.lpa.build_method``; each step is what a training loop does:
``loss, logits = method.training_loss(x, y)``, zero_grad, backward, ``method.after_backward()``,
``opt.step()``. Rows give the median step time, its ratio to the plain step timed alongside it (``plain_ms``;
on the CPU one call of each per round, ``timing.paired_median_ms``), and how many times the
lower network (everything below the perturbed layer) and the upper network ran per step, counted by
forward hooks on their first modules (the SPEC's algorithmic target: lower network once per step).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from lpa_bench.report import new_row
from lpa_bench.runner import Budget, attempt
from lpa_bench.timing import median_ms, paired_median_ms, timer_name

STEPS = (0, 1, 3)
COUNTED_STEPS = 3


def mlp(d_in: int, hidden: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


def _mlp_model_and_input(sizes: dict) -> tuple[nn.Module, tuple[int, ...]]:
    return mlp(sizes["IN"], sizes["HIDDEN"], sizes["K"]), (sizes["B"], sizes["IN"])


def _resnet_model_and_input(sizes: dict) -> tuple[nn.Module, tuple[int, ...]]:
    from lpa_programs.models import ResNet

    model = ResNet(sizes["K"], in_channels=3, width=sizes["WIDTH"], blocks=sizes["BLOCKS"])
    return model, (sizes["B"], 3, sizes["SIDE"], sizes["SIDE"])


@dataclass(frozen=True)
class Network:
    """A model the rows time. ``build(sizes)``: ``(model, input shape)`` at one tier's ``sizes``; each of
    ``layers`` (perturbed layer -> the first module of the upper network above it) gets its own LPA rows;
    ``lower_entry``: the first module of the lower network. Entries are leaf modules: the split model calls
    those (a traced container's own forward hooks do not run)."""

    op: str
    sizes: dict
    layers: dict
    lower_entry: str
    build: Callable[[dict], tuple[nn.Module, tuple[int, ...]]]


NETWORKS = {
    # "3" is the penultimate features, so the upper network is the linear classifier "4": the head fast path.
    "mlp": Network(
        "mlp_step",
        {"quick": dict(B=64, IN=16, HIDDEN=32, K=5), "cpu": dict(B=256, IN=64, HIDDEN=256, K=10),
         "gpu": dict(B=1024, IN=1024, HIDDEN=4096, K=1000)},
        {"3": "4"}, "0", _mlp_model_and_input),
    # lpa-train's CIFAR ResNet (cpu and gpu tiers: its default, ResNet-20 of width 16; on the CPU 16 x 16
    # images, a ~20 ms step, so that a few seconds of paired timing hold enough rounds for a stable median):
    # its pooled features feed the classifier (the head path); its second stage is NCHW (an inner layer:
    # the perturb path, whose PGD steps re-run the upper network).
    "resnet": Network(
        "resnet_step",
        {"quick": dict(B=16, SIDE=8, WIDTH=4, BLOCKS=1, K=5), "cpu": dict(B=32, SIDE=16, WIDTH=16, BLOCKS=3, K=10),
         "gpu": dict(B=256, SIDE=32, WIDTH=16, BLOCKS=3, K=100)},
        {"features.pool": "classifier", "features.stage2": "features.stage3.0.conv1"}, "features.stem.0",
        _resnet_model_and_input),
}


class _CallCounter:
    def __init__(self, module: nn.Module):
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *args):
        self.calls += 1


def class_counts(num_classes: int) -> torch.Tensor:
    """Training counts 10 K, 10 (K - 1), ..., 10 for the policies and losses that read them (a long tail)."""
    return torch.arange(num_classes, 0, -1) * 10


def _method(name: str, steps: int | None, model: nn.Module, num_classes: int, layer: str, backend: str, policies: dict):
    from lpa_kernels.lpa import LPAConfig, build_method

    # plain training goes through the same split model, so the ratio measures LPA's extra work only
    config = None if steps is None else LPAConfig(steps=steps, backend=backend, **policies)
    return build_method(name, model, num_classes, layer=layer, config=config, class_counts=class_counts(num_classes))


def training_step(name: str, steps: int | None, model: nn.Module, x, y, num_classes: int, layer: str,
                  backend: str = "auto", policies: dict | None = None):
    """``(step, method)``: ``step()`` runs one training step of ``model`` with the method ``name`` (a
    ``METHODS`` name; ``steps`` PGD steps, perturbing ``layer`` on ``backend``, ``policies`` the
    ``direction`` / ``radius`` settings) on the batch ``(x, y)``."""
    method = _method(name, steps, model, num_classes, layer, backend, policies or {})
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        loss, _ = method.training_loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        method.after_backward()
        opt.step()
        return loss

    return step, method


def _measure(name, steps, network, layer, base, x, y, num_classes, device, quick, policies):
    """(median step ms, the plain step's median ms timed alongside it (None for the plain step itself), lower
    forwards per step, upper forwards per step, method.stats())."""
    model = copy.deepcopy(base)
    step, method = training_step(name, steps, model, x, y, num_classes, layer, policies=policies)
    if name == "erm":
        ms, plain_ms = median_ms(step, device, quick), None
    else:
        plain, _ = training_step("erm", None, copy.deepcopy(base), x, y, num_classes, layer)
        ms, plain_ms = paired_median_ms(step, plain, device, quick)
    lower = _CallCounter(model.get_submodule(network.lower_entry))
    upper = _CallCounter(model.get_submodule(network.layers[layer]))
    for _ in range(COUNTED_STEPS):
        step()
    lower.handle.remove()
    upper.handle.remove()
    stats = method.stats() if hasattr(method, "stats") else None
    return ms, plain_ms, lower.calls / COUNTED_STEPS, upper.calls / COUNTED_STEPS, stats


def train_rows(tier: str, device: torch.device, budget: Budget, quick: bool, methods=("lpa",),
               policies: dict | None = None) -> Iterator[dict]:
    """For each of ``NETWORKS``: the plain step, then each of ``methods`` with T = 0, 1, 3 (``policies``:
    direction and radius) at each of its layers; each row yielded once measured."""
    for network in NETWORKS.values():
        yield from _network_rows(network, tier, device, budget, quick, methods, policies or {})


def _network_rows(network: Network, tier: str, device: torch.device, budget: Budget, quick: bool, methods,
                  policies: dict) -> Iterator[dict]:
    shape = network.sizes[tier]
    torch.manual_seed(0)
    base, input_shape = network.build(shape)
    base = base.to(device)
    x = torch.randn(*input_shape, device=device)
    y = torch.randint(0, shape["K"], (shape["B"],), device=device)
    first_layer = next(iter(network.layers))
    runs = [("erm", None, first_layer)] + [(m, t, layer) for layer in network.layers for m in methods for t in STEPS]
    for name, steps, layer in runs:
        row = new_row(bench="train_step", op=network.op, **{"pass": "step"}, impl=name, dtype="float32",
                      shape=dict(shape), variant={"layer": layer, "steps": steps, **policies}, timer=timer_name(device))
        measured = attempt(row, budget, lambda: _measure(name, steps, network, layer, base, x, y, shape["K"], device,
                                                         quick, policies))
        (row["time_ms"], row["plain_ms"], row["lower_forwards_per_step"], row["upper_forwards_per_step"],
         row["stats"]) = measured or (None,) * 5
        if row["time_ms"] and row["plain_ms"]:
            row["ratio"] = row["time_ms"] / row["plain_ms"]  # the plain step timed alongside (timing.paired_median_ms)
        if name == "lpa":  # the SPEC's step targets are LPA's; the other methods are timed, not held to them
            _lpa_targets(row)
        yield row


def _lpa_targets(row: dict) -> None:
    steps = row["variant"]["steps"]
    lower_once = None if row["lower_forwards_per_step"] is None else row["lower_forwards_per_step"] == 1
    if steps == 0:
        row["target"] = "step time <= 1.05x plain step; lower network run once per step"
        fast = None if row["ratio"] is None else row["ratio"] <= 1.05
        row["target_met"] = None if fast is None or lower_once is None else (fast and lower_once)
    else:
        row["target"] = f"lower network run once per step, not {steps + 1} times"
        row["target_met"] = lower_once
