"""``lpa-train``: train a classifier with LPA or a baseline and report overall and many/medium/few-shot
accuracy, seconds per training step and, for the perturbation methods, how often the network below and
above the perturbed layer ran.

With no arguments it compares ERM and LPA on digits-lt over three seeds, 60 epochs each (about 10 s of
CPU time; LPA's settings are LPAConfig's defaults). Examples::

    lpa-train
    lpa-train --method erm lpa lpl lpa+lpl --dataset digits-lt --seeds 0 1 2 --json out.json
    lpa-train --method lpa --steps 0 --init carried          # single-pass LPA
    lpa-train --method lpa --layer features.1 --mode scale   # perturb an inner layer
    lpa-train --dataset cifar10-lt --imbalance 100 --data-dir ~/data --device cuda --epochs 200

Every option and setting is checked before any training: a mistake exits with status 2 and one
``lpa-train: error: ...`` line. ``--json PATH`` writes one object, rewritten after every run (so a
failure late in a long job loses nothing): ``command``, ``date``, ``commit``, ``args`` (every option),
``device``, ``processes`` (1, or the number torchrun started), ``dataset`` (``name``, ``num_classes``,
``train_counts``, ``test_counts``, ``shot_rule``, ``groups``), ``recipe`` (``--recipe``: ``name`` and
``settings``, else empty), ``finished`` (false until the last run), ``runs`` (one per method and seed:
``method``, ``seed``, ``overall``, ``many``, ``medium``, ``few``, ``per_class`` (accuracies in %), ``epochs``
(with ``--plot`` or ``--eval-every``: per evaluated epoch ``epoch``, ``train_loss``, ``test_accuracy``, else
empty), ``best`` (the best evaluated test accuracy, or ``overall`` without evaluations) and ``last`` (the
final ``overall``), ``sec_per_step`` (median), ``train_seconds``, ``steps``, ``config``, ``stats``
(``method.stats()``), ``pgd_path``) and
``summary`` (per method: ``mean``/``std``/``n`` of each figure over the seeds, the mean of each
``stats`` count and ``pgd_path``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from lpa_kernels.backend import BACKENDS, resolve
from lpa_kernels.lpa import DIRECTIONS, METHODS, RADII, LPAConfig, Method, build_method
from lpa_kernels.lpa.config import LOSSES
from lpa_programs.data import DATASETS, DEFAULT_IMBALANCE, Dataset, augment_images, load, shot_groups
from lpa_programs.models import DEFAULT_LAYER, MODEL_SIZES, build_model
from lpa_programs import recipes, schedules
from lpa_programs.cifar_models import CIFAR_MODELS
from lpa_programs.cli import (MAX_THREADS, Parser, Terminated, check_writable, main_process, number, sigterm_stops,
                              write_json_atomically, write_or_exit)
from lpa_programs import checkpoint, distributed
from lpa_programs.distributed import per_class_accuracy
from lpa_programs.plot import EpochLog, check_option as check_plot_option, write as write_plot

FIGURES = ("overall", "many", "medium", "few", "sec_per_step")
FLOAT32_MAX = torch.finfo(torch.float32).max
# torch.manual_seed takes seeds below 2^64 and the batch order's generator is seeded with seed + epoch: a seed
# below 2^63 leaves room for any number of epochs
MAX_SEED = 2**63 - 1
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's modes
# CLI options that are LPAConfig fields; their defaults are LPAConfig's, read from the dataclass.
CONFIG_OPTIONS = {
    "loss": dict(choices=LOSSES, help="ce, or la: logit-adjusted cross-entropy CE(f(x) + tau log prior); the la* "
                                      "methods force la"),
    "tau": dict(type=float, help="logit-adjustment temperature"),
    "mode": dict(choices=("add", "scale"), help="perturbation: h + delta[y] or h * (1 + delta[y])"),
    "norm": dict(choices=("linf", "l2"), help="PGD norm ball"),
    "eps": dict(type=float, help="perturbation radius"),
    "step_size": dict(type=float, help="PGD step size (default: 2.5 x the largest radius / steps, so the radius "
                                       "binds; a quarter of the radius in single pass)"),
    "steps": dict(type=int, help="PGD steps per batch; 0 = single pass (delta carried, one update per step)"),
    "direction": dict(choices=DIRECTIONS, help="per-class direction policy (+1 ascend / -1 descend the class "
                                               "loss): " + DIRECTIONS.help_text()),
    "radius": dict(choices=RADII, help="per-class radius policy: " + RADII.help_text()),
    "gamma": dict(type=float, help="exponent of the frequency radius eps * (n_min / n_c) ** gamma"),
    "delta_eps": dict(type=float, help="confidence radius bonus, a fraction of eps"),
    "head_classes": dict(type=int, help="head classes of the split direction and budget radius (default: "
                                        "LPL's 4 of 10, 27 of 100, else 30%%)"),
    "head_fraction": dict(type=float, help="the head as a fraction of the classes (instead of --head-classes)"),
    "head_budget": dict(type=float, help="budget radius: LPL step count of the most frequent class"),
    "tail_budget": dict(type=float, help="budget radius: LPL step count of the rarest class"),
    "init": dict(choices=("fresh", "carried"),
                 help="delta starts at 0 every batch, or is carried across batches (default: carried with "
                      "--steps 0, fresh otherwise)"),
    "delta_shape": dict(choices=("full", "channel", "last"),
                        help="delta per class: the full activation shape, per channel (NCHW) or per last dim"),
    "head": dict(choices=("auto", "always", "never"), help="use the fused linear-head PGD fast path"),
    "lpl_eps": dict(type=float, help="LPL logit-offset radius"),
    "lpl_step_size": dict(type=float, help="LPL step size (default: as --step-size, for LPL's radius and steps)"),
    "lpl_steps": dict(type=int, help="LPL PGD steps"),
    "noise_std": dict(type=float, help="std of the Gaussian-noise baseline"),
    "dropout_p": dict(type=float, help="drop probability of the dropout baseline"),
    "mixup_alpha": dict(type=float, help="Beta(alpha, alpha) of the manifold-mixup baseline"),
    "adv_eps": dict(type=float, help="radius of the sample-level adversarial feature baseline"),
}
CONFIG_DEFAULTS = {field.name: field.default for field in dataclasses.fields(LPAConfig)}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: X)`` to each option's help once; not where the default is None or a flag's
    False (the help says what applies then)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        default = action.default
        if default is None or default is argparse.SUPPRESS or action.nargs == 0:
            return action.help
        shown = " ".join(map(str, default)) if isinstance(default, list) else str(default)
        return f"{action.help} (default: {shown.replace('%', '%%')})"


def build_parser() -> argparse.ArgumentParser:
    mlp, resnet = MODEL_SIZES["mlp"], MODEL_SIZES["resnet"]
    summary, examples, commands = __doc__.replace("``", "").split("\n\n")[:3]
    p = Parser(prog="lpa-train", description=summary, epilog="\n\n".join((examples, commands, recipes.describe())),
               formatter_class=_HelpFormatter)
    p.add_argument("--method", nargs="+", default=["erm", "lpa"], choices=METHODS, metavar="METHOD",
                   help="one or more of: " + METHODS.help_text())
    p.add_argument("--dataset", default="digits-lt", choices=DATASETS, metavar="NAME",
                   help="one of " + ", ".join(DATASETS))
    p.add_argument("--data-dir", default=None, help="folder with cifar-10-batches-py / cifar-100-python (CIFAR only)")
    p.add_argument("--imbalance", type=number(float, 1), default=None,
                   help="n_max / n_min of an -lt training set (default: "
                        + ", ".join(f"{name} {ratio:g}" for name, ratio in DEFAULT_IMBALANCE.items()) + ")")
    p.add_argument("--shot-rule", default="auto", choices=("auto", "thresholds", "terciles"),
                   help="many/medium/few split: >100 / 20..100 / <20 training samples, or count terciles; "
                        "auto = thresholds when each group has at least max(2, K/10) classes")
    p.add_argument("--epochs", type=number(int, 1), default=60, help="passes over the training set")
    p.add_argument("--batch-size", type=number(int, 1), default=64,
                   help="training batch size (the global batch: split over the processes under torchrun)")
    # the optimizer's update takes them as float32 numbers (a larger one fails at the first step)
    p.add_argument("--lr", type=number(float, 0, strict=True, maximum=FLOAT32_MAX), default=0.05,
                   help="SGD learning rate (the peak, after any warm-up)")
    p.add_argument("--weight-decay", type=number(float, 0, maximum=FLOAT32_MAX), default=5e-4, help="SGD weight decay")
    schedules.add_options(p)
    p.add_argument("--model", default="auto", choices=("auto",) + tuple(CIFAR_MODELS),
                   help="auto: an MLP for vectors, lpa-train's ResNet (--width, --depth) for images; or a CIFAR "
                        "network: " + ", ".join(CIFAR_MODELS))
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="bf16 autocast of the training forward (GPU or CPU; a --recipe's: on a GPU only)")
    p.add_argument("--eval-every", type=number(int, 0), default=0, metavar="N",
                   help="evaluate every N epochs (and the last) into the JSON's epochs, with the best and last "
                        "accuracy (0: at the end only, or every epoch with --plot)")
    recipes.add_option(p)
    p.add_argument("--width", type=number(int, 1), default=None,
                   help=f"MLP width / ResNet base channels (default: {mlp['width']} / {resnet['width']})")
    p.add_argument("--depth", type=number(int, 1), default=None,
                   help=f"MLP hidden layers / ResNet blocks per stage (default: {mlp['depth']} / {resnet['depth']})")
    p.add_argument("--seed", "--seeds", dest="seeds", type=number(int, 0, maximum=MAX_SEED), nargs="+", default=[0, 1, 2],
                   help="one run per seed; several give mean and std")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=number(int, 1, maximum=MAX_THREADS), default=None,
                   help="CPU threads for torch (default: 1 for the small MLP datasets, where threading costs "
                        "more than it saves, torch's default for images)")
    p.add_argument("--backend", default=CONFIG_DEFAULTS["backend"], choices=("auto",) + BACKENDS,
                   help="lpa_kernels backend for the perturbation ops")
    p.add_argument("--layer", default=DEFAULT_LAYER,
                   help="dotted module name whose output is perturbed: the penultimate features by default; "
                        "e.g. features.1 for the MLP's first hidden layer, features.stage2 for the ResNet")
    for name, kw in CONFIG_OPTIONS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=CONFIG_DEFAULTS[name], **kw)
    distributed.add_arguments(p)
    checkpoint.add_arguments(p)
    p.add_argument("--json", default=None, metavar="PATH",
                   help="write every figure to this JSON file (rewritten after each run)")
    p.add_argument("--plot", default=None, metavar="PATH", help="draw per-class accuracy by method (grouped many/"
                   "medium/few) and per-epoch test accuracy and loss into this PNG (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES, metavar="MODE",
                   help="run the training forward under torch.compile after the first step (fullgraph=True in one "
                        "process); MODE is torch.compile's: default, or reduce-overhead for CUDA graphs on a GPU, "
                        "max-autotune, max-autotune-no-cudagraphs")
    return p


def make_config(args: argparse.Namespace) -> LPAConfig:
    return LPAConfig(backend=args.backend, **{name: getattr(args, name) for name in CONFIG_OPTIONS})


def bf16_autocast(args: argparse.Namespace, device: torch.device):
    """``--amp``: bf16 autocast of the training forward (GEMMs in bf16, weights and delta in float32), on
    the GPU or the CPU alike."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_one(data: Dataset, method_name: str, seed: int, args: argparse.Namespace, device: torch.device,
              groups: dict[str, list[int]], inspect: Callable[[torch.nn.Module, Method], dict] | None = None) -> dict:
    """Train one model with one method and seed; return its figures (see the module docstring), plus
    what ``inspect(model, method)`` returns after training (e.g. ``method.diagnostics`` in experiments)."""
    torch.manual_seed(seed)
    model, method = build_run(data, method_name, args, device)
    config = method.config
    ctx = distributed.context()
    forward = distributed.wrap(method, ctx, args.fsdp, device)  # the training loss; DDP / FSDP2 under torchrun
    if args.compile:  # one process: the training forward as one graph; DDP's and FSDP2's hooks split it
        options = {} if args.compile == "default" else {"mode": args.compile}
        forward = (torch.compile(forward, **options) if ctx.world > 1 or args.fsdp
                   else method.compiled_training_loss(**options))
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    batches = distributed.Batches(len(y_train), args.batch_size, seed, ctx)  # this rank's share of each global batch
    total_steps = batches.steps_per_epoch * args.epochs
    optimizer, scheduler = schedules.build(model.parameters(), args, batches.steps_per_epoch)
    autocast = bf16_autocast(args, device)
    saver = checkpoint.Checkpointer(args, ctx, method_name, seed, model, method, optimizer, scheduler)
    first_epoch, progress = saver.restore()
    step_seconds: list[float] = progress.get("step_seconds", [])

    evaluated = args.plot or args.eval_every  # per-epoch figures: every epoch for --plot, else every N
    epoch_log = EpochLog(data, device, progress.get("epochs", [])) if evaluated else None
    bar = tqdm(total=total_steps, initial=batches.steps_per_epoch * first_epoch, desc=f"{method_name} seed {seed}",
               leave=False, dynamic_ncols=True, disable=args.quiet or not sys.stderr.isatty() or not ctx.is_main)
    for epoch in range(first_epoch, args.epochs):
        model.train()
        # the evaluated epochs log their own mean training loss, so only their steps are summed
        evaluate = epoch_log and (args.plot or (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs)
        for idx in batches.epoch(epoch, device):
            xb, yb = x_train[idx], y_train[idx]
            if data.is_image:
                xb = augment_images(xb)
            _sync(device)
            start = time.perf_counter()
            with autocast:
                loss, _ = forward(xb, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            method.after_backward()
            optimizer.step()
            _sync(device)
            step_seconds.append(time.perf_counter() - start)
            scheduler.step()
            bar.update()
            if evaluate:
                epoch_log.add(loss)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        method.sync()  # the step reads nothing back: a bad label found on the device is raised here
        if evaluate:
            epoch_log.end_epoch(model, epoch + 1)
        saver.after_epoch(epoch + 1, {"step_seconds": step_seconds,
                                      "epochs": epoch_log.rows if epoch_log else []})
    bar.close()

    accuracy = per_class_accuracy(model, data.x_test.to(device), data.y_test.to(device), data.num_classes)
    test_counts = data.test_counts
    correct = sum(a * c for a, c in zip(accuracy, test_counts))
    result = {"method": method_name, "seed": seed, "overall": correct / max(sum(test_counts), 1)}
    for name, classes in groups.items():
        result[name] = statistics.fmean(accuracy[c] for c in classes) if classes else float("nan")
    epochs = epoch_log.rows if epoch_log else []
    result.update(
        per_class=accuracy,
        epochs=epochs,
        sec_per_step=statistics.median(step_seconds) if step_seconds else float("nan"),
        train_seconds=sum(step_seconds),
        steps=len(step_seconds),
        config=config.resolved(),
        stats={k: v for k, v in method.stats().items() if isinstance(v, (int, float))},
        best=max((row["test_accuracy"] for row in epochs), default=result["overall"]),
        last=result["overall"],
    )
    result["pgd_path"] = pgd_path(method_name, config, result["stats"])
    if inspect is not None:
        result.update(inspect(model, method))
    return result


def build_run(data: Dataset, method_name: str, args: argparse.Namespace, device: torch.device):
    """A fresh model and the training method ``method_name`` on it."""
    model = make_model(data, args).to(device)
    method = build_method(method_name, model, data.num_classes, layer=args.layer, config=make_config(args),
                          class_counts=data.train_counts)
    return model, method


def make_model(data: Dataset, args: argparse.Namespace) -> torch.nn.Module:
    """``--model``: lpa-train's default model for the data, or one of the CIFAR networks."""
    if args.model == "auto":
        return build_model(data, args.width, args.depth)
    return CIFAR_MODELS[args.model](data.num_classes, data.x_train.shape[1])


def pgd_path(method_name: str, config: LPAConfig, stats: dict) -> str:
    """Where the PGD steps of a run went: LPA's "fused head" (``head_pgd_``, no autograd forward of the
    upper network), "autograd" (one upper forward per step), "single pass" (one update per training step
    from its backward); LPL's on the "logits". The fused path shows in the counts as no upper forward
    beyond the training forward (``Method.stats``), which is how it is told apart here."""
    parts = method_name.split("+")
    paths = []
    if "lpa" in parts:
        if config.steps == 0:
            paths.append("single pass")
        else:
            extra_upper = stats["upper_forwards"] / max(stats["training_steps"], 1) - 1
            paths.append("autograd" if extra_upper >= config.steps else "fused head")
    if "lpl" in parts:
        paths.append("logits")
    return " + ".join(paths) or "-"


def summarise(runs: list[dict]) -> dict:
    """Per method: mean, std (0 for one seed) and count of each figure, and mean stats counts."""
    summary: dict[str, dict] = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        entry = {}
        for fig in FIGURES:
            values = [r[fig] for r in mine]
            entry[fig] = {"mean": statistics.fmean(values),
                          "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}
        keys = dict.fromkeys(k for r in mine for k in r["stats"])
        entry["stats"] = {k: statistics.fmean(r["stats"].get(k, 0) for r in mine) for k in keys}
        entry["pgd_path"] = mine[0]["pgd_path"]  # the same for every seed: settings and model are
        summary[method] = entry
    return summary


def format_table(summary: dict) -> str:
    """Plain-text table: accuracies in % (mean ± std over seeds), ms per step, and per training step the
    forwards of the network below and above the layer (autograd) and the PGD steps, the class updates
    the finiteness guard skipped over the run (mean over seeds), and the PGD path."""
    header = ["method", "overall", "many", "medium", "few", "ms/step", "lower fwd/step", "upper fwd/step",
              "PGD steps/step", "skipped updates", "PGD path"]
    rows = [header]
    for method, e in summary.items():
        row = [method] + [f"{e[f]['mean']:.2f} ± {e[f]['std']:.2f}" for f in ("overall", "many", "medium", "few")]
        row.append(f"{1e3 * e['sec_per_step']['mean']:.2f}")
        steps = e["stats"].get("training_steps") or 0
        for key in ("lower_forwards", "upper_forwards", "pgd_steps"):
            no_pgd = key == "pgd_steps" and e["pgd_path"] == "-"  # a baseline: "-", not "0.00"
            row.append(f"{e['stats'][key] / steps:.2f}" if steps and key in e["stats"] and not no_pgd else "-")
        # class updates the finiteness guard skipped (non-finite gradient or new delta), over the run
        skipped = e["stats"].get("skipped_class_updates")
        row.append("-" if skipped is None else f"{skipped:.0f}")
        row.append(e["pgd_path"])
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i in (0, len(header) - 1) else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(r, widths))).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _commit() -> str | None:
    """HEAD of the checkout this file lives in, with ``-dirty`` when tracked files differ from it."""
    git = ["git", "-C", str(Path(__file__).resolve().parent)]
    try:
        head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(git + ["diff", "--quiet", "HEAD"], capture_output=True, timeout=10).returncode == 1
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "") if head.returncode == 0 else None


