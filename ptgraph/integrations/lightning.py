"""PruneTrain as a `lightning.Trainer` callback: prunes the model a LightningModule holds, while it trains.

    trainer = lightning.Trainer(callbacks=[PruneTrainCallback(target_flops=0.5)], ...)
    trainer.fit(module)                                  # module.model is pruned in place

How it holds each piece across a shrink (docs/DESIGN_NOTES.md):
- the model: at `setup` the module's model attribute is traced and replaced by the traced graph module
  (it shares the user's parameters), so the module's forward runs the pruned model;
- the optimizer: `shrink` slices parameters in place (same objects) and their optimizer state, so
  Lightning's optimizer and LR scheduler go on as they are;
- DDP: after a shrink the strategy's DistributedDataParallel wrapper (whose buckets hold the old
  shapes) is rebuilt through the strategy's own `configure_ddp`; rank 0 plans, every rank applies it;
- checkpoints: the callback's state carries the plans; Lightning loads a module's weights before any
  callback state, so the module's `on_load_checkpoint` hook is wrapped to replay the plans first.
"""
from __future__ import annotations

import gc
from typing import Any

import numpy as np
import torch
from torch import nn

from ptgraph.errors import UserError
from ptgraph.passes import PrunePlan
from ptgraph.trainers.prunetrain import PruneTrain

try:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
except ImportError as e:  # pragma: no cover - the extra is missing
    raise UserError("ptgraph.integrations.lightning needs Lightning; pip install 'ptgraph[lightning]'") from e


def find_model(pl_module: nn.Module, name: str | None = None) -> str:
    """The attribute of `pl_module` that holds the model to prune: `name`, or its one child with trainable
    parameters (metrics and parameter-free losses are not candidates)."""
    if name is not None:
        if not isinstance(getattr(pl_module, name, None), nn.Module):
            raise UserError(f"{type(pl_module).__name__} has no module attribute '{name}'; pass model_attr= the "
                            f"attribute its forward calls")
        return name
    found = [n for n, m in pl_module.named_children() if any(p.requires_grad for p in m.parameters())]
    if len(found) != 1:
        what = f"{len(found)} children with parameters ({', '.join(found)})" if found else "no child with parameters"
        raise UserError(f"{type(pl_module).__name__} has {what}; pass model_attr= the one attribute its forward calls "
                        f"(several parts: hold them in one nn.Module)")
    return found[0]


