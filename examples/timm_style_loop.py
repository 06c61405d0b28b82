"""A training script of your own with PruneTrain, timm-style: an EMA copy, DDP under torchrun, torch.compile, resume.

    python examples/timm_style_loop.py --epochs 4 --dir runs/own
    torchrun --nproc-per-node 2 examples/timm_style_loop.py --epochs 4 --compile      # 2 gloo processes on the CPU
    python examples/timm_style_loop.py --epochs 4 --dir runs/own --resume              # after a kill: the same weights

The PruneTrain object plans on rank 0 and hands every rank the same plan; `Runner.rebuild()` after a shrink
builds a new DDP wrapper, compiles afresh and shrinks the EMA copy alike. Tiny synthetic data.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.utils import ModelEmaV3

from ptgraph.integrations.ddp import Runner
from ptgraph.passes import PrunePlan
from ptgraph.specs import build_model
from ptgraph.trainers import PruneTrain
from ptgraph.trainers import checkpoint as ckpt
from ptgraph.trainers.distributed import ShardSampler


def synthetic(n: int, image: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(classes, 3, 1, 1, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return patterns[y] + 0.5 * torch.randn(n, 3, image, image, generator=g), y


def sync_buffers(*modules: torch.nn.Module) -> None:
    """Rank 0's BatchNorm statistics everywhere (timm's distribute_bn): each rank updated its own."""
    if dist.is_initialized():
        for m in modules:
            for b in m.buffers():
                dist.broadcast(b, 0)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="torchvision:resnet18?num_classes=10", help="a ptgraph model spec")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--batch", type=int, default=16, help="per process")
    p.add_argument("--image", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--target", type=float, default=0.5, help="share of the dense FLOPs to end with")
    p.add_argument("--prune-until", type=float, default=0.5)
    p.add_argument("--ema-decay", type=float, default=0.99)
    p.add_argument("--compile", nargs="?", const="inductor", help="torch.compile, with this backend")
    p.add_argument("--dir", default="runs/own", help="checkpoint.pt goes here after every epoch")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    p.add_argument("--out", help="write each rank's final weights here (rank{r}.pt)")
    args = p.parse_args(argv)

    if "RANK" in os.environ and not dist.is_initialized():  # torchrun
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    path = Path(args.dir) / "checkpoint.pt"
    state = torch.load(path, weights_only=False) if args.resume and path.exists() else None

    torch.manual_seed(0)
    x_all, y_all = synthetic(args.samples, args.image, 10)
    steps = len(ShardSampler(args.samples, rank, world, True, 0)) // args.batch
    model = build_model(args.model).train()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    pt = PruneTrain(model, x_all[:2], opt, target_flops=args.target, total_steps=args.epochs * steps,
                    prune_until=args.prune_until)
    for plan in state["plans"] if state else ():  # the architecture of the checkpoint, before its weights
        pt.reconfigure(PrunePlan.from_json(plan))
    model = pt.model  # the traced graph module: it shares the parameters and is what shrinks
    ema = ModelEmaV3(model, decay=args.ema_decay)  # timm's order: EMA, then DDP, then compile
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs, eta_min=0.1 * args.lr)
    epoch = 0
    if state:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        ema.load_state_dict(state["ema"])
        pt.steps, epoch = state["steps"], state["epoch"]
        pt.load_budget_state(state["budget"])
        ckpt.set_rng_state(state["rng"])
    runner = Runner(pt, compile={"backend": args.compile} if args.compile else False, follow=[ema])

    while epoch < args.epochs:
        order = list(ShardSampler(args.samples, rank, world, True, seed=epoch))
        for i in range(steps):
            idx = order[i * args.batch:(i + 1) * args.batch]
            x, y = x_all[idx], y_all[idx]
            x = torch.where(torch.rand(len(x), 1, 1, 1) < 0.5, x.flip(3), x)  # random flips: the RNG state matters
            loss = F.cross_entropy(runner(x), y)
            (loss + pt.penalty(loss)).backward()  # the penalty is zero with the proximal lasso (the default)
            opt.step()
            opt.zero_grad(set_to_none=True)
            pt.after_step()
            ema.update(model)
            if pt.reconfiguration_due() and pt.reconfigure():  # the same answer on every rank
                runner.rebuild()  # new DDP buckets, a fresh compile, the EMA copy shrunk alike
        sched.step()
        pt.flush()
        sync_buffers(model, ema)
        epoch += 1
        if rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            ckpt.save(path, {
                "plans": [q.to_json() for q in pt.plans], "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "ema": ema.state_dict(), "steps": pt.steps, "epoch": epoch,
                "budget": pt.budget_state(), "rng": ckpt.rng_state()})
            print(f"epoch {epoch}: loss {loss.detach().item():.3f}  FLOPs/img {pt.flops / 1e6:.2f}M "
                  f"({pt.flops / pt.dense_flops:.0%} of dense)  {len(pt.plans)} reconfigurations", flush=True)
    result = {"model": model.state_dict(), "ema": ema.state_dict(), "plans": [q.to_json() for q in pt.plans],
              "flops": pt.flops, "dense_flops": pt.dense_flops}
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        torch.save(result, Path(args.out) / f"rank{rank}.pt")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
