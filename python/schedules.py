"""``lpa-train``'s optimiser and learning-rate schedule: SGD (momentum, Nesterov, weight decay) and a
per-step ``LambdaLR`` of an optional linear warm-up followed by cosine decay to 0 or step decay at
epoch milestones (LDAM-DRW: 5 warm-up epochs, x0.01 at epochs 160 and 180)."""

from __future__ import annotations

import argparse
import math

import torch

SCHEDULES = ("cosine", "step")


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--schedule", default="cosine", choices=SCHEDULES,
                   help="learning-rate decay after the warm-up: cosine to 0, or x --lr-decay at each --milestones epoch")
    p.add_argument("--milestones", type=int, nargs="+", default=[], metavar="EPOCH",
                   help="epochs of the step schedule's decays")
    p.add_argument("--lr-decay", type=float, default=0.1, help="factor of each step decay")
    p.add_argument("--warmup-epochs", type=int, default=0, help="epochs of linear warm-up from lr / warm-up steps")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True, help="Nesterov momentum")


def check(args: argparse.Namespace) -> str:
    """Why the schedule options cannot work ("" when they can)."""
    if not 0 <= args.warmup_epochs < args.epochs:
        return f"argument --warmup-epochs: must be in [0, --epochs), got {args.warmup_epochs}"
    if not 0 <= args.momentum < 1:
        return f"argument --momentum: must be in [0, 1), got {args.momentum}"
    if args.nesterov and args.momentum == 0:
        return "argument --nesterov: needs --momentum > 0 (use --no-nesterov)"
    if not 0 < args.lr_decay <= 1:
        return f"argument --lr-decay: must be in (0, 1], got {args.lr_decay}"
    if args.schedule == "step" and not args.milestones:
        return "argument --milestones: the step schedule needs at least one epoch"
    ms = args.milestones
    if any(not 0 < m < args.epochs for m in ms) or any(later <= earlier for earlier, later in zip(ms, ms[1:])):
        return f"argument --milestones: increasing epochs in (0, --epochs), got {args.milestones}"
    return ""


def lr_factor(step: int, steps_per_epoch: int, args: argparse.Namespace) -> float:
    """The learning-rate multiplier at optimiser step ``step`` (0-based)."""
    warmup = args.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if args.schedule == "step":
        epoch = step // max(steps_per_epoch, 1)
        return args.lr_decay ** sum(epoch >= m for m in args.milestones)
    total = args.epochs * steps_per_epoch - warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total, 1)))


def build(parameters, args: argparse.Namespace, steps_per_epoch: int):
    """``(optimizer, scheduler)``; call ``scheduler.step()`` after every optimiser step."""
    optimizer = torch.optim.SGD(parameters, lr=args.lr, momentum=args.momentum, nesterov=args.nesterov,
                                weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: lr_factor(t, steps_per_epoch, args))
    return optimizer, scheduler


def describe(args: argparse.Namespace) -> str:
    """One line for the banner."""
    decay = "cosine" if args.schedule == "cosine" else f"x{args.lr_decay:g} at epochs {' '.join(map(str, args.milestones))}"
    warmup = f"{args.warmup_epochs} warm-up epochs, " if args.warmup_epochs else ""
    momentum = f"{'Nesterov ' if args.nesterov else ''}momentum {args.momentum:g}"
    return f"SGD lr {args.lr:g} ({momentum}; {warmup}{decay}), weight decay {args.weight_decay:g}"
