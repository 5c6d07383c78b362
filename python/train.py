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

``--json PATH`` writes one object: ``command``, ``date``, ``commit``, ``args`` (every option),
``dataset`` (``name``, ``num_classes``, ``train_counts``, ``test_counts``, ``shot_rule``, ``groups``),
``runs`` (one per method and seed: ``method``, ``seed``, ``overall``, ``many``, ``medium``, ``few``,
``per_class`` (accuracies in %), ``sec_per_step`` (median), ``train_seconds``, ``steps``, ``config``,
``stats`` (``method.stats()``)) and ``summary`` (per method: ``mean``/``std``/``n`` of each figure over
the seeds, and the mean of each ``stats`` count).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from lpa_kernels.lpa import METHODS, LPAConfig, build_method
from lpa_programs.data import DATASETS, Dataset, augment_images, load, shot_groups
from lpa_programs.models import DEFAULT_LAYER, build_model

FIGURES = ("overall", "many", "medium", "few", "sec_per_step")
# CLI options that are LPAConfig fields; left unset, LPAConfig's own defaults apply.
CONFIG_OPTIONS = {
    "mode": dict(choices=("add", "scale"), help="perturbation: h + delta[y] or h * (1 + delta[y])"),
    "norm": dict(choices=("linf", "l2"), help="PGD norm ball"),
    "eps": dict(type=float, help="perturbation radius"),
    "step_size": dict(type=float, help="PGD step size"),
    "steps": dict(type=int, help="PGD steps per batch; 0 = single pass (delta carried, one update per step)"),
    "direction": dict(choices=("confidence", "frequency", "ascent", "descent", "loss_trend"),
                      help="per-class direction policy (+1 ascend / -1 descend the class loss)"),
    "radius": dict(choices=("constant", "confidence", "frequency"), help="per-class radius policy"),
    "gamma": dict(type=float, help="exponent of the frequency radius eps * (n_max / n_c) ** gamma"),
    "init": dict(choices=("fresh", "carried"), help="delta starts at 0 every batch, or is carried across batches"),
    "delta_shape": dict(choices=("full", "channel", "last"),
                        help="delta per class: the full activation shape, per channel (NCHW) or per last dim"),
    "head": dict(choices=("auto", "always", "never"), help="use the fused linear-head PGD fast path"),
    "lpl_eps": dict(type=float, help="LPL logit-offset radius"),
    "lpl_step_size": dict(type=float, help="LPL step size"),
    "lpl_steps": dict(type=int, help="LPL PGD steps"),
    "noise_std": dict(type=float, help="std of the Gaussian-noise baseline"),
    "dropout_p": dict(type=float, help="drop probability of the dropout baseline"),
    "mixup_alpha": dict(type=float, help="Beta(alpha, alpha) of the manifold-mixup baseline"),
    "adv_eps": dict(type=float, help="radius of the sample-level adversarial feature baseline"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lpa-train", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", nargs="+", default=["erm", "lpa"], choices=METHODS, metavar="METHOD",
                   help=f"one or more of {', '.join(METHODS)}")
    p.add_argument("--dataset", default="digits-lt", choices=DATASETS)
    p.add_argument("--data-dir", default=None, help="folder with cifar-10-batches-py / cifar-100-python")
    p.add_argument("--imbalance", type=float, default=None,
                   help="n_max / n_min of an -lt training set (default 10, CIFAR 100)")
    p.add_argument("--shot-rule", default="auto", choices=("auto", "thresholds", "terciles"),
                   help="many/medium/few split: >100 / 20..100 / <20 training samples, or count terciles; "
                        "auto = thresholds when each group has at least max(2, K/10) classes")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05, help="SGD (Nesterov momentum 0.9) learning rate, cosine decay")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--width", type=int, default=None, help="MLP width (128) / ResNet base channels (16)")
    p.add_argument("--depth", type=int, default=None, help="MLP hidden layers (2) / ResNet blocks per stage (3)")
    p.add_argument("--seed", "--seeds", dest="seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="one run per seed; several give mean and std")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: 1 for the small MLP datasets, where threading costs "
                        "more than it saves, torch's default for images)")
    p.add_argument("--backend", default="auto", choices=("auto", "reference", "triton", "cuda"),
                   help="lpa_kernels backend for the perturbation ops")
    p.add_argument("--layer", default=DEFAULT_LAYER,
                   help="dotted module name whose output is perturbed (default: the penultimate features; "
                        "e.g. features.1 for the MLP's first hidden layer, features.stage2 for the ResNet)")
    for name, kw in CONFIG_OPTIONS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=None, **kw)
    p.add_argument("--json", default=None, metavar="PATH", help="write every figure to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def make_config(args: argparse.Namespace) -> LPAConfig:
    given = {k: getattr(args, k) for k in CONFIG_OPTIONS if getattr(args, k) is not None}
    return LPAConfig(backend=args.backend, **given)


@torch.no_grad()
def per_class_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                       batch_size: int = 1024) -> list[float]:
    model.eval()
    pred = torch.cat([model(xb).argmax(1) for xb in x.split(batch_size)])
    correct = torch.bincount(y[pred == y], minlength=num_classes).double()
    total = torch.bincount(y, minlength=num_classes).double().clamp_min(1)
    return (100.0 * correct / total).tolist()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_one(data: Dataset, method_name: str, seed: int, args: argparse.Namespace, device: torch.device,
              groups: dict[str, list[int]]) -> dict:
    """Train one model with one method and seed; return its figures (see the module docstring)."""
    torch.manual_seed(seed)
    model = build_model(data, args.width, args.depth).to(device)
    config = make_config(args)
    method = build_method(method_name, model, data.num_classes, layer=args.layer, config=config,
                          class_counts=data.train_counts)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                                weight_decay=args.weight_decay)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    n = len(y_train)
    batch = min(args.batch_size, n)
    steps_per_epoch = n // batch  # incomplete last batch dropped: no tiny batches for batch norm
    total_steps = steps_per_epoch * args.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * t / max(total_steps, 1))))

    step_seconds: list[float] = []
    bar = tqdm(total=total_steps, desc=f"{method_name} seed {seed}", leave=False, dynamic_ncols=True,
               disable=args.quiet or not sys.stderr.isatty())
    for _ in range(args.epochs):
        model.train()
        order = torch.randperm(n).to(device)
        for b in range(steps_per_epoch):
            idx = order[b * batch:(b + 1) * batch]
            xb, yb = x_train[idx], y_train[idx]
            if data.is_image:
                xb = augment_images(xb)
            _sync(device)
            start = time.perf_counter()
            loss, _ = method.training_loss(xb, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            method.after_backward()
            optimizer.step()
            _sync(device)
            step_seconds.append(time.perf_counter() - start)
            scheduler.step()
            bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()

    accuracy = per_class_accuracy(model, data.x_test.to(device), data.y_test.to(device), data.num_classes)
    test_counts = data.test_counts
    correct = sum(a * c for a, c in zip(accuracy, test_counts))
    result = {"method": method_name, "seed": seed, "overall": correct / max(sum(test_counts), 1)}
    for name, classes in groups.items():
        result[name] = statistics.fmean(accuracy[c] for c in classes) if classes else float("nan")
    result.update(
        per_class=accuracy,
        sec_per_step=statistics.median(step_seconds) if step_seconds else float("nan"),
        train_seconds=sum(step_seconds),
        steps=len(step_seconds),
        config=dataclasses.asdict(config),
        stats={k: v for k, v in method.stats().items() if isinstance(v, (int, float))},
    )
    return result


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
        summary[method] = entry
    return summary


def format_table(summary: dict) -> str:
    """Plain-text table: accuracies in % (mean ± std over seeds), ms per step, forwards per step."""
    header = ["method", "overall", "many", "medium", "few", "ms/step", "lower fwd/step", "upper fwd/step"]
    rows = [header]
    for method, e in summary.items():
        row = [method] + [f"{e[f]['mean']:.2f} ± {e[f]['std']:.2f}" for f in ("overall", "many", "medium", "few")]
        row.append(f"{1e3 * e['sec_per_step']['mean']:.2f}")
        steps = e["stats"].get("training_steps") or 0
        for key in ("lower_forwards", "upper_forwards"):
            row.append(f"{e['stats'][key] / steps:.2f}" if steps and key in e["stats"] else "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
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
    try:
        return _main(build_parser().parse_args(argv), argv)
    finally:
        torch.set_num_threads(threads)  # main() may be called from other programs and tests


def _main(args: argparse.Namespace, argv: list[str] | None) -> int:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    data = load(args.dataset, args.imbalance, args.data_dir)
    if args.threads or not data.is_image:
        torch.set_num_threads(args.threads or 1)
    groups, rule = shot_groups(data.train_counts, args.shot_rule)
    print(f"{data.name}: {len(data.y_train)} train / {len(data.y_test)} test, {data.num_classes} classes, "
          f"train counts {min(data.train_counts)}..{max(data.train_counts)}; shot groups by {rule}: "
          + ", ".join(f"{k} {len(v)}" for k, v in groups.items()) + f"; device {device}", flush=True)

    runs = []
    for method in args.method:
        for seed in args.seeds:
            runs.append(train_one(data, method, seed, args, device, groups))
            r = runs[-1]
            if not args.quiet:
                print(f"  {method:>8} seed {seed}: overall {r['overall']:.2f}  many {r['many']:.2f}  "
                      f"medium {r['medium']:.2f}  few {r['few']:.2f}  ({r['train_seconds']:.1f} s)", flush=True)
    summary = summarise(runs)
    print(format_table(summary))

    if args.json:
        report = {
            "command": shlex.join(["lpa-train", *(sys.argv[1:] if argv is None else argv)]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": _commit(),
            "args": vars(args),
            "device": str(device),
            "dataset": {"name": data.name, "num_classes": data.num_classes, "train_counts": data.train_counts,
                        "test_counts": data.test_counts, "shot_rule": rule, "groups": groups},
            "runs": runs,
            "summary": summary,
        }
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
