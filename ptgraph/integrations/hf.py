"""PruneTrain inside `transformers.Trainer`, and Hugging Face models that stay Hugging Face models.

    trainer = Trainer(model, args, train_dataset=..., callbacks=[PruneTrainCallback(target_flops=0.5)])
    trainer.train()                      # pruned while it trains: model, optimizer and scheduler state follow
    trainer.save_model("out")            # a standard checkpoint: AutoModel...from_pretrained("out") loads it

The Trainer keeps training its own model object: the callback traces it (torch.export) once, prunes with the
`config` allocation so that every shrink leaves a shape its config expresses, and after each shrink rewrites
the config and rebuilds the model's Python side from it (hf_config.adopt), so the Trainer's forward, `generate`
and `save_pretrained` see the model of its family it now is. docs/DESIGN_NOTES.md, "Hugging Face integration".

Under torchrun, use `PruneTrainer` in place of `Trainer` (the same arguments): the Trainer holds its DDP wrapper
where no callback reaches it, and PruneTrainer's training step runs through one rebuilt after each shrink.
"""
from __future__ import annotations

import contextlib
import gc
import os
from typing import Any, Iterator

import torch
from torch import nn

from ptgraph.errors import UserError
from ptgraph.graph import trace
from ptgraph.integrations.hf_config import adopt, mismatch, pruned_config
from ptgraph.passes import PrunePlan, analyze_channels, shrink
from ptgraph.trainers.budget import DEFAULT_PRUNE_UNTIL
from ptgraph.trainers.prunetrain import PruneTrain
from ptgraph.trainers.uniform_blocks import config_blocks

try:
    from transformers import Trainer, TrainerCallback
except ImportError as e:  # pragma: no cover - the extra is missing
    raise ImportError("ptgraph.integrations.hf needs transformers: pip install 'ptgraph[transformers]'") from e

STATE_FILE = "ptgraph_prunetrain.pt"  # beside the Trainer's own files in every checkpoint-N folder

__all__ = ["PruneTrainCallback", "PruneTrainer", "adopt_pruned", "example_inputs", "save_pruned",
           "save_pruned_sharded"]


def example_inputs(model: nn.Module, batch: int = 2, length: int = 16) -> tuple[torch.Tensor]:
    """A batch of the model's main input made from its config (token ids or images), to trace it with."""
    config, device = model.config, next(model.parameters()).device
    name = getattr(model, "main_input_name", "input_ids")
    g = torch.Generator().manual_seed(0)
    if name == "input_ids" and isinstance(getattr(config, "vocab_size", None), int):
        return (torch.randint(0, config.vocab_size, (batch, length), generator=g).to(device),)
    if name == "pixel_values" and isinstance(getattr(config, "image_size", None), int):
        size = config.image_size
        return (torch.randn(batch, getattr(config, "num_channels", 3), size, size, generator=g).to(device),)
    raise UserError(f"cannot make an example '{name}' for {type(model).__name__} from its config; pass "
                    f"example_inputs=(tensor,) to PruneTrainCallback")


@contextlib.contextmanager
def _traceable(model: nn.Module) -> Iterator[None]:
    """Trace the model's class forward, not a wrapper an accelerator put on the instance (autocast), and
    without a key/value cache (an output torch.export cannot return)."""
    wrapped = model.__dict__.pop("forward", None)
    cache = getattr(model.config, "use_cache", None)
    if cache:
        model.config.use_cache = False
    try:
        yield
    finally:
        if wrapped is not None:
            model.forward = wrapped
        if cache:
            model.config.use_cache = cache


