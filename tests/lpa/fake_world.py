"""One process pretending to be rank 0 of two, for the collectives' tests: every collective is recorded by
name, and the peer contributes what ``peer(t)`` returns (default: the same as this rank, so an all-reduce
doubles its buffer and an all-gather repeats this rank's row). Two real processes: ``test_distributed.py``."""

import torch

from lpa_kernels.lpa import collectives, site

WORLD = 2


def pretend_two_ranks(monkeypatch, peer=None) -> list:
    """Patch ``torch.distributed`` as seen by LPA into a two-rank world; returns the list of collective names."""
    calls = []
    peer = peer or (lambda t: t.clone())

    def all_gather(table, mine):
        calls.append("all_gather")
        table[0].copy_(mine)
        table[1].copy_(peer(mine))

    def all_reduce(t, op=None):
        calls.append("all_reduce")
        t.add_(peer(t))

    monkeypatch.setattr(collectives, "world_size", lambda: WORLD)
    monkeypatch.setattr(site, "world_size", lambda: WORLD)  # (its own binding: the fused head path is single-process)
    monkeypatch.setattr(collectives.dist, "get_world_size", lambda: WORLD)
    monkeypatch.setattr(collectives.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(collectives.dist, "all_gather", all_gather)
    monkeypatch.setattr(collectives.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(collectives, "_verdicts", {})  # the device guard's state in this pretence, dropped after it
    monkeypatch.setattr(collectives, "_padded", {})
    return calls


def out_of_step_peer(t: torch.Tensor) -> torch.Tensor:
    """A peer one training call behind: the last digit of the call in the "device" guard's signature (the
    26 last entries of an all-reduce: 13 digits, then their squares) is one less, or for the "host" guard's
    gathered row ``(call, index, crc)`` the call is."""
    other = t.clone()
    if other.dtype == torch.int64:
        other[0] -= 1
    else:
        other[-26] -= 1
    return other
