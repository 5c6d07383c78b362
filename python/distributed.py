"""``lpa-train`` on several processes: ``torchrun --nproc_per_node N -m lpa_programs.train ...``.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address; ``setup`` joins the
process group from them (nccl for CUDA devices, gloo for the CPU) and gives each process its device
(``cuda:LOCAL_RANK``). Without those variables, or with ``WORLD_SIZE=1``, training is one process as before.

What every rank does, so that N processes train like one on the same global batches:
- ``--batch-size`` is the global batch; each rank takes ``batch / N`` samples of it. ``Batches`` draws
  the epoch's order with ``torch.utils.data.DistributedSampler`` (seed and epoch, so every rank agrees
  without communicating) and rank r takes every N-th sample, so the union of the ranks' k-th batches is
  the k-th batch of a one-process run with the same seed.
- Random draws inside a step (mixup, dropout, noise, image augmentation) come from torch's generator,
  reseeded at every epoch from (seed, epoch, rank): different on each rank, reproducible, and the same
  after a resume at an epoch boundary.
- The model's gradients are averaged by ``DistributedDataParallel`` around ``method.as_module()`` (or
  reduce-scattered by FSDP2 with ``--fsdp``); LPA's class gradients and statistics are summed by the
  method itself, so every rank keeps the same delta and policy state.
- BatchNorm statistics are each rank's own during an epoch (as under DDP; SyncBatchNorm is not
  used) and rank 0's at its end (``sync_buffers``). So a model with BatchNorm does not train exactly like
  one process on the global batch; a model without does, up to float rounding.
- Evaluation: each rank scores every N-th test sample and the per-class counts are summed.
- Rank 0 alone prints, writes ``--json`` and checkpoints; the other ranks' standard output is discarded.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

from lpa_kernels.lpa.collectives import set_order_guard, world_size
from lpa_programs.cli import main_process, number


# --dist-timeout: ~31 years, beyond any job (1e30 overflowed datetime.timedelta) and well inside what a clock
# counting int64 nanoseconds, as C++'s steady_clock does, can add a timeout to (292 years)
MAX_TIMEOUT_S = 1e9
_owned = {"group": False}  # whether the process group is one that ``setup`` created


@dataclass(frozen=True)
class Context:
    """This process's place in the job: ``rank`` of ``world`` processes (1 without torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def context() -> Context:
    """The current process's ``Context`` (from torch.distributed's process group, if one is joined)."""
    return Context(dist.get_rank(), dist.get_world_size()) if world_size() > 1 else Context()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fsdp", action="store_true",
                        help="under torchrun: shard the model with FSDP2 (fully_shard) instead of DDP")
    parser.add_argument("--dist-timeout", type=number(float, 1, maximum=MAX_TIMEOUT_S), default=600.0, metavar="SECONDS",
                        help="under torchrun: the longest a collective may wait for the other processes")
    parser.add_argument("--order-guard", choices=("device", "host", "off"), default="device",
                        help="under torchrun: how the ranks check that their LPA all-reduces pair up: on the device "
                             "(no host read; reported at the epoch's end), on the host (one read per LPA all-reduce; "
                             "stops at once) or not at all (lpa_kernels.lpa.collectives.set_order_guard)")


def check_arguments(args: argparse.Namespace) -> str:
    """Why the distributed options cannot be used in this job ("" when they can)."""
    world = launched_world()
    if args.fsdp and world == 1:
        return "argument --fsdp: needs several processes (torchrun --nproc_per_node N ...)"
    return ""


def batch_split_problem(batch_size: int, num_samples: int, world: int) -> str:
    """Why ``world`` processes cannot take equal shares of every global batch ("" when they can). A global
    batch is ``batch_size`` samples, or the whole training set of ``num_samples`` when that is smaller:
    an odd set cannot be split over 2 processes, which would drop a sample one process keeps."""
    if batch_size % world:
        return f"the global batch {batch_size} must be a multiple of the {world} processes"
    if batch_size > num_samples and num_samples % world:
        return (f"{batch_size} is more than the {num_samples} training samples, so a global batch is all of them, "
                f"which the {world} processes cannot share evenly: give --batch-size {num_samples - num_samples % world} "
                "or less")
    return ""


