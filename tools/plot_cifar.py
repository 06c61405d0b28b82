"""Accuracy against training FLOPs for the CIFAR-10 rows of docs/BENCHMARKS.md section 1.

Reads docs/cifar_results.json (one row per run: model, run kind, setting, seed, top-1, training FLOPs as a
share of the dense run's) and draws one panel per model: dense runs, PruneTrain's default, the baselines at
equal training FLOPs (the final architecture from scratch, dense on a shorter schedule), other settings and
a narrower network trained from scratch; the mean of each kind's seeds as a larger marker.

    python tools/plot_cifar.py                       # writes docs/cifar_accuracy_vs_flops.png
    python tools/plot_cifar.py --data my.json --out my.png
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STYLE = {  # run kind: label, marker, colour
    "dense": ("dense, full schedule", "o", "black"),
    "prunetrain": ("PruneTrain, default (half the FLOPs)", "*", "tab:red"),
    "scratch": ("final architecture from scratch, same training FLOPs", "s", "tab:blue"),
    "short": ("dense, shorter schedule, same training FLOPs", "D", "tab:green"),
    "setting": ("PruneTrain, other settings", ".", "tab:orange"),
    "narrow": ("narrower network from scratch, whole schedule", "v", "tab:purple"),
}


def load(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    keys = ("model", "run", "setting", "seed", "top1", "train_flops")
    return [dict(zip(keys, r)) for r in data["rows"]]


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        for kind, (label, marker, colour) in STYLE.items():
            pts = [r for r in mine if r["run"] == kind]
            if not pts:
                continue
            ax.scatter([r["train_flops"] * 100 for r in pts], [r["top1"] for r in pts], marker=marker, color=colour,
                       s=28 if kind != "setting" else 40, alpha=0.55, label=label, zorder=3)
            if kind in ("dense", "prunetrain", "scratch", "short") and len(pts) > 1:
                ax.scatter([statistics.mean(r["train_flops"] for r in pts) * 100],
                           [statistics.mean(r["top1"] for r in pts)], marker=marker, color=colour, s=160,
                           edgecolors="white", linewidths=1.2, zorder=4)
        ax.set_title(f"{model}, CIFAR-10, 20 epochs (CPU)")
        ax.set_xlabel("training FLOPs (% of the dense run's)")
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.text(0.5, 0.93, "large markers: mean over seeds", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT / "docs" / "cifar_results.json"))
    p.add_argument("--out", default=str(ROOT / "docs" / "cifar_accuracy_vs_flops.png"))
    args = p.parse_args(argv)
    plot(load(Path(args.data)), Path(args.out))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
