"""The paper's layer analysis as a runnable experiment on shipped data (CPU, about a minute).

For each dataset and seed it trains ERM and LPA at each layer of lpa-train's MLP, from shallow
(``features.0``, the first Linear's output) to the penultimate features (``features``), and LPL on the
logits, all with lpa-train's defaults (60 epochs, cosine). After training it records, per LPA layer,
``method.diagnostics`` on the test set: the per-class share of samples whose perturbed activation is
longer than the clean one (expansive fraction), the class's direction sign at that batch, and the
amplification ``||upper(h~) - upper(h)|| / ||h~ - h||``. Per class it pairs these with the accuracy
gain over ERM of the same seed. Claims tested:

1. "shallow behaves like input augmentation, deep like logit manipulation": the gain and the
   amplification by depth, and how close the penultimate layer's per-class gains are to LPL's;
2. "expansive perturbations act as positive augmentation": the correlation over classes between the
   expansive fraction and the direction (+1 = ascent), and between the expansive fraction and the gain.

    python -m lpa_bench.layer_sweep --out benchmarks/results/layer_sweep

writes ``layer_sweep.json`` and ``layer_sweep.png`` there.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from lpa_kernels.lpa.policy import class_stats
from lpa_programs.cli import Parser, check_writable, number, write_json_atomically
from lpa_programs.data import load, shot_groups
from lpa_programs.train import build_parser as train_parser, train_one

LAYERS = ("features.0", "features.2", "features")  # shallow to penultimate; LPL is the logits row
DATASETS = ("digits-lt", "synthetic-lt")


def diagnose(data, device):
    """``inspect`` for ``train_one``: the method's diagnostics on the test set, with the class directions."""
    def inspect(model, method):
        x, y = data.x_test.to(device), data.y_test.to(device)
        found = method.diagnostics(x, y)
        with torch.no_grad():
            model.eval()
            stats = class_stats(model(x), y, data.num_classes)
        direction = method.lpa.policy.resolve(stats, x)[0].cpu() if getattr(method, "lpa", None) else None
        return {"expansive_fraction": found["expansive_fraction"].tolist(), "amplification": found["amplification"],
                "direction": None if direction is None else direction.tolist()}
    return inspect


def correlation(a: list[float], b: list[float]) -> float:
    pairs = [(x, y) for x, y in zip(a, b) if x == x and y == y]
    if len(pairs) < 3:
        return float("nan")
    return float(torch.corrcoef(torch.tensor(pairs, dtype=torch.float64).T)[0, 1])


def run(datasets, seeds, epochs) -> dict:
    device = torch.device("cpu")
    torch.set_num_threads(1)
    results = {}
    for name in datasets:
        data = load(name)
        groups, _ = shot_groups(data.train_counts, "auto")
        rows = {}
        for label, method, layer in [("erm", "erm", "features")] + [(f"lpa@{l}", "lpa", l) for l in LAYERS] + [("lpl@logits", "lpl", "features")]:
            args = train_parser().parse_args(["--epochs", str(epochs), "--quiet", "--layer", layer, "--seeds", "0"])
            runs = [train_one(data, method, seed, args, device, groups, diagnose(data, device) if method == "lpa" else None)
                    for seed in seeds]
            rows[label] = runs
        results[name] = summarise(rows)
    return results


def summarise(rows: dict) -> dict:
    """Per row: accuracy and gain over ERM (mean, std over seeds), amplification, and per-class means."""
    erm = rows["erm"]
    out = {}
    for label, runs in rows.items():
        gains = [r["overall"] - e["overall"] for r, e in zip(runs, erm)]
        class_gain = [statistics.fmean(r["per_class"][c] - e["per_class"][c] for r, e in zip(runs, erm))
                      for c in range(len(erm[0]["per_class"]))]
        entry = {"overall": _spread([r["overall"] for r in runs]), "gain": _spread(gains),
                 "few_gain": _spread([r["few"] - e["few"] for r, e in zip(runs, erm)]), "class_gain": class_gain}
        if "expansive_fraction" in runs[0]:
            expansive = [statistics.fmean(r["expansive_fraction"][c] for r in runs) for c in range(len(class_gain))]
            direction = [statistics.fmean(r["direction"][c] for r in runs) for c in range(len(class_gain))]
            entry.update(amplification=_spread([r["amplification"] for r in runs]), expansive_fraction=expansive,
                         direction=direction, corr_expansive_direction=correlation(expansive, direction),
                         corr_expansive_gain=correlation(expansive, class_gain))
        out[label] = entry
    lpl = out["lpl@logits"]["class_gain"]
    for label in out:
        if label.startswith("lpa@"):
            out[label]["corr_class_gain_with_lpl"] = correlation(out[label]["class_gain"], lpl)
    return out


def _spread(values):
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for name, rows in results.items():
        labels = [l for l in rows if l != "erm"]
        gains = [rows[l]["gain"]["mean"] for l in labels]
        errors = [rows[l]["gain"]["std"] for l in labels]
        axes[0].errorbar(range(len(labels)), gains, yerr=errors, marker="o", capsize=3, label=name)
        axes[0].set_xticks(range(len(labels)), labels, rotation=15)
        for label in labels:
            if "expansive_fraction" in rows[label]:
                axes[1].scatter(rows[label]["expansive_fraction"], rows[label]["class_gain"], s=12,
                                label=f"{name} {label}")
    axes[0].axhline(0, color="grey", lw=0.5)
    axes[0].set_ylabel("overall accuracy gain over ERM (points)")
    axes[0].set_title("gain by layer, mean ± std over seeds", fontsize=10)
    axes[0].legend()
    axes[1].axhline(0, color="grey", lw=0.5)
    axes[1].set_xlabel("expansive fraction of the class (test set)")
    axes[1].set_ylabel("class accuracy gain over ERM (points)")
    axes[1].set_title("per class, mean over seeds", fontsize=10)
    axes[1].legend(fontsize=6)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m lpa_bench.layer_sweep", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/layer_sweep"), help="output folder")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--seeds", type=number(int, 0), nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=number(int, 1), default=60)
    args = p.parse_args(argv)
    for name in ("layer_sweep.json", "layer_sweep.png"):  # before minutes of training
        if check_writable(args.out / name):
            p.error(f"argument --out: {check_writable(args.out / name)}")
    results = run(args.datasets, args.seeds, args.epochs)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomically(args.out / "layer_sweep.json", {"seeds": args.seeds, "epochs": args.epochs, "results": results})
    plot(results, args.out / "layer_sweep.png")
    for name, rows in results.items():
        for label, e in rows.items():
            extra = ""
            if "amplification" in e:
                extra = (f"  amplification {e['amplification']['mean']:.3f}  corr(expansive, direction) "
                         f"{e['corr_expansive_direction']:+.2f}  corr(expansive, gain) {e['corr_expansive_gain']:+.2f}"
                         f"  corr(class gain, LPL's) {e['corr_class_gain_with_lpl']:+.2f}")
            print(f"{name:>12} {label:>14}: acc {e['overall']['mean']:.2f} ± {e['overall']['std']:.2f}  gain "
                  f"{e['gain']['mean']:+.2f} ± {e['gain']['std']:.2f}  few gain {e['few_gain']['mean']:+.2f}{extra}")
    print(f"wrote {args.out / 'layer_sweep.json'} and {args.out / 'layer_sweep.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
