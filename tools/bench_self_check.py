"""What the reconfiguration self-check costs next to the training between two reconfigurations.

Per model: the self-check of a random 30% plan as a reconfiguration runs it (`checked_shrink`: the dropped
slices set aside, the model masked and run, shrunk and run, in place; the seconds it reports exclude the
slicing a shrink does anyway) and one training step at --batch, timed interleaved in rounds
(medians), on this machine now; then the check's share of training time for a run of --steps steps
with --reconfigurations checks (the CIFAR table's budget runs: 1950 steps, 8 reconfigurations).

    python tools/bench_self_check.py [--models ptgraph:resnet20,...] [--batch 128] [--size 32]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from ptgraph.passes import keep_every_tensor, random_plan
from ptgraph.passes.trial import checked_shrink
from ptgraph.passes.verify import flat_output
from ptgraph.specs import build_model
from ptgraph.trainers import PruneTrain


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="ptgraph:resnet20,ptgraph:mobilenet_v2?width_mult=0.5&stride=16")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=1950, help="training steps of the run the share is for")
    p.add_argument("--reconfigurations", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} thread(s), torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"load average {os.getloadavg()[0]:.2f}; medians of {args.rounds} interleaved rounds\n")
    print(f"| model | self-check | training step (b{args.batch}) | check / step | share of a {args.steps}-step run "
          f"with {args.reconfigurations} checks |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for spec in args.models.split(","):
        torch.manual_seed(0)
        model = build_model(f"{spec}{'&' if '?' in spec else '?'}num_classes=10").train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        probe = torch.randn(2, 3, args.size, args.size)
        x, y = torch.randn(args.batch, 3, args.size, args.size), torch.randint(0, 10, (args.batch,))
        checks, steps = [], []
        for _ in range(args.rounds + 1):
            twin = PruneTrain(copy.deepcopy(model), probe, None)  # the check shrinks it
            plan = keep_every_tensor(twin.analysis, random_plan(twin.analysis.groups, 0.3))
            report, err, seconds = checked_shrink(twin.analysis, plan, twin.probe, flat_output, 1e-4)
            assert report is not None and err < 1e-4
            checks.append(seconds)
            start = time.perf_counter()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            steps.append(time.perf_counter() - start)
        check, step = statistics.median(checks[1:]), statistics.median(steps[1:])
        share = args.reconfigurations * check / (args.steps * step)
        print(f"| {spec} | {check:.3f} s | {step:.3f} s | {check / step:.1f} | {share:.3%} |", flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
