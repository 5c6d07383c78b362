"""``lpa-train --plot PATH``: one PNG of a finished report (the ``--json`` object).

Left: test accuracy per class for each method (mean over seeds), the classes ordered from the most to
the fewest training samples and shaded by shot group (many / medium / few). Right: per epoch, the test
accuracy and the mean training loss of each method (mean over seeds), from ``EpochLog``.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
from pathlib import Path

import torch

from lpa_programs.cli import check_writable
from lpa_programs.data import Dataset
from lpa_programs.distributed import per_class_accuracy

GROUP_SHADES = {"many": "#dbe9f6", "medium": "#fbe5c8", "few": "#f6d5d5"}


def check_option(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Before any training: matplotlib is importable and can write PATH's format (named by its extension),
    PATH is writable and is not ``--json``'s file (one error line, exit 2)."""
    if args.plot is None:
        return
    if importlib.util.find_spec("matplotlib") is None:
        parser.error("argument --plot: needs matplotlib, which is not installed: pip install 'lpa_kernels[bench]' "
                     "(or pip install matplotlib)")
    if check_writable(args.plot):
        parser.error(f"argument --plot: {check_writable(args.plot)}")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    formats = FigureCanvasAgg.get_supported_filetypes()
    extension = Path(args.plot).suffix.lower().removeprefix(".")
    if extension not in formats:  # matplotlib would refuse it after the training, or append .png to the name
        problem = f"matplotlib cannot write .{extension} files" if extension else "the name has no extension"
        parser.error(f"argument --plot: {args.plot}: {problem}; name a .png file (or one of "
                     f"{', '.join('.' + f for f in sorted(formats))})")
    if args.json is not None and Path(args.json).resolve() == Path(args.plot).resolve():
        parser.error(f"argument --plot: {args.plot} is also the --json file; the picture would replace the report")


class EpochLog:
    """Per-epoch figures of one run: ``add(loss)`` after every training step of an epoch to evaluate (no
    host read), then ``end_epoch(model, epoch)`` (epochs numbered from 1): that epoch's mean training loss
    (this process's batches) and the overall test accuracy in % (the whole test set, summed over processes
    under torchrun). ``rows``: the epochs so far, starting from those a resumed checkpoint carried."""

    def __init__(self, data: Dataset, device: torch.device, rows: list[dict]):
        self.data, self.x_test, self.y_test = data, data.x_test.to(device), data.y_test.to(device)
        self.rows = list(rows)
        self._loss_sum, self._steps = 0.0, 0

    def add(self, loss: torch.Tensor) -> None:
        self._loss_sum = self._loss_sum + loss.detach()
        self._steps += 1

    @torch.no_grad()
    def end_epoch(self, model: torch.nn.Module, epoch: int) -> None:
        accuracy = per_class_accuracy(model, self.x_test, self.y_test, self.data.num_classes)  # leaves eval mode
        model.train()
        counts = self.data.test_counts
        overall = sum(a * c for a, c in zip(accuracy, counts)) / max(sum(counts), 1)
        loss = float(self._loss_sum) / self._steps if self._steps else float("nan")
        self.rows.append({"epoch": epoch, "train_loss": loss, "test_accuracy": overall})
        self._loss_sum, self._steps = 0.0, 0


def _per_class_means(runs: list[dict]) -> dict[str, list[float]]:
    """Per method, each class's test accuracy averaged over the method's seeds."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        series = [r["per_class"] for r in runs if r["method"] == method]
        out[method] = [statistics.fmean(column) for column in zip(*series)]
    return out


def _epoch_means(runs: list[dict], key: str) -> dict[str, tuple[list[int], list[float]]]:
    """Per method, ``(epochs, mean of key over the seeds that logged that epoch)`` (a run resumed from a
    checkpoint written without ``--plot`` has no figures for its earlier epochs)."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        by_epoch: dict[int, list[float]] = {}
        for run in (r for r in runs if r["method"] == method):
            for row in run["epochs"]:
                by_epoch.setdefault(row["epoch"], []).append(row[key])
        epochs = sorted(by_epoch)
        out[method] = (epochs, [statistics.fmean(by_epoch[e]) for e in epochs])
    return out


def write(path: str, report: dict) -> None:
    """Draw ``report`` (``lpa-train``'s JSON object, runs with ``per_class`` and ``epochs``) into ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs, dataset = report["runs"], report["dataset"]
    order = sorted(range(dataset["num_classes"]), key=lambda c: -dataset["train_counts"][c])
    per_class = _per_class_means(runs)
    fig, (classes_ax, accuracy_ax, loss_ax) = plt.subplots(
        1, 3, figsize=(15, 4.5), gridspec_kw={"width_ratios": [2, 1, 1]}, layout="constrained")

    position = {c: i for i, c in enumerate(order)}
    for group, members in dataset["groups"].items():
        for c in members:
            classes_ax.axvspan(position[c] - 0.5, position[c] + 0.5, color=GROUP_SHADES.get(group, "#eeeeee"), lw=0)
        if members:
            middle = statistics.fmean(position[c] for c in members)
            classes_ax.text(middle, 1.01, group, ha="center", va="bottom", transform=classes_ax.get_xaxis_transform())
    width = 0.8 / max(len(per_class), 1)
    for i, (method, accuracy) in enumerate(per_class.items()):
        classes_ax.bar([position[c] - 0.4 + (i + 0.5) * width for c in order], [accuracy[c] for c in order],
                       width, label=method)
    classes_ax.set_xticks(range(len(order)), [str(c) for c in order], fontsize=7)
    classes_ax.set_xlim(-0.5, len(order) - 0.5)
    classes_ax.set_xlabel("class (most to fewest training samples)")
    classes_ax.set_ylabel("test accuracy (%)")
    classes_ax.legend(fontsize=8, loc="lower left")

    for ax, key, label in ((accuracy_ax, "test_accuracy", "test accuracy (%)"), (loss_ax, "train_loss", "training loss")):
        for method, (epochs, curve) in _epoch_means(runs, key).items():
            ax.plot(epochs, curve, marker="." if len(epochs) < 30 else None, label=method)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(f"{dataset['name']}: mean over seeds {sorted({r['seed'] for r in runs})}")
    fig.savefig(path, dpi=110)
    plt.close(fig)