def _plain(value: Any) -> Any:
    """numpy arrays as tensors and numpy scalars as Python numbers: Lightning loads checkpoints with weights_only."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    return value.item() if isinstance(value, np.generic) else value


class PruneTrainCallback(pl.Callback):
    """PruneTrain during `trainer.fit`: group lasso after every optimizer step, shrinks on its schedule.

    `target_flops`, `prune_until`, `reconfigurations`, ... are PruneTrain's (trainers/prunetrain.py);
    `total_steps` defaults to the Trainer's estimate of optimizer steps. `example_inputs` are the
    model's inputs for tracing, by default the module's `example_input_array`.
    """

    def __init__(self, target_flops: float | None = None, *, model_attr: str | None = None,
                 example_inputs: Any = None, total_steps: int | None = None, **prunetrain: Any) -> None:
        if prunetrain.get("proximal") is False:
            raise UserError("the Lightning callback applies the proximal lasso after each optimizer step; leave out "
                            "proximal=False (the subgradient lasso would have to change the module's loss)")
        self.target_flops, self.model_attr, self.example_inputs = target_flops, model_attr, example_inputs
        self.total_steps, self.options = total_steps, prunetrain
        self.pt: PruneTrain | None = None
        self.reconfigurations: list = []  # this process's Reconfiguration objects
        self._module: pl.LightningModule | None = None
        self._seen = 0  # optimizer steps handed to PruneTrain (gradient accumulation: fewer than batches)

    # -- set up: trace and swap the model in, replay a checkpoint's plans before its weights load -------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._module is pl_module:
            return
        attr = self.model_attr = find_model(pl_module, self.model_attr)
        example = self.example_inputs if self.example_inputs is not None else pl_module.example_input_array
        if example is None:
            raise UserError("PruneTrainCallback needs the model's example inputs to trace it; set the module's "
                            "example_input_array or pass example_inputs=")
        total = self.total_steps
        if self.target_flops is not None and total is None:
            total = trainer.estimated_stepping_batches if stage == "fit" else 1
            if total == float("inf"):
                raise UserError("the Trainer cannot tell how many optimizer steps it will take (max_steps=-1 with an "
                                "iterable of unknown length); pass total_steps= or set max_steps")
        self.total_steps = int(total) if total is not None else None
        self.pt = self._prunetrain(getattr(pl_module, attr), example)
        setattr(pl_module, attr, self.pt.model)  # the module's forward now runs the graph that shrinks
        user_hook = pl_module.on_load_checkpoint

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            self._replay(checkpoint)
            user_hook(checkpoint)

        pl_module.on_load_checkpoint = on_load_checkpoint  # called before the weights load (see the module's doc)
        self._module = pl_module

    def _prunetrain(self, model: nn.Module | Any, example: Any) -> PruneTrain:
        return PruneTrain(model, example, None, target_flops=self.target_flops, total_steps=self.total_steps,
                          **self.options)

    def _replay(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is None:  # a dense run's checkpoint: pruning starts from its weights
            return
        assert self.pt is not None and not self.pt.plans, "plans are replayed into a fresh model only"
        if state["total_steps"] != self.total_steps:  # the run's own schedule, even if this fit runs longer
            self.total_steps = state["total_steps"]
            self.pt = self._prunetrain(self.pt.graph, self.pt.probe)
        for plan in state["plans"]:
            self.pt.reconfigure(PrunePlan.from_json(plan))

    def state_dict(self) -> dict[str, Any]:
        pt = self.pt
        assert pt is not None
        return {"plans": [p.to_json() for p in pt.plans], "steps": pt.steps, "seen": self._seen,
                "pending": pt._pending, "budget": _plain(pt.budget_state()), "total_steps": self.total_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pt = self.pt
        assert pt is not None and len(pt.plans) == len(state_dict["plans"]), "the plans were replayed at load"
        pt.steps, self._seen, pt._pending = state_dict["steps"], state_dict["seen"], state_dict["pending"]
        pt.load_budget_state(state_dict["budget"])

    # -- training -------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise UserError(f"PruneTrainCallback shrinks one optimizer's state; configure_optimizers returned "
                            f"{len(trainer.optimizers)}")
        if not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise UserError(f"PruneTrainCallback supports the single-device and ddp strategies, not "
                            f"{type(trainer.strategy).__name__} (its sharded parameters cannot be sliced in place)")
        assert self.pt is not None
        self.pt.optimizer = trainer.optimizers[0]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        pt = self.pt
        assert pt is not None
        if pt.lam is None and pt.schedule is None:  # the penalty ratio's lambda, from the loss (the mean over ranks)
            pt.penalty(outputs["loss"] if isinstance(outputs, dict) else outputs)
        while self._seen < trainer.global_step:  # one PruneTrain step per optimizer step
            self._seen += 1
            pt.after_step()
            if pt.reconfiguration_due():
                pl_module.zero_grad(set_to_none=True)  # applied already; Lightning zeroes them before the next backward
                r = pt.reconfigure()  # under ddp: rank 0's plan on every rank
                if r is not None:
                    self.reconfigurations.append(r)
                    self._rewrap(trainer)
        pl_module.log("prunetrain/flops", pt.flops / pt.dense_flops, on_step=True, on_epoch=False)
        pl_module.log("prunetrain/lambda", float(pt.lam or 0.0), on_step=True, on_epoch=False)

    @staticmethod
    def _rewrap(trainer: pl.Trainer) -> None:
        """A new DDP wrapper for the new shapes (the old one's buckets and reducer hold the old ones)."""
        strategy = trainer.strategy
        if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, nn.parallel.DistributedDataParallel):
            strategy.model = strategy.lightning_module
            gc.collect()  # frees the old reducer before the new one registers its hooks
            strategy.configure_ddp()
