"""The `ptgraph prune-train` loop: epochs, reconfigurations, metrics, checkpoints and the report, around a Run."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ptgraph.trainers import checkpoint as ckpt
from ptgraph.trainers.config import TrainConfig
from ptgraph.trainers.distributed import Dist
from ptgraph.trainers.distributed import setup as setup_distributed
from ptgraph.trainers.report import MetricsLog, make_run_dir, run_mode, weak_penalty_hint, write_report
from ptgraph.trainers.run import Run
from ptgraph.trainers.task import logits  # noqa: F401 - tools import it from here

__all__ = ["Run", "train"]


def train(cfg: TrainConfig, resume_dir: str | None = None, console=None) -> dict[str, Any]:
    """Run PruneTrain (or dense training with cfg.dense) and return the final figures.

    Under torchrun every process calls this and trains its shard with DDP (see distributed.py); a
    rank that dies or stalls makes the others stop with a RankFailure that names the checkpoint.
    """
    d = setup_distributed(cfg.device, cfg.dist_timeout)
    try:
        with d.failures():
            summary = _train(cfg, resume_dir, console, d)
            d.finish()
            return summary
    finally:
        d.teardown()


def _train(cfg: TrainConfig, resume_dir: str | None, console, d: Dist) -> dict[str, Any]:
    from rich.console import Console

    console = (console or Console()) if d.main else Console(quiet=True)
    payload = None
    if resume_dir:
        payload = d.on_main(lambda: ckpt.load(Path(resume_dir)))
        cfg = ckpt.resumed_config(cfg, payload, resume_dir)
    run = Run(cfg, payload, d)
    cfg = run.cfg
    run_dir = d.on_main(lambda: make_run_dir(cfg.run_dir, cfg.model))  # rank 0's name (it holds the time) and disk
    d.checkpoint = run_dir / "checkpoint.pt"
    log = MetricsLog(run_dir, cfg.tensorboard) if d.main else None
    if log:
        log.truncate_after(run.epoch)
    procs = f" x {run.world} processes" if run.world > 1 else ""
    if payload and payload.get("world", 1) != run.world:
        console.print(f"resuming a {payload.get('world', 1)}-process run with {run.world} (batch per process kept)")
    console.print(f"{run_mode(cfg, run.pt)}: {run.spec} on {cfg.data}, {cfg.epochs} epochs, batch {run.batch}{procs}, "
                  f"lr {cfg.lr * run.world_scale:g}, device {run.device}"
                  f"{', ' + str(run.amp).replace('torch.', '') if run.amp else ''}; run dir {run_dir}")
    if run.compiler is not None and run.device.type == "cpu" and not cfg.dense:
        console.print("note: --compile on the CPU compiles the training graph anew after every reconfiguration "
                      "(ResNet-20: a minute or more each, for steps not clearly faster than eager; docs/USER_GUIDE.md, "
                      "section 6); leave it out unless the run is long after its last reconfiguration")
    start = time.perf_counter()
    while run.epoch < cfg.epochs:
        epoch_start = time.perf_counter()
        seen, correct, loss_sum = run.train_epoch(console, run_dir)
        run.sched.step()
        last = run.epoch + 1 == cfg.epochs
        if not cfg.dense and not cfg.budget and not cfg.reconfig_steps and (run.epoch + 1) % cfg.reconfig_every == 0 \
                and not last:
            run.reconfigure(console)
        val = run.evaluate()
        run.note_eager(console)
        run.epoch += 1
        record = run.epoch_record(seen, correct, loss_sum, val, time.perf_counter() - epoch_start)
        for r in run.records:  # every reconfiguration of this epoch, then the epoch line
            if r["epoch"] == run.epoch and log:
                log.write(r)
        console.print(
            f"epoch {run.epoch:>3}: loss {record['train_loss']:.4f}  {run.task.describe(val)}  channels {record['channels']}  "
            f"FLOPs/img {record['flops'] / 1e6:.1f}M  train FLOPs {run.train_flops / 1e12:.3f}T "
            f"({record['train_flops_share']:.1%} of dense)  {record['seconds']:.1f} s")
        if run.sharded is not None:  # FSDP2: a collective, every rank writes its shards
            _save_sharded(run, run_dir, last=run.epoch == cfg.epochs)
        elif d.main:
            ckpt.save(run_dir / "checkpoint.pt", run.state())
    if log:
        log.close()
    summary = run.summary(time.perf_counter() - start, run_dir)
    epochs = [r for r in run.records if r["kind"] == "epoch"]
    if epochs and d.main:
        write_report(run_dir, run.records, run.widths_before, run._widths(), summary)
    console.print(f"done: {run.task.describe(summary) if epochs else 'no epoch run'}, FLOPs/img {run.dense_flops / 1e6:.1f}M -> "
                  f"{summary['flops'] / 1e6:.1f}M, training FLOPs {summary['train_flops_share']:.1%} of dense; "
                  f"report {run_dir / 'report.md'}")
    hint = weak_penalty_hint(cfg, summary)
    if hint and d.main:
        console.print(hint)
    return summary


def _save_sharded(run: Run, run_dir: Path, last: bool) -> None:
    """FSDP2's checkpoint: the shards through torch.distributed.checkpoint, then rank 0's checkpoint.pt naming them
    (plans, config, schedule, RNG); the last epoch's also holds the whole model, gathered one tensor at a time, so
    that `ptgraph export RUN_DIR` and `checkpoint.rebuild` read it as an ordinary file."""
    from ptgraph.trainers.fsdp import full_state_dict

    name = ckpt.save_sharded(run_dir, f"e{run.epoch}", run.model, run.opt)
    state = {**run.state(), "sharded": name}
    if last:
        state["model"] = full_state_dict(run.model)
    if run.dist.main:
        ckpt.save(run_dir / "checkpoint.pt", state)
        ckpt.drop_older_sharded(run_dir, name)
