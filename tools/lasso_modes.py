"""Do channels reach the pruning threshold? Proximal group soft-thresholding against the lasso subgradient.

Trains the same model from the same seed on the same batches twice, once per mode, and prints
for each: validation accuracy, and how many channels have a group norm under the threshold
(the ones a reconfiguration would remove), under 1e-2, and the median norm.
Usage: python tools/lasso_modes.py [--model ptgraph:resnet20] [--steps 400] [--penalty-ratio 0.95]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from ptgraph.specs import build_model
from ptgraph.trainers import PruneTrain
from ptgraph.trainers.data import synthetic


def run(mode: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    data = synthetic(seed=args.seed)
    model = build_model(args.model).train()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    pt = PruneTrain(model, torch.randn(2, 3, 32, 32), opt, penalty_ratio=args.penalty_ratio,
                    proximal=mode == "proximal", threshold=args.threshold)
    gen = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(data.train, batch_size=args.batch, shuffle=True, generator=gen, drop_last=True)
    start, step = time.perf_counter(), 0
    while step < args.steps:
        for x, y in loader:
            loss = F.cross_entropy(pt.model(x), y)
            (loss + pt.penalty(loss)).backward()
            opt.step()
            opt.zero_grad()
            pt.after_step()
            step += 1
            if step == args.steps:
                break
    norms = np.concatenate(list(pt.channel_norms().values()))
    pt.model.eval()
    with torch.no_grad():
        xv, yv = data.val.tensors
        acc = float((pt.model(xv).argmax(1) == yv).float().mean())
    return {"mode": mode, "val_acc": acc, "under_threshold": float((norms < args.threshold).mean()),
            "under_1e-2": float((norms < 1e-2).mean()), "median_norm": float(np.median(norms)),
            "channels": len(norms), "seconds": time.perf_counter() - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="ptgraph:resnet20")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--penalty-ratio", type=float, default=0.95)
    ap.add_argument("--threshold", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"{args.model} on synthetic data, {args.steps} steps of {args.batch}, lr {args.lr}, "
          f"penalty ratio {args.penalty_ratio}, threshold {args.threshold}, torch {torch.__version__}")
    print("| mode | val acc | channels under threshold | under 1e-2 | median norm | time |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mode in ("proximal", "subgradient"):
        r = run(mode, args)
        print(f"| {r['mode']} | {r['val_acc']:.1%} | {r['under_threshold']:.1%} of {r['channels']} | "
              f"{r['under_1e-2']:.1%} | {r['median_norm']:.3g} | {r['seconds']:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
