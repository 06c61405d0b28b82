"""What a run leaves behind and says: metrics.jsonl, TensorBoard events (when installed), report.md with plots,
and the lines it prints about itself."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ptgraph.errors import UserError

if TYPE_CHECKING:
    from ptgraph.trainers.config import TrainConfig
    from ptgraph.trainers.prunetrain import PruneTrain


def default_run_dir(model: str) -> Path:
    from ptgraph.specs import parse_spec

    name = parse_spec(model).name.replace("/", "_")
    return Path("runs") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"


def make_run_dir(run_dir: str | None, model: str) -> Path:
    """--run-dir, or runs/MODEL-DATE, created."""
    path = Path(run_dir) if run_dir else default_run_dir(model)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create run directory {path} ({e.strerror}); pass a writable --run-dir") from None
    return path


class MetricsLog:
    """One JSON object per line, appended; TensorBoard scalars too when tensorboard is installed."""

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(run_dir) / "tb"))
            except ImportError:
                self.writer = None

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None and record.get("kind") == "epoch":
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.writer.add_scalar(key, value, record["epoch"])
            self.writer.flush()

    def truncate_after(self, epoch: int) -> None:
        """On resume: forget records of epochs the checkpoint does not contain."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("epoch", 0) <= epoch]
        self.path.write_text("".join(line + "\n" for line in keep))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def write_report(run_dir: Path, records: list[dict[str, Any]], widths_before: dict[str, int],
                 widths_after: dict[str, int], summary: dict[str, Any]) -> Path:
    """report.md with two PNGs: accuracy (perplexity, for token data) and FLOPs per epoch, and per-layer widths
    before/after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    epochs = [r for r in records if r.get("kind") == "epoch"]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [r["epoch"] for r in epochs]
    lm = bool(epochs) and "val_ppl" in epochs[0]  # next-token data: perplexity instead of accuracy
    metric, what = ("val_ppl", "val perplexity") if lm else ("val_acc", "val accuracy (%)")
    ax.plot(xs, [r[metric] if lm else 100 * r[metric] for r in epochs], "o-", color="tab:blue", label=what)
    if lm:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel(what, color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(xs, [r["flops"] / 1e6 for r in epochs], "s--", color="tab:red", label="MFLOPs / image")
    dense = next((r.get("dense_flops") for r in epochs if r.get("dense_flops")), None)
    if summary.get("target_flops") and dense:
        ax2.axhline(summary["target_flops"] * dense / 1e6, color="tab:red", lw=0.8, ls=":",
                    label=f"target ({summary['target_flops']:.0%} of dense)")
    if dense:
        ax2.axhline(dense / 1e6, color="gray", lw=0.8, ls=":", label="dense")
    ax2.set_ylim(0, 1.08 * max([(dense or 0) / 1e6] + [r["flops"] / 1e6 for r in epochs]) or None)
    ax2.set_ylabel(f"forward MFLOPs per {'sequence' if lm else 'image'}", color="tab:red")
    ax2.legend(loc="lower right", fontsize=8)
    saved = 1 - epochs[-1]["train_flops_share"] if epochs else 0.0
    ax.set_title(f"{'perplexity' if lm else 'accuracy'} and model cost over training ({saved:.0%} of the dense "
                 f"training FLOPs saved)")
    fig.tight_layout()
    fig.savefig(run_dir / "training.png", dpi=110)
    plt.close(fig)

    names = list(widths_before)
    fig, ax = plt.subplots(figsize=(max(7, len(names) * 0.18), 4))
    ax.bar(range(len(names)), [widths_before[n] for n in names], color="lightgray", label="dense")
    ax.bar(range(len(names)), [widths_after.get(n, 0) for n in names], color="tab:green", label="pruned")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel("output channels")
    ax.legend()
    ax.set_title("per-layer width before and after")
    fig.tight_layout()
    fig.savefig(run_dir / "widths.png", dpi=110)
    plt.close(fig)

    lines = ["# PruneTrain report", ""]
    lines += [f"- {k}: {v}" for k, v in summary.items()]
    val_head = "val loss | val ppl | FLOPs/seq" if lm else "val acc | FLOPs/img"
    lines += ["", f"![{'perplexity' if lm else 'accuracy'} and FLOPs](training.png)", "", "![layer widths](widths.png)",
              "", f"| epoch | train loss | {val_head} | schedule | train FLOPs (cum.) | share of dense | saved so far "
              "| time (s) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if lm else "")]
    for r in epochs:
        goal = f"{r['scheduled_flops'] / 1e6:.1f} M" if r.get("scheduled_flops") else "-"
        val = f"{r['val_loss']:.4f} | {r['val_ppl']:.2f}" if lm else f"{100 * r['val_acc']:.2f}%"
        lines.append(f"| {r['epoch']} | {r['train_loss']:.4f} | {val} | {r['flops'] / 1e6:.1f} M | "
                     f"{goal} | {r['train_flops'] / 1e12:.3f} T | {100 * r['train_flops_share']:.1f}% | "
                     f"{100 * (1 - r['train_flops_share']):.1f}% | {r['seconds']:.1f} |")
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_mode(cfg: TrainConfig, pt: PruneTrain) -> str:
    """How the run prunes, in the words of its first line."""
    if cfg.dense:
        return "dense"
    if cfg.budget:
        n = len(range(pt.reconfig_steps, pt.schedule.until + 1, pt.reconfig_steps))
        return (f"PruneTrain to {cfg.target_flops:.0%} of the dense FLOPs by {cfg.prune_until:.0%} of training "
                f"({cfg.prune_schedule} schedule, {n} reconfigurations, steered proximal lasso, {cfg.allocation} allocation"
                f"{', compute-aware scores' if cfg.compute_aware else ''})")
    return f"PruneTrain ({cfg.lasso} lasso, penalty ratio {cfg.penalty_ratio})"


def weak_penalty_hint(cfg: TrainConfig, summary: dict[str, Any]) -> str | None:
    """A PruneTrain run that removed almost nothing had a penalty too weak for its schedule: the group
    lasso only moves weights while the learning rate is high, so a short schedule needs a larger ratio."""
    if summary["mode"] != "prunetrain" or cfg.budget or summary["flops"] < 0.9 * summary["dense_flops"]:
        return None
    removed = 1 - summary["flops"] / summary["dense_flops"]
    return (f"note: PruneTrain removed only {removed:.0%} of the FLOPs: penalty ratio {cfg.penalty_ratio:g} was too weak "
            f"for {cfg.epochs} epochs at lr {cfg.lr:g}; raise --penalty-ratio, or leave it out for a FLOPs target "
            f"(--target-flops) that steers the penalty itself (docs/EXPERIMENTS.md, F1: on "
            f"CIFAR-10 in 10 epochs ResNet-20 lost 4% at 0.8, 62% at 0.9, 92% at 0.95)")
