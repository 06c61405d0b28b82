"""What the group lasso costs per training step: resnet50, batch 32, 224x224, on this machine's CPU.

Times a full step (forward, backward, SGD step) without regularisation, with the lasso added to the
loss (subgradient mode) and with the proximal step after the update, interleaved, and prints the
medians and their ratios to the plain step. Usage: python tools/bench_penalty.py [--model ...] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from ptgraph.specs import build_model
from ptgraph.trainers import PruneTrain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="torchvision:resnet50")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = build_model(args.model).train()
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 1000, (args.batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    pt = PruneTrain(model, x[:2], opt, proximal=False)
    gm = pt.model

    def step(mode: str) -> float:
        start = time.perf_counter()
        loss = F.cross_entropy(gm(x), y)
        if mode == "subgradient":
            loss = loss + pt.penalty(loss)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if mode == "proximal":
            pt.proximal, saved = True, pt.proximal
            pt.after_step()
            pt.proximal = saved
        return time.perf_counter() - start

    pt.penalty(F.cross_entropy(gm(x[:2]), y[:2]))  # calibrate lambda
    modes = ("plain", "subgradient", "proximal")
    for mode in modes:  # warm-up
        step(mode)
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for mode in modes:
            times[mode].append(step(mode))
    med = {m: statistics.median(t) for m, t in times.items()}
    print(f"{args.model}, batch {args.batch}, {args.size}x{args.size}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, median of {args.repeats}")
    for mode in modes:
        print(f"  {mode:<12} {med[mode]:.3f} s/step   ratio {med[mode] / med['plain']:.3f}")


if __name__ == "__main__":
    main()
