"""The paper's table on real data: dense training against PruneTrain, same model, seed and schedule.

For each model, trains it through the product's own loop (`ptgraph.trainers.loop.train`) once
dense and once with PruneTrain per penalty ratio, then writes a markdown table (and JSON) of top-1
accuracy, training FLOPs as a share of dense, final inference FLOPs and parameters, wall time, and
the final models' training-step time measured side by side.

Several FLOPs targets (or penalty ratios, the paper's method) give several PruneTrain runs, one
table row each, against one dense run: the accuracy/FLOPs trade-off. Runs land in OUT/<model>-dense,
OUT/<model>-prunetrain-t<target> and OUT/<model>-prunetrain-p<ratio>. A finished run (summary.json
present) is reused; an interrupted one resumes from its checkpoint, so the table can be built over
several invocations:

    python tools/cifar_table.py --models ptgraph:resnet20 --epochs 10 --steps-per-epoch 195 \\
        --target-flops 0.5,0.3 --out runs/cifar_cpu

Two baselines at the same training FLOPs as each PruneTrain run (`--modes scratch,short`, after or
beside `prunetrain`; they read the PruneTrain run's folder):

- `scratch`: the run's final architecture (model spec `run:RUN_DIR`: its widths, from checkpoint.pt's plans) with a fresh
  initialisation, trained dense (OUT/<model>-scratch-t<target>);
- `short`: the dense model on a shorter schedule (OUT/<model>-short-t<target>).

Both keep the number of epochs and change the steps per epoch, so the learning-rate shape (milestones
at 50%/75% of the epochs, or the cosine) is the PruneTrain run's, compressed or stretched, and the
training FLOPs match the PruneTrain run's to within one step per epoch.
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
from torch import nn

from bench_step import step_timer
from ptgraph.cost import TRAIN_STEP_FACTOR
from ptgraph.errors import UserError
from ptgraph.specs import parse_spec
from ptgraph.trainers import checkpoint
from ptgraph.trainers.checkpoint import final_architecture as fresh_final_architecture
from ptgraph.trainers.budget import ALLOCATIONS, DEFAULT_PRUNE_UNTIL
from ptgraph.trainers.config import TrainConfig
from ptgraph.trainers.distributed import pick_device
from ptgraph.trainers.loop import logits, train

DEFAULT_DATA = "cifar10-npz:../shared/data/cifar10-jpeg.npz"
PAPER = {"resnet32": "paper (182 epochs): 53% fewer training FLOPs, 66% fewer inference FLOPs, 91.8% top-1"}


BASELINES = {"scratch": "final architecture from scratch", "short": "dense, shorter schedule"}


def final_architecture(checkpoint: str) -> nn.Module:
    """`checkpoint.final_architecture` as a spec callable: scratch runs made before the `run:RUN_DIR` spec existed
    name `cifar_table:final_architecture?checkpoint=PATH` in their checkpoints, which this keeps rebuildable."""
    return fresh_final_architecture(checkpoint_payload(checkpoint))


def checkpoint_payload(path: str | Path) -> dict:
    return checkpoint.load(Path(path))


def matched_steps(pruned_dir: Path, mode: str) -> tuple[int, dict]:
    """Steps per epoch for a baseline with the PruneTrain run's training FLOPs, same epochs and batch.

    The PruneTrain run spent T = sum over its steps of 3 x FLOPs/img x batch; a baseline whose model has
    F FLOPs/img (the dense model's, or the run's final ones) matches it with T / (3 F batch epochs) steps
    an epoch."""
    payload = checkpoint_payload(pruned_dir / "checkpoint.pt")
    cfg = payload["config"]
    if payload["epoch"] < cfg["epochs"]:
        raise UserError(f"the PruneTrain run {pruned_dir} stopped at epoch {payload['epoch']} of {cfg['epochs']}; "
                        f"finish it (--modes prunetrain) before its baselines")
    summary = json.loads((pruned_dir / "summary.json").read_text())
    flops = summary["dense_flops"] if mode == "short" else summary["flops"]
    steps = round(payload["train_flops"] / (TRAIN_STEP_FACTOR * flops * payload["batch"] * cfg["epochs"]))
    return max(1, steps), {"train_flops": payload["train_flops"], "dense_train_flops": payload["dense_train_flops"]}


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
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary["train_flops"] = [r for r in records if r.get("kind") == "epoch"][-1]["train_flops"]  # absolute, all steps
    done.write_text(json.dumps(summary, indent=1))
    return summary


def run_folder(name: str, ratio: float | None, target_flops: float | None = None, mode: str = "prunetrain") -> str:
    """A run's folder under --out: `<model>-dense`, `<model>-prunetrain-t<target>` or `<model>-prunetrain-p<ratio>`;
    a baseline of a PruneTrain run: `<model>-scratch-t<target>`, `<model>-short-t<target>`."""
    if ratio is None and target_flops is None:
        return f"{name}-dense"
    return f"{name}-{mode}-" + (f"p{ratio:g}" if ratio is not None else f"t{target_flops:g}")


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


def baseline_rows(spec: str, knob_key: tuple, results: dict, step: dict) -> list[dict]:
    """One row per run at one PruneTrain run's training FLOPs: PruneTrain, its baselines, and dense (full) if run."""
    pruned = results[("prunetrain", *knob_key)]
    dense = results.get(("dense", None, None))
    rows = []
    for mode in ("prunetrain", "scratch", "short", "dense"):
        key = (mode, None, None) if mode == "dense" else (mode, *knob_key)
        if key not in results:
            continue
        r = results[key]
        rows.append({
            "model": spec, "penalty_ratio": pruned.get("penalty_ratio"), "target_flops": pruned.get("target_flops"),
            "run": mode, "val_acc": r["val_acc"], "flops": r["flops"], "dense_flops": pruned["dense_flops"],
            "params": r["params"], "train_flops": r.get("train_flops"), "pt_train_flops": pruned.get("train_flops"),
            "steps_per_epoch": r.get("steps_per_epoch"), "epochs": r["epochs"],
            "dense_acc": dense["val_acc"] if dense else None,
            "step_time_share": step[key] / step[("dense", None, None)] if step and ("dense", None, None) in step
            else (step[key] / step[("prunetrain", *knob_key)] if step else None),
            "step_time_of": "dense" if step and ("dense", None, None) in step else "prunetrain",
        })
    return rows


