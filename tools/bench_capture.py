"""Capture time through both paths: torch.fx symbolic trace and torch.export, for the four small
Hugging Face models of tests/test_transformers.py (built from configs) and torchvision's resnet50.

Each figure is `ptgraph.trace(model, x, capture=...)` in full (capture + shape propagation), the
paths interleaved per round, the median over rounds, the load average printed beside it.

    python tools/bench_capture.py --rounds 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def models() -> dict:
    import torchvision
    from test_transformers import MODELS

    out = {name: (build, inputs(2, 16)) for name, (build, inputs) in MODELS.items()}
    out["resnet50"] = (lambda: torchvision.models.resnet50(), (torch.randn(2, 3, 224, 224),))
    return out


def time_capture(model: torch.nn.Module, x: tuple, capture: str) -> float | None:
    from ptgraph import UserError, trace

    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trace(model, x, capture=capture)
    except UserError:
        return None
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| model | torch.fx | torch.export | load average |")
    print("| --- | --- | --- | --- |")
    for name, (build, x) in models().items():
        torch.manual_seed(0)
        model = build()
        times: dict[str, list[float | None]] = {"fx": [], "export": []}
        for _ in range(args.rounds):
            for capture in times:
                times[capture].append(time_capture(model, x, capture))
        cells = []
        for capture, ts in times.items():
            ok = [t for t in ts if t is not None]
            cells.append(f"{statistics.median(ok):.2f} s" if ok else "cannot capture")
        print(f"| {name} | {cells[0]} | {cells[1]} | {os.getloadavg()[0]:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
