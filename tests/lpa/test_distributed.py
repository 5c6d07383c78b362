"""Data-parallel LPA: two CPU processes (gloo) keep the same delta, equal to one process on the whole batch.

Each of 3 training steps has a global batch of 8 samples; rank r trains on rows 4r..4r+3 and averages
the weight gradients with an all-reduce (what DDP does). The controller all-reduces its class gradient
(the gradient of the cross-entropy summed over the global batch) and the policy statistics. A rank that
catches an error and goes on with the next batch makes every rank raise ``CollectiveOrderError``: at once
with the "host" order guard, at ``sync`` (having updated nothing since) with the default "device" one.
"""

import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from lpa_kernels.lpa import LPAConfig, build_method
from lpa_kernels.lpa import collectives
from lpa_kernels.lpa.collectives import CollectiveOrderError
from tests.lpa.models import NUM_CLASSES, mlp

WORLD = 2
CONFIGS = {
    "single-pass": ("lpa", LPAConfig(steps=0, norm="l2", eps=0.5, step_size=0.2, direction="confidence")),
    "t-step-carried": ("lpa", LPAConfig(steps=2, init="carried", norm="l2", eps=0.5, step_size=0.2,
                                        direction="confidence", radius="confidence")),
    "lpa+lpl-single-pass": ("lpa+lpl", LPAConfig(steps=0, lpl_steps=0, norm="l2", eps=0.5, step_size=0.2,
                                                 direction="ascent")),
    # at "4", which feeds the classifier: the class-space loss (lpa.head_loss) on each rank
    "single-pass-at-the-classifier": ("lpa", LPAConfig(steps=0, norm="l2", eps=0.5, step_size=0.2,
                                                       direction="confidence")),
}


def _data():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 8, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (3, 8), generator=gen)
    return x, y


def _train(rows: slice, world: int) -> dict:
    """Train every config for 3 steps on ``rows`` of each global batch; the final deltas and weights.
    Weight gradients are averaged by hand, and for one config by DDP around ``method.as_module()``."""
    x, y = _data()
    results = {}
    for key, (name, config) in list(CONFIGS.items()) + [("ddp-module", CONFIGS["t-step-carried"])]:
        torch.manual_seed(0)
        model = mlp()
        method = build_method(name, model, NUM_CLASSES, layer="4" if key.endswith("classifier") else "3",
                              config=config)
        use_ddp = key == "ddp-module" and world > 1
        forward = DistributedDataParallel(method.as_module()) if use_ddp else method.as_module()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        for step in range(3):
            loss, _ = forward(x[step, rows], y[step, rows])
            optimizer.zero_grad()
            loss.backward()
            for p in model.parameters():
                if world > 1 and not use_ddp:
                    dist.all_reduce(p.grad)
                    p.grad /= world
            method.after_backward()
            optimizer.step()
        results[key] = method.delta.clone()
        if method.logit_delta is not None:
            results[key + "/lpl"] = method.logit_delta.clone()
        results[key + "/weights"] = torch.cat([p.detach().flatten() for p in model.parameters()])
    return results


def _skip_a_step_on_rank_0(rank: int, guard: str):
    """Train with the order guard ``guard``; rank 0's second call has labels of a wrong dtype (refused at
    once; a label out of range would be found on the device and not skip the step), which it catches and
    goes on with the next batch while rank 1 is still at the second.

    "host": 3 batches; what the rank's training ended with (the guard raises in ``after_backward``).
    "device": rank 0 takes 4 batches, rank 1 3 (each makes 3 LPA all-reduces, so none is left unpaired),
    then ``sync``: ``(its outcome, delta after the first step, delta at the end)``."""
    collectives.set_order_guard(guard)
    x, y = _data()
    method = build_method("lpa", mlp(), NUM_CLASSES, layer="3", config=CONFIGS["single-pass"][1])
    rows = slice(4 * rank, 4 * rank + 4)
    first_delta = None
    for step in range(4 if guard == "device" and rank == 0 else 3):
        labels = y[step % 3, rows].clone()
        if rank == 0 and step == 1:
            labels = labels.double()
        try:
            loss, _ = method.training_loss(x[step % 3, rows], labels)
        except TypeError:
            continue
        loss.backward()
        try:  # the single-pass step's all-reduce (class gradient and statistics)
            method.after_backward()
        except CollectiveOrderError as error:
            return f"CollectiveOrderError at step {step}: {error}"
        if first_delta is None:
            first_delta = method.delta.clone()
    if guard == "host":
        return "finished"
    return _sync_outcome(method), first_delta, method.delta.clone()


def _sync_outcome(method) -> str:
    """What ``method.sync()`` ended with: "finished" or the ``CollectiveOrderError`` it raised."""
    try:
        method.sync()
    except CollectiveOrderError as error:
        return f"CollectiveOrderError at sync: {error}"
    return "finished"


