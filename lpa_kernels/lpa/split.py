"""Split a model at a named layer into ``lower`` (input -> layer output) and ``upper`` (the rest).

The model is traced with ``torch.fx`` (the chosen layer is kept as one call). Every node up to the
layer's call goes to ``lower``; the nodes after it go to ``upper``. Values computed before the cut and
used after it (the skip connection of a residual block cut inside it, an input the head reads again)
cross the cut as extra outputs of ``lower`` and extra inputs of ``upper``:
``h, extras = lower(x)`` and ``logits = upper(h, *extras)``. Both graph modules share the model's
submodules and parameters, so hooks, ``train()``/``eval()`` and the optimizer see one model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx, nn


@dataclass
class Split:
    """``lower(x) -> (h, extras)``, ``upper(h, *extras) -> logits``; ``head`` is the final ``nn.Linear``
    when ``upper`` is exactly ``head(h)`` or ``head(h.flatten(1))`` (the fused ``head_pgd_`` case)."""

    lower: Callable
    upper: Callable
    head: nn.Linear | None = None


class _CutTracer(fx.Tracer):
    """The default tracer, except that the layer to cut at stays one call even when it is a container."""

    def __init__(self, layer: str):
        super().__init__()
        self.layer = layer

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname == self.layer or super().is_leaf_module(m, qualname)


def _explicit_help() -> str:
    return ("pass lower= and upper= callables to build_method instead (lower(x) -> h at the layer, "
            "upper(h) -> logits)")


def trace_split(model: nn.Module, layer: str) -> Split:
    """The fx split of ``model`` at the submodule named ``layer`` (dotted name, as in ``named_modules``)."""
    names = dict(model.named_modules())
    if layer not in names or layer == "":
        raise ValueError(f"layer={layer!r} is not a submodule of the model; choose one of "
                         f"{[n for n in names if n][:20]}")
    try:
        graph = _CutTracer(layer).trace(model)
    except Exception as error:  # fx raises many kinds (control flow on tensors, unsupported ops)
        raise ValueError(f"torch.fx could not trace the model to split it at {layer!r} ({error}); "
                         f"{_explicit_help()}") from error
    nodes = list(graph.nodes)
    cuts = [n for n in nodes if n.op == "call_module" and n.target == layer]
    if len(cuts) != 1:
        raise ValueError(f"layer {layer!r} is called {len(cuts)} times in the traced forward; LPA needs a "
                         f"layer called exactly once, or {_explicit_help()}")
    cut = cuts[0]
    position = nodes.index(cut) + 1
    lower_nodes, upper_nodes = nodes[:position], nodes[position:]
    after = set(upper_nodes)
    crossing = [n for n in lower_nodes if n is not cut and any(u in after for u in n.users)]
    extras = [n for n in crossing if n.op != "get_attr"]

    lower_graph, env = fx.Graph(), {}
    for node in lower_nodes:
        env[node] = lower_graph.node_copy(node, lambda a: env[a])
    lower_graph.output((env[cut], tuple(env[n] for n in extras)))

    upper_graph, env = fx.Graph(), {}
    env[cut] = upper_graph.placeholder("h")
    for node in extras:
        env[node] = upper_graph.placeholder(f"extra_{node.name}")
    for node in crossing:
        if node.op == "get_attr":  # parameters and buffers are read again, not passed across the cut
            env[node] = upper_graph.node_copy(node)
    for node in upper_nodes:
        env[node] = upper_graph.node_copy(node, lambda a: env[a])

    upper = fx.GraphModule(model, upper_graph)
    return Split(fx.GraphModule(model, lower_graph), upper, None if extras else _head_linear(upper))


def _is_flatten(node: fx.Node, source: fx.Node) -> bool:
    """``torch.flatten(source, 1)`` or ``source.flatten(1)``."""
    is_call = (node.op == "call_function" and node.target is torch.flatten) or (
        node.op == "call_method" and node.target == "flatten")
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    return is_call and node.args[0] is source and start == 1 and len(node.args) <= 2 and "end_dim" not in node.kwargs


def _head_linear(upper: fx.GraphModule) -> nn.Linear | None:
    """The ``nn.Linear`` when the upper graph is ``linear(h)`` or ``linear(flatten(h, 1))`` and nothing else."""
    nodes = [n for n in upper.graph.nodes if n.op not in ("placeholder", "output")]
    placeholder = next(n for n in upper.graph.nodes if n.op == "placeholder")
    output = next(n for n in upper.graph.nodes if n.op == "output")
    if not nodes or len(nodes) > 2 or output.args[0] is not nodes[-1]:
        return None
    linear = nodes[-1]
    source = placeholder if len(nodes) == 1 else nodes[0]
    if len(nodes) == 2 and not _is_flatten(nodes[0], placeholder):
        return None
    if linear.op != "call_module" or list(linear.args) != [source] or linear.kwargs:
        return None
    module = upper.get_submodule(linear.target)
    return module if type(module) is nn.Linear else None


def explicit_split(lower: Callable, upper: Callable) -> Split:
    """A split from user callables ``lower(x) -> h`` and ``upper(h) -> logits`` (no extras)."""
    return Split(lambda x: (lower(x), ()), upper, upper if type(upper) is nn.Linear else None)
