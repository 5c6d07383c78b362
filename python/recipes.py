"""Named training recipes for ``lpa-train --recipe NAME``: the published settings LPA is compared under.

A recipe sets option defaults; any option given on the command line still wins. ``--help`` lists every
recipe in full and ``--json`` records the recipe's name and settings.

- ``lpl-wrn28-10`` / ``lpl-wrn16-8``: LPL's balanced CIFAR runs (lpl-balanced/train_lpl.py): 240 epochs,
  batch 128, SGD lr 0.1 with Nesterov momentum 0.9, weight decay 5e-4, cosine decay, dropout 0.3.
- ``la-resnet32``: LPL's long-tail runs with the logit-adjusted loss (lpl-longtail-other): ResNet-32 with
  option-A shortcuts, 1240 epochs, batch 128, lr 0.1 Nesterov 0.9, weight decay 1e-4, x0.1 at epochs
  604 and 824; LPL's split direction and budget radius.
- ``ldam-drw-resnet32``: LDAM-DRW's CIFAR-LT schedule: ResNet-32 (option A), 200 epochs, 5 warm-up epochs,
  x0.01 at epochs 160 and 180, weight decay 2e-4, batch 128, lr 0.1, momentum 0.9 (not Nesterov).

All evaluate every epoch (best and last accuracy) and use bf16 autocast on a GPU (``--amp`` on the CPU too,
``--no-amp`` nowhere).
"""

from __future__ import annotations

import argparse

# a recipe's --amp: bf16 autocast where the run's device is a GPU (resolved_amp), not on the CPU
ON_A_GPU = "on a GPU"
_COMMON = dict(batch_size=128, lr=0.1, momentum=0.9, eval_every=1, amp=ON_A_GPU)
_LONG_TAIL = dict(model="resnet32a", direction="split", radius="budget")
RECIPES = {
    "lpl-wrn28-10": dict(_COMMON, model="wrn28-10", epochs=240, schedule="cosine", weight_decay=5e-4, nesterov=True),
    "lpl-wrn16-8": dict(_COMMON, model="wrn16-8", epochs=240, schedule="cosine", weight_decay=5e-4, nesterov=True),
    "la-resnet32": dict(_COMMON, **_LONG_TAIL, epochs=1240, schedule="step", milestones=[604, 824], lr_decay=0.1,
                        weight_decay=1e-4, nesterov=True, tau=1.0),
    "ldam-drw-resnet32": dict(_COMMON, **_LONG_TAIL, epochs=200, schedule="step", milestones=[160, 180], lr_decay=0.01,
                              warmup_epochs=5, weight_decay=2e-4, nesterov=False),
}


def add_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default=None, choices=RECIPES, metavar="NAME",
                   help="start from a named recipe's settings (listed below); explicit options override them")


def describe() -> str:
    """Every recipe in full, for ``--help``."""
    lines = ["recipes (--recipe NAME; explicit options override):"]
    for name, settings in RECIPES.items():
        lines.append(f"  {name}: {' '.join(_as_option(k, v) for k, v in settings.items())}")
    return "\n".join(lines)


def _as_option(name: str, value) -> str:
    """A recipe setting as the command-line option that gives it."""
    option = "--" + name.replace("_", "-")
    if value == ON_A_GPU:
        return f"{option} ({value})"
    if isinstance(value, bool):
        return option if value else option.replace("--", "--no-", 1)
    return f"{option} {' '.join(map(str, value)) if isinstance(value, list) else value}"


def resolved_amp(amp: bool | str, device) -> bool:
    """``--amp`` for a run on ``device`` (a ``torch.device``): as given, or a recipe's ``ON_A_GPU``."""
    return device.type == "cuda" if amp == ON_A_GPU else amp


def apply(parser: argparse.ArgumentParser, argv: list[str] | None) -> dict:
    """Set the chosen recipe's settings as ``parser``'s defaults (before the real parse); returns
    ``{"name": ..., "settings": ...}`` or ``{}`` without a recipe."""
    known, _ = parser.parse_known_args(argv)
    if known.recipe is None:
        return {}
    settings = RECIPES[known.recipe]
    parser.set_defaults(**settings)
    return {"name": known.recipe, "settings": settings}