def _first(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = tuple(out.values())
    return next(x for x in out if isinstance(x, torch.Tensor))


def adopt_pruned(model: nn.Module, pt: PruneTrain) -> None:
    """After `pt.reconfigure()` on a Hugging Face model (allocation='config'): rewrite its config and rebuild its
    Python side, then check that its own forward computes what the pruned graph computes (eval, the probe)."""
    assert pt.blocks is not None, "adopt_pruned needs allocation='config'"
    adopt(model, pruned_config(model, pt.blocks, pt.analysis))
    modes = model.training, pt.model.training
    model.eval()
    pt.model.eval()
    try:
        with torch.no_grad():
            ours, graph = _first(type(model).forward(model, *pt.probe)), _first(pt.model(*pt.probe))
    finally:
        model.train(modes[0])
        pt.model.train(modes[1])
    err = float((ours.float() - graph.float()).abs().max() / graph.float().abs().max().clamp_min(1e-12))
    if err > 1e-4:
        raise UserError(f"after a shrink, {type(model).__name__}'s own forward differs from the pruned graph "
                        f"(relative error {err:.2g}); its modules keep a size their config does not set. Train the "
                        f"graph module (pt.model) instead and export it with ptgraph export")


def save_pruned(model: nn.Module, directory: str, **kwargs: Any) -> None:
    """`save_pretrained`, after checking that the config describes the pruned weights (one clear sentence if not)."""
    problem = mismatch(model, model.config)
    if problem:
        raise UserError(f"{type(model).__name__}'s config does not describe its pruned weights: {problem}; prune "
                        f"it with allocation='config' and call adopt_pruned(model, pt) after each reconfigure()")
    model.save_pretrained(directory, **kwargs)


def save_pruned_sharded(model: nn.Module, pt: PruneTrain, directory: str, **kwargs: Any) -> None:
    """Under FSDP2 (`ptgraph.trainers.fsdp.shard(pt)`, allocation='config'): the pruned model as a Hugging Face
    checkpoint. Every rank calls it (one all-gather per tensor); rank 0 builds `type(model)` from the rewritten
    config on the CPU, loads the gathered weights, checks its forward against the pruned graph and writes it."""
    if getattr(pt, "sharded", None) is None or pt.blocks is None:
        raise UserError("save_pruned_sharded saves a PruneTrain run sharded with ptgraph.trainers.fsdp.shard and "
                        "pruned with allocation='config'; without FSDP2 use adopt_pruned and save_pruned")
    graph = pt.sharded.whole_model()
    if graph is None:
        return
    config = pruned_config(model, pt.blocks, pt.analysis)
    pruned = type(model)(config).to(next(graph.parameters()).dtype)
    weights = graph.state_dict()
    problem = set(weights) - set(pruned.state_dict())
    assert not problem, f"graph tensors without a place in {type(model).__name__}: {sorted(problem)[:3]}"
    missing = pruned.load_state_dict(weights, strict=False).missing_keys
    pruned.tie_weights()
    assert not missing or getattr(config, "tie_word_embeddings", False), f"not loaded: {missing[:3]}"
    probe = tuple(x.cpu() for x in pt.probe)
    pruned.eval()
    graph.eval()
    with torch.no_grad():
        ours, want = _first(pruned(*probe)), _first(graph(*probe))
    err = float((ours.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12))
    if err > 1e-4:
        raise UserError(f"the rebuilt {type(model).__name__} computes other outputs than the pruned graph (relative "
                        f"error {err:.2g}); its modules keep a size their config does not set. Save the graph "
                        f"module instead (ptgraph.trainers.fsdp.full_state_dict) and export it with ptgraph export")
    save_pruned(pruned, directory, **kwargs)


class PruneTrainCallback(TrainerCallback):
    """PruneTrain during `Trainer.train()`: brings the model to `target_flops` of its dense forward FLOPs by
    `prune_until` of the optimizer steps (steered proximal group lasso, `config` allocation), shrinking the
    model, the optimizer's state and the config in place; logs `flops_share` and `lasso_lambda`; resumes from
    the Trainer's checkpoints (its state is saved beside them). Under torchrun, with `PruneTrainer`."""

    def __init__(self, target_flops: float = 0.5, prune_until: float = DEFAULT_PRUNE_UNTIL, *,
                 reconfigurations: int = 8, width_multiple: int = 8, prune_schedule: str = "cubic",
                 example_inputs: tuple | None = None, self_check: bool = True) -> None:
        self.options = dict(target_flops=target_flops, prune_until=prune_until, reconfigurations=reconfigurations,
                            width_multiple=width_multiple, prune_schedule=prune_schedule, self_check=self_check)
        self.inputs = example_inputs
        self.pt: PruneTrain | None = None
        self.model: nn.Module | None = None
        self.resumed_shapes = False  # the model was shrunk to a checkpoint's shapes before its weights loaded
        self.shrinks = 0  # reconfigurations that changed shapes in this process: PruneTrainer rebuilds DDP after each
        self.ddp_follows = False  # set by PruneTrainer, whose training step follows the shrinks with a new DDP
        self._graph = None  # the trace made then, handed to PruneTrain

    # -- set-up ----------------------------------------------------------------------------------------------
    def on_init_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        if model is None or not hasattr(model, "config"):
            raise UserError("PruneTrainCallback prunes a Hugging Face model; give the Trainer a PreTrainedModel")
        self.model = model
        model.register_load_state_dict_pre_hook(self._before_load)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        if args.world_size > 1 and not self.ddp_follows:
            raise UserError("under torchrun the Trainer's DDP wrapper keeps the shapes it was built with and cannot "
                            "follow a shrink; use ptgraph.integrations.hf.PruneTrainer in place of Trainer (the same "
                            "arguments), whose training step runs through a DDP wrapper rebuilt after each shrink")
        model = model or self.model
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
        inputs = self.inputs if self.inputs is not None else example_inputs(model)
        o = self.options
        source = self._graph if self._graph is not None else model  # traced already if a checkpoint loaded
        with _traceable(model):
            self.pt = PruneTrain(source, inputs, inner, target_flops=o["target_flops"], total_steps=state.max_steps,
                                 prune_until=o["prune_until"], prune_schedule=o["prune_schedule"],
                                 reconfigurations=o["reconfigurations"], self_check=o["self_check"],
                                 allocation="config", width_multiple=o["width_multiple"])
        if source is not model:  # the widths are fitted on the model's config, which the graph does not carry
            self.pt.blocks = config_blocks(self.pt.analysis, model, o["width_multiple"])
            self.pt.frozen = set(self.pt.blocks.outside)
        self.model, self._graph = model, None
        if state.global_step > 0:
            self._restore(os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE))

    # -- training --------------------------------------------------------------------------------------------
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        pt = self.pt
        pt.after_step()
        if pt.reconfiguration_due():
            if pt.reconfigure() is not None:  # under torchrun: rank 0's plan, the same answer on every rank
                adopt_pruned(self.model, pt)
                self.shrinks += 1
            control.should_log = True

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if self.pt is None or logs is None:
            return
        extra = {"flops_share": self.pt.flops / self.pt.dense_flops, "lasso_lambda": float(self.pt.lam or 0.0)}
        logs.update(extra)
        if state.log_history:  # the Trainer copied the logs before calling back
            state.log_history[-1].update(extra)

    # -- checkpoints -----------------------------------------------------------------------------------------
    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if self.pt is None or not args.should_save or not os.path.isdir(folder):
            return
        pt = self.pt
        torch.save({"steps": pt.steps, "budget": pt.budget_state(), "plans": [dict(p.keep) for p in pt.plans],
                    "dense_flops": pt.dense_flops, "dense_sizes": pt.dense_sizes, "min_channels": pt.min_channels,
                    "sizes": pt.channels}, os.path.join(folder, STATE_FILE))

    def _restore(self, path: str) -> None:
        if not os.path.isfile(path):
            raise UserError(f"resuming a PruneTrainCallback run needs {path}, written with the checkpoint; resume "
                            f"from a checkpoint folder of this run's output_dir")
        saved = torch.load(path, weights_only=False)
        pt = self.pt
        if saved["sizes"] != pt.channels:
            raise UserError(f"the checkpoint's channel groups ({len(saved['sizes'])}) do not match this model's "
                            f"({len(pt.channels)}); resume with the model and callback options of the run")
        pt.dense_flops, pt.dense_sizes, pt.min_channels = saved["dense_flops"], saved["dense_sizes"], saved["min_channels"]
        pt.steps = saved["steps"]
        pt.plans = [PrunePlan(keep) for keep in saved["plans"]]
        pt.load_budget_state(saved["budget"])

    def _before_load(self, module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        """A Trainer checkpoint of a pruned run loads into the dense model it was started from: shrink the model
        to the checkpoint's shapes first (which channels does not matter: the checkpoint overwrites them all)."""
        if self.pt is not None or prefix:
            return
        own = module.state_dict()
        if all(tuple(state_dict[k].shape) == tuple(v.shape) for k, v in own.items() if k in state_dict):
            return
        inputs = self.inputs if self.inputs is not None else example_inputs(module)
        with _traceable(module):
            graph = trace(module, inputs)
        analysis = analyze_channels(graph)
        blocks = config_blocks(analysis, module, self.options["width_multiple"])
        keep = {}
        for g in analysis.groups:
            if not g.prunable:
                continue
            counts = {state_dict[m.name].shape[m.axis] * g.size // own[m.name].shape[m.axis]
                      for m in g.members if m.name in state_dict and len(m.positions) == own[m.name].shape[m.axis]}
            assert len(counts) <= 1, f"group {g.id}: the checkpoint's shapes disagree ({counts})"
            if counts and counts != {g.size}:
                keep[g.id] = tuple(range(counts.pop()))
        shrink(analysis, PrunePlan(keep), None)
        adopt(module, pruned_config(module, blocks, analysis))
        self.resumed_shapes, self._graph = True, graph


class PruneTrainer(Trainer):
    """`transformers.Trainer` that PruneTrainCallback can prune under torchrun; in one process it is the Trainer.

    Why a subclass: the Trainer builds its DistributedDataParallel wrapper once (accelerate's `prepare`) and keeps
    it in a local variable of its training loop, which hands it to every `training_step`; after a shrink that
    wrapper's buckets hold the old shapes, and no callback can reach it. So `training_step` here runs through a
    wrapper rebuilt with accelerate's DDP options after each shrink (and made `model_wrapped`); the Trainer's loop,
    its `no_sync` during gradient accumulation (mirrored onto the new wrapper), clipping, logging and saving stay
    its own. The old wrapper is left unused: its reducer's hooks ignore a backward it did not run the forward of.
    Pass the callback as usual: `PruneTrainer(model, args, ..., callbacks=[PruneTrainCallback(...)])`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        found = [c for c in self.callback_handler.callbacks if isinstance(c, PruneTrainCallback)]
        if len(found) != 1:
            raise UserError(f"PruneTrainer follows one PruneTrainCallback's shrinks, and its callbacks hold "
                            f"{len(found)}; pass callbacks=[PruneTrainCallback(...)]")
        self.prune = found[0]
        self.prune.ddp_follows = True
        self._held: nn.Module | None = None  # the Trainer's own wrapper, as its loop passes it
        self._ddp: nn.Module | None = None  # the wrapper steps run through
        self._built_at = 0  # the callback's shrink count when _ddp was built

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = self._following(model)
        return super().training_step(model, inputs, num_items_in_batch)

    def _following(self, held: nn.parallel.DistributedDataParallel) -> nn.parallel.DistributedDataParallel:
        """The DDP wrapper for the model's current shapes: the Trainer's until the first shrink, then rebuilt."""
        shrinks = self.prune.shrinks
        if held is not self._held:  # a train() call: the Trainer wrapped the model as it is now
            self._held, self._ddp, self._built_at = held, held, shrinks
        if self._built_at != shrinks:
            self._ddp = self.model_wrapped = None
            gc.collect()  # frees the previous rebuilt wrapper's reducer before the new one registers its hooks
            handler = self.accelerator.ddp_handler
            self._ddp = nn.parallel.DistributedDataParallel(
                held.module, device_ids=held.device_ids, output_device=held.output_device,
                **(handler.to_kwargs() if handler is not None else {}))
            if handler is not None:
                handler.register_comm_hook(self._ddp)
            self.model_wrapped, self._built_at = self._ddp, shrinks
        self._ddp.require_backward_grad_sync = held.require_backward_grad_sync  # the loop's no_sync is on `held`
        return self._ddp
