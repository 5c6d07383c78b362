"""The training step under ``torch.compile(fullgraph=True)`` (CPU: no graph break, same results as
eager) and captured whole in a CUDA graph (GPU: forward, backward, ``after_backward`` and the optimizer
step replayed give what eager steps give)."""

import copy

import pytest
import torch

from lpa_kernels.lpa import LPAConfig, build_method
from tests.lpa.models import NUM_CLASSES, TinyResNet, batch, mlp

# (T, layer, backend): in tests.lpa.models.mlp, layer "4" feeds the classifier (the fused head path),
# "3" feeds Dropout + classifier (the autograd path at the head), "1" is an inner layer
CASES = [(0, "3", "reference"), (0, "1", "triton"), (1, "4", "reference"), (2, "1", "reference"),
         (1, "4", "triton")]


def _step(training_loss, method, optimizer, x, y):
    loss, _ = training_loss(x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    method.after_backward()
    optimizer.step()
    return loss.detach()


def _twins(steps, layer, backend, device="cpu"):
    model = mlp(torch.float32).to(device)
    config = LPAConfig(steps=steps, backend=backend)
    runs = []
    for copy_of in (model, copy.deepcopy(model)):
        method = build_method("lpa", copy_of, NUM_CLASSES, layer=layer, config=config)
        runs.append((method, torch.optim.SGD(copy_of.parameters(), lr=0.1, momentum=0.9)))
    return runs


@pytest.mark.parametrize("steps,layer,backend", CASES)
@torch._dynamo.config.patch(recompile_limit=1)  # one graph for every step: nothing per-step is baked in
def test_compiled_training_loss_has_no_graph_break_and_matches_eager(steps, layer, backend):
    torch._dynamo.reset()
    (eager, eager_opt), (compiled, compiled_opt) = _twins(steps, layer, backend)
    # aot_eager: dynamo's full graph and AOT autograd without inductor's C++ build (fullgraph=True
    # raises on any graph break, whatever the backend)
    training_loss = compiled.compiled_training_loss(backend="aot_eager")
    for seed in range(4):
        x, y = batch(dtype=torch.float32, seed=seed)
        expected = _step(eager.training_loss, eager, eager_opt, x, y)
        got = _step(training_loss, compiled, compiled_opt, x, y)
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(compiled.delta, eager.delta)
    assert eager.delta.abs().sum() > 0, "delta never moved: the comparison shows nothing"
    assert compiled.stats() == eager.stats()


@pytest.mark.parametrize("method_name, steps", [("lpa", 2), ("adv", None)])
@torch._dynamo.config.patch(recompile_limit=1)
def test_pgd_through_batchnorm_compiles_and_leaves_its_statistics_as_eager_does(method_name, steps):
    """PGD forwards through BatchNorms above the cut (TinyResNet's layer2) leave their running statistics
    alone; the forward hook that once marked the norms that ran could not be traced (fullgraph failed)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyResNet()
    runs = []
    for copy_of in (model, copy.deepcopy(model)):
        config = LPAConfig(steps=steps) if steps is not None else None
        method = build_method(method_name, copy_of, NUM_CLASSES, layer="layer1", config=config)
        runs.append((copy_of, method, torch.optim.SGD(copy_of.parameters(), lr=0.1)))
    (eager_model, eager, eager_opt), (compiled_model, compiled, compiled_opt) = runs
    training_loss = compiled.compiled_training_loss(backend="aot_eager")
    for seed in range(3):
        x, y = batch(features=(3, 8, 8), dtype=torch.float32, seed=seed)
        expected = _step(eager.training_loss, eager, eager_opt, x, y)
        got = _step(training_loss, compiled, compiled_opt, x, y)
        torch.testing.assert_close(got, expected)
    for (name, want), have in zip(eager_model.state_dict().items(), compiled_model.state_dict().values()):
        torch.testing.assert_close(have, want, msg=name)
    assert eager_model.layer2[0].bn1.num_batches_tracked == 3, "one update per training forward, none per PGD step"


@pytest.mark.gpu
@pytest.mark.parametrize("steps,layer,backend", [(0, "3", "triton"), (0, "1", "cuda"), (1, "4", "triton"),
                                                 (2, "1", "triton"), (0, "3", "reference")])
def test_whole_training_step_replays_from_a_cuda_graph(steps, layer, backend):
    (eager, eager_opt), (graphed, graphed_opt) = _twins(steps, layer, backend, "cuda")
    batches = [tuple(t.cuda() for t in batch(dtype=torch.float32, seed=seed)) for seed in range(6)]
    static_x, static_y = (t.clone() for t in batches[0])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs asks
        for x, y in batches[:3]:
            _step(eager.training_loss, eager, eager_opt, x, y)
            _step(graphed.training_loss, graphed, graphed_opt, x, y)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    graphed_opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = _step(graphed.training_loss, graphed, graphed_opt, static_x, static_y)
    for x, y in batches[3:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        expected = _step(eager.training_loss, eager, eager_opt, x, y)
        torch.testing.assert_close(static_loss, expected)
        torch.testing.assert_close(graphed.delta, eager.delta)
    bad = batches[0][1].clone()
    bad[0] = NUM_CLASSES
    static_y.copy_(bad)
    graph.replay()  # the label check runs inside the graph and its record survives the replay
    with pytest.raises(ValueError, match="labels must lie in"):
        graphed.sync()
