"""The all-reduces that keep LPA's state identical on every process, and their order guard.

Under ``torch.distributed`` (initialised, world size > 1) the class gradients and class statistics are
summed over the processes (``all_reduce_sum``). Collectives pair by issue order: if one rank catches an
error in a training call and goes on with the next batch while its peers are still in the previous step,
the ranks would sum the statistics and gradients of different steps and end with silently different
deltas. The order guard prevents that: before each LPA all-reduce every rank contributes
``(training call, all-reduce index within the call, signature of what is reduced)`` to a small
``all_gather``, and a rank that sees any disagreement raises ``CollectiveOrderError`` (on every rank at
once, since all of them see the same table). "Training call" counts every ``Method.training_loss`` call
of the process, including calls that raised, so a skipped or repeated step shows even when the failed
call issued no collective. The check reads the gathered table on the host: one synchronisation per LPA
all-reduce (per site: T per T-step training step, T + 1 with the loss_trend policy; one per single-pass
step), which ``set_order_guard(False)`` removes where every rank is known to run the same steps (the
collectives are then the bare all-reduces). Within ``local_only()`` (``Method.diagnostics``: a probe of
this process's batch, which one rank may run while its peers do not) the all-reduces are skipped.
"""

from __future__ import annotations

import contextlib
import zlib

import torch
import torch.distributed as dist

_guard = {"enabled": True, "call": 0, "index": 0, "local": 0}


class CollectiveOrderError(RuntimeError):
    """The ranks reached an LPA all-reduce from different training calls or for different tensors."""


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def set_order_guard(enabled: bool) -> None:
    """Turn the collective-order guard on (the default) or off for this process (see the module docstring)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _guard["enabled"] = enabled


def begin_training_call() -> None:
    """Called at the start of every ``Method.training_loss``: the all-reduces that follow belong to it."""
    _guard["call"] += 1
    _guard["index"] = 0


@contextlib.contextmanager
def local_only():
    """Within: ``all_reduce_sum`` leaves its tensor as it is (this process's batch alone), and no
    collective is issued, so the ranks' collectives stay paired whatever one rank runs here."""
    _guard["local"] += 1
    try:
        yield
    finally:
        _guard["local"] -= 1


def all_reduce_sum(t: torch.Tensor, what: str = "tensor") -> torch.Tensor:
    """Sum ``t`` in place over the processes (a no-op in a single process or within ``local_only``);
    ``what`` names it in errors."""
    if world_size() > 1 and not _guard["local"]:
        if _guard["enabled"]:
            _check_order(t, what)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_sum_together(parts: dict[str, torch.Tensor | None]) -> None:
    """``all_reduce_sum`` in place of each tensor of ``parts`` (name -> tensor; None: absent, left out), as
    ONE all-reduce (and one order check, its signature naming the parts present) when they share a dtype
    and device: packed into one buffer and copied back, which costs two small copies where each all-reduce
    costs a collective's latency (and the guard's gather and host read)."""
    present = {name: t for name, t in parts.items() if t is not None}
    if world_size() == 1 or _guard["local"] or not present:
        return
    what, tensors = " and ".join(present), list(present.values())
    if len(tensors) == 1 or len({(t.dtype, t.device) for t in tensors}) > 1:
        for t in tensors:
            all_reduce_sum(t, what)
        return
    packed = all_reduce_sum(torch.cat([t.reshape(-1) for t in tensors]), what)
    for t, part in zip(tensors, packed.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def _check_order(t: torch.Tensor, what: str) -> None:
    _guard["index"] += 1
    described = f"{what} {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
    mine = torch.tensor([_guard["call"], _guard["index"], zlib.crc32(described.encode())], dtype=torch.int64,
                        device=t.device)
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(table, mine)
    rows = [tuple(row) for row in torch.stack(table).tolist()]  # one read back, not one per rank
    if len(set(rows)) > 1:
        shown = "; ".join(f"rank {r}: call {c}, all-reduce {i}, signature {s:08x}" for r, (c, i, s) in enumerate(rows))
        raise CollectiveOrderError(
            f"LPA all-reduces out of step across ranks (rank {dist.get_rank()} is at {described}): {shown}. "
            "Every rank must make the same training calls in the same order; a rank that skips a batch "
            "after an error (or repeats one) desynchronises the per-class deltas, so training stops here")
