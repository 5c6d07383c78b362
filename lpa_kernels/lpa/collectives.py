"""The all-reduces that keep LPA's state identical on every process, and their order guard.

Under ``torch.distributed`` (initialised, world size > 1) the class gradients and class statistics are
summed over the processes (``all_reduce_sum``). Collectives pair by issue order: if one rank catches an
error in a training call and goes on with the next batch while its peers are still in the previous step,
the ranks would sum the statistics and gradients of different steps and end with silently different
deltas. The order guard catches that. Every LPA all-reduce has a signature of where its rank is:
``(training call, all-reduce index within the call, CRC of what is reduced)``, where "training call"
counts every ``Method.training_loss`` call of the process, including calls that raised, so a skipped or
repeated step shows even when the failed call issued no collective. ``set_order_guard`` chooses how the
ranks compare their signatures (LPA all-reduces per perturbation site and training step: single pass
one, T steps T, T + 1 with the loss_trend policy):

- ``"device"`` (the default): no host read. The signature rides in the all-reduce itself, after the
  data: its 13 base-64 digits ``d`` and their squares. After the sum every rank holds the same ``S1 =
  sum_r d_r`` and ``S2 = sum_r d_r^2`` and compares them with ``W d`` and ``W d^2`` of its own digits
  (``W`` ranks): both hold for every digit exactly when every rank sent the same digits, since
  ``sum_r (d_r - d)^2 = S2 - 2 d S1 + W d^2`` is 0 only then. The sums are exact integers in float32 up to
  4096 ranks (``W * 63^2 < 2^24``; any float64). The verdict stays on the device, in a flag that a
  disagreement clears until it is reported: from then on what the LPA all-reduces return is zeroed, so the
  sites update nothing (a class whose gradient is all zero keeps its delta, classes absent from zeroed
  statistics leave the policies' state as it was; ``order_ok`` lets a site restore what it changed before
  the all-reduces: a fresh delta's zeroing), and ``Method.sync`` raises ``CollectiveOrderError``, on every
  rank, since every rank sees the same sums. Ranks out of step may pair all-reduces of different sizes (a T-step
  run's first, which carries the statistics, with another's second; LPA's with LPL's), which a backend
  does not survive (gloo aborts the process): so every signed all-reduce of a dtype is padded with zeros
  to the largest this process has made, its signature last, and once each kind has run (after the first
  training step) every LPA all-reduce of a dtype has one size. With 3 ranks or more the 26 numbers also
  move the backend's chunk boundaries, so the sums may differ from the unchecked ones by rounding (float32:
  ~1e-8 measured). Tensors of another dtype, or more ranks than those limits, take the "host" check.
- ``"host"``: before each LPA all-reduce every rank contributes its signature to a small ``all_gather``
  and reads the gathered table on the host: a rank that sees any disagreement raises
  ``CollectiveOrderError`` at once (every rank does, all seeing the same table), before the mismatched
  all-reduce runs; one device synchronisation per LPA all-reduce.
- ``False``: the bare all-reduces, where every rank is known to run the same steps.

In every mode, all-reduces traced by ``torch.compile`` or captured in a CUDA graph are not checked (the call
counter would be a constant in the graph; the "host" check's read cannot be traced).

Within ``local_only()`` (``Method.diagnostics``: a probe of this process's batch, which one rank may run
while its peers do not) the all-reduces are skipped.
"""

from __future__ import annotations

import contextlib
import zlib

import torch
import torch.distributed as dist

_guard = {"mode": "device", "call": 0, "index": 0, "local": 0}
_GUARD_MODES = {True: "device", "device": "device", "host": "host", False: None}

# the signature in base-64 digits: 5 of the training call (mod 2^30), 2 of the all-reduce index, 6 of the CRC
_DIGIT_BITS, _CALL_DIGITS, _INDEX_DIGITS, _CRC_DIGITS = 6, 5, 2, 6
_POSITION_DIGITS = _CALL_DIGITS + _INDEX_DIGITS
# the most ranks whose digit sums (up to W * 63^2) are exact integers in the all-reduce's dtype
_EXACT_RANKS = {torch.float32: 4096, torch.float64: 2**40}
# device -> (in order: 0-d bool, False from the first disagreement until it is reported; this rank's call
# and all-reduce index digits (float64) at that disagreement)
_verdicts: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
# dtype -> the length every signed all-reduce of that dtype is padded to: the largest this process made
_padded: dict[torch.dtype, int] = {}


