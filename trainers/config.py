"""TrainConfig: every knob of `ptgraph prune-train`, with the paper's defaults filled in per data family."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ptgraph.errors import UserError
from ptgraph.trainers.budget import DEFAULT_PRUNE_UNTIL, check_budget, resolve_allocation

DEFAULT_TARGET = 0.5  # docs/BENCHMARKS.md section 1: ResNet-20 and MobileNetV2 at half their FLOPs, 1.5-1.7 under dense
TOKENS_LR = 0.5  # SGD on token data (tiny GPT on tokens:synthetic; see docs/BENCHMARKS.md)


@dataclass(frozen=True)
class TrainConfig:
    model: str
    data: str = "synthetic"
    epochs: int | None = None  # cifar 182, imagenet 90, synthetic 8, tokens:synthetic 8, token files 1
    batch_size: int | None = None  # cifar 128, imagenet 256, synthetic 64, tokens 32
    lr: float | None = None  # 0.1 * batch / 128 (cifar) or / 256 (imagenet); tokens TOKENS_LR
    weight_decay: float | None = None  # 5e-4 (cifar) or 1e-4 (imagenet)
    momentum: float = 0.9
    schedule: str = "step"  # step: x0.1 at 50/75% (cifar) or 45/67/90% (imagenet); or cosine
    penalty_ratio: float | None = None  # the paper's method: lambda fixed so the lasso is this share of the first loss
    threshold: float = 1e-4
    lasso: str = "proximal"  # proximal (group soft-thresholding) or subgradient (penalty in the loss)
    prox_every: int = 1  # steps between proximal thresholdings (each with the strength of all of them)
    target_flops: float | None = None  # end at this share of the dense forward FLOPs (default 0.5 without a ratio)
    prune_until: float | None = None  # share of the training steps by which to reach the target (default 0.3)
    prune_schedule: str | None = None  # cubic (default) or linear, from dense to the target
    reconfigurations: int | None = None  # shrinks on the way to the target (default 8)
    compute_aware: bool | None = None  # with a target: press the channels with the least norm per FLOP first (default off)
    allocation: str | None = None  # with a target: how each cut is spread over the groups (default uniform; global with compute_aware)
    reconfig_every: int | None = None  # epochs (default 10 with a penalty ratio; with a target, set by the schedule)
    reconfig_steps: int | None = None  # overrides reconfig_every
    steps_per_epoch: int | None = None
    block_size: int | None = None  # token data: tokens per block (default: the model's block_size, else 128)
    round_to: int | None = None  # None: 8 on CUDA (odd channel counts run slower than dense there), 1 on the CPU
    exact_only: bool = False
    dynamic_batch: bool = False
    max_batch: int | None = None
    dense: bool = False
    compile: bool = False
    device: str = "auto"
    amp: str = "auto"  # auto: bf16 where supported on CUDA, else fp16 with a GradScaler; off on the CPU
    workers: int | None = None
    data_on_device: str = "auto"  # hold the decoded data set on the device: auto (CUDA only), on, off
    seed: int = 0
    run_dir: str | None = None
    download: bool = False
    tensorboard: bool = True
    scale_lr: bool = True  # under torchrun: lr x world size (batch_size is per process)
    sync_bn: bool = False  # SyncBatchNorm across ranks (CUDA only)
    fsdp: bool = False  # FSDP2: parameters, gradients and optimizer state sharded across the torchrun processes
    dist_timeout: float = 300.0  # seconds a collective may wait for a peer before the run stops

    def resolved(self, family: str) -> "TrainConfig":
        """Fill the defaults that depend on the data family, and check the values."""
        imagenet, generated = family == "imagenet", self.data.startswith(("synthetic", "tokens:synthetic"))
        if family == "tokens":  # an epoch is one pass over train.bin's tokens in random blocks
            epochs, batch = self.epochs or (8 if generated else 1), self.batch_size or 32
            lr = self.lr if self.lr is not None else TOKENS_LR
            wd = self.weight_decay if self.weight_decay is not None else 0.0
        else:
            epochs = self.epochs or (90 if imagenet else 182 if not generated else 8)
            batch = self.batch_size or (256 if imagenet else 128 if not generated else 64)
            lr = self.lr if self.lr is not None else 0.1 * batch / (256 if imagenet else 128)
            wd = self.weight_decay if self.weight_decay is not None else (1e-4 if imagenet else 5e-4)
        cfg = dataclasses.replace(self, epochs=epochs, batch_size=batch, lr=lr, weight_decay=wd)
        cfg.check()
        if not cfg.dense and cfg.penalty_ratio is None:  # a FLOPs budget, the default
            cfg = dataclasses.replace(cfg, **cfg.budget_values())
        elif not cfg.dense and cfg.reconfig_every is None:
            cfg = dataclasses.replace(cfg, reconfig_every=10)
        return cfg

    def budget_values(self) -> dict:
        """The FLOPs budget's settings, defaults filled in."""
        given = {"target_flops": self.target_flops, "prune_until": self.prune_until,
                 "prune_schedule": self.prune_schedule, "reconfigurations": self.reconfigurations,
                 "compute_aware": self.compute_aware, "allocation": self.allocation}
        defaults = {"target_flops": DEFAULT_TARGET, "prune_until": DEFAULT_PRUNE_UNTIL, "prune_schedule": "cubic",
                    "reconfigurations": 8, "compute_aware": False, "allocation": None}
        values = {k: defaults[k] if v is None else v for k, v in given.items()}
        return {**values, "allocation": resolve_allocation(self.allocation, values["compute_aware"])}

    @property
    def budget(self) -> bool:
        """Pruning steered to a FLOPs target (the default), rather than at a fixed penalty ratio."""
        return not self.dense and self.penalty_ratio is None

    def milestones(self, family: str) -> list[int]:
        fractions = (0.45, 0.67, 0.9) if family == "imagenet" else (0.5, 0.75)
        return [max(1, round(f * self.epochs)) for f in fractions]

    def check(self) -> None:
        schedule_flags = [name for name, value in (("--prune-until", self.prune_until),
                                                   ("--prune-schedule", self.prune_schedule),
                                                   ("--reconfigurations", self.reconfigurations)) if value is not None]
        rules = [
            (not (self.penalty_ratio is not None and self.target_flops is not None),
             "--target-flops steers the lasso strength itself; give either --target-flops or --penalty-ratio, not both"),
            (not (self.dense and (self.penalty_ratio is not None or self.target_flops is not None or schedule_flags)),
             "--dense trains without pruning; leave out --target-flops, --penalty-ratio and the schedule flags"),
            (not (self.penalty_ratio is not None and schedule_flags),
             f"{', '.join(schedule_flags)} place(s) the FLOPs target's schedule; they do not apply with --penalty-ratio"),
            (not (self.compute_aware is not None and not self.budget),
             "--compute-aware weighs the FLOPs target's choice of channels; it needs a target, not --dense or --penalty-ratio"),
            (not (self.allocation is not None and not self.budget),
             "--allocation spreads the FLOPs target's cuts over the groups; it needs a target, not --dense or --penalty-ratio"),
            (not (self.budget and self.lasso == "subgradient"),
             "a FLOPs target steers the proximal lasso; use --lasso subgradient only with --penalty-ratio"),
            (self.epochs is None or self.epochs > 0, "--epochs must be positive"),
            (self.lr is None or (math.isfinite(self.lr) and self.lr > 0), "--lr must be a positive number, e.g. 0.1"),
            (0 <= self.momentum < 1, "--momentum must be in [0, 1), e.g. 0.9"),
            (self.weight_decay is None or (math.isfinite(self.weight_decay) and self.weight_decay >= 0),
             "--weight-decay must be zero or positive, e.g. 5e-4"),
            (self.max_batch is None or self.max_batch > 0, "--max-batch must be positive"),
            (self.workers is None or self.workers >= 0, "--workers must be 0 or more"),
            (self.batch_size is None or self.batch_size > 0, "--batch-size must be positive"),
            (self.penalty_ratio is None or 0 <= self.penalty_ratio < 1, "--penalty-ratio must be in [0, 1), e.g. 0.2"),
            (self.threshold >= 0, "--threshold must be non-negative, e.g. 1e-4"),
            (self.reconfig_every is None or self.reconfig_every > 0, "--reconfig-every must be a positive number of epochs"),
            (self.reconfig_steps is None or self.reconfig_steps > 0, "--reconfig-steps must be positive"),
            (self.steps_per_epoch is None or self.steps_per_epoch > 0, "--steps-per-epoch must be positive"),
            (self.block_size is None or self.block_size > 0, "--block-size must be a positive number of tokens"),
            (self.round_to is None or self.round_to >= 1, "--round-to must be 1 or more"),
            (self.prox_every >= 1, "--prox-every must be 1 or more"),
            (self.schedule in ("step", "cosine"), "--schedule must be step or cosine"),
            (self.lasso in ("proximal", "subgradient"), "--lasso must be proximal or subgradient"),
            (self.amp in ("auto", "bf16", "fp16", "off"), "--amp must be auto, bf16, fp16 or off"),
            (self.data_on_device in ("auto", "on", "off"), "--data-on-device must be auto, on or off"),
            (self.dist_timeout > 0, "--dist-timeout must be a positive number of seconds"),
            (not (self.fsdp and self.compile), "--fsdp with --compile is not supported (a re-sharded model would be "
             "compiled anew after every shrink, untested); leave out --compile"),
            (not (self.fsdp and self.lasso == "subgradient"), "--fsdp needs the proximal lasso (the subgradient one "
             "would gather every parameter at each step); leave out --lasso subgradient"),
            (not (self.fsdp and self.allocation == "sensitivity"), "--fsdp cannot measure the sensitivity allocation "
             "(it masks copies of the whole model); use --allocation uniform, global or config"),
        ]
        for ok, message in rules:
            if not ok:
                raise UserError(message)
        if self.budget:
            b = self.budget_values()
            check_budget(b["target_flops"], b["prune_until"], b["prune_schedule"], b["reconfigurations"], b["allocation"],
                         b["compute_aware"])
