"""lpa-train's recipes, learning-rate schedules and CIFAR networks."""

import argparse
import json

import pytest
import torch

from lpa_programs import recipes, schedules
from lpa_programs.cifar_models import CIFAR_MODELS, OptionABlock
from lpa_programs.models import ResNet
from lpa_programs.train import build_parser, main
from tests.programs.fake_cifar import write_cifar


def _schedule(**kw):
    defaults = dict(epochs=10, schedule="cosine", milestones=[], lr_decay=0.1, warmup_epochs=0, momentum=0.9, nesterov=True)
    return argparse.Namespace(**{**defaults, **kw})


def test_warmup_then_step_decay_by_hand():
    args = _schedule(schedule="step", milestones=[4, 8], lr_decay=0.01, warmup_epochs=2)
    # 3 steps per epoch: warm-up over the first 6 steps, then 1 until epoch 4, 0.01 until epoch 8, then 1e-4
    got = [schedules.lr_factor(t, 3, args) for t in (0, 5, 6, 11, 12, 23, 24, 29)]
    assert got == pytest.approx([1 / 6, 1.0, 1.0, 1.0, 0.01, 0.01, 1e-4, 1e-4])


def test_cosine_after_warmup_by_hand():
    args = _schedule(warmup_epochs=2)  # 10 epochs of 1 step: cosine over the last 8
    assert [schedules.lr_factor(t, 1, args) for t in (0, 1, 2, 6)] == pytest.approx([0.5, 1.0, 1.0, 0.5])


@pytest.mark.parametrize("bad, match", [(dict(schedule="step"), "milestones"), (dict(milestones=[12]), "milestones"),
                                        (dict(milestones=[4, 4]), "milestones"), (dict(milestones=[6, 3]), "milestones"),
                                        (dict(warmup_epochs=10), "warmup"), (dict(momentum=0.0), "nesterov")])
def test_schedule_checks(bad, match):
    assert match in schedules.check(_schedule(**bad))


def test_recipe_sets_defaults_and_explicit_options_win():
    parser = build_parser()
    argv = ["--recipe", "ldam-drw-resnet32", "--epochs", "20", "--milestones", "16", "18"]
    recipe = recipes.apply(parser, argv)
    args = parser.parse_args(argv)
    assert recipe["name"] == "ldam-drw-resnet32"
    assert (args.epochs, args.milestones, args.weight_decay, args.warmup_epochs, args.lr_decay, args.nesterov,
            args.model, args.direction) == (20, [16, 18], 2e-4, 5, 0.01, False, "resnet32a", "split")
    for name in recipes.RECIPES:
        assert name in recipes.describe()


@pytest.mark.parametrize("argv, device, amp", [
    (["--recipe", "lpl-wrn16-8"], "cuda", True),  # the recipes' bf16 autocast is on a GPU
    (["--recipe", "lpl-wrn16-8"], "cpu", False),
    (["--recipe", "lpl-wrn16-8", "--no-amp"], "cuda", False),  # an explicit option overrides the recipe
    (["--recipe", "lpl-wrn16-8", "--amp"], "cpu", True),
    (["--amp"], "cpu", True),
    ([], "cuda", False),
])
def test_amp_of_a_recipe_is_on_a_gpu_and_explicit_amp_or_no_amp_wins(argv, device, amp):
    """A recipe's --amp could not be turned off (no --no-amp) and applied on the CPU too, though the recipes
    document bf16 autocast on a GPU and explicit options override a recipe."""
    parser = build_parser()
    recipes.apply(parser, argv)
    assert recipes.resolved_amp(parser.parse_args(argv).amp, torch.device(device)) is amp


@pytest.mark.parametrize("name, millions", [("wrn28-10", 36.5), ("wrn16-8", 11.0), ("resnet32a", 0.46)])
def test_cifar_networks_have_the_published_sizes(name, millions):
    model = CIFAR_MODELS[name](10, 3)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.05)


def test_option_a_shortcut_pads_channels_and_subsamples_without_parameters():
    model = ResNet(10, blocks=1, block=OptionABlock)
    shortcut = model.features.stage2[0].shortcut
    assert not list(shortcut.parameters())
    x = torch.randn(2, 16, 8, 8)
    out = shortcut(x)
    assert out.shape == (2, 32, 4, 4) and torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_recipe_runs_end_to_end_on_a_fake_cifar_folder(tmp_path):
    write_cifar(tmp_path, 10, per_class_per_file=2)
    out = tmp_path / "r.json"
    assert main(["--recipe", "ldam-drw-resnet32", "--method", "la+lpa", "--dataset", "cifar10-lt", "--imbalance", "2",
                 "--data-dir", str(tmp_path), "--epochs", "2", "--warmup-epochs", "1", "--milestones", "1",
                 "--batch-size", "16", "--seeds", "0", "--quiet", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["recipe"]["name"] == "ldam-drw-resnet32"
    run = report["runs"][0]
    assert [row["epoch"] for row in run["epochs"]] == [1, 2] and run["last"] == run["overall"]
    assert run["best"] == max(row["test_accuracy"] for row in run["epochs"])
    assert run["epochs"][-1]["test_accuracy"] == run["overall"]
    assert run["config"]["loss"] == "la" and run["config"]["direction"] == "split"
    assert report["args"]["amp"] is False, "the recipe's bf16 autocast is for a GPU, this run is on the CPU"