class CollectiveOrderError(RuntimeError):
    """The ranks reached an LPA all-reduce from different training calls or for different tensors."""


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def set_order_guard(mode: bool | str) -> None:
    """How this process checks that the ranks' LPA all-reduces pair up (see the module docstring):
    ``"device"`` or ``True`` (the default: no host read, reported by ``Method.sync``), ``"host"`` (raises
    at once, one host read per LPA all-reduce) or ``False`` (no check)."""
    if not isinstance(mode, (bool, str)):
        raise TypeError(f"mode must be a bool or a str, got {type(mode).__name__}")
    if mode not in _GUARD_MODES:
        raise ValueError(f"mode must be 'device', 'host', True or False, got {mode!r}")
    _guard["mode"] = _GUARD_MODES[mode]


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
        _reduce([t], what)
    return t


def all_reduce_sum_together(parts: dict[str, torch.Tensor | None]) -> None:
    """``all_reduce_sum`` in place of each tensor of ``parts`` (name -> tensor; None: absent, left out), as
    ONE all-reduce (and one signature, naming the parts present) when they share a dtype and device: packed
    into one buffer and copied back, which costs two small copies where each all-reduce costs a
    collective's latency."""
    present = {name: t for name, t in parts.items() if t is not None}
    if world_size() == 1 or _guard["local"] or not present:
        return
    what, tensors = " and ".join(present), list(present.values())
    if len({(t.dtype, t.device) for t in tensors}) > 1:
        for t in tensors:
            _reduce([t], what)
    else:
        _reduce(tensors, what)


def order_ok(device: torch.device) -> torch.Tensor | None:
    """The "device" guard's verdict on ``device``: a 0-d bool, False from the first disagreement until
    ``raise_if_out_of_order`` reports it (a site restores on it what it changed before the all-reduces);
    None where it does not apply (a single process, the other modes: a verdict left pending there is still
    reported)."""
    if _guard["mode"] != "device" or world_size() == 1:
        return None
    return _verdict(device)[0]


def raise_if_out_of_order() -> None:
    """Raise ``CollectiveOrderError`` if the "device" guard found the ranks out of step since the last
    call (one host read per device where an all-reduce carried a signature); the verdict is then reset."""
    for good, position in _verdicts.values():
        flag, *digits = torch.cat([good.to(position.dtype).view(1), position]).tolist()
        if flag:
            continue
        good.fill_(True)
        call = _from_digits(digits[:_CALL_DIGITS])
        index = _from_digits(digits[_CALL_DIGITS:])
        rank = dist.get_rank() if world_size() > 1 else 0
        raise CollectiveOrderError(
            f"LPA all-reduces out of step across ranks: rank {rank}'s all-reduce {index} of training call "
            f"{call} (mod 2^30) was summed with another training call's or another tensor on a peer; from there "
            "on LPA updated nothing (delta, the class statistics and the policies kept their values). Every "
            "rank must make the same training calls in the same order; a rank that skips a batch after an "
            "error (or repeats one) desynchronises the per-class deltas, so training stops here")


def _reduce(tensors: list[torch.Tensor], what: str) -> None:
    """Sum ``tensors`` (one dtype and device; several are packed into one buffer) over the processes in
    place, with the order check the guard's mode asks for."""
    first = tensors[0]
    described = f"{what} {[tuple(t.shape) for t in tensors]} {str(first.dtype).removeprefix('torch.')}"
    check = _check_kind(first)
    if check == "device":
        return _reduce_signed(tensors, described)
    # in place when it can be: a backend sums a tensor's memory, so a strided view goes through a buffer
    in_place = len(tensors) == 1 and first.is_contiguous()
    buffer = first if in_place else torch.cat([t.reshape(-1) for t in tensors])
    if check == "host":
        _check_order(buffer, described)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    if not in_place:
        _unpack(buffer, tensors)


