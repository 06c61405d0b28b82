"""The paper's table on real data: dense training against PruneTrain, same model, seed and schedule.

For each model, trains it twice through the product's own loop (`ptgraph.trainers.loop.train`):
once dense, once with PruneTrain, then writes a markdown table (and JSON) of top-1 accuracy,
training FLOPs as a share of dense, final inference FLOPs and parameters, and wall time.

Runs land in OUT/<model>-dense and OUT/<model>-prunetrain. A finished run (summary.json present)
is reused; an interrupted one resumes from its checkpoint, so the table can be built across sessions:

    python tools/cifar_table.py --models ptgraph:resnet20 --epochs 12 --reconfig-every 2 \\
        --penalty-ratio 0.8 --out runs/cifar_cpu
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ptgraph.specs import parse_spec
from ptgraph.trainers.config import TrainConfig
from ptgraph.trainers.loop import train

DEFAULT_DATA = "cifar10-npz:../shared/data/cifar10-jpeg.npz"
PAPER = {"resnet32": "paper (182 epochs): 53% fewer training FLOPs, 66% fewer inference FLOPs, 91.8% top-1"}


def epoch_seconds(run_dir: Path) -> float:
    """Training wall time summed over the logged epochs, so a resumed run counts every segment once."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return sum(r["seconds"] for r in map(json.loads, lines) if r.get("kind") == "epoch")


def run_one(cfg: TrainConfig, run_dir: Path) -> dict:
    done = run_dir / "summary.json"
    if done.exists():
        print(f"reusing {run_dir}")
        return json.loads(done.read_text())
    resume = str(run_dir) if (run_dir / "checkpoint.pt").exists() else None
    summary = train(cfg, resume_dir=resume)
    summary["train_seconds"] = epoch_seconds(run_dir)
    done.write_text(json.dumps(summary, indent=1))
    return summary


def schedule_text(cfg: TrainConfig, args: argparse.Namespace) -> str:
    lr = "cosine" if cfg.schedule == "cosine" else "x0.1 at 50%/75%"
    return (f"{cfg.epochs} epochs, batch {cfg.batch_size or 128}, lr {cfg.lr if cfg.lr is not None else 0.1:g} ({lr}), "
            f"reconfigure every {cfg.reconfig_every} epochs, penalty ratio {cfg.penalty_ratio:g}, "
            f"threshold {cfg.threshold:g}, round-to {cfg.round_to or 'auto (8 on CUDA, 1 on CPU)'}, proximal step every {cfg.prox_every} steps")


def row(name: str, dense: dict, pruned: dict) -> dict:
    return {
        "model": name, "dense_acc": dense["val_acc"], "prunetrain_acc": pruned["val_acc"],
        "train_flops_share": pruned["train_flops_share"],
        "dense_flops": dense["flops"], "pruned_flops": pruned["flops"],
        "dense_params": dense["params"], "pruned_params": pruned["params"],
        "dense_seconds": dense["train_seconds"], "pruned_seconds": pruned["train_seconds"],
        "reconfigurations": pruned["reconfigurations"],
    }


def markdown(rows: list[dict], schedule: str, machine: str) -> str:
    out = [f"Schedule: {schedule}. Machine: {machine}.", "",
           "| model | dense top-1 | PruneTrain top-1 | training FLOPs (of dense) | inference FLOPs/img dense -> pruned "
           "| params dense -> pruned | wall dense / PruneTrain | reconfigs |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        out.append(
            f"| {r['model']} | {r['dense_acc']:.2%} | {r['prunetrain_acc']:.2%} | {r['train_flops_share']:.1%} "
            f"| {r['dense_flops'] / 1e6:.1f}M -> {r['pruned_flops'] / 1e6:.1f}M ({r['pruned_flops'] / r['dense_flops']:.1%}) "
            f"| {r['dense_params'] / 1e6:.3f}M -> {r['pruned_params'] / 1e6:.3f}M ({r['pruned_params'] / r['dense_params']:.1%}) "
            f"| {r['dense_seconds']:.0f} s / {r['pruned_seconds']:.0f} s ({r['pruned_seconds'] / r['dense_seconds']:.2f}) "
            f"| {r['reconfigurations']} |")
    notes = [PAPER[m] for m in {parse_spec(r["model"]).name for r in rows} if m in PAPER]
    return "\n".join(out + ([""] + [f"For reference, {n}." for n in notes] if notes else [])) + "\n"


def machine_line(device: str) -> str:
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        name = torch.cuda.get_device_name()
    else:
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "CPU")
        name = f"{cpu}, {torch.get_num_threads()} threads"
    return f"{name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="ptgraph:resnet20", help="comma-separated model specs")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--schedule", choices=("step", "cosine"), default="step")
    p.add_argument("--reconfig-every", type=int, default=2)
    p.add_argument("--penalty-ratio", type=float, default=0.8)
    p.add_argument("--threshold", type=float, default=1e-4)
    p.add_argument("--round-to", type=int, default=None, help="default: 8 on CUDA, 1 on the CPU")
    p.add_argument("--prox-every", type=int, default=1)
    p.add_argument("--steps-per-epoch", type=int, default=None, help="cap, for smoke runs")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", default="dense,prunetrain", help="which runs to make (one alone: for running them in parallel)")
    p.add_argument("--out", default="runs/cifar_table")
    args = p.parse_args(argv)
    if not set(args.modes.split(",")) <= {"dense", "prunetrain"}:
        print(f"error: --modes takes dense and/or prunetrain, not {args.modes}")
        return 2
    data_path = args.data.partition(":")[2]
    if args.data.startswith("cifar10-npz:") and not Path(data_path).exists():
        print(f"error: {data_path} is not there; this benchmark needs the CIFAR-10 npz (see ../shared/data/README.md)")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in args.models.split(","):
        cfg = TrainConfig(model=spec, data=args.data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                          schedule=args.schedule, reconfig_every=args.reconfig_every, penalty_ratio=args.penalty_ratio,
                          threshold=args.threshold, round_to=args.round_to, prox_every=args.prox_every, steps_per_epoch=args.steps_per_epoch,
                          device=args.device, workers=args.workers,
                          seed=args.seed, tensorboard=False)
        name = parse_spec(spec).name
        results = {}
        for mode in args.modes.split(","):
            run_cfg = TrainConfig(**{**cfg.__dict__, "dense": mode == "dense", "run_dir": str(out / f"{name}-{mode}")})
            results[mode] = run_one(run_cfg, out / f"{name}-{mode}")
        if len(results) < 2:
            continue
        rows.append(row(spec, results["dense"], results["prunetrain"]))
        table = markdown(rows, schedule_text(cfg, args), machine_line(args.device))
        (out / "table.md").write_text(table)
        (out / "table.json").write_text(json.dumps({"schedule": schedule_text(cfg, args), "rows": rows}, indent=1))
    if rows:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
