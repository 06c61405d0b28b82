"""TrainConfig: every knob of `ptgraph prune-train`, with the paper's defaults filled in per data family."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ptgraph.errors import UserError


@dataclass(frozen=True)
class TrainConfig:
    model: str
    data: str = "synthetic"
    epochs: int | None = None  # cifar 182, imagenet 90, synthetic 8
    batch_size: int | None = None  # cifar 128, imagenet 256, synthetic 64
    lr: float | None = None  # 0.1 * batch / 128 (cifar) or / 256 (imagenet)
    weight_decay: float | None = None  # 5e-4 (cifar) or 1e-4 (imagenet)
    momentum: float = 0.9
    schedule: str = "step"  # step: x0.1 at 50/75% (cifar) or 45/67/90% (imagenet); or cosine
    penalty_ratio: float = 0.2
    threshold: float = 1e-4
    lasso: str = "proximal"  # proximal (group soft-thresholding) or subgradient (penalty in the loss)
    prox_every: int = 1  # steps between proximal thresholdings (each with the strength of all of them)
    target_flops: float | None = None  # stop pruning at this share of the dense forward FLOPs
    reconfig_every: int = 10  # epochs
    reconfig_steps: int | None = None  # overrides reconfig_every
    steps_per_epoch: int | None = None
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
    dist_timeout: float = 300.0  # seconds a collective may wait for a peer before the run stops

    def resolved(self, family: str) -> "TrainConfig":
        """Fill the defaults that depend on the data family, and check the values."""
        imagenet = family == "imagenet"
        epochs = self.epochs or (90 if imagenet else 182 if not self.data.startswith("synthetic") else 8)
        batch = self.batch_size or (256 if imagenet else 128 if not self.data.startswith("synthetic") else 64)
        lr = self.lr if self.lr is not None else 0.1 * batch / (256 if imagenet else 128)
        wd = self.weight_decay if self.weight_decay is not None else (1e-4 if imagenet else 5e-4)
        cfg = dataclasses.replace(self, epochs=epochs, batch_size=batch, lr=lr, weight_decay=wd)
        cfg.check()
        return cfg

    def milestones(self, family: str) -> list[int]:
        fractions = (0.45, 0.67, 0.9) if family == "imagenet" else (0.5, 0.75)
        return [max(1, round(f * self.epochs)) for f in fractions]

    def check(self) -> None:
        rules = [
            (self.epochs is None or self.epochs > 0, "--epochs must be positive"),
            (self.batch_size is None or self.batch_size > 0, "--batch-size must be positive"),
            (0 <= self.penalty_ratio < 1, "--penalty-ratio must be in [0, 1), e.g. 0.2"),
            (self.threshold >= 0, "--threshold must be non-negative, e.g. 1e-4"),
            (self.reconfig_every > 0, "--reconfig-every must be a positive number of epochs"),
            (self.reconfig_steps is None or self.reconfig_steps > 0, "--reconfig-steps must be positive"),
            (self.steps_per_epoch is None or self.steps_per_epoch > 0, "--steps-per-epoch must be positive"),
            (self.round_to is None or self.round_to >= 1, "--round-to must be 1 or more"),
            (self.prox_every >= 1, "--prox-every must be 1 or more"),
            (self.target_flops is None or 0 < self.target_flops < 1,
             "--target-flops is the share of the dense FLOPs to keep, between 0 and 1, e.g. 0.5"),
            (self.schedule in ("step", "cosine"), "--schedule must be step or cosine"),
            (self.lasso in ("proximal", "subgradient"), "--lasso must be proximal or subgradient"),
            (self.amp in ("auto", "bf16", "fp16", "off"), "--amp must be auto, bf16, fp16 or off"),
            (self.data_on_device in ("auto", "on", "off"), "--data-on-device must be auto, on or off"),
            (self.dist_timeout > 0, "--dist-timeout must be a positive number of seconds"),
        ]
        for ok, message in rules:
            if not ok:
                raise UserError(message)