def _check_kind(t: torch.Tensor) -> str | None:
    """How the all-reduce of ``t``'s dtype and device is checked: "device", "host" or None."""
    mode = _guard["mode"]
    if mode is None or torch.compiler.is_compiling() or (t.is_cuda and torch.cuda.is_current_stream_capturing()):
        return None
    if mode == "host":
        return mode
    return "device" if world_size() <= _EXACT_RANKS.get(t.dtype, 0) else "host"


def _position(described: str) -> tuple[int, int, int]:
    """``(training call, all-reduce index, CRC of described)`` of the all-reduce about to run."""
    _guard["index"] += 1
    return _guard["call"], _guard["index"], zlib.crc32(described.encode())


def _digits(value: int, count: int) -> list[int]:
    return [(value >> (_DIGIT_BITS * i)) & ((1 << _DIGIT_BITS) - 1) for i in range(count)]


def _from_digits(digits) -> int:
    return sum(int(d) << (_DIGIT_BITS * i) for i, d in enumerate(digits))


def _reduce_signed(tensors: list[torch.Tensor], described: str) -> None:
    """The "device" guard's all-reduce: the data and the signature's digits and squares in one buffer;
    the verdict updated on the device and the data zeroed once the ranks disagree (module docstring)."""
    call, index, crc = _position(described)
    digits = _digits(call, _CALL_DIGITS) + _digits(index, _INDEX_DIGITS) + _digits(crc, _CRC_DIGITS)
    first, signed = tensors[0], 2 * len(digits)
    values = digits + [d * d for d in digits]
    values += [v * world_size() for v in values] + [0]  # then the sums when every rank sent the same, and a 0
    if first.is_cuda:  # pinned, so the copy to the device does not wait for the queued kernels
        uploaded = torch.tensor(values, dtype=first.dtype, pin_memory=True).to(first.device, non_blocking=True)
    else:
        uploaded = torch.tensor(values, dtype=first.dtype, device=first.device)
    signature, expected, zero = uploaded[:signed], uploaded[signed:-1], uploaded[-1]
    length = sum(t.numel() for t in tensors)
    padded = _padded[first.dtype] = max(_padded.get(first.dtype, 0), length + signed)
    padding = [first.new_zeros(padded - length - signed)] if padded > length + signed else []
    buffer = torch.cat([t.reshape(-1) for t in tensors] + padding + [signature])
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    data = buffer[:length]
    good, position = _verdict(first.device)
    # every all-reduce's position is kept while the ranks agree: the one that finds them out of step is the last
    torch.where(good, signature[:_POSITION_DIGITS], position, out=position)
    good.logical_and_((buffer[-signed:] == expected).all())
    torch.where(good, data, zero, out=data)
    _unpack(data, tensors)


def _unpack(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Copy ``flat`` (the tensors' elements one after the other) back into ``tensors``."""
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def _verdict(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if device not in _verdicts:
        _verdicts[device] = (torch.ones((), dtype=torch.bool, device=device),
                             torch.zeros(_POSITION_DIGITS, dtype=torch.float64, device=device))
    return _verdicts[device]


def _check_order(t: torch.Tensor, described: str) -> None:
    mine = torch.tensor(_position(described), dtype=torch.int64, device=t.device)
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(table, mine)
    rows = [tuple(row) for row in torch.stack(table).tolist()]  # one read back, not one per rank
    if len(set(rows)) > 1:
        shown = "; ".join(f"rank {r}: call {c}, all-reduce {i}, signature {s:08x}" for r, (c, i, s) in enumerate(rows))
        raise CollectiveOrderError(
            f"LPA all-reduces out of step across ranks (rank {dist.get_rank()} is at {described}): {shown}. "
            "Every rank must make the same training calls in the same order; a rank that skips a batch "
            "after an error (or repeats one) desynchronises the per-class deltas, so training stops here")
