"""How much of a FLOP saving becomes a training-time saving: dense against shrunk models, one run.

For each model, builds pruned versions at about 25%, 40% and 60% fewer forward FLOPs (the same
share of channels dropped in every prunable group, found by bisection; shrunk by the shrink pass),
each with and without rounding the kept channels to multiples of 8, then times a full training
step (forward, backward, SGD with momentum) of every version, interleaved in rounds, and prints
time saving / FLOP saving. On CUDA the step runs in bf16 autocast with channels_last inputs.

    python tools/bench_step.py                              # CPU: resnet50 b8 and resnet56 b64
    python tools/bench_step.py --device cuda --batch 256    # GPU, bf16 + channels_last
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ptgraph.cost import forward_flops
from ptgraph.graph import trace
from ptgraph.passes import PrunePlan, analyze_channels, keep_every_tensor, shrink
from ptgraph.specs import build_model

MODELS = {"torchvision:resnet50": 224, "ptgraph:resnet56": 32}
TARGETS = (0.25, 0.40, 0.60)


@dataclass
class Variant:
    name: str
    model: torch.nn.Module
    flops: int
    params: int
    ratio: float  # share of each group's channels dropped


def uniform_plan(analysis, ratio: float, round_to: int) -> PrunePlan:
    """Drop `ratio` of every prunable exact group's channels (evenly spaced ones, so that split or
    chunked tensors keep some of each part), keeping a multiple of `round_to` where the group allows."""
    keep = {}
    for g in analysis.groups:
        if not g.prunable or not g.exact or g.size < 2:
            continue
        n = max(1, g.size - math.floor(g.size * ratio))
        if round_to > 1:
            n = min(g.size, max(round_to, math.ceil(n / round_to) * round_to))
        if n < g.size:
            keep[g.id] = tuple(np.unique(np.linspace(0, g.size - 1, n).round().astype(int)).tolist())
    return keep_every_tensor(analysis, PrunePlan(keep))


def pruned(spec: str, size: int, ratio: float, round_to: int) -> tuple[torch.nn.Module, int]:
    torch.manual_seed(0)
    graph = trace(build_model(spec).train(), (torch.randn(2, 3, size, size),))
    analysis = analyze_channels(graph)
    if ratio > 0:
        shrink(analysis, uniform_plan(analysis, ratio, round_to))
    return graph.module, forward_flops(graph.module)


def at_flop_cut(spec: str, size: int, target: float, round_to: int, dense_flops: int) -> Variant:
    """Bisect the per-group drop ratio until the FLOPs fall by about `target`."""
    lo, hi = 0.0, 0.95
    best = None
    for _ in range(10):
        mid = (lo + hi) / 2
        model, flops = pruned(spec, size, mid, round_to)
        cut = 1 - flops / dense_flops
        if best is None or abs(cut - target) < abs(1 - best[1] / dense_flops - target):
            best = (model, flops, mid)
        if abs(cut - target) < 0.01:
            break
        lo, hi = (mid, hi) if cut < target else (lo, mid)
    model, flops, ratio = best
    label = f"-{target:.0%} FLOPs" + (f", round-to {round_to}" if round_to > 1 else "")
    return Variant(label, model, flops, sum(p.numel() for p in model.parameters()), ratio)


def step_timer(model: torch.nn.Module, batch: int, size: int, device: torch.device, classes: int):
    model = model.to(device)
    bf16 = device.type == "cuda"
    if bf16:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch, 3, size, size, device=device)
    if bf16:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device=device)

    def steps(n: int) -> float:
        if bf16:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if bf16:
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / n

    return steps


def bench_model(spec: str, size: int, batch: int, device: torch.device, rounds: int, steps: int) -> list[dict]:
    dense, dense_flops = pruned(spec, size, 0.0, 1)
    variants = [Variant("dense", dense, dense_flops, sum(p.numel() for p in dense.parameters()), 0.0)]
    for target in TARGETS:
        for round_to in (1, 8):
            variants.append(at_flop_cut(spec, size, target, round_to, dense_flops))
    classes = 1000 if spec.startswith("torchvision") else 10
    timers = [step_timer(v.model, batch, size, device, classes) for v in variants]
    for t in timers:  # warm-up: allocator, cudnn autotuning for each shape
        t(3)
    times: list[list[float]] = [[] for _ in variants]
    for _ in range(rounds):
        for i, t in enumerate(timers):
            times[i].append(t(steps))
    base = statistics.median(times[0])
    rows = []
    for v, ts in zip(variants, times):
        t = statistics.median(ts)
        flop_saving, time_saving = 1 - v.flops / dense_flops, 1 - t / base
        rows.append({"model": spec, "variant": v.name, "drop_ratio": round(v.ratio, 4), "flops": v.flops,
                     "params": v.params, "flop_saving": flop_saving, "step_s": t, "time_saving": time_saving,
                     "time_per_flop_saving": time_saving / flop_saving if flop_saving > 0 else None,
                     "batch": batch, "size": size, "rounds": rounds, "steps": steps})
    return rows


def table(rows: list[dict], header: str) -> str:
    out = [header, "", "| model | variant | FLOPs/img | FLOP saving | step | time saving | time / FLOP saving |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ratio = "-" if r["time_per_flop_saving"] is None else f"{r['time_per_flop_saving']:.2f}"
        out.append(f"| {r['model']} b{r['batch']} | {r['variant']} | {r['flops'] / 1e9:.3f}G | {r['flop_saving']:.1%} "
                   f"| {r['step_s'] * 1e3:.1f} ms | {r['time_saving']:.1%} | {ratio} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated specs (image size: 224, or 32 for ptgraph:)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=None, help="batch (default: CPU 8 for 224px, 64 for 32px; GPU 256)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: CPU 3, GPU 5)")
    p.add_argument("--steps", type=int, default=None, help="steps per timing (default: CPU 2, GPU 10)")
    p.add_argument("--json", default=None, help="write the rows to this file")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True
    rows = []
    for spec in args.models.split(","):
        size = MODELS.get(spec, 32 if spec.startswith("ptgraph:") else 224)
        batch = args.batch or (256 if gpu else 8 if size > 64 else 64)
        rows += bench_model(spec, size, batch, device, args.rounds or (5 if gpu else 3), args.steps or (10 if gpu else 2))
        print(f"{spec}: done", file=sys.stderr, flush=True)
    where = torch.cuda.get_device_name(device) + ", bf16 autocast, channels_last" if gpu else \
        next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "CPU") + \
        f", {torch.get_num_threads()} threads, float32"
    header = (f"Training step (forward + backward + SGD), median of interleaved rounds; {where}; torch {torch.__version__}; "
              f"{time.strftime('%Y-%m-%d')}")
    print(table(rows, header))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
