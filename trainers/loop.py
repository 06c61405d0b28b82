"""The `ptgraph prune-train` loop, built on the PruneTrain object: data, schedule, AMP, checkpoints, metrics.

Determinism: each epoch's shuffling comes from a generator seeded by (seed, epoch), and the
checkpoint written after every epoch holds every RNG state, so a resumed run replays exactly
what the uninterrupted run would have done (bit-identical on the CPU).
"""
from __future__ import annotations

import dataclasses
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ptgraph.cost import TRAIN_STEP_FACTOR, activation_elements
from ptgraph.errors import UserError
from ptgraph.graph import trace
from ptgraph.passes import PrunePlan, count_params
from ptgraph.specs import build_model, parse_spec
from ptgraph.trainers import checkpoint as ckpt
from ptgraph.trainers.config import TrainConfig
from ptgraph.trainers.data import DataSets, load_data
from ptgraph.trainers.prunetrain import PruneTrain, Reconfiguration
from ptgraph.trainers.report import MetricsLog, write_report

AUX_WEIGHTS = {"GoogLeNetOutputs": 0.3, "InceptionOutputs": 0.4}  # the usual auxiliary-loss weights


def task_loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy; models that return auxiliary logits in training add them with their usual weight."""
    if isinstance(out, torch.Tensor):
        return F.cross_entropy(out, y)
    weight = AUX_WEIGHTS.get(type(out).__name__, 0.3)
    main, *aux = [o for o in out if isinstance(o, torch.Tensor)]
    return F.cross_entropy(main, y) + sum(weight * F.cross_entropy(a, y) for a in aux)


def logits(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def _spec_with_classes(spec: str, num_classes: int) -> str:
    s = parse_spec(spec)
    if s.source in ("torchvision", "ptgraph", "timm") and "num_classes" not in dict(s.kwargs):
        return f"{spec}{'&' if '?' in spec else '?'}num_classes={num_classes}"
    return spec


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA, which this machine does not have; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device '{name}' is not a device; use auto, cpu, cuda or cuda:N") from None


def _amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or cfg.amp == "off":
        return None
    if cfg.amp == "fp16" or (cfg.amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


class Run:
    """One training run: everything the loop needs, rebuilt identically from a checkpoint."""

    def __init__(self, cfg: TrainConfig, resume: dict[str, Any] | None = None) -> None:
        self.data: DataSets = load_data(cfg.data, cfg.download)
        self.cfg = cfg = cfg.resolved(self.data.family)
        self.device = _device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.spec = _spec_with_classes(cfg.model, self.data.num_classes)
        model = build_model(self.spec).train()
        size = self.data.image_size
        self.input_shape = (2, 3, size, size)
        example = (torch.randn(self.input_shape),)
        graph = trace(model, example)
        n_out = [n for n in graph.module.graph.nodes if n.op == "output"][0].args[0]
        out_shape = getattr(n_out, "meta", {}).get("shape") if not isinstance(n_out, tuple) else None
        if isinstance(out_shape, tuple) and out_shape and isinstance(out_shape[-1], int) \
                and out_shape[-1] != self.data.num_classes:
            raise UserError(f"the model has {out_shape[-1]} outputs but the data has {self.data.num_classes} classes; "
                            f"build it with num_classes={self.data.num_classes}")
        self.pt = PruneTrain(graph, example, None, penalty_ratio=cfg.penalty_ratio, threshold=cfg.threshold,
                             reconfig_steps=cfg.reconfig_steps, round_to=cfg.round_to,
                             proximal=cfg.lasso == "proximal", exact_only=cfg.exact_only)
        self.widths_before = self._widths()
        self.dense_flops = self.pt.dense_flops
        for plan_json in (resume or {}).get("plans", []):
            self.pt.reconfigure(PrunePlan.from_json(plan_json))
        self.model = self.pt.model.to(self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
        self.amp = _amp_dtype(cfg, self.device)
        self.batch = cfg.batch_size
        self.lr_scale = 1.0
        self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay)
        self.pt.optimizer = self.opt
        if cfg.schedule == "cosine":
            self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=cfg.epochs)
        else:
            self.sched = torch.optim.lr_scheduler.MultiStepLR(self.opt, cfg.milestones(self.data.family), 0.1)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp is torch.float16)
        self.epoch, self.train_flops, self.dense_train_flops = 0, 0.0, 0.0
        self.records: list[dict[str, Any]] = []
        self.runner = self._compiled()
        if resume:
            self._restore(resume)

    # -- state -------------------------------------------------------------------------------
    def _widths(self) -> dict[str, int]:
        return {n: m.out_channels for n, m in self.pt.model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)}

    def _compiled(self) -> nn.Module:
        if not self.cfg.compile:
            return self.model
        torch._dynamo.reset()
        return torch.compile(self.model)

    def state(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.cfg), "spec": self.spec, "plans": [p.to_json() for p in self.pt.plans],
            "input_shape": self.input_shape,
            "model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": ckpt.rng_state(), "epoch": self.epoch, "steps": self.pt.steps,
            "lam": self.pt.lam, "batch": self.batch, "lr_scale": self.lr_scale, "train_flops": self.train_flops,
            "dense_train_flops": self.dense_train_flops, "records": self.records,
        }

    def _restore(self, s: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(s["model"])
            self.opt.load_state_dict(s["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"the checkpoint's weights do not fit the rebuilt model ({str(e).splitlines()[0]}); "
                            f"it was written by another model or ptgraph version, start a new run") from None
        self.sched.load_state_dict(s["scheduler"])
        self.scaler.load_state_dict(s["scaler"])
        self.epoch, self.pt.steps, self.pt.lam = s["epoch"], s["steps"], s["lam"]
        self.batch, self.lr_scale = s["batch"], s["lr_scale"]
        self.train_flops, self.dense_train_flops = s["train_flops"], s["dense_train_flops"]
        self.records = list(s["records"])
        ckpt.set_rng_state(s["rng"])

    # -- training ------------------------------------------------------------------------------
    def loader(self, dataset, shuffle: bool, epoch: int) -> DataLoader:
        gen = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
        workers = self.cfg.workers if self.cfg.workers is not None else (4 if self.device.type == "cuda" else 0)
        return DataLoader(dataset, batch_size=self.batch, shuffle=shuffle, generator=gen, num_workers=workers,
                          pin_memory=self.device.type == "cuda", drop_last=shuffle, persistent_workers=False)

    def _to(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.device.type == "cuda" and x.dim() == 4 else x

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            out = self.runner(x)
            loss = task_loss(out, y)
            total = loss if self.cfg.dense else loss + self.pt.penalty(loss)
        self.scaler.scale(total).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        if not self.cfg.dense:
            self.pt.after_step()
        correct = int((logits(out).argmax(1) == y).sum())
        return float(loss.detach()), correct

    def reconfigure(self, console) -> Reconfiguration | None:
        act_before = activation_elements(self.model)
        r = self.pt.reconfigure()
        if r is None:
            return None
        self.runner = self._compiled()
        shrunk = ", ".join(f"g{g}: {a}->{b}" for g, (a, b) in sorted(r.report.groups.items())[:8])
        more = f" (+{len(r.report.groups) - 8} more)" if len(r.report.groups) > 8 else ""
        record = {"kind": "reconfig", "epoch": self.epoch + 1, "step": r.step, "groups": len(r.report.groups),
                  "params": r.report.params_after, "flops": r.flops_after, "seconds": r.seconds}
        if self.cfg.dynamic_batch:
            record.update(self._grow_batch(act_before / max(activation_elements(self.model), 1)))
        console.print(f"reconfigure @ step {r.step}: {len(r.report.groups)} groups shrank ({shrunk}{more}); "
                      f"FLOPs/img {r.flops_before / 1e6:.1f}M -> {r.flops_after / 1e6:.1f}M; "
                      f"params {r.report.params_before:,} -> {r.report.params_after:,}; {r.seconds:.3f} s"
                      + (f"; batch {record['batch']}, lr x{record['lr_scale']:.2f}" if self.cfg.dynamic_batch else ""))
        self.records.append(record)
        return r

    def _grow_batch(self, freed: float) -> dict[str, Any]:
        """The SC'19 dynamic mini-batch: memory freed per sample lets the batch grow; LR scales linearly."""
        cap = self.cfg.max_batch or 4 * self.cfg.batch_size
        new = min(cap, int(self.batch * freed) // 8 * 8)
        if new > self.batch:
            factor = new / self.batch
            self.lr_scale *= factor
            self.sched.base_lrs = [lr * factor for lr in self.sched.base_lrs]
            for g in self.opt.param_groups:
                g["lr"] *= factor
            self.batch = new
        return {"batch": self.batch, "lr_scale": self.lr_scale}

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        correct = total = 0
        for x, y in self.loader(self.data.val, False, 0):
            x, y = self._to(x), self._to(y)
            with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                out = self.runner(x)
            correct += int((logits(out).argmax(1) == y).sum())
            total += len(y)
        self.model.train()
        return correct / max(total, 1)


def default_run_dir(model: str) -> Path:
    name = parse_spec(model).name.replace("/", "_")
    return Path("runs") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"


def train(cfg: TrainConfig, resume_dir: str | None = None, console=None) -> dict[str, Any]:
    """Run PruneTrain (or dense training with cfg.dense) and return the final figures."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    console = console or Console()
    payload = None
    if resume_dir:
        payload = ckpt.load(Path(resume_dir))
        saved = TrainConfig(**payload["config"])
        if cfg.model and parse_spec(cfg.model).name != parse_spec(saved.model).name:
            raise UserError(f"the checkpoint in {resume_dir} is of {saved.model}, not {cfg.model}; "
                            f"resume without --model or pass the matching run directory")
        cfg = dataclasses.replace(saved, device=cfg.device, workers=cfg.workers, tensorboard=cfg.tensorboard,
                                  run_dir=str(Path(resume_dir) if Path(resume_dir).is_dir() else Path(resume_dir).parent))
    run = Run(cfg, payload)
    cfg = run.cfg
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg.model)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create run directory {run_dir} ({e.strerror}); pass a writable --run-dir") from None
    log = MetricsLog(run_dir, cfg.tensorboard)
    log.truncate_after(run.epoch)
    mode = "dense" if cfg.dense else f"PruneTrain ({cfg.lasso} lasso, penalty ratio {cfg.penalty_ratio})"
    console.print(f"{mode}: {run.spec} on {cfg.data}, {cfg.epochs} epochs, batch {run.batch}, lr {cfg.lr:g}, "
                  f"device {run.device}{', ' + str(run.amp).replace('torch.', '') if run.amp else ''}; run dir {run_dir}")
    start = time.perf_counter()
    while run.epoch < cfg.epochs:
        epoch_start = time.perf_counter()
        loader = run.loader(run.data.train, True, run.epoch)
        n_steps = min(len(loader), cfg.steps_per_epoch or len(loader))
        seen = correct = 0
        loss_sum = 0.0
        with Progress(TextColumn(f"epoch {run.epoch + 1}/{cfg.epochs}"), BarColumn(), TextColumn("{task.fields[info]}"),
                      TimeRemainingColumn(), console=console, transient=True) as bar:
            task = bar.add_task("train", total=n_steps, info="")
            for i, (x, y) in enumerate(loader):
                if i >= n_steps:
                    break
                x, y = run._to(x), run._to(y)
                try:
                    loss, hits = run.train_step(x, y)
                except torch.cuda.OutOfMemoryError:
                    raise UserError(f"out of memory with a batch of {len(y)}; lower --batch-size"
                                    + (" or --max-batch" if cfg.dynamic_batch else "")) from None
                flops_now = run.pt.flops
                run.train_flops += TRAIN_STEP_FACTOR * flops_now * len(y)
                run.dense_train_flops += TRAIN_STEP_FACTOR * run.dense_flops * len(y)
                seen, correct, loss_sum = seen + len(y), correct + hits, loss_sum + loss * len(y)
                rate = seen / (time.perf_counter() - epoch_start)
                bar.update(task, advance=1, info=f"loss {loss_sum / seen:.3f} acc {correct / seen:.1%} {rate:.0f} img/s")
                if not cfg.dense and run.pt.reconfiguration_due():
                    run.reconfigure(console)
        run.sched.step()
        last = run.epoch + 1 == cfg.epochs
        if not cfg.dense and not cfg.reconfig_steps and (run.epoch + 1) % cfg.reconfig_every == 0 and not last:
            run.reconfigure(console)
        val_acc = run.evaluate()
        run.epoch += 1
        record = {
            "kind": "epoch", "epoch": run.epoch, "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
            "val_acc": val_acc, "channels": sum(run.pt.channels.values()), "flops": run.pt.flops,
            "params": count_params(run.model), "train_flops": run.train_flops,
            "train_flops_share": run.train_flops / max(run.dense_train_flops, 1), "lr": run.opt.param_groups[0]["lr"],
            "batch": run.batch, "seconds": time.perf_counter() - epoch_start,
        }
        run.records.append(record)
        for r in run.records:  # every reconfiguration of this epoch, then the epoch line
            if r["epoch"] == run.epoch:
                log.write(r)
        console.print(
            f"epoch {run.epoch:>3}: loss {record['train_loss']:.4f}  val acc {val_acc:.2%}  channels {record['channels']}  "
            f"FLOPs/img {record['flops'] / 1e6:.1f}M  train FLOPs {run.train_flops / 1e12:.3f}T "
            f"({record['train_flops_share']:.1%} of dense)  {record['seconds']:.1f} s")
        ckpt.save(run_dir / "checkpoint.pt", run.state())
    log.close()
    summary = {
        "model": run.spec, "data": cfg.data, "mode": "dense" if cfg.dense else "prunetrain", "epochs": cfg.epochs,
        "val_acc": run.records[-1]["val_acc"] if run.records else None, "flops": run.pt.flops,
        "dense_flops": run.dense_flops, "params": count_params(run.model),
        "train_flops_share": run.train_flops / max(run.dense_train_flops, 1),
        "reconfigurations": len(run.pt.plans), "wall_seconds": time.perf_counter() - start, "run_dir": str(run_dir),
    }
    epochs = [r for r in run.records if r["kind"] == "epoch"]
    if epochs:
        write_report(run_dir, run.records, run.widths_before, run._widths(), summary)
    console.print(f"done: val acc {summary['val_acc']:.2%}, FLOPs/img {run.dense_flops / 1e6:.1f}M -> "
                  f"{summary['flops'] / 1e6:.1f}M, training FLOPs {summary['train_flops_share']:.1%} of dense; "
                  f"report {run_dir / 'report.md'}")
    return summary
