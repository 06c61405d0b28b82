"""What ptgraph's own work costs next to the training it saves: analysis + shrink, checkpoints.

Per model (224x224): trace + channel analysis + shrink of a random 30% plan (median of --runs after
a warm-up, the model rebuilt before each run, untimed), next to the median time of one training
step (forward, backward, SGD) at --batch; and the time to save and load a PruneTrain checkpoint
(model, optimizer state, plans) the way `prune-train` writes it after every epoch.

    python tools/bench_overheads.py [--models resnet50,densenet121,efficientnet_b0,vit_b_16] [--runs 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from zoo import timing_worker  # noqa: E402

from ptgraph.specs import build_model  # noqa: E402
from ptgraph.trainers import PruneTrain  # noqa: E402
from ptgraph.trainers import checkpoint as ckpt  # noqa: E402

MODELS = "resnet50,densenet121,efficientnet_b0,vit_b_16"


def step_seconds(name: str, batch: int, runs: int) -> float:
    torch.manual_seed(0)
    model = build_model(f"torchvision:{name}").train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 1000, (batch,))
    times = []
    for i in range(runs + 1):
        start = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def checkpoint_seconds(name: str, runs: int) -> tuple[float, float, int]:
    """Save and load of what prune-train checkpoints: weights, SGD momentum, a plan, RNG states."""
    model = build_model(f"torchvision:{name}").train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    pt = PruneTrain(model, torch.randn(2, 3, 224, 224), opt)
    F.cross_entropy(pt.model(torch.randn(2, 3, 224, 224)), torch.tensor([0, 1])).backward()
    opt.step()
    payload = {"model": pt.model.state_dict(), "optimizer": opt.state_dict(), "plans": [], "rng": ckpt.rng_state()}
    saves, loads = [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "checkpoint.pt"
        for _ in range(runs):
            start = time.perf_counter()
            ckpt.save(path, payload)
            saves.append(time.perf_counter() - start)
            start = time.perf_counter()
            torch.load(path, weights_only=False)
            loads.append(time.perf_counter() - start)
        size = path.stat().st_size
    return statistics.median(saves), statistics.median(loads), size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=MODELS)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--batch", type=int, default=8, help="training-step batch (default 8: this is a CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = args.models.split(",")
    shrink = timing_worker(models, args.runs, 0.3)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "CPU")
    print(f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; "
          f"medians of {args.runs} after a warm-up\n")
    print(f"| model | trace + analysis | shrink (30%) | total | training step (b{args.batch}) | total / step "
          f"| checkpoint save | load | size |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in models:
        t = shrink[name]
        ta = statistics.median(r["trace"] + r["analyze"] for r in t["runs"])
        step = step_seconds(name, args.batch, max(2, args.runs // 2))
        save, load, size = checkpoint_seconds(name, args.runs)
        print(f"| {name} | {ta:.3f} s | {t['shrink']:.3f} s | {t['total']:.3f} s | {step:.2f} s | {t['total'] / step:.2f} "
              f"| {save:.3f} s | {load:.3f} s | {size / 1e6:.0f} MB |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
