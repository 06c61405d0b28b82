"""The paper's table on real data: dense training against PruneTrain, same model, seed and schedule.

For each model, trains it through the product's own loop (`ptgraph.trainers.loop.train`) once
dense and once with PruneTrain per penalty ratio, then writes a markdown table (and JSON) of top-1
accuracy, training FLOPs as a share of dense, final inference FLOPs and parameters, wall time, and
the final models' training-step time measured side by side.

Several FLOPs targets (or penalty ratios, the paper's method) give several PruneTrain runs, one
table row each, against one dense run: the accuracy/FLOPs trade-off. Runs land in OUT/<model>-dense,
OUT/<model>-prunetrain-t<target> and OUT/<model>-prunetrain-p<ratio>. A finished run (summary.json
present) is reused; an interrupted one resumes from its checkpoint, so the table can be built across
sessions:

    python tools/cifar_table.py --models ptgraph:resnet20 --epochs 10 --steps-per-epoch 195 \\
        --target-flops 0.5,0.3 --out runs/cifar_cpu
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bench_step import step_timer
from ptgraph.errors import UserError
from ptgraph.specs import parse_spec
from ptgraph.trainers import checkpoint
from ptgraph.trainers.budget import ALLOCATIONS, DEFAULT_PRUNE_UNTIL
from ptgraph.trainers.config import TrainConfig
from ptgraph.trainers.distributed import pick_device
from ptgraph.trainers.loop import logits, train

DEFAULT_DATA = "cifar10-npz:../shared/data/cifar10-jpeg.npz"
PAPER = {"resnet32": "paper (182 epochs): 53% fewer training FLOPs, 66% fewer inference FLOPs, 91.8% top-1"}


def epoch_seconds(run_dir: Path) -> list[float]:
    """Every logged epoch's wall time, so a resumed run counts every segment once."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["seconds"] for r in map(json.loads, lines) if r.get("kind") == "epoch"]


def run_one(cfg: TrainConfig, run_dir: Path) -> dict:
    done = run_dir / "summary.json"
    if done.exists():
        print(f"reusing {run_dir}")
        return json.loads(done.read_text())
    resume = str(run_dir) if (run_dir / "checkpoint.pt").exists() else None
    summary = train(cfg, resume_dir=resume)
    seconds = epoch_seconds(run_dir)
    summary["train_seconds"] = sum(seconds)
    summary["median_epoch_seconds"] = statistics.median(seconds)
    done.write_text(json.dumps(summary, indent=1))
    return summary


def run_folder(name: str, ratio: float | None, target_flops: float | None = None) -> str:
    """A run's folder under --out: `<model>-dense`, `<model>-prunetrain-t<target>` or `<model>-prunetrain-p<ratio>`."""
    if ratio is None and target_flops is None:
        return f"{name}-dense"
    return f"{name}-prunetrain-" + (f"p{ratio:g}" if ratio is not None else f"t{target_flops:g}")


def final_step_times(run_dirs: dict, batch: int, steps: int, device: str, rounds: int = 3) -> dict:
    """Median training-step time of every run's final model, timed interleaved on this machine now:
    the runs themselves may have shared the machine with different loads, so their wall times are
    not comparable; this is."""
    dev = pick_device(device)
    timers = {}
    for key, run_dir in run_dirs.items():
        model, shape = checkpoint.rebuild(checkpoint.load(run_dir / "checkpoint.pt"))
        with torch.no_grad():
            classes = logits(model(torch.randn(shape))).shape[1]
        timers[key] = step_timer(model.train(), batch, shape[-1], dev, classes)
        timers[key](1)  # warm-up
    times = {key: [] for key in timers}
    for _ in range(rounds):
        for key, timer in timers.items():
            times[key].append(timer(steps))
    return {key: statistics.median(t) for key, t in times.items()}


