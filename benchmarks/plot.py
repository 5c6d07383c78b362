"""Throughput vs problem size per op and pass, with the roofline measured in the same run.

Memory-bound ops plot GB/s against bytes moved, under the measured copy bandwidth. Compute-bound ops
(``linear_perturb``, ``head_pgd_``) plot TFLOP/s against flops, under
``min(matmul rate, arithmetic intensity x copy bandwidth)`` for each point. A last panel shows the
training-step ratios (each method's step / the plain step) against LPA's 1.05 target.
"""

from __future__ import annotations

import math

from lpa_bench.ops import OPS


def _label(row: dict) -> str:
    variant = ",".join(f"{k}={v}" for k, v in (row["variant"] or {}).items())
    return " ".join(part for part in (row["impl"], row["dtype"], variant) if part)


def _op_panel(ax, op: str, pass_: str, rows: list, meta: dict) -> None:
    from matplotlib.ticker import NullFormatter

    compute = OPS[op].bound == "compute"
    xkey, ykey = ("flops", "tflops") if compute else ("bytes", "gbps")
    series: dict = {}
    for row in rows:
        series.setdefault(_label(row), []).append((row[xkey], row[ykey]))
    for label, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    copy_gbps = meta.get("copy_gbps")
    if compute:
        matmul = meta.get("matmul_tflops") or {}
        for dtype in sorted({r["dtype"] for r in rows}):
            points = sorted({(r["flops"], r["bytes"]) for r in rows if r["dtype"] == dtype})
            if dtype in matmul and copy_gbps:
                roof = [min(matmul[dtype], f / b * copy_gbps / 1e3) for f, b in points]
                ax.plot([f for f, _ in points], roof, "k--", label=f"roofline {dtype}")
    elif copy_gbps:
        ax.axhline(copy_gbps, color="k", linestyle="--", label=f"copy {copy_gbps:.0f} GB/s")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks crowd a span under one decade
    ax.set_xlabel("flops" if compute else "bytes moved")
    ax.set_ylabel("TFLOP/s" if compute else "GB/s")
    ax.set_title(f"{op} {pass_}")
    ax.legend(fontsize=6)


def _train_panel(ax, rows: list) -> None:
    # the method names the bar: several --train-methods share each network, layer and T
    labels = [f"{r['impl']} {r['op'].removesuffix('_step')} {r['variant']['layer']}\nT={r['variant']['steps']}"
              for r in rows]
    ax.bar(labels, [r["ratio"] for r in rows])
    ax.tick_params(axis="x", labelsize=6, labelrotation=90)
    if any(r["impl"] == "lpa" for r in rows):
        ax.axhline(1.05, color="k", linestyle="--", label="LPA's target for T=0: 1.05")
        ax.legend(fontsize=6)
    methods = "LPA" if {r["impl"] for r in rows} == {"lpa"} else "method"
    ax.set_ylabel(f"{methods} step / plain step")
    ax.set_title("training step")


def plot(path: str, meta: dict, rows: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if r["bench"] == "op" and r["time_ms"]]
    passes = ("fwd", "bwd", "fwd+bwd")
    panels = sorted({(r["op"], r["pass"]) for r in measured}, key=lambda p: (list(OPS).index(p[0]), passes.index(p[1])))
    train = [r for r in rows if r["bench"] == "train_step" and r["ratio"]]
    count = max(1, len(panels) + bool(train))
    cols = min(3, count)
    # constrained layout places the figure title above the panel titles (tight_layout lets them overlap)
    fig, axes = plt.subplots(math.ceil(count / cols), cols, figsize=(5.5 * cols, 4 * math.ceil(count / cols)),
                             squeeze=False, layout="constrained")
    flat = list(axes.flat)
    for ax, (op, pass_) in zip(flat, panels):
        _op_panel(ax, op, pass_, [r for r in measured if r["op"] == op and r["pass"] == pass_], meta)
    if train:
        _train_panel(flat[len(panels)], train)
    if not panels and not train:
        flat[0].text(0.5, 0.5, "no measurements", ha="center", va="center")
    for ax in flat[len(panels) + bool(train):]:
        if panels or train:
            ax.axis("off")
    fig.suptitle(f"lpa-bench on {meta.get('device')} ({meta.get('timer')}, commit {str(meta.get('git_commit'))[:10]})")
    fig.savefig(path, dpi=110)
    plt.close(fig)
