"""``Policy.step``, the fused path of the built-in policies (``step_update``: one kernel), against the
rule-by-rule path (``Policy.observe`` then ``Policy.resolve``, the registered functions themselves) over
several steps, so the loss-trend state evolves; and the fallback for a policy a user registered."""

import pytest
import torch

from lpa_kernels.lpa import LPAConfig
from lpa_kernels.lpa.policies import DIRECTIONS
from lpa_kernels.lpa.policy import Policy
from tests.helpers import KERNEL_TARGETS

K = 7
COUNTS = torch.tensor([50, 40, 30, 20, 10, 5, 2])
REFERENCE = pytest.param(("reference", "cpu"), id="reference")
CASES = [("confidence", "constant"), ("confidence", "confidence"), ("confidence", "confidence_linear"),
         ("loss_trend", "confidence"), ("loss_trend", "frequency"), ("split", "budget"), ("frequency", "confidence"),
         ("ascent", "constant"), ("user", "confidence_linear")]


def _stats(step: int, dtype) -> torch.Tensor:
    """Class statistics with an absent class (5) and, at step 1, a class (2) of non-finite sums."""
    generator = torch.Generator().manual_seed(step)
    counts = torch.randint(1, 5, (K,), generator=generator).to(dtype)
    counts[5] = 0
    p_sum = counts * torch.rand(K, generator=generator, dtype=dtype)
    ce_sum = counts * torch.rand(K, generator=generator, dtype=dtype) * 2
    if step == 1:
        p_sum[2] = float("nan")
    return torch.stack([counts, p_sum, ce_sum])


@pytest.mark.parametrize("target", [REFERENCE] + KERNEL_TARGETS)
@pytest.mark.parametrize("direction,radius", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_policy_equals_the_rule_by_rule_path(target, direction, radius, dtype):
    backend, device = target
    chosen = torch.tensor([1.0, -1.0, 0.5, 0.0, -0.25, 1.0, -1.0]) if direction == "user" else direction
    config = LPAConfig(direction=chosen, radius=radius, delta_eps=0.3, trend_momentum=0.6)
    fused, rules = (Policy(config, K, 0.5, COUNTS) for _ in range(2))
    assert fused.fused
    like = torch.zeros(K, dtype=dtype, device=device)
    for step in range(3):
        stats = _stats(step, dtype).to(device)
        got_stats = stats.clone()
        got = fused.step(got_stats if fused.needs_stats or fused.tracks_loss else None, like, observe=True,
                         clear=True, backend=backend)
        rules.observe(stats)
        expected = rules.resolve(stats, like)
        assert torch.equal(got[0].cpu(), expected[0].cpu()), f"direction at step {step}"
        assert got[1].dtype == expected[1].dtype == dtype
        torch.testing.assert_close(got[1], expected[1], rtol=4 * torch.finfo(dtype).eps, atol=0)
        if fused.needs_stats or fused.tracks_loss:
            assert not got_stats.any(), "the statistics were not cleared"
    if rules.tracks_loss:
        torch.testing.assert_close(fused.loss_ema, rules.loss_ema, equal_nan=True, rtol=1e-12, atol=0)
        torch.testing.assert_close(fused.fall_ema, rules.fall_ema, rtol=1e-12, atol=0)
        assert fused.skipped_observations == rules.skipped_observations == 1
        assert set(expected[0].tolist()) >= {-1.0, 1.0}, "the trend gave no direction: the comparison shows little"


def test_a_user_registered_batch_policy_takes_the_rule_by_rule_path():
    DIRECTIONS.register("least_seen", "the classes with the fewest samples this batch ascend", batch=True)(
        lambda inputs: torch.where(inputs.p_true < 0.5, 1.0, -1.0).to(inputs.p_true.dtype))
    try:
        policy = Policy(LPAConfig(direction="least_seen"), K, 0.5, None)
        assert not policy.fused
        stats = _stats(0, torch.float64)
        direction, eps = policy.step(stats, torch.zeros(K, dtype=torch.float64), observe=True, clear=True,
                                     backend="reference")
        means = stats[1] / stats[0].clamp_min(1)
        assert direction.tolist() == torch.where(means < 0.5, 1.0, -1.0).tolist()
        assert eps.tolist() == [0.5] * K and not stats.any()
    finally:
        DIRECTIONS.remove("least_seen")