RUN_NAMES = {"prunetrain": "PruneTrain", "dense": "dense, full schedule", **BASELINES}


def baseline_markdown(rows: list[dict], machine: str) -> str:
    out = [f"At equal training FLOPs. Machine: {machine}.", "",
           "| model | FLOPs target (or penalty ratio) | run | steps an epoch | top-1 | top-1 minus PruneTrain's "
           "| training FLOPs (of PruneTrain's) | inference FLOPs/img (of dense) | params | final model's step time |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        pt = next(x for x in rows if x["model"] == r["model"] and knob(x) == knob(r) and x["run"] == "prunetrain")
        share = "-" if r["train_flops"] is None or not pt["train_flops"] else f"{r['train_flops'] / pt['train_flops']:.1%}"
        step = "-" if r.get("step_time_share") is None else f"{r['step_time_share']:.1%} of {r['step_time_of']}'s"
        out.append(f"| {r['model']} | {knob(r)} | {RUN_NAMES[r['run']]} | {r['steps_per_epoch'] or '-'} | {r['val_acc']:.2%} "
                   f"| {(r['val_acc'] - pt['val_acc']) * 100:+.2f} | {share} "
                   f"| {r['flops'] / 1e6:.1f}M ({r['flops'] / r['dense_flops']:.1%}) | {r['params'] / 1e6:.3f}M | {step} |")
    return "\n".join(out) + "\n"


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
    p.add_argument("--modes", default="dense,prunetrain",
                   help="which runs to make, in this order: dense, prunetrain, scratch (the PruneTrain run's final "
                        "architecture from scratch), short (dense on a shorter schedule); the last two at the "
                        "PruneTrain run's training FLOPs, after it (one mode alone: for running them in parallel)")
    p.add_argument("--out", default="runs/cifar_table")
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    if not set(modes) <= {"dense", "prunetrain", *BASELINES}:
        print(f"error: --modes takes dense, prunetrain, scratch and/or short, not {args.modes}")
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
    rows, extra = [], []
    for spec in args.models.split(","):
        cfg = TrainConfig(model=spec, data=args.data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                          schedule=args.schedule, threshold=args.threshold, round_to=args.round_to,
                          prox_every=args.prox_every, steps_per_epoch=args.steps_per_epoch,
                          device=args.device, workers=args.workers, seed=args.seed, tensorboard=False)
        name = parse_spec(spec).name
        configs = {("dense", None, None): dataclasses.replace(cfg, dense=True)} if "dense" in modes else {}
        pruned_configs = {}
        for ratio, target in knobs:
            pruned_configs[ratio, target] = dataclasses.replace(
                cfg, penalty_ratio=ratio, target_flops=target,
                reconfig_every=args.reconfig_every if ratio is not None else None,
                **({} if ratio is not None else dict(prune_until=args.prune_until, reconfigurations=args.reconfigurations,
                                                     prune_schedule=args.prune_schedule,
                                                     compute_aware=args.compute_aware,
                                                     allocation=args.allocation)))
        if "prunetrain" in modes:
            configs.update({("prunetrain", *key): c for key, c in pruned_configs.items()})
        baselines = [m for m in modes if m in BASELINES]
        folders = {key: out / run_folder(name, *key[1:], mode=key[0]) for key in configs}
        try:  # the configs first, so that a bad flag costs no training; the data and model are read by the first run
            for c in configs.values():
                c.check()
            results = {key: run_one(dataclasses.replace(c, run_dir=str(folders[key])), folders[key])
                       for key, c in configs.items()}
            for key in pruned_configs if baselines else ():
                pruned_dir = out / run_folder(name, *key)
                if ("prunetrain", *key) not in results:  # made by an earlier invocation
                    if not (pruned_dir / "summary.json").exists():
                        raise UserError(f"no finished PruneTrain run in {pruned_dir}; add prunetrain to --modes")
                    results[("prunetrain", *key)] = json.loads((pruned_dir / "summary.json").read_text())
                    folders[("prunetrain", *key)] = pruned_dir
                for mode in baselines:
                    steps, _ = matched_steps(pruned_dir, mode)
                    model = spec if mode == "short" else f"run:{pruned_dir}"
                    folder = out / run_folder(name, *key, mode=mode)
                    base = dataclasses.replace(cfg, model=model, dense=True, steps_per_epoch=steps, run_dir=str(folder))
                    results[(mode, *key)] = {**run_one(base, folder), "steps_per_epoch": steps}
                    folders[(mode, *key)] = folder
        except UserError as e:
            print(f"error: {e}")
            return 2
        step = {}
        if args.time_steps and len(results) > 1:
            step = final_step_times(folders, args.batch_size, args.time_steps, args.device)
        for key in pruned_configs:
            if ("prunetrain", *key) not in results:
                continue
            results[("prunetrain", *key)].setdefault("steps_per_epoch", args.steps_per_epoch)
            if ("dense", None, None) in results:
                results["dense", None, None].setdefault("steps_per_epoch", args.steps_per_epoch)
                rows.append(row(spec, results["dense", None, None], results[("prunetrain", *key)],
                                step[("prunetrain", *key)] / step["dense", None, None] if step else None))
            if baselines:
                extra += baseline_rows(spec, key, results, step)
        machine = machine_line(args.device)
        table = (markdown(rows, schedule_text(cfg, args), machine) if rows else "") + \
                ("\n" + baseline_markdown(extra, machine) if extra else "")
        if table:
            (out / "table.md").write_text(table)
            (out / "table.json").write_text(json.dumps({"schedule": schedule_text(cfg, args), "rows": rows,
                                                        "equal_training_flops": extra}, indent=1))
    if rows or extra:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