def _fail_mid_step(rank: int):
    """T = 2 PGD steps, whose first all-reduce carries the statistics (larger than the second's). Each rank
    catches an error in one PGD step and goes on with the next batch: rank 0 in its second step's second
    PGD step, rank 1 in its third's, so both make five LPA all-reduces, the last two pairing all-reduces of
    different sizes. ``(sync's outcome, delta after the last in-step all-reduce, delta at the end)``."""
    x, y = _data()
    config = LPAConfig(steps=2, init="carried", head="never", norm="l2", eps=0.5, step_size=0.2,
                       direction="confidence", radius="confidence")
    method = build_method("lpa", mlp(), NUM_CLASSES, layer="3", config=config)
    pgd_forwards, failing = [0], (4 if rank == 0 else 6)
    real_upper = method._pgd_upper

    def upper(h, extras):
        pgd_forwards[0] += 1
        if pgd_forwards[0] == failing:
            raise RuntimeError("a PGD step failed")
        return real_upper(h, extras)

    method._pgd_upper = upper
    rows, in_step = slice(4 * rank, 4 * rank + 4), None
    for step in range(3):
        try:
            loss, _ = method.training_loss(x[step, rows], y[step, rows])
        except RuntimeError:
            if in_step is None:  # the PGD steps before the failure had paired with the peer's
                in_step = method.delta.clone()
            continue
        loss.backward()
        method.after_backward()
    return _sync_outcome(method), in_step, method.delta.clone()


def _sum_strided_views(rank: int) -> dict:
    """``all_reduce_sum`` of a strided view (every second column) in each guard mode: the matrices after it."""
    results = {}
    for mode in ("device", "host", False):
        collectives.set_order_guard(mode)
        matrix = torch.arange(12.0).view(3, 4) * (rank + 1)
        collectives.all_reduce_sum(matrix[:, ::2], "every second column")
        results[mode] = matrix
    return results


def _worker(rank: int, port: int, out_dir: str, task: str = "train"):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a bound on every collective: a guard that failed to fire would end the test, not hang it
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        per_rank = 8 // WORLD
        if task == "train":
            result = _train(slice(rank * per_rank, (rank + 1) * per_rank), WORLD)
        elif task == "mid-step":
            result = _fail_mid_step(rank)
        elif task == "strided":
            result = _sum_strided_views(rank)
        else:
            result = _skip_a_step_on_rank_0(rank, task)
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
        # Neither rank tears its process group down while the other may still be in a collective: once
        # (CI, 2026-11-30) a rank aborted in gloo at exit ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # A finished rank skips the interpreter's shutdown, where gloo's threads once aborted a rank whose
    # work was done and saved (lpa_programs.train.run_as_program does the same, and says why).
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_delta_is_identical_across_ranks_and_equals_one_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]
    single = _train(slice(0, 8), 1)
    for key, expected in single.items():
        assert expected.abs().sum() > 0, f"{key}: did not move"
        assert torch.equal(ranks[0][key], ranks[1][key]), f"{key}: ranks hold different deltas"
        assert torch.allclose(ranks[0][key], expected, rtol=1e-9, atol=1e-12), \
            f"{key}: two processes differ from one process on the concatenated batch"


def test_a_rank_that_skips_a_step_makes_every_rank_raise_at_once_with_the_host_guard(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), "host"), nprocs=WORLD, join=True)
    outcomes = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]
    # rank 0 is at its 3rd training call (the 2nd raised) while rank 1 is at its 2nd
    assert outcomes[0].startswith("CollectiveOrderError at step 2: "), outcomes[0]
    assert outcomes[1].startswith("CollectiveOrderError at step 1: "), outcomes[1]
    for outcome in outcomes:
        assert "rank 0: call 3, all-reduce 1" in outcome and "rank 1: call 2, all-reduce 1" in outcome


def test_a_rank_that_skips_a_step_updates_nothing_and_every_rank_raises_at_sync_with_the_device_guard(tmp_path):
    """The default guard reads nothing during training: the out-of-step all-reduces leave delta where the
    last in-step one left it, on both ranks, and ``sync`` raises on each."""
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), "device"), nprocs=WORLD, join=True)
    outcomes = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]
    calls = {0: 3, 1: 2}  # where each rank's first out-of-step all-reduce was
    for rank, (outcome, first_delta, final_delta) in enumerate(outcomes):
        assert outcome.startswith("CollectiveOrderError at sync: "), outcome
        assert f"rank {rank}'s all-reduce 1 of training call {calls[rank]} " in outcome, outcome
        assert first_delta.abs().sum() > 0
        assert torch.equal(final_delta, first_delta), f"rank {rank}: delta moved after the ranks went out of step"
    assert torch.equal(outcomes[0][1], outcomes[1][1])


def test_ranks_out_of_step_between_all_reduces_of_different_sizes_are_caught_by_the_device_guard(tmp_path):
    """Every LPA all-reduce of a dtype is padded to the largest one the process has made, its signature
    last: ranks that pair a T-step run's first all-reduce (gradient and statistics) with another's second
    (gradient only) still sum buffers of one size, and the verdict catches them."""
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), "mid-step"), nprocs=WORLD, join=True)
    outcomes = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]
    for rank, (outcome, _, final_delta) in enumerate(outcomes):
        assert outcome.startswith("CollectiveOrderError at sync: "), outcome
    # rank 1's delta when rank 0 failed: the last all-reduce both made in step (rank 0 kept that one)
    assert torch.equal(outcomes[0][2], outcomes[0][1])
    assert torch.equal(outcomes[1][2], outcomes[0][1]), "rank 1 moved delta after the ranks went out of step"


def test_all_reduce_sum_of_a_strided_view_sums_its_elements_only_in_every_mode(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), "strided"), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        for mode, matrix in torch.load(tmp_path / f"{rank}.pt").items():
            expected = torch.arange(12.0).view(3, 4) * (rank + 1)
            expected[:, ::2] = torch.arange(12.0).view(3, 4)[:, ::2] * 3  # ranks 0 and 1: 1x + 2x
            assert torch.equal(matrix, expected), f"rank {rank}, guard {mode}: {matrix}"
