"""A training step validates the labels once and reads no other tensor value on the host (no device sync).

On a GPU every host read of a tensor value (``int(t)``, ``bool(t)``, ``t.item()``, ...) stalls the CPU
until the queued kernels have run. The CPU tests count those reads at the Python level; the GPU test
lets CUDA itself report every synchronising call.
"""

import warnings

import pytest
import torch

from lpa_kernels.lpa import LPAConfig, build_method
from tests.lpa.models import NUM_CLASSES, batch, mlp

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
}


def training_step(method, x, y):
    loss, _ = method.training_loss(x, y)
    loss.backward()
    method.after_backward()


@pytest.fixture
def host_reads(monkeypatch):
    """Counts label range checks (``torch.aminmax``) and host reads of tensor values, by name."""
    counts = {"aminmax": 0, "reads": []}
    aminmax = torch.aminmax

    def counting_aminmax(*args, **kwargs):
        counts["aminmax"] += 1
        return aminmax(*args, **kwargs)

    monkeypatch.setattr(torch, "aminmax", counting_aminmax)
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _name=name, _original=original, **kwargs):
            counts["reads"].append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return counts


@pytest.mark.parametrize("case", list(CASES))
def test_training_step_checks_labels_once_and_reads_no_other_tensor_value(case, host_reads):
    name, config = CASES[case]
    method = build_method(name, mlp(), NUM_CLASSES, layer="3", config=LPAConfig(**config), class_counts=COUNTS)
    training_step(method, *batch(seed=0))  # the first step creates delta and the policy's constant tensors
    before = method.delta.clone()
    host_reads["aminmax"], host_reads["reads"] = 0, []
    steps = 3
    for seed in range(1, steps + 1):
        training_step(method, *batch(seed=seed))
    assert host_reads["aminmax"] == steps, f"{case}: {host_reads['aminmax']} label range checks in {steps} steps"
    assert host_reads["reads"] == ["__int__", "__int__"] * steps, \
        f"{case}: host reads other than the label check's min and max: {host_reads['reads']}"
    assert not torch.equal(method.delta, before), f"{case}: delta did not move"


@pytest.mark.parametrize("steps", [0, 2])
def test_out_of_range_labels_are_rejected_before_anything_runs(steps):
    method = build_method("lpa", mlp(), NUM_CLASSES, layer="3", config=LPAConfig(steps=steps, head="never"))
    x, y = batch()
    training_step(method, x, y)
    delta = method.delta.clone()
    bad = y.clone()
    bad[1] = NUM_CLASSES
    for call in (lambda: method.training_loss(x, bad), lambda: method.diagnostics(x, bad)):
        with pytest.raises(ValueError, match=rf"labels must lie in \[0, {NUM_CLASSES}\)"):
            call()
    with pytest.raises(TypeError, match="labels must be an int32 or int64"):
        method.training_loss(x, y.double())
    assert torch.equal(method.delta, delta), "a rejected batch changed delta"
    assert method.stats()["upper_forwards"] == steps + 1, "a rejected batch ran the upper network"


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
def test_training_step_synchronises_the_gpu_only_for_the_label_check(case):
    name, config = CASES[case]
    model = mlp(torch.float32).cuda()
    method = build_method(name, model, NUM_CLASSES, layer="3", config=LPAConfig(**config), class_counts=COUNTS)
    x, y = (t.cuda() for t in batch(dtype=torch.float32))
    training_step(method, x, y)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            training_step(method, x, y)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # Only the per-call reports: torch also warns once per process that the debug mode is a prototype
    # ("Synchronization debug mode is a prototype feature..."), which is not a synchronisation.
    syncs = [str(w.message) for w in caught if "called a synchronizing CUDA operation" in str(w.message)]
    assert len(syncs) <= 2, f"{case}: {len(syncs)} synchronising calls (the label check makes 2): {syncs}"
