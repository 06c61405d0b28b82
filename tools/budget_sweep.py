"""Does one FLOPs target mean the same on models the steering was not tuned on? A sweep of the PruneTrain object.

For each model spec, builds it from its config (nothing is downloaded), and trains it for a few steps
on random images and labels with the product's defaults for a target (half the dense FLOPs by 30%
of the steps, cubic schedule, 8 reconfigurations, uniform allocation; `--target`, `--reconfigurations` and the other
flags change them), exactly as the README's loop does. Records the final FLOPs against the target,
the shrinks before the schedule's point (gradual or not), the groups the self-check froze, and
whether the final model still runs forward and backward. Each model runs in its own subprocess
(memory, a per-model timeout); the table says what happened, one row per model:

    python tools/budget_sweep.py --models torchvision:resnet50,timm:efficientnet_b0 --out /tmp/sweep.md

Random data is enough here: the question is whether the steering reaches the budget on schedule
and leaves a working model, not the accuracy it ends at (docs/BENCHMARKS.md section 1 is that).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ptgraph.errors import UserError
from ptgraph.trainers.budget import ALLOCATIONS, DEFAULT_PRUNE_UNTIL, check_budget

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = ",".join([
    "torchvision:resnet50", "torchvision:mobilenet_v3_small", "torchvision:efficientnet_b0",
    "torchvision:regnet_y_400mf", "torchvision:densenet121", "torchvision:convnext_tiny",
    "timm:ghostnet_050", "timm:mixnet_s", "timm:repvgg_a0", "timm:dla34",
])


def run_one(spec: str, args: argparse.Namespace) -> dict:
    """Train `spec` for args.steps steps under a FLOPs target; what the steering reached."""
    import torch

    from ptgraph.specs import build_model
    from ptgraph.trainers import PruneTrain

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = build_model(spec)
    x = torch.randn(args.batch, 3, args.size, args.size)
    with torch.no_grad():
        classes = model.eval()(x[:2]).shape[-1]
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    start = time.perf_counter()
    pt = PruneTrain(model, x[:2], opt, target_flops=args.target, total_steps=args.steps,
                    reconfigurations=args.reconfigurations, round_to=args.round_to,
                    **({"allocation": args.allocation} if args.allocation else {}))
    shrinks, lags = [], []
    for _ in range(args.steps):
        x = torch.randn(args.batch, 3, args.size, args.size)
        y = torch.randint(0, classes, (args.batch,))
        pt.observe(x)  # what the sensitivity allocation measures on (a no-op for the others)
        loss = torch.nn.functional.cross_entropy(pt.model(x), y)
        (loss + pt.penalty(loss)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        pt.after_step()
        if not pt.reconfiguration_due():
            continue
        if (r := pt.reconfigure()) is not None:
            shrinks.append(r.step)
        if pt.steps < pt.schedule.until:  # how far the lasso's zeros fell behind the schedule (the point cuts by norm)
            lags.append((pt.flops - pt.scheduled_flops) / pt.dense_flops)
    out = pt.model(torch.randn(2, 3, args.size, args.size))
    out.float().sum().backward()  # the shrunk model still trains
    return {"model": spec, "target": args.target, "share": pt.flops / pt.dense_flops,
            "dense_flops": pt.dense_flops, "flops": pt.flops, "shrinks": len(shrinks),
            "before_point": sum(s < pt.schedule.until for s in shrinks), "frozen": len(pt.frozen),
            "groups": len(pt.dense_sizes), "until": pt.schedule.until, "lag": max(lags, default=0.0), "allocation": pt.allocation, "round_to": pt.round_to, "finite": bool(torch.isfinite(out).all()),
            "seconds": time.perf_counter() - start, "check_seconds": pt.check_seconds}


def sweep(models: list[str], args: argparse.Namespace) -> list[dict]:
    rows = []
    for spec in models:
        cmd = [sys.executable, __file__, "--worker", spec, *forwarded(args)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env, cwd=ROOT)
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
            row = json.loads(lines[-1]) if done.returncode == 0 and lines else \
                {"model": spec, "error": (done.stderr.strip().splitlines() or ["no output"])[-1][:200]}
        except subprocess.TimeoutExpired:
            row = {"model": spec, "error": f"timed out after {args.timeout:g} s"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def forwarded(args: argparse.Namespace) -> list[str]:
    flags = ["--target", args.target, "--steps", args.steps, "--reconfigurations", args.reconfigurations,
             "--size", args.size, "--batch", args.batch, "--lr", args.lr, "--threads", args.threads]
    if args.allocation:
        flags += ["--allocation", args.allocation]
    if args.round_to > 1:
        flags += ["--round-to", args.round_to]
    return [str(f) for f in flags]


def table(rows: list[dict], args: argparse.Namespace) -> str:
    ok = [r for r in rows if "error" not in r]
    hit = [r for r in ok if abs(r["share"] - args.target) <= 0.05 and r["before_point"] >= 2 and r["finite"]]
    until = ok[0]["until"] if ok else None
    lines = [f"Target {args.target:g} of the dense FLOPs by step {until} of {args.steps}, {args.reconfigurations} "
             f"reconfigurations, round-to {args.round_to}, {args.size}x{args.size} random images, batch {args.batch}, "
             f"SGD lr {args.lr:g}, "
             f"{args.threads} thread(s), load average {os.getloadavg()[0]:.1f}: {len(hit)} of {len(rows)} models within "
             f"0.05 of the target with at least two shrinks before the point and a finite output.", "",
             "| model | groups | allocation | FLOPs share | shrinks (before the point) | largest lag behind the schedule "
             "before the point | frozen groups | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | - | - | error: {r['error']} | - | - | - | - |")
        else:
            lines.append(f"| {r['model']} | {r['groups']} | {r['allocation']} | {r['share']:.3f} | {r['shrinks']} "
                         f"({r['before_point']}) | {r['lag']:+.3f} of dense | {r['frozen']} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated model specs")
    p.add_argument("--target-flops", "--target", dest="target", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=80, help="default: 80 (the point at step 24, a shrink every 3)")
    p.add_argument("--reconfigurations", type=int, default=8)
    p.add_argument("--allocation", choices=ALLOCATIONS, default=None, help="default: the product's")
    p.add_argument("--round-to", type=int, default=1,
                   help="keep multiples of this many channels per group (the CUDA default of prune-train is 8; default: 1)")
    p.add_argument("--size", type=int, default=64, help="image side (default: 64)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=float, default=900, help="seconds per model")
    p.add_argument("--out", default=None, help="markdown table (default: print it)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.size < 1 or args.round_to < 1:
        p.error("--steps, --batch, --size and --round-to must be 1 or more")
    try:
        check_budget(args.target, DEFAULT_PRUNE_UNTIL, "cubic", args.reconfigurations, args.allocation)
    except UserError as e:
        p.error(str(e))  # one line and exit 2, before any model is built
    if args.worker:
        row = run_one(args.worker, args)
        print(json.dumps(row))
        return [row]
    rows = sweep([m for m in args.models.split(",") if m], args)
    text = table(rows, args)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return rows


if __name__ == "__main__":
    main()
