"""A training step reads no tensor value on the host (no device sync), for every method, T and layer.

On a GPU every host read of a tensor value (``int(t)``, ``bool(t)``, ``t.item()``, ...) stalls the CPU
until the queued kernels have run. The CPU tests count those reads at the Python level; the GPU test
lets CUDA itself raise on every synchronising call. Labels are checked on the device: a bad batch is
reported by ``Method.sync`` (tests/lpa/test_finiteness.py).
"""

import pytest
import torch

from lpa_kernels.lpa import LPAConfig, build_method
from lpa_kernels.lpa.labels import device_label_check_only
from tests.lpa.fake_world import pretend_two_ranks
from tests.lpa.models import NUM_CLASSES, TinyResNet, batch, mlp

COUNTS = torch.tensor([40, 30, 20, 10])  # training samples per class: the la prior, split and budget
HOST_READS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "numpy", "cpu")

# single pass with the policies that read batch statistics or history, and the T-step autograd path
CASES = {
    "single-pass": ("lpa", dict(steps=0)),
    "single-pass-linf-scale-confidence-radius": ("lpa", dict(steps=0, norm="linf", mode="scale", radius="confidence")),
    "single-pass-user-direction": ("lpa", dict(steps=0, direction=torch.tensor([1.0, -1.0, 1.0, -1.0]))),
    "single-pass-loss-trend": ("lpa", dict(steps=0, direction="loss_trend")),
    "single-pass-lpa+lpl": ("lpa+lpl", dict(steps=0, lpl_steps=0)),
    "single-pass-confidence-linear-radius": ("lpa", dict(steps=0, radius="confidence_linear")),
    "single-pass-la-split-budget": ("la+lpa", dict(steps=0, direction="split", radius="budget")),
    "single-pass-la-lpa+lpl": ("la+lpa+lpl", dict(steps=0, lpl_steps=0)),
    "t-step-autograd": ("lpa", dict(steps=2, head="never", init="carried")),
    "t-step-head": ("lpa", dict(steps=2)),
    "t-step-head-confidence-radius-linf": ("lpa", dict(steps=1, norm="linf", radius="confidence")),
    "t-step-lpa+lpl": ("lpa+lpl", dict(steps=1, lpl_steps=2)),
}
RESNET_CASES = {"single-pass": dict(steps=0), "t-step": dict(steps=1), "t-step-channel": dict(steps=3, delta_shape="channel")}


def training_step(method, x, y):
    loss, _ = method.training_loss(x, y)
    loss.backward()
    method.after_backward()


@pytest.fixture
def host_reads(monkeypatch):
    """The names of the tensor methods that read a value on the host, one entry per call. The CPU labels
    stand in for GPU ones, so they take the device-side check (``lpa.labels.device_label_check_only``)."""
    reads = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _name=name, _original=original, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    with device_label_check_only():
        yield reads


def _assert_no_reads(method, batches, host_reads, case):
    training_step(method, *batches[0])  # the first step creates delta and the policy's constant tensors
    before = method.delta.clone()
    host_reads.clear()
    for x, y in batches[1:]:
        training_step(method, x, y)
    assert host_reads == [], f"{case}: host reads in a training step: {host_reads}"
    assert not torch.equal(method.delta, before), f"{case}: delta did not move"


@pytest.mark.parametrize("case", list(CASES))
def test_training_step_reads_no_tensor_value(case, host_reads):
    name, config = CASES[case]
    method = build_method(name, mlp(), NUM_CLASSES, layer="3", config=LPAConfig(**config), class_counts=COUNTS)
    _assert_no_reads(method, [batch(seed=seed) for seed in range(4)], host_reads, case)


@pytest.mark.parametrize("case", list(CASES))
def test_data_parallel_training_step_reads_no_tensor_value(case, host_reads, monkeypatch):
    """As one of two ranks, with the default collective-order guard (its verdict stays on the device)."""
    calls = pretend_two_ranks(monkeypatch)
    name, config = CASES[case]
    method = build_method(name, mlp(), NUM_CLASSES, layer="3", config=LPAConfig(**config), class_counts=COUNTS)
    _assert_no_reads(method, [batch(seed=seed) for seed in range(4)], host_reads, case)
    assert set(calls) == {"all_reduce"}, calls
    method.sync()


@pytest.mark.parametrize("case", list(RESNET_CASES))
def test_resnet_training_step_at_an_inner_layer_reads_no_tensor_value(case, host_reads):
    torch.manual_seed(0)
    method = build_method("lpa", TinyResNet(), NUM_CLASSES, layer="layer1", config=LPAConfig(**RESNET_CASES[case]))
    batches = [batch(size=6, features=(3, 8, 8), dtype=torch.float32, seed=seed) for seed in range(3)]
    _assert_no_reads(method, batches, host_reads, case)


def test_diagnostics_still_check_labels_at_once():
    method = build_method("lpa", mlp(), NUM_CLASSES, layer="3", config=LPAConfig(steps=0))
    x, y = batch()
    bad = y.clone()
    bad[1] = NUM_CLASSES
    with pytest.raises(ValueError, match=rf"labels must lie in \[0, {NUM_CLASSES}\)"):
        method.diagnostics(x, bad)


def test_frequency_radius_that_is_zero_for_a_class_is_rejected():
    # a class with no training sample makes eps * (n_min / n_c) ** gamma zero for every class
    config = LPAConfig(steps=0, radius="frequency", direction="ascent")
    method = build_method("lpa", mlp(), NUM_CLASSES, layer="3", config=config, class_counts=torch.tensor([0, 3, 5, 9]))
    x, y = batch()
    loss, _ = method.training_loss(x, y)
    loss.backward()
    with pytest.raises(ValueError, match="'frequency' radius policy gives eps <= 0"):
        method.after_backward()


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("ranks", [1, 2], ids=["one-process", "data-parallel"])
def test_training_step_never_synchronises_the_gpu(case, backend, ranks, monkeypatch):
    """Data-parallel: as one of two ranks (``fake_world``), the default collective-order guard's signature
    copied to the GPU and its verdict kept there."""
    if ranks == 2:
        pretend_two_ranks(monkeypatch)
    name, config = CASES[case]
    model = mlp(torch.float32).cuda()
    method = build_method(name, model, NUM_CLASSES, layer="3", config=LPAConfig(**config, backend=backend),
                          class_counts=COUNTS)
    x, y = (t.cuda() for t in batch(dtype=torch.float32))
    training_step(method, x, y)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising CUDA call raises
    try:
        training_step(method, x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    method.sync()