def launched_world() -> int:
    """The number of processes torchrun (or another launcher that sets ``WORLD_SIZE``) started; 1 without."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: torch.device, timeout_s: float, order_guard: str = "device") -> torch.device:
    """Join the process group described by the environment (see ``context()``); returns this rank's
    device: ``cuda:LOCAL_RANK`` for CUDA. ``timeout_s`` bounds every collective, so a rank that stops
    answering fails the others; ``order_guard`` ("device", "host" or "off") is LPA's collective-order guard."""
    if launched_world() == 1:
        return device
    set_order_guard(False if order_guard == "off" else order_guard)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        _owned["group"] = True
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return device


def agree(message: str) -> str:
    """Rank 0's ``message`` on every rank (for checks that only rank 0 can make, e.g. reading files)."""
    if world_size() == 1:
        return message
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def teardown(failed: bool) -> None:
    """Leave the process group: after a barrier when all went well (no rank tears down while another is
    still in a collective); at once after an error (the peers then fail instead of waiting)."""
    if not (_owned["group"] and dist.is_initialized()):
        return  # a process group lpa-train did not create (a caller's) is left to its owner
    _owned["group"] = False
    if not failed:
        dist.barrier()
    dist.destroy_process_group()


@contextlib.contextmanager
def quiet_unless_main():
    """A block in which only rank 0 (by torchrun's ``RANK``) prints to standard output (progress bars
    use stderr and are turned off on the other ranks by the caller)."""
    if main_process():
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Reseed torch (CPU and CUDA) for this rank's random draws in ``epoch``."""
    torch.manual_seed(int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, np.uint64)[0] >> 1))


class Batches:
    """The local batches of each epoch: ``batch_size`` is the global batch, split evenly over the ranks;
    the incomplete last batch is dropped (no tiny batches for batch norm)."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, ctx: Context):
        problem = batch_split_problem(batch_size, num_samples, ctx.world)
        if problem:
            raise ValueError(problem)
        self.local_batch = min(batch_size, num_samples) // ctx.world
        self.seed, self.ctx = seed, ctx
        self.sampler = DistributedSampler(range(num_samples), num_replicas=ctx.world, rank=ctx.rank, shuffle=True,
                                          seed=seed, drop_last=True)
        self.steps_per_epoch = len(self.sampler) // max(self.local_batch, 1)

    def epoch(self, epoch: int, device: torch.device):
        """Index tensors ``(local_batch,)`` on ``device``, one per step of ``epoch``; reseeds the random
        draws of the steps (``seed_epoch``)."""
        self.sampler.set_epoch(epoch)
        order = torch.tensor(list(self.sampler), dtype=torch.int64)
        seed_epoch(self.seed, epoch, self.ctx.rank)
        b = self.local_batch
        for step in range(self.steps_per_epoch):
            yield order[step * b:(step + 1) * b].to(device)


def wrap(method, ctx: Context, fsdp: bool, device: torch.device) -> nn.Module:
    """The module whose ``forward(x, y)`` is the training loss, prepared for the job: ``method.as_module()``
    in one process; wrapped in ``DistributedDataParallel``; or, with ``fsdp``, sharded with FSDP2
    (``fully_shard`` on every submodule that holds parameters, then on the whole)."""
    module = method.as_module()
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for sub in list(method.model.modules()):
            if next(sub.parameters(recurse=False), None) is not None:
                fully_shard(sub)
        return fully_shard(module)
    if ctx.world == 1:
        return module
    return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


@torch.no_grad()
def sync_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics). Each rank updates them from its
    own batches (DDP copies rank 0's at the start of every forward, FSDP2 never): called at the end of
    every epoch, so the evaluated and checkpointed model is the same on every rank."""
    if world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


@torch.no_grad()
def per_class_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                       batch_size: int = 1024) -> list[float]:
    """Accuracy in % per class on ``(x, y)``; under torch.distributed each rank scores every N-th sample
    and the counts are summed, so every rank returns the figures of the whole set."""
    model.eval()
    rank, world = (dist.get_rank(), world_size()) if world_size() > 1 else (0, 1)
    # the same number of forwards on every rank (FSDP2 gathers the weights in each), some maybe empty
    chunks = max(1, -(-len(y) // (world * batch_size)))
    x, y = x[rank::world], y[rank::world]
    counts = torch.zeros(2, num_classes, dtype=torch.float64, device=y.device)
    for xb, yb in zip(x.tensor_split(chunks), y.tensor_split(chunks)):
        counts[0].index_add_(0, yb, (model(xb).argmax(1) == yb).double())
        counts[1].index_add_(0, yb, torch.ones_like(yb, dtype=torch.float64))
    if world > 1:
        dist.all_reduce(counts)
    return (100.0 * counts[0] / counts[1].clamp_min(1)).tolist()
