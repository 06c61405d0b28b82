"""PruneTrain through lightning.Trainer: torchvision's ResNet-18 brought to half its FLOPs while it trains.

    python examples/lightning_resnet.py --epochs 4                      # one process
    torchrun --nproc-per-node 2 examples/lightning_resnet.py --devices 2 # strategy="ddp", gloo on the CPU
    python examples/lightning_resnet.py --epochs 6 --resume runs/lit/last.ckpt   # a fresh module resumes

Tiny synthetic data (each class a colour pattern plus noise), so it runs anywhere in seconds.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ptgraph.integrations.lightning import PruneTrainCallback
from ptgraph.specs import build_model


class Classifier(L.LightningModule):
    """A plain LightningModule: its forward calls its model, which the callback prunes."""

    def __init__(self, model: nn.Module, lr: float = 0.05, image: int = 32) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.example_input_array = torch.randn(2, 3, image, image)  # what the callback traces the model with

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.trainer.max_epochs),
                                                           eta_min=0.1 * self.lr)
        return {"optimizer": opt, "lr_scheduler": sched}


def synthetic(n: int, image: int, classes: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(classes, 3, 1, 1, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return TensorDataset(patterns[y] + 0.5 * torch.randn(n, 3, image, image, generator=g), y)


def main(argv: list[str] | None = None) -> L.Trainer:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="torchvision:resnet18?num_classes=10", help="a ptgraph model spec")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--batch", type=int, default=16, help="per process")
    p.add_argument("--image", type=int, default=32)
    p.add_argument("--target", type=float, default=0.5, help="share of the dense FLOPs to end with")
    p.add_argument("--prune-until", type=float, default=0.5)
    p.add_argument("--devices", type=int, default=1, help="CPU processes; 2 or more use strategy='ddp' (gloo)")
    p.add_argument("--total-steps", type=int, help="the pruning schedule's length (default: this fit's steps)")
    p.add_argument("--dir", default="runs/lit", help="where checkpoints go")
    p.add_argument("--resume", help="a Lightning checkpoint to resume from (into a fresh module)")
    p.add_argument("--keep-all", action="store_true", help="keep every epoch's checkpoint, not only the last")
    p.add_argument("--out", help="write each rank's final weights here (rank{r}.pt)")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    module = Classifier(build_model(args.model), image=args.image)
    callback = PruneTrainCallback(target_flops=args.target, prune_until=args.prune_until, total_steps=args.total_steps)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=args.devices,
                        strategy="ddp" if args.devices > 1 else "auto", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, deterministic=True, default_root_dir=args.dir,
                        callbacks=[callback, ModelCheckpoint(dirpath=args.dir, save_last=True,
                                                                   save_top_k=-1 if args.keep_all else 1)])
    loader = DataLoader(synthetic(args.samples, args.image, 10), batch_size=args.batch, shuffle=True,
                        generator=torch.Generator().manual_seed(1))
    trainer.fit(module, loader, ckpt_path=args.resume)
    pt = callback.pt
    if trainer.is_global_zero:
        print(f"FLOPs/img {pt.dense_flops / 1e6:.1f}M -> {pt.flops / 1e6:.1f}M ({pt.flops / pt.dense_flops:.1%}), "
              f"{len(pt.plans)} reconfigurations; checkpoints in {args.dir}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        torch.save({"state": module.state_dict(), "flops": pt.flops, "dense_flops": pt.dense_flops,
                    "plans": [q.to_json() for q in pt.plans]}, Path(args.out) / f"rank{trainer.global_rank}.pt")
    return trainer


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