def schedule_text(cfg: TrainConfig, args: argparse.Namespace) -> str:
    lr = "cosine" if cfg.schedule == "cosine" else "x0.1 at 50%/75%"
    steps = f" of {cfg.steps_per_epoch} steps" if cfg.steps_per_epoch else ""
    until = DEFAULT_PRUNE_UNTIL if args.prune_until is None else args.prune_until
    return (f"{cfg.epochs} epochs{steps}, batch {cfg.batch_size or 128}, lr {cfg.lr if cfg.lr is not None else 0.1:g} ({lr}), "
            f"targets reached by {until:g} of the steps ({args.prune_schedule}, {args.reconfigurations} "
            f"reconfigurations); ratios reconfigure every {args.reconfig_every} epochs; "
            f"threshold {cfg.threshold:g}, round-to {cfg.round_to or 'auto (8 on CUDA, 1 on CPU)'}, proximal step every {cfg.prox_every} steps")


def row(name: str, dense: dict, pruned: dict, step_ratio: float | None = None) -> dict:
    return {
        "model": name, "penalty_ratio": pruned.get("penalty_ratio"), "target_flops": pruned.get("target_flops"), "dense_acc": dense["val_acc"], "prunetrain_acc": pruned["val_acc"],
        "train_flops_share": pruned["train_flops_share"],
        "dense_flops": dense["flops"], "pruned_flops": pruned["flops"],
        "dense_params": dense["params"], "pruned_params": pruned["params"],
        "dense_seconds": dense["train_seconds"], "pruned_seconds": pruned["train_seconds"],
        "dense_epoch_seconds": dense["median_epoch_seconds"], "pruned_epoch_seconds": pruned["median_epoch_seconds"],
        "reconfigurations": pruned["reconfigurations"], "final_step_time_share": step_ratio,
    }


def knob(r: dict) -> str:
    parts = ([f"target {r['target_flops']:g}"] if r.get("target_flops") else []) + \
            ([f"ratio {r['penalty_ratio']:g}"] if r.get("penalty_ratio") is not None else [])
    return ", ".join(parts) or "-"


def markdown(rows: list[dict], schedule: str, machine: str) -> str:
    out = [f"Schedule: {schedule}. Machine: {machine}.", "",
           "| model | FLOPs target (or penalty ratio) | dense top-1 | PruneTrain top-1 | training FLOPs (of dense) "
           "| inference FLOPs/img dense -> pruned | params dense -> pruned | wall dense / PruneTrain "
           "| median epoch dense / PruneTrain | final model's step time (of dense) | reconfigs |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        out.append(
            f"| {r['model']} | {knob(r)} | {r['dense_acc']:.2%} | {r['prunetrain_acc']:.2%} "
            f"| {r['train_flops_share']:.1%} "
            f"| {r['dense_flops'] / 1e6:.1f}M -> {r['pruned_flops'] / 1e6:.1f}M ({r['pruned_flops'] / r['dense_flops']:.1%}) "
            f"| {r['dense_params'] / 1e6:.3f}M -> {r['pruned_params'] / 1e6:.3f}M ({r['pruned_params'] / r['dense_params']:.1%}) "
            f"| {r['dense_seconds']:.0f} s / {r['pruned_seconds']:.0f} s ({r['pruned_seconds'] / r['dense_seconds']:.2f}) "
            f"| {r['dense_epoch_seconds']:.0f} s / {r['pruned_epoch_seconds']:.0f} s "
            f"({r['pruned_epoch_seconds'] / r['dense_epoch_seconds']:.2f}) "
            f"| {'-' if r.get('final_step_time_share') is None else format(r['final_step_time_share'], '.1%')} "
            f"| {r['reconfigurations']} |")
    notes = [PAPER[m] for m in {parse_spec(r["model"]).name for r in rows} if m in PAPER]
    return "\n".join(out + ([""] + [f"For reference, {n}." for n in notes] if notes else [])) + "\n"


