"""Your own training loop under torchrun: DDP, torch.compile and EMA copies that follow PruneTrain's shrinks.

    pt = PruneTrain(model, example, opt, target_flops=0.5, total_steps=n)
    model = pt.model
    ema = timm.utils.ModelEmaV3(model, decay=0.999)       # or swa_utils.AveragedModel(model, ...)
    runner = Runner(pt, compile=True, follow=[ema])        # DDP when torchrun started >1 process, then compile
    for x, y in loader:
        loss = F.cross_entropy(runner(x), y)
        loss.backward(); opt.step(); opt.zero_grad()
        pt.after_step(); ema.update(model)
        if pt.reconfiguration_due() and pt.reconfigure():   # rank 0 plans, every rank gets the same answer
            runner.rebuild()                               # new DDP buckets, fresh compile, EMA shrunk alike

Why each: DDP's buckets and reducer hold the shapes they were built with, dynamo's compiled graphs guard on
them (and after `recompile_limit` recompiles of one frame it runs eager), and an EMA copy is a second set of
tensors `shrink` does not know. Parameters keep their identity through a shrink, so the optimizer needs nothing.
"""
from __future__ import annotations

import copy
import gc
import warnings
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from ptgraph.errors import UserError
from ptgraph.trainers.compiling import Compiler
from ptgraph.trainers.distributed import current
from ptgraph.trainers.prunetrain import PruneTrain


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (module.get_submodule(path) if path else module), attr


class Follower:
    """Keeps a copy of the model (an EMA: timm's ModelEma*, `torch.optim.swa_utils.AveragedModel`, anything
    holding it as `.module`, or the copy itself) shaped like `pt.model` across shrinks: `update()` after each
    reconfiguration keeps the copy's own values of the channels the model kept, by tensor name.

    The copy must be of `pt.model` (the traced graph module), as `deepcopy(pt.model)` makes it: the names are
    the graph's. Its structure (module attributes, the graph's constants) is taken anew from the shrunk model.
    """

    def __init__(self, pt: PruneTrain, ema: nn.Module) -> None:
        self.pt, self.ema = pt, ema
        names = set(self.copy.state_dict())
        missing = sorted(set(pt.model.state_dict()) - names)
        if missing or len(names) != len(pt.model.state_dict()):
            raise UserError(f"the EMA copy's tensors are not named as pt.model's ({(missing or sorted(names))[0]} "
                            f"differs); build it from pt.model, e.g. ModelEmaV3(pt.model)")
        self._alive = pt.analysis.flow.alive.copy()  # which channels the copy holds now

    @property
    def copy(self) -> nn.Module:
        """The module that holds the averaged tensors."""
        inner = getattr(self.ema, "module", None)
        return inner if isinstance(inner, nn.Module) else self.ema

    def cuts(self) -> dict[str, list[tuple[int, np.ndarray]]]:
        """tensor name -> [(axis, positions kept)] since the last update (what `shrink` did to the model)."""
        flow = self.pt.analysis.flow
        out: dict[str, list[tuple[int, np.ndarray]]] = {}
        for name, axes in flow.param_axes.items():
            for axis, ids in axes.items():
                before, after = self._alive[ids], flow.alive[ids]
                if (before & ~after).any():
                    out.setdefault(name, []).append((axis, np.nonzero(after[before])[0]))
        return out

    @torch.no_grad()
    def update(self) -> nn.Module:
        """Shrink the copy as the model was shrunk since the last update; returns the new copy (also set as the
        holder's `.module`)."""
        cuts, old = self.cuts(), self.copy
        if not cuts:
            return old
        canonical = self.pt.analysis.flow.canonical
        values = dict(old.named_parameters(remove_duplicate=False)) | dict(old.named_buffers(remove_duplicate=False))
        device = next(iter(values.values())).device
        new = copy.deepcopy(self.pt.model).to(device)  # the shrunk structure: module attributes, graph constants
        for name, t in list(new.named_parameters()) + list(new.named_buffers()):
            value = values[name]
            for axis, keep in cuts.get(canonical.get(name, name), cuts.get(name, ())):
                value = value.index_select(axis, torch.as_tensor(keep, device=value.device))
            assert value.shape == t.shape, f"{name}: {tuple(value.shape)} != {tuple(t.shape)}"
            owner, attr = _owner(new, name)
            if isinstance(t, nn.Parameter):
                t.data, t.grad = value, None
                t.requires_grad_(values[name].requires_grad)
            else:
                owner._buffers[attr] = value
        new.train(old.training)
        if self.copy is self.ema:
            self.ema = new
        else:
            self.ema.module = new
        self._alive = self.pt.analysis.flow.alive.copy()
        return new


class Runner:
    """What a training step calls: `pt.model`, in DistributedDataParallel when a process group of more than
    one process is initialised (torchrun), then torch.compile'd on request (timm's order). `rebuild()` after
    every shrink: a new DDP wrapper, a fresh compile, and every followed EMA copy shrunk alike.

    `compile`: False, True, or torch.compile's keyword arguments. `ddp`: DistributedDataParallel's.
    Recompiling resets dynamo (trainers/compiling.py, the CLI's own), so every shape is a fresh compile and none
    runs eager for having hit `recompile_limit`; other compiled functions recompile at their next call. If dynamo
    runs a frame eagerly anyway (other recompiles: eval mode, batch sizes), a call warns once.
    """

    def __init__(self, pt: PruneTrain, *, compile: bool | dict[str, Any] = False, follow: Iterable[nn.Module] = (),
                 ddp: dict[str, Any] | None = None) -> None:
        self.pt = pt
        self.compiler = Compiler({} if compile is True else dict(compile)) if compile else None
        self.ddp_options = dict(ddp or {})
        self.followers = [Follower(pt, ema) for ema in follow]
        self.module: nn.Module | None = None
        self.module = self._wrap()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        assert self.module is not None
        out = self.module(*args, **kwargs)
        note = self.compiler.eager_note() if self.compiler is not None else None
        if note:
            warnings.warn(note, RuntimeWarning, stacklevel=2)
        return out

    def rebuild(self) -> None:
        """After a reconfiguration that shrank the model (on every rank alike)."""
        self.module = None  # the old wrapper's buckets go before the new ones are made
        for f in self.followers:
            f.update()
        self.module = self._wrap()

    def _wrap(self) -> nn.Module:
        model, world = self.pt.model, current()
        module = model
        if world.active:
            gc.collect()  # frees the old reducer
            device = next(model.parameters()).device
            module = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, **self.ddp_options)
        return module if self.compiler is None else self.compiler(module)  # afresh: never `recompile_limit` shapes