def main(argv: list[str] | None = None) -> int:
    threads = torch.get_num_threads()
    parser = build_parser()
    failed = True
    try:
        recipe = recipes.apply(parser, argv)
        args = parser.parse_args(argv)
        with distributed.quiet_unless_main(), sigterm_stops():
            code = _main(parser, args, argv, recipe)
        failed = False
        return code
    finally:
        torch.set_num_threads(threads)  # main() may be called from other programs and tests
        distributed.teardown(failed)


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None, recipe: dict) -> int:
    device, data = check_args(parser, args)
    groups, rule = shot_groups(data.train_counts, args.shot_rule)
    print_banner(args, device, data, groups, rule)
    report = {
        "command": shlex.join(["lpa-train", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "args": vars(args),
        "recipe": recipe,
        "device": str(device),
        "processes": distributed.context().world,
        "dataset": {"name": data.name, "num_classes": data.num_classes, "train_counts": data.train_counts,
                    "test_counts": data.test_counts, "shot_rule": rule, "groups": groups},
        "finished": False,
        "runs": [],
        "summary": {},
    }
    write_report(parser, args, report)
    for method in args.method:
        for seed in args.seeds:
            try:
                r = train_one(data, method, seed, args, device, groups)
            except checkpoint.CheckpointWriteError as exc:  # the runs finished so far are in the report
                parser.error(str(exc))
            report["runs"].append(r)
            report["summary"] = summarise(report["runs"])
            write_report(parser, args, report)  # after every run: a later failure loses nothing
            if not args.quiet:
                print(f"  {method:>8} seed {seed}: overall {r['overall']:.2f}  many {r['many']:.2f}  "
                      f"medium {r['medium']:.2f}  few {r['few']:.2f}  ({r['train_seconds']:.1f} s)", flush=True)
    print(format_table(report["summary"]))
    report["finished"] = True
    write_report(parser, args, report)
    if args.json:
        print(f"wrote {args.json}")
    if args.plot and distributed.context().is_main:
        write_or_exit(parser, "--plot", args.plot, lambda: write_plot(args.plot, report))
        print(f"wrote {args.plot}")
    return 0


def write_report(parser: argparse.ArgumentParser, args: argparse.Namespace, report: dict) -> None:
    """The report so far into ``--json`` (on the main process), atomically."""
    if args.json and distributed.context().is_main:
        write_or_exit(parser, "--json", args.json, lambda: write_json_atomically(args.json, report))


# ---- checks before any training: every user error exits 2 with one line (parser.error) ---------------

def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[torch.device, Dataset]:
    """Check every option that argparse alone cannot, load the data and try one step of each method on a
    throwaway model, so that a mistake is reported now and not after hours of training."""
    args.method, args.seeds = list(dict.fromkeys(args.method)), list(dict.fromkeys(args.seeds))  # each run once
    # joins torchrun's group
    device = distributed.setup(check_device(parser, args.device), args.dist_timeout, args.order_guard)
    args.amp = recipes.resolved_amp(args.amp, device)
    problem = schedules.check(args) or distributed.check_arguments(args) or distributed.agree(
        checkpoint.check_arguments(args) if distributed.context().is_main else "")
    if problem:
        parser.error(problem)
    try:
        make_config(args)
    except ValueError as exc:
        parser.error(f"LPA settings: {exc}")
    try:
        resolve(args.backend, device)
    except ValueError as exc:
        parser.error(f"argument --backend: {exc}")
    if args.json is not None and check_writable(args.json):
        parser.error(f"argument --json: {check_writable(args.json)}")
    check_plot_option(parser, args)
    data = check_data(parser, args)
    problem = distributed.batch_split_problem(args.batch_size, len(data.y_train), distributed.launched_world())
    if problem:
        parser.error(f"argument --batch-size: {problem}")
    if args.model != "auto" and not data.is_image:
        parser.error(f"argument --model: {args.model} is a CIFAR network; {data.name} is not an image dataset")
    if args.threads or not data.is_image:
        torch.set_num_threads(args.threads or 1)
    for method in args.method:
        try_one_step(parser, data, method, args, device)
    return device, data


def check_device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        parser.error(f"argument --device: {name!r} is not a device; use auto, cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"argument --device: lpa-train runs on cpu or cuda, not {device.type}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            parser.error(f"argument --device: {name} asked for, but torch sees no CUDA GPU "
                         f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
        if device.index is not None and device.index >= count:
            parser.error(f"argument --device: {name} asked for, but torch sees {count} GPU(s)")
    return device


def check_data(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Dataset:
    if args.imbalance is not None and not args.dataset.endswith("-lt"):
        parser.error(f"argument --imbalance: applies to the -lt datasets only, not {args.dataset}")
    if args.data_dir is not None and not Path(args.data_dir).expanduser().is_dir():
        parser.error(f"argument --data-dir: no such folder: {args.data_dir}")
    try:
        return load(args.dataset, args.imbalance,
                    None if args.data_dir is None else Path(args.data_dir).expanduser())
    except (ValueError, OSError) as exc:
        parser.error(f"argument --dataset: {exc}")


def try_one_step(parser: argparse.ArgumentParser, data: Dataset, method_name: str, args: argparse.Namespace,
                 device: torch.device) -> None:
    """One training step of ``method_name`` on a throwaway model and a few samples: finds what only the
    model can tell (--layer, --delta-shape, --head always, a backend's limits) in a fraction of a second.
    The runs reseed, so this step changes none of their results."""
    few = min(4, len(data.y_train))
    try:
        model, method = build_run(data, method_name, args, device)
        loss, _ = method.training_loss(data.x_train[:few].to(device), data.y_train[:few].to(device))
        loss.backward()
        method.after_backward()
    except (ValueError, TypeError) as exc:  # the library's messages for bad settings and layers
        parser.error(f"--method {method_name} cannot train with these settings: {exc}")
    except RuntimeError as exc:  # a model too large for the device's memory (--width, --depth, --batch-size)
        if not isinstance(exc, torch.OutOfMemoryError) and "can't allocate memory" not in str(exc):
            raise
        parser.error(f"--method {method_name}: the model does not fit in the {device.type} memory: "
                     f"{str(exc).splitlines()[0]}")


def print_banner(args: argparse.Namespace, device: torch.device, data: Dataset, groups: dict, rule: str) -> None:
    """The data, the model, the optimisation and every setting in force for each method."""
    print(f"{data.name}: {len(data.y_train)} train / {len(data.y_test)} test, {data.num_classes} classes, "
          f"train counts {min(data.train_counts)}..{max(data.train_counts)}; shot groups by {rule}: "
          + ", ".join(f"{k} {len(v)}" for k, v in groups.items()), flush=True)
    model = make_model(data, args)
    print(f"model {type(model).__name__} ({sum(p.numel() for p in model.parameters())} parameters), layer "
          f"{args.layer!r}; {args.epochs} epochs, batch {args.batch_size}, {schedules.describe(args)}"
          f"{'; bf16 autocast' if args.amp else ''}; seeds {' '.join(map(str, args.seeds))}; device {device}"
          + (f", {torch.get_num_threads()} CPU thread(s)" if device.type == "cpu" else ""), flush=True)
    config = make_config(args)
    for method in args.method:
        settings = config.settings_for(method)
        if "backend" in settings:
            settings["backend"] = f"{config.backend} ({resolve(config.backend, device)} here)"
        shown = ", ".join(f"{k}={v}" for k, v in settings.items()) or "no settings"
        print(f"  {method}: {shown}", flush=True)


def run_as_program(argv: list[str] | None = None) -> None:
    """The program's entry (``lpa-train``, ``python -m lpa_programs.train``): :func:`main`, then exit.

    A process that is one of several torchrun ranks leaves with ``os._exit`` once its output is flushed,
    skipping the interpreter's shutdown: there gloo's worker threads can abort the process ("terminate
    called without an active exception", seen on 2-core CI machines after a complete, correct run),
    which torchrun reports as a failed job. Nothing is lost: results and checkpoints are written and
    closed as they are made, and the process group is already destroyed.

    SIGTERM stops a run as Ctrl-C does (``cli.sigterm_stops``); it then ends with one line and status 143
    (128 + SIGTERM, as if the signal had ended the process)."""
    try:
        code = main(argv)
    except Terminated as stop:
        if main_process():
            print(f"lpa-train: {stop}; the checkpoints and --json written so far are kept", file=sys.stderr)
        code = 128 + signal.SIGTERM
    if distributed.launched_world() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run_as_program()