def machine_line(device: str) -> str:
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        name = torch.cuda.get_device_name()
    else:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")), "CPU")
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
    p.add_argument("--reconfig-every", type=int, default=2, help="epochs between reconfigurations, for ratio runs")
    p.add_argument("--target-flops", default="0.5", help="comma-separated: one PruneTrain run per FLOPs target")
    p.add_argument("--prune-until", type=float, default=None, help="target runs (default: the product's)")
    p.add_argument("--prune-schedule", choices=("cubic", "linear"), default="cubic")
    p.add_argument("--reconfigurations", type=int, default=8)
    p.add_argument("--compute-aware", action=argparse.BooleanOptionalAction, default=None,
                   help="target runs: compute-aware channel scores (default: the product's, off)")
    p.add_argument("--allocation", choices=ALLOCATIONS, default=None,
                   help="target runs: how cuts are spread over the groups (default: the product's)")
    p.add_argument("--penalty-ratio", default="", help="comma-separated: one PruneTrain run per ratio (the paper's method)")
    p.add_argument("--threshold", type=float, default=1e-4)
    p.add_argument("--round-to", type=int, default=None, help="default: 8 on CUDA, 1 on the CPU")
    p.add_argument("--prox-every", type=int, default=1)
    p.add_argument("--steps-per-epoch", type=int, default=None, help="cap, for smoke runs")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-steps", type=int, default=10,
                   help="time this many training steps of every final model, interleaved (0: skip)")
    p.add_argument("--modes", default="dense,prunetrain", help="which runs to make (one alone: for running them in parallel)")
    p.add_argument("--out", default="runs/cifar_table")
    args = p.parse_args(argv)
    if not set(args.modes.split(",")) <= {"dense", "prunetrain"}:
        print(f"error: --modes takes dense and/or prunetrain, not {args.modes}")
        return 2
    try:
        knobs = [(float(r), None) for r in args.penalty_ratio.split(",") if r] + \
                [(None, float(t)) for t in args.target_flops.split(",") if t]
    except ValueError:
        print("error: --penalty-ratio and --target-flops take comma-separated numbers, e.g. 0.5,0.3")
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
                          schedule=args.schedule, threshold=args.threshold, round_to=args.round_to,
                          prox_every=args.prox_every, steps_per_epoch=args.steps_per_epoch,
                          device=args.device, workers=args.workers, seed=args.seed, tensorboard=False)
        name = parse_spec(spec).name
        configs = {(None, None): dataclasses.replace(cfg, dense=True)} if "dense" in args.modes else {}
        if "prunetrain" in args.modes:
            for ratio, target in knobs:
                configs[ratio, target] = dataclasses.replace(
                    cfg, penalty_ratio=ratio, target_flops=target,
                    reconfig_every=args.reconfig_every if ratio is not None else None,
                    **({} if ratio is not None else dict(prune_until=args.prune_until, reconfigurations=args.reconfigurations,
                                                         prune_schedule=args.prune_schedule,
                                                         compute_aware=args.compute_aware,
                                                         allocation=args.allocation)))
        folders = {key: out / run_folder(name, *key) for key in configs}
        try:  # the configs first, so that a bad flag costs no training; the data and model are read by the first run
            for c in configs.values():
                c.check()
            results = {key: run_one(dataclasses.replace(c, run_dir=str(folders[key])), folders[key])
                       for key, c in configs.items()}
        except UserError as e:
            print(f"error: {e}")
            return 2
        if (None, None) not in results or len(results) < 2:
            continue
        step = {}
        if args.time_steps:
            step = final_step_times(folders, args.batch_size, args.time_steps, args.device)
        rows += [row(spec, results[None, None], results[key], step[key] / step[None, None] if step else None)
                 for key in results if key != (None, None)]
        table = markdown(rows, schedule_text(cfg, args), machine_line(args.device))
        (out / "table.md").write_text(table)
        (out / "table.json").write_text(json.dumps({"schedule": schedule_text(cfg, args), "rows": rows}, indent=1))
    if rows:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
