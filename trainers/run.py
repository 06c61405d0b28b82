"""One training run's state for `ptgraph prune-train`: model, optimizer, schedule, data and the PruneTrain object.

Determinism: each epoch's shuffling comes from a generator seeded by (seed, epoch), and the
checkpoint written after every epoch holds every RNG state, so a resumed run replays exactly
what the uninterrupted run would have done (bit-identical on the CPU).
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ptgraph.cost import TRAIN_STEP_FACTOR, activation_elements
from ptgraph.errors import UserError
from ptgraph.graph import trace
from ptgraph.inputs import dtype_name
from ptgraph.passes import PrunePlan, count_params
from ptgraph.specs import build_model
from ptgraph.trainers import checkpoint as ckpt
from ptgraph.trainers.compiling import Compiler
from ptgraph.trainers.config import TrainConfig
from ptgraph.trainers.data import DataSets, load_data
from ptgraph.trainers.distributed import Dist, ShardSampler, pick_device
from ptgraph.trainers.prunetrain import PruneTrain, Reconfiguration
from ptgraph.trainers.resident import DeviceBatches, ImageTensors, image_tensors
from ptgraph.trainers.tokens import TokenBatches


def _amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or cfg.amp == "off":
        return None
    if cfg.amp == "fp16" or (cfg.amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


class Run:
    """One training run: everything the loop needs, rebuilt identically from a checkpoint."""

    def __init__(self, cfg: TrainConfig, resume: dict[str, Any] | None = None, dist: Dist | None = None) -> None:
        self.dist = dist or Dist(device=pick_device(cfg.device))
        self.rank, self.world = self.dist.rank, self.dist.world  # this process's shard of every batch
        load = lambda: load_data(cfg.data, cfg.download)  # noqa: E731
        self.data: DataSets = self.dist.local_first(load) if cfg.download else load()
        self.cfg = cfg = cfg.resolved(self.data.family)
        self.device = self.dist.device
        if cfg.round_to is None:  # tensor cores want channel counts in multiples of 8 (docs/BENCHMARKS.md)
            self.cfg = cfg = dataclasses.replace(cfg, round_to=8 if self.device.type == "cuda" else 1)
        torch.manual_seed(cfg.seed)
        self.task = self.data.task  # loss, example input and validation figures: classification or next-token
        self.spec = self.task.model_spec(cfg.model)
        model = build_model(self.spec).train()
        if cfg.sync_bn:
            if self.dist.active and self.device.type != "cuda":
                raise UserError("--sync-bn needs CUDA (SyncBatchNorm has no CPU kernel); leave it out on the CPU")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # before tracing: the analysis binds these
        self.data, example = self.task.fit(self.data, model, cfg.block_size)
        self.input_shape, self.input_dtype = tuple(example[0].shape), dtype_name(example[0])
        graph = trace(model, example)
        n_out = [n for n in graph.module.graph.nodes if n.op == "output"][0].args[0]
        if isinstance(n_out, (tuple, list)) and graph.capture == "export":  # flat outputs: the first is the main one
            n_out = n_out[0] if n_out else None
        self.task.check_output(getattr(n_out, "meta", {}).get("shape") if not isinstance(n_out, (tuple, list)) else None)
        self.batch = cfg.batch_size
        shard = len(ShardSampler(len(self.data.train), self.rank, self.world, True, 0))
        self.steps_per_epoch = min(shard // self.batch, cfg.steps_per_epoch or shard)  # what every epoch runs
        reconfig_steps = cfg.reconfig_steps
        if cfg.budget and cfg.reconfig_every and not reconfig_steps:  # the budget reconfigures by steps
            reconfig_steps = cfg.reconfig_every * self.steps_per_epoch
        budget = dict(target_flops=cfg.target_flops, total_steps=cfg.epochs * self.steps_per_epoch,
                      prune_until=cfg.prune_until, prune_schedule=cfg.prune_schedule,
                      reconfigurations=cfg.reconfigurations, compute_aware=cfg.compute_aware,
                      allocation=cfg.allocation) if cfg.budget else {}
        self.pt = PruneTrain(graph, example, None, penalty_ratio=cfg.penalty_ratio, threshold=cfg.threshold,
                             reconfig_steps=reconfig_steps, round_to=cfg.round_to,
                             proximal=cfg.lasso == "proximal", exact_only=cfg.exact_only, prox_every=cfg.prox_every,
                             **budget)
        self.widths_before = self._widths()
        self.dense_flops = self.pt.dense_flops
        for plan_json in (resume or {}).get("plans", []):
            self.pt.reconfigure(PrunePlan.from_json(plan_json))
        self.model = self.pt.model.to(self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
        self.amp = _amp_dtype(cfg, self.device)
        self.sharded = None  # FSDP2 (--fsdp): trainers/fsdp.py; self.model is then its sharded module
        if cfg.fsdp:
            from ptgraph.trainers import fsdp

            if not self.dist.active or self.world < 2:
                raise UserError("--fsdp shards the model across processes; run it under torchrun with 2 or more "
                                "(--nproc-per-node N)")
            self.sharded = fsdp.shard(self.pt, self.device, fsdp.mixed_precision(self.amp))
            self.model = self.sharded.module
        self.lr_scale = 1.0  # the dynamic batch's factor
        self.world_scale = float(self.world) if cfg.scale_lr else 1.0  # lr x processes: batch_size is per process
        self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg.lr * self.world_scale, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay)
        self.pt.optimizer = self.opt
        if cfg.schedule == "cosine":
            self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=cfg.epochs)
        else:
            self.sched = torch.optim.lr_scheduler.MultiStepLR(self.opt, cfg.milestones(self.data.family), 0.1)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp is torch.float16)
        self.epoch, self.train_flops, self.dense_train_flops = 0, 0.0, 0.0
        self.records: list[dict[str, Any]] = []
        self._on_device: dict[int, ImageTensors | None] = {}
        self.compiler = Compiler() if cfg.compile else None  # a fresh compile after every shrink
        self.runner = self.model if self.sharded else self._compiled()  # FSDP2: no DDP, no compile
        if resume:
            self._restore(resume)

    # -- state -------------------------------------------------------------------------------
    def _widths(self) -> dict[str, int]:
        """Output width per conv (per linear layer in a model without convs): the report's width plot."""
        convs = {n: m.out_channels for n, m in self.pt.model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)}
        return convs or {n: m.out_features for n, m in self.pt.model.named_modules() if isinstance(m, nn.Linear)}

    def _compiled(self) -> nn.Module:
        """What a step calls: the model, wrapped in DDP under torchrun (rebuilt after every shrink), compiled on
        request (afresh after every shrink: trainers/compiling.py)."""
        self.runner = None  # drops the old DDP wrapper and its buckets before a new one is built
        module = self.dist.wrap(self.model)
        return module if self.compiler is None else self.compiler(module)

    def note_eager(self, console) -> None:
        """Say so if dynamo's recompile limit made a compiled frame run eagerly (it logs it only)."""
        note = self.compiler.eager_note() if self.compiler is not None else None
        if note:
            console.print(note)
            self.records.append({"kind": "compile", "epoch": self.epoch + 1, "note": note})

    def state(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.cfg), "spec": self.spec, "plans": [p.to_json() for p in self.pt.plans],
            "input_shape": self.input_shape, "input_dtype": self.input_dtype,
            **({} if self.sharded else {"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": ckpt.rng_state(), "epoch": self.epoch, "steps": self.pt.steps,
            "lam": self.pt.lam, "budget": self.pt.budget_state(), "batch": self.batch, "lr_scale": self.lr_scale, "world": self.world,
            "world_scale": self.world_scale, "train_flops": self.train_flops,
            "dense_train_flops": self.dense_train_flops, "records": self.records,
        }

    def _restore(self, s: dict[str, Any]) -> None:
        try:
            if self.sharded is not None:  # FSDP2: each rank reads its shards
                ckpt.load_sharded(Path(self.cfg.run_dir), s["sharded"], self.model, self.opt)
            else:
                self.model.load_state_dict(s["model"])
                self.opt.load_state_dict(s["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"the checkpoint's weights do not fit the rebuilt model ({str(e).splitlines()[0]}); "
                            f"it was written by another model or ptgraph version, start a new run") from None
        self.sched.load_state_dict(s["scheduler"])
        self.scaler.load_state_dict(s["scaler"])
        self.epoch, self.pt.steps, self.pt.lam = s["epoch"], s["steps"], s["lam"]
        if "budget" in s:
            self.pt.load_budget_state(s["budget"])
        self.batch, self.lr_scale = s["batch"], s["lr_scale"]
        if s.get("world_scale", 1.0) != self.world_scale:  # resumed with another number of processes
            self._scale_lr(self.world_scale / s.get("world_scale", 1.0))
        self.train_flops, self.dense_train_flops = s["train_flops"], s["dense_train_flops"]
        self.records = list(s["records"])
        ckpt.set_rng_state(s["rng"])

    # -- training ------------------------------------------------------------------------------
    def loader(self, dataset, shuffle: bool, epoch: int) -> DataLoader | DeviceBatches | TokenBatches:
        seed = self.cfg.seed * 100_003 + epoch
        if hasattr(dataset, "batches"):  # token blocks cut their own batches (random blocks, not a permutation)
            return dataset.batches(self.batch, self.rank, self.world, shuffle, seed)
        sampler = ShardSampler(len(dataset), self.rank, self.world, shuffle, seed)  # same global batches for any world
        gen = torch.Generator().manual_seed(seed * 1_009 + self.rank)  # worker seeds: augmentations differ per rank
        split = self._resident(dataset, shuffle)
        if split is not None:
            return DeviceBatches(split, list(sampler), self.batch, drop_last=shuffle, seed=seed * 1_009 + self.rank,
                                 channels_last=self.device.type == "cuda")
        workers = self.cfg.workers if self.cfg.workers is not None else (4 if self.device.type == "cuda" else 0)
        return DataLoader(dataset, batch_size=self.batch, sampler=sampler, generator=gen, num_workers=workers,
                          pin_memory=self.device.type == "cuda", drop_last=shuffle, persistent_workers=False)

    def _resident(self, dataset, train: bool) -> ImageTensors | None:
        """The split held on the device (decoded once), when --data-on-device asks for it and the data allow."""
        mode = self.cfg.data_on_device
        if mode == "off" or (mode == "auto" and self.device.type != "cuda"):
            return None
        if id(dataset) not in self._on_device:
            split = image_tensors(dataset, train)
            if split is None and mode == "on":
                raise UserError(f"--data-on-device on: {self.cfg.data} cannot be held in memory; use auto or off")
            self._on_device[id(dataset)] = split.to(self.device) if split is not None else None
        return self._on_device[id(dataset)]

    def _to(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.device.type == "cuda" and x.dim() == 4 else x

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step; returns the loss and the number of hits as device tensors (reading them would make the
        CPU wait for the GPU every step)."""
        if not self.cfg.dense:
            self.pt.observe(x)
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            out = self.runner(x)
            loss = self.task.loss(out, y)
            if self.pt.lam is None and not self.cfg.dense and self.dist.active:
                self._calibrate(loss)
            total = loss if self.cfg.dense else loss + self.pt.penalty(loss)
        self.scaler.scale(total).backward()
        if self.task.clip_norm is not None:  # transformers: one large gradient must not throw the weights off
            self.scaler.unscale_(self.opt)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.task.clip_norm)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        if not self.cfg.dense:
            self.pt.after_step()
        return loss.detach().float(), self.task.hits(out, y)

    def _calibrate(self, loss: torch.Tensor) -> None:
        """lambda from the global batch's loss (the mean over ranks), decided on rank 0 for every rank."""
        (mean,) = self.dist.sum(float(loss.detach()) / self.world)
        if self.dist.main or self.sharded is not None:  # FSDP2: the norms are a collective, every rank computes
            self.pt.lam = self.pt.calibrate(mean)
        if self.pt.schedule is not None:  # the adaptive weights too
            self.pt.load_budget_state(self.dist.broadcast_object(self.pt.budget_state()))
        else:
            self.pt.lam = self.dist.broadcast_object(self.pt.lam)

    def reconfigure(self, console) -> Reconfiguration | None:
        act_before = activation_elements(self.model)
        goal = self.pt.scheduled_flops
        with warnings.catch_warnings():  # the self-check's note is printed below, once
            warnings.simplefilter("ignore")
            # rank 0 plans, checks and shrinks in one pass and broadcasts its plan; the other ranks apply it (under
            # FSDP2 every rank takes part: norms, checks and re-sharding are collectives)
            r = self.pt.reconfigure()
        # rank 0 planned, checked and steered: the same lambda, gain, weights and frozen groups on every rank
        self.pt.load_budget_state(self.dist.broadcast_object(self.pt.budget_state()))
        if self.pt.check_note:
            console.print(self.pt.check_note)
            self.records.append({"kind": "self_check", "epoch": self.epoch + 1, "step": self.pt.steps,
                                 "frozen": sorted(self.pt.frozen), "note": self.pt.check_note})
        if r is None:
            return None
        if self.sharded is not None:
            self.model = self.runner = self.sharded.module  # a new sharded module; the optimizer followed it
        else:
            self.runner = self._compiled()
        shrunk = ", ".join(f"g{g}: {a}->{b}" for g, (a, b) in sorted(r.report.groups.items())[:8])
        more = f" (+{len(r.report.groups) - 8} more)" if len(r.report.groups) > 8 else ""
        record = {"kind": "reconfig", "epoch": self.epoch + 1, "step": r.step, "groups": len(r.report.groups),
                  "params": r.report.params_after, "flops": r.flops_after, "scheduled_flops": goal,
                  "lam": self.pt.lam, "gain": self.pt.controller.gain, "cut_norm": self.pt.cut_norm, "seconds": r.seconds,
                  "check_seconds_total": self.pt.check_seconds}
        if self.cfg.dynamic_batch:
            record.update(self._grow_batch(act_before / max(activation_elements(self.model), 1)))
        n = len(r.report.groups)
        console.print(f"reconfigure @ step {r.step}: {n} group{'s' if n != 1 else ''} shrank ({shrunk}{more}); "
                      f"FLOPs/img {r.flops_before / 1e6:.1f}M -> {r.flops_after / 1e6:.1f}M"
                      + (f" (schedule {goal / 1e6:.1f}M)" if goal is not None else "") + "; "
                      f"params {r.report.params_before:,} -> {r.report.params_after:,}; {r.seconds:.3f} s"
                      + (f"; batch {record['batch']}, lr x{record['lr_scale']:.2f}" if self.cfg.dynamic_batch else ""))
        self.records.append(record)
        return r

    def _grow_batch(self, freed: float) -> dict[str, Any]:
        """The SC'19 dynamic mini-batch: memory freed per sample lets the batch grow; LR scales linearly."""
        cap = self.cfg.max_batch or 4 * self.cfg.batch_size
        new = self.dist.broadcast_object(min(cap, int(self.batch * freed) // 8 * 8))  # rank 0 decides for all
        if new > self.batch:
            factor = new / self.batch
            self.lr_scale *= factor
            self._scale_lr(factor)
            self.batch = new
        return {"batch": self.batch, "lr_scale": self.lr_scale}

    def _scale_lr(self, factor: float) -> None:
        self.sched.base_lrs = [lr * factor for lr in self.sched.base_lrs]
        for g in self.opt.param_groups:
            g["lr"] *= factor

    @torch.no_grad()
    def check_finite(self, loss_sum: torch.Tensor, run_dir: Path) -> None:
        """A diverged run stops here, before a non-finite loss or weight reaches a plan or a checkpoint (a fp16
        GradScaler's skipped steps leave both finite). Every rank decides the same: the flags are summed."""
        bad_loss = not bool(torch.isfinite(loss_sum))
        bad_weights = not bool(torch.stack([(p.to_local() if hasattr(p, "device_mesh") else p).isfinite().all()
                                            for p in self.model.parameters()]).all())  # FSDP2: this rank's shards
        bad_loss, bad_weights = self.dist.sum(int(bad_loss), int(bad_weights))
        if bad_loss or bad_weights:
            what = "the loss" + (" and the weights" if bad_weights else "") if bad_loss else "the weights"
            saved = run_dir / "checkpoint.pt"
            last = (f"the last good checkpoint ({saved}, epoch {self.epoch}) is kept; resume from it with "
                    f"--resume {run_dir} after fixing the cause" if saved.exists() else "no checkpoint was written")
            raise UserError(f"training diverged in epoch {self.epoch + 1} (step {self.pt.steps}): {what} became "
                            f"infinite or NaN; lower --lr (now {self.cfg.lr:g}) or check the data; {last}")

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The task's validation figures (accuracy; or loss and perplexity), each rank on its shard, with rank 0's
        BatchNorm statistics."""
        self.dist.sync_buffers(self.model)
        self.model.eval()
        summed, count = torch.zeros((), device=self.device), 0
        runner = self.runner if self.cfg.compile else self.model  # not DDP, whose forward may sync: shards differ
        batches = 0
        for x, y in self.loader(self.data.val, False, 0):
            x, y = self._to(x), self._to(y)
            with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                out = runner(x)
            summed += self.task.eval_sum(out, y)
            count += self.task.count(y)
            batches += 1
        if self.sharded is not None and batches:  # FSDP2's forward is a collective: as many on every rank
            most = int(max(self.dist.sum(*[batches if r == self.rank else 0 for r in range(self.world)])))
            for _ in range(most - batches):
                runner(x)
        self.model.train()
        summed, count = self.dist.sum(float(summed), count)
        return self.task.val_metrics(summed, count)


    # -- one epoch -----------------------------------------------------------------------------
    def train_epoch(self, console, run_dir: Path) -> tuple[float, float, float]:
        """One epoch's steps behind a progress bar, reconfiguring when due; samples, hits and summed loss over all ranks."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        cfg, epoch_start = self.cfg, time.perf_counter()
        loader = self.loader(self.data.train, True, self.epoch)
        n_steps = min(len(loader), cfg.steps_per_epoch or len(loader))
        seen, shown = 0, 0.0
        correct = loss_sum = torch.zeros((), device=self.device)
        with Progress(TextColumn(f"epoch {self.epoch + 1}/{cfg.epochs}"), BarColumn(), TextColumn("{task.fields[info]}"),
                      TimeRemainingColumn(), console=console, transient=True) as bar:
            task = bar.add_task("train", total=n_steps, info="")
            for i, (x, y) in enumerate(loader):
                if i >= n_steps:
                    break
                x, y = self._to(x), self._to(y)
                try:
                    loss, hits = self.train_step(x, y)
                except torch.cuda.OutOfMemoryError:
                    raise UserError(f"out of memory with a batch of {len(y)}; lower --batch-size"
                                    + (" or --max-batch" if cfg.dynamic_batch else "")) from None
                flops_now = self.pt.flops
                self.train_flops += TRAIN_STEP_FACTOR * flops_now * len(y) * self.world
                self.dense_train_flops += TRAIN_STEP_FACTOR * self.dense_flops * len(y) * self.world
                seen, correct, loss_sum = seen + len(y), correct + hits, loss_sum + loss * len(y)
                now = time.perf_counter()
                if now - shown > 0.5 or i + 1 == n_steps:  # the figures need a GPU sync: twice a second at most
                    shown, rate = now, seen * self.world / (now - epoch_start)
                    bar.update(task, info=self.task.progress(float(loss_sum) / seen, float(correct) / seen, rate))
                bar.advance(task)
                if not cfg.dense and self.pt.reconfiguration_due():
                    self.check_finite(loss_sum, run_dir)
                    self.reconfigure(console)
        self.pt.flush()  # every epoch ends with its thresholding applied (checkpoints hold no pending strength)
        self.check_finite(loss_sum, run_dir)  # before anything of this epoch reaches a plan or the checkpoint
        return tuple(self.dist.sum(seen, float(correct), float(loss_sum)))  # over all ranks' shards

    def epoch_record(self, seen: float, correct: float, loss_sum: float, val: dict[str, float],
                     seconds: float) -> dict[str, Any]:
        """The epoch's line of metrics.jsonl, kept in self.records."""
        record = {
            "kind": "epoch", "epoch": self.epoch, "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
            **val, "channels": sum(self.pt.channels.values()), "flops": self.pt.flops,
            "scheduled_flops": self.pt.scheduled_flops, "dense_flops": self.dense_flops,
            "params": count_params(self.model), "train_flops": self.train_flops,
            "train_flops_share": self.train_flops / max(self.dense_train_flops, 1), "lr": self.opt.param_groups[0]["lr"],
            "batch": self.batch, "world": self.world, "seconds": seconds,
        }
        self.records.append(record)
        return record

    def summary(self, wall_seconds: float, run_dir: Path) -> dict[str, Any]:
        """The run's final figures, what train() returns."""
        cfg = self.cfg
        epochs = [r for r in self.records if r["kind"] == "epoch"]
        return {
            "model": self.spec, "data": cfg.data, "mode": "dense" if cfg.dense else "prunetrain", "epochs": cfg.epochs,
            "target_flops": cfg.target_flops, "penalty_ratio": cfg.penalty_ratio,
            **({k: v for k, v in epochs[-1].items() if k.startswith("val_")} if epochs else {"val_acc": None}),
            "flops": self.pt.flops,
            "dense_flops": self.dense_flops, "params": count_params(self.model),
            "train_flops_share": self.train_flops / max(self.dense_train_flops, 1),
            "reconfigurations": len(self.pt.plans), "wall_seconds": wall_seconds, "run_dir": str(run_dir),
        }
