"""FSDP2 against DDP: each rank's training state (parameters + gradients + optimizer state, counted tensor by
tensor), a training step's peak memory, and one reconfiguration's time and peak (on the CPU from the
allocator's events through the profiler, on CUDA from the CUDA allocator's statistics).

    python tools/bench_fsdp.py                      # a GPT of 12.2M parameters, 2 gloo ranks
    python tools/bench_fsdp.py --model 'ptgraph:gpt?n_layer=8&n_embd=512' --ranks 2
    python tools/bench_fsdp.py --device cuda --ranks 1     # one GPU: FSDP2 against DDP (tools/gpu_check.py)

The reconfiguration removes a quarter of every prunable group (the same plan in both modes), self-checked.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1].parent))  # run from a checkout without installing

MB = 1e6


def _nbytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def _state_bytes(module: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    params = list(dict.fromkeys(module.parameters()))
    return {"parameters": sum(_nbytes(p) for p in params),
            "gradients": sum(_nbytes(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(_nbytes(v) for s in opt.state.values() for v in s.values()
                             if isinstance(v, torch.Tensor) and v.dim())}


def window_peak(trace: Path, window: str, last: bool = False) -> tuple[int, int]:
    """Bytes allocated when the `window` range (torch.profiler.record_function) begins, and the most held at once
    within it: torch's CPU allocator reports every allocation and free to the profiler (profile_memory), summed in
    order from the start of the process's profile."""
    events = json.loads(trace.read_text())["traceEvents"]
    spans = [e for e in events if e.get("name") == window and e.get("ph") == "X"]
    span = spans[-1] if last else spans[0]
    begin, end = span["ts"], span["ts"] + span["dur"]
    memory = sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
                    key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)))
    live, before, peak = 0, None, 0
    for e in memory:
        if e["ts"] >= begin and before is None:  # allocations before the window's first one
            before = peak = live
        if e["ts"] > end:
            break
        live += e["args"]["Bytes"]
        if before is not None:
            peak = max(peak, live)
    return before or live, peak


def _quarter_plan(pt):
    from ptgraph.passes import PrunePlan

    return PrunePlan({g.id: tuple(range(g.size - g.size // 4)) for g in pt.analysis.groups
                      if g.prunable and g.id not in pt.frozen and g.size >= 4})


def _run(rank: int, world: int, port: int, args: argparse.Namespace, out: Path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ptgraph.graph import trace
    from ptgraph.specs import build_model
    from ptgraph.trainers import fsdp
    from ptgraph.trainers.prunetrain import PruneTrain

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True) \
        if args.measure == "memory" and not cuda else None
    if profiler:  # from the start, so that every tensor's free is seen
        profiler.__enter__()
    torch.manual_seed(0)
    model = build_model(args.model).to(device)
    vocab, length = model.wte.num_embeddings, args.length
    tokens = torch.randint(0, vocab, (args.batch, length + 1), generator=torch.Generator().manual_seed(1)).to(device)
    source = trace(model, (tokens[:2, :length],), capture=args.capture)
    if args.root_only:  # for the comparison: the export graph sharded at the root alone, as before fsdp_units
        fsdp.with_called_blocks = lambda gm, blocks: gm
    pt = PruneTrain(source, (tokens[:2, :length],), None, target_flops=0.5, total_steps=100)
    sharded = fsdp.shard(pt, device) if args.mode == "fsdp" else None
    module = sharded.module if sharded else DDP(pt.model)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    pt.optimizer = opt
    share = tokens[rank * args.batch // world:(rank + 1) * args.batch // world]
    for _ in range(2):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with torch.profiler.record_function("step"):
            logits = module(share[:, :length])
            torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), share[:, 1:].reshape(-1)).backward()
            state = _state_bytes(module, opt)  # gradients still held: the step's state at its largest
            opt.step()
            opt.zero_grad(set_to_none=True)
    result = {"mode": args.mode, "state": state, "params": sum(p.numel() for p in pt.model.parameters())}
    if cuda:
        torch.cuda.synchronize()
        result["step_peak"] = torch.cuda.max_memory_allocated()
    largest = max(p.numel() * 4 for p in pt.model.parameters())
    plan = _quarter_plan(pt)
    reconfigure = (lambda: sharded.apply(plan)) if sharded else (lambda: pt.reconfigure(plan))
    if args.measure == "time":
        start = time.perf_counter()
        reconfigure()
        if cuda:
            torch.cuda.synchronize()
        result["seconds"] = time.perf_counter() - start
    elif cuda:  # the CUDA allocator keeps its own statistics
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        reconfigure()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        result.update(extra_peak=peak - before, allocated_before=before, reconfiguration_peak=peak)
    else:
        with torch.profiler.record_function("reconfiguration"):
            reconfigure()
        profiler.__exit__(None, None, None)
        trace = out / f"trace{rank}.json"
        profiler.export_chrome_trace(str(trace))
        before, peak = window_peak(trace, "reconfiguration")
        result["step_peak"] = window_peak(trace, "step", last=True)[1]
        trace.unlink()
        result.update(extra_peak=peak - before, allocated_before=before, reconfiguration_peak=peak)
    result.update(largest_parameter=largest, flops_share=pt.flops / pt.dense_flops, note=pt.check_note)
    if rank == 0:
        (out / f"{args.mode}-{args.measure}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ptgraph:gpt?vocab_size=4096&block_size=64&n_layer=6&n_embd=384&n_head=6")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--batch", type=int, default=8, help="global batch")
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: NCCL, one GPU per rank")
    p.add_argument("--out", default="runs/bench_fsdp")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--capture", choices=("fx", "export"), default="fx", help="how the model is captured")
    p.add_argument("--root-only", action="store_true",
                   help="shard an export-captured graph at the root alone (each block its own unit otherwise)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda" and torch.cuda.device_count() < args.ranks:
        print(f"error: {args.ranks} ranks need {args.ranks} GPUs, this machine has {torch.cuda.device_count()}")
        return 2
    kind = torch.cuda.get_device_name() if args.device == "cuda" else "gloo, one thread each"
    print(f"{args.model}, captured by {args.capture}{', FSDP2 at the root only' if args.root_only else ''}, "
          f"{args.ranks} ranks ({kind}), load {os.getloadavg()[0]:.2f}")
    rows = {}
    for mode in ("ddp", "fsdp"):
        rows[mode] = {}
        for measure in ("time", "memory"):  # apart: the profiler slows what it watches
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            run_args = argparse.Namespace(**{**vars(args), "mode": mode, "measure": measure})
            mp.start_processes(_run, args=(args.ranks, port, run_args, out), nprocs=args.ranks, start_method="spawn")
            rows[mode].update(json.loads((out / f"{mode}-{measure}.json").read_text()))
    print(f"parameters {rows['ddp']['params'] / 1e6:.1f}M, the largest {rows['ddp']['largest_parameter'] / MB:.2f} MB")
    print("| per rank | parameters | gradients | optimizer state | total | a step's peak | reconfiguration "
          "| its peak | its extra (beyond what it started with) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mode, r in rows.items():
        s = r["state"]
        print(f"| {mode.upper()}, {args.ranks} ranks | {s['parameters'] / MB:.1f} MB | {s['gradients'] / MB:.1f} MB "
              f"| {s['optimizer'] / MB:.1f} MB | {sum(s.values()) / MB:.1f} MB | {r['step_peak'] / MB:.1f} MB "
              f"| {r['seconds']:.2f} s | {r['reconfiguration_peak'] / MB:.1f} MB | {r['extra_peak'] / MB:.1f} MB |")
    print(f"load {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": kind, "model": args.model, "ranks": args.ranks, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
