"""PruneTrain under FSDP2: shrinking a model whose parameters and optimizer state are sharded across ranks.

    pt = PruneTrain(model, example, None, target_flops=0.5, total_steps=n)   # under torchrun, every rank
    sharded = shard(pt)                  # fully_shard per repeated block and at the root; pt.model -> a meta skeleton
    opt = torch.optim.AdamW(sharded.module.parameters(), lr=...)
    pt.optimizer = opt
    for x, y in loader:                  # each rank its share of the global batch
        loss = F.cross_entropy(sharded.module(x), y)
        loss.backward(); opt.step(); opt.zero_grad()
        pt.after_step()                  # proximal step on the local shards
        if pt.reconfiguration_due():
            pt.reconfigure()             # every rank: norms (one all_reduce), rank 0's plan, check, re-shard

Why a skeleton and a rebuilt copy: FSDP2's state (its FSDPParams, all-gather buffers, padded shards) is built for
the shapes it was given and has no public way to change them or to be removed from a module. So `pt.model` (the
traced graph module the analysis is bound to) holds shapes only, on the meta device, and is shrunk by the ordinary
`shrink`; the module that trains is a deep copy of that skeleton, `fully_shard`ed and materialised with its own
shards; after a shrink a new copy is built from the new skeleton and filled one parameter at a time (one all-gather
of the old parameter, the plan's slicing, this rank's chunk kept), and the optimizer's per-parameter state follows
the same way onto the new parameters (docs/DESIGN_NOTES.md, "FSDP2").
"""
from __future__ import annotations

import copy
import gc
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ptgraph.cost import forward_flops
from ptgraph.errors import UserError
from ptgraph.passes import ChannelAnalysis, PrunePlan, ShrinkReport, shrink
from ptgraph.passes.shrink import _owner, _slices, alive_after, set_alive, set_data
from ptgraph.passes.trial import FAILURES, _GraphState, eval_mode, relative_error
from ptgraph.passes.verify import flat_output, tolerance_for
from ptgraph.trainers.distributed import Dist, current
from ptgraph.trainers.fsdp_shards import first_row, is_sharded, local_rows
from ptgraph.trainers.fsdp_units import with_called_blocks

try:  # FSDP2's public API (torch >= 2.6)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - older torch
    fully_shard = None  # type: ignore[assignment]
    DTensor = ()  # type: ignore[assignment,misc]

Cuts = dict[str, list[tuple[int, np.ndarray]]]


def available() -> bool:
    return fully_shard is not None


# -- which modules form one FSDP unit ------------------------------------------------------------------
def repeated_blocks(gm: nn.Module) -> list[str]:
    """The repeated blocks of a model (transformer layers, CNN stages), by name: the children of the outermost
    module whose children are numbered (a ModuleList or Sequential; a traced graph module keeps the names but
    not the container classes), two or more holding parameters: GPT's `blocks.N`, a CIFAR ResNet's `stages.N`."""
    for name, m in gm.named_modules():
        kids = [(f"{name}.{k}" if name else k, c) for k, c in m.named_children() if any(True for _ in c.parameters())]
        if len(kids) >= 2 and all(k.rpartition(".")[2].isdigit() for k, _ in kids):
            return [k for k, _ in kids]
    return []


def _units(gm: nn.Module) -> list[list[nn.Module]]:
    """Per repeated block, the modules the graph calls inside it that hold parameters: a traced graph inlines a
    block's own forward, so FSDP's hooks go on the modules that are called (fully_shard takes such a list)."""
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    units = []
    for block in repeated_blocks(gm):
        mods = [gm.get_submodule(t) for t in called if t.startswith(block + ".") or t == block]
        mods = [m for m in dict.fromkeys(mods) if any(True for _ in m.parameters())]
        if mods:
            units.append(mods)
    return units


def _inplace_on_module_output(gm: nn.Module) -> str | None:
    """An op of the graph that writes in place into a module's output, described; None if there is none. FSDP2's
    backward hook sits on each unit's output, and an in-place op on it (a view, as a Linear's 3-d output is)
    drops the hook silently: the gradients would be wrong."""
    for n in gm.graph.nodes:
        name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
        schema = getattr(n.target, "_schema", None)  # an ATen op (the export path): does it write its first input?
        inplace = (n.op == "call_method" and name.endswith("_") and not name.endswith("__")) or \
            n.kwargs.get("inplace") is True or (n.op == "call_function" and schema is not None and schema.arguments
                                                 and getattr(schema.arguments[0].alias_info, "is_write", False))
        first = n.args[0] if n.args else None
        if inplace and getattr(first, "op", None) == "call_module":
            return f"{n.name} ({name}) writes into the output of {first.target}"
    return None


def to_meta(module: nn.Module) -> None:
    """Every parameter and buffer replaced by a meta tensor of its shape, tied parameters kept tied (`.to("meta")`
    makes a new Parameter per owning module, which would untie an LM head from its embedding)."""
    metas: dict[int, Any] = {}
    for name, t in list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False)):
        owner, _, attr = name.rpartition(".")
        m = module.get_submodule(owner) if owner else module
        if id(t) not in metas:
            meta = torch.empty_like(t, device="meta")
            metas[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
        (m._parameters if isinstance(t, nn.Parameter) else m._buffers)[attr] = metas[id(t)]


# -- building and filling a sharded copy --------------------------------------------------------------------
def _sliced(value: torch.Tensor, cuts: list[tuple[int, np.ndarray]]) -> torch.Tensor:
    for axis, keep in sorted(cuts, key=lambda c: -c[0]):
        value = value.index_select(axis, torch.as_tensor(keep, dtype=torch.long, device=value.device))
    return value


@dataclass
class _Candidate:
    module: nn.Module
    cuts: Cuts


def _skeleton_copy(analysis: ChannelAnalysis, plan: PrunePlan) -> nn.Module:
    """A deep copy of the meta skeleton shrunk by `plan`; the skeleton and its analysis left exactly as they were.
    (The analysis cannot be copied: its module fixes and graph rewrites hold the skeleton's own objects.)"""
    flow, gm = analysis.flow, analysis.graph.module
    alive = alive_after(analysis, plan)
    graph_state = _GraphState(flow, gm)
    originals = []
    try:
        for name, axis_cuts in _slices(flow, alive).items():
            owner, attr = _owner(gm, name)
            t = getattr(owner, attr)
            originals.append((t, t.data) if isinstance(t, nn.Parameter) else (owner, attr, t))
            new = _sliced(t.data if isinstance(t, nn.Parameter) else t, axis_cuts)
            if isinstance(t, nn.Parameter):
                set_data(t, new)
            elif attr in owner._buffers:
                owner._buffers[attr] = new
            else:
                setattr(owner, attr, new)
        set_alive(flow, gm, alive)
        return copy.deepcopy(gm)
    finally:
        for o in reversed(originals):
            if len(o) == 2:
                set_data(*o)
            elif o[1] in o[0]._buffers:
                o[0]._buffers[o[1]] = o[2]
            else:
                setattr(*o)
        if graph_state.changed():
            graph_state.restore()


class Sharded:
    """A PruneTrain object's model sharded with FSDP2, and its reconfigurations (see the module's docstring).
    `module` is what trains; after a reconfiguration that shrank something it is a new object."""

    def __init__(self, pt: Any, device: torch.device | None = None, mp_policy: Any = None,
                 reshard_after_forward: bool = True) -> None:
        if not available():
            raise UserError("FSDP2 (torch.distributed.fsdp.fully_shard) needs torch 2.6 or newer; upgrade torch")
        if not (dist.is_available() and dist.is_initialized()):
            raise UserError("FSDP2 shards across the processes of a process group; start under torchrun (several "
                            "processes) and initialise it first")
        if not pt.proximal:
            raise UserError("under FSDP2 the lasso is the proximal one (the subgradient lasso would gather every "
                            "parameter each step); leave out the subgradient lasso")
        if pt.allocation == "sensitivity":
            raise UserError("the sensitivity allocation measures on copies of the whole model, which FSDP2 does not "
                            "keep; choose uniform, global or config")
        inplace = _inplace_on_module_output(pt.model)
        if inplace:
            raise UserError(f"under FSDP2 an op may not write in place into a module's output: {inplace}, which "
                            f"FSDP2's backward hook would miss (wrong gradients); write it out of place "
                            f"(`x = x + y`, `inplace=False`)")
        # FSDP2 warns of every unit whose output is a view in case an in-place op follows; none does (checked above)
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        self.pt = pt
        self.world: Dist = current(device)
        self.device = device or next(pt.model.parameters()).device
        self.mesh = init_device_mesh(self.device.type, (dist.get_world_size(),))
        self.mp_policy = mp_policy
        self.reshard_after_forward = reshard_after_forward
        gm = pt.model
        values = {**dict(gm.named_parameters(remove_duplicate=False)), **dict(gm.named_buffers(remove_duplicate=False))}
        values = {k: v.detach().to(self.device) for k, v in values.items()}
        to_meta(gm)  # the skeleton: shapes for the analysis, the FLOPs and the next copy
        self.module = self._build(copy.deepcopy(gm))
        rank, world = dist.get_rank(), dist.get_world_size()
        with torch.no_grad():
            for name, p in self.module.named_parameters():
                p.to_local().copy_(local_rows(values[name], world, rank))
            for name, b in self.module.named_buffers():
                b.copy_(values[name])
        del values
        pt.values, pt.sharded, pt._index = self.module, self, None
        self.seconds = 0.0  # the last reconfiguration's re-sharding (building, filling, moving the state)

    def _build(self, fm: nn.Module) -> nn.Module:
        """`fm`, a deep copy of the meta skeleton, fully_shard'ed (one unit per repeated block, one at the root) and
        materialised: only the local shards are allocated."""
        fm = with_called_blocks(fm, repeated_blocks(fm))  # an export-captured graph calls no module of its own
        kw: dict[str, Any] = {"mesh": self.mesh, "reshard_after_forward": self.reshard_after_forward}
        if self.mp_policy is not None:
            kw["mp_policy"] = self.mp_policy
        for unit in _units(fm):
            fully_shard(unit, **kw)
        fully_shard(fm, **kw)
        fm.to_empty(device=self.device)
        return fm

    def whole_model(self) -> nn.Module | None:
        """The model as one ordinary module on the CPU, on rank 0 (None on the others): a copy of the skeleton
        filled with the gathered tensors (one all-gather per tensor; every rank must call it)."""
        state = full_state_dict(self.module)
        if dist.get_rank() != 0:
            return None
        gm = copy.deepcopy(self.pt.model).to_empty(device="cpu")  # in place per Parameter: ties stay tied
        with torch.no_grad():  # non-persistent buffers too (a rotary table), which load_state_dict would refuse
            for name, t in [*gm.named_parameters(), *gm.named_buffers()]:
                t.copy_(state[name])
        return gm.train(self.module.training)

    # -- a reconfiguration ---------------------------------------------------------------------------------
    def _candidate(self, plan: PrunePlan) -> _Candidate:
        """The model shrunk by `plan`, sharded anew, beside the current one (which is left as it is): the
        skeleton and its analysis copied (shapes only) and shrunk, each parameter gathered once, sliced, and
        this rank's chunk written into the new shards."""
        pt = self.pt
        cuts = _slices(pt.analysis.flow, alive_after(pt.analysis, plan))
        fm = self._build(_skeleton_copy(pt.analysis, plan))
        canonical = pt.analysis.flow.canonical
        rank, world = dist.get_rank(), dist.get_world_size()
        old = {**dict(self.module.named_parameters(remove_duplicate=False)),
               **dict(self.module.named_buffers(remove_duplicate=False))}
        with torch.no_grad():
            for name, p in fm.named_parameters():
                full = old[name].full_tensor() if is_sharded(old[name]) else old[name]
                full = _sliced(full, cuts.get(canonical.get(name, name), cuts.get(name, [])))
                local = p.to_local()
                new = local_rows(full, world, rank)
                assert new.shape == local.shape, f"{name}: {tuple(new.shape)} != {tuple(local.shape)}"
                local.copy_(new)
                del full, new
            for name, b in fm.named_buffers():
                b.copy_(_sliced(old[name], cuts.get(canonical.get(name, name), cuts.get(name, []))))
        fm.train(self.module.training)
        return _Candidate(fm, cuts)

    def _run(self, module: nn.Module) -> torch.Tensor | None:
        """The probe's output in eval mode (a collective: every rank runs it); None if the forward fails."""
        restore = eval_mode(module)
        try:
            with torch.no_grad():
                return flat_output(module(*self.pt._probe_on_device()))
        except FAILURES:
            return None
        finally:
            restore()

    def _masked(self, cuts: Cuts) -> list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]]:
        """Zero the dropped positions of the current shards in place; returns what puts them back."""
        rank, world = dist.get_rank(), dist.get_world_size()
        tensors = {**dict(self.module.named_parameters(remove_duplicate=False)),
                   **dict(self.module.named_buffers(remove_duplicate=False))}
        saved = []
        with torch.no_grad():
            for name, axis_cuts in cuts.items():
                t = tensors[name]
                local = t.to_local() if is_sharded(t) else t
                for axis, keep in axis_cuts:
                    dropped = np.setdiff1d(np.arange(t.shape[axis]), keep)
                    if is_sharded(t) and axis == 0:
                        off = first_row(t, world, rank)
                        dropped = dropped[(dropped >= off) & (dropped < off + local.shape[0])] - off
                    idx = torch.as_tensor(dropped, dtype=torch.long, device=local.device)
                    if len(idx) and local.numel():
                        saved.append((local, axis, idx, local.index_select(axis, idx)))
                        local.index_fill_(axis, idx, 0)
        return saved

    @staticmethod
    def _unmask(saved: list) -> None:
        with torch.no_grad():
            for local, axis, idx, values in reversed(saved):
                local.index_copy_(axis, idx, values)

    def _try(self, plan: PrunePlan) -> tuple[_Candidate | None, float]:
        """The self-check: the exact groups' shrink must compute what their mask computes (relative error at most
        the tolerance), and the whole plan's shrunk model must run. The current model is left as it was."""
        pt = self.pt
        exact = {g.id for g in pt.analysis.groups if g.exact}
        stage = PrunePlan({g: k for g, k in plan.keep.items() if g in exact})
        err, cand = 0.0, None
        try:
            if stage.keep:
                saved = self._masked(_slices(pt.analysis.flow, alive_after(pt.analysis, stage)))
                try:
                    want = self._run(self.module)
                finally:
                    self._unmask(saved)
                cand = self._candidate(stage)
                got = self._run(cand.module)
                err = float("inf") if got is None or want is None else relative_error(got, want)
                err = self.world.broadcast_object(err)  # rank 0 decides for all
                if err > tolerance_for(self.module):
                    return None, err
            if len(stage.keep) < len(plan.keep):
                cand = None  # released before the whole plan's copy is built: one new copy at a time
                gc.collect()  # FSDP's hooks make each sharded module a reference cycle
                cand = self._candidate(plan)
                if not self.world.broadcast_object(self._run(cand.module) is not None):
                    return None, float("inf")
        except FAILURES:
            return None, float("inf")
        return cand, err

    def _adopt(self, plan: PrunePlan, cand: _Candidate) -> ShrinkReport:
        """The candidate becomes the model: the optimizer's parameters and per-parameter state move onto its
        shards (each state tensor gathered once, sliced, re-chunked), the old shards are released."""
        pt, opt = self.pt, self.pt.optimizer
        rank, world = dist.get_rank(), dist.get_world_size()
        canonical = pt.analysis.flow.canonical
        new = dict(cand.module.named_parameters())
        name_of = {p: n for n, p in self.module.named_parameters()}
        if opt is not None:
            with torch.no_grad():
                for group in opt.param_groups:
                    group["params"] = [new[name_of[p]] for p in group["params"]]
                for old_p, name in name_of.items():
                    state = opt.state.pop(old_p, None)
                    if not state:
                        continue
                    p = new[name]
                    cuts = cand.cuts.get(canonical.get(name, name), cand.cuts.get(name, []))
                    for key, value in state.items():
                        if is_sharded(value) and value.shape == old_p.shape:
                            full = _sliced(value.full_tensor(), cuts)
                            state[key] = DTensor.from_local(local_rows(full, world, rank).clone(), p.device_mesh,
                                                            p.placements, run_check=False, shape=p.shape,
                                                            stride=p.stride())
                            del full
                    opt.state[p] = state
        report = shrink(pt.analysis, plan)  # the skeleton (meta: shapes only), its graph and groups
        shapes = {n: p.shape for n, p in cand.module.named_parameters()}
        assert all(shapes[n] == p.shape for n, p in pt.model.named_parameters()), "the skeleton and the copy differ"
        pt._index = None
        pt._flops = forward_flops(pt.model)
        pt.plans.append(plan)
        self.module = pt.values = cand.module
        return report

    def apply(self, plan: PrunePlan) -> ShrinkReport | None:
        """Shrink by `plan` on every rank (the same plan everywhere), self-checked unless the PruneTrain object's
        self_check is off; a group that fails the check is left out and frozen. Returns what was adopted."""
        pt = self.pt
        pt.check_note = None
        if not plan.keep:
            return None
        start = time.perf_counter()
        for p in self.module.parameters():  # between steps the gradients are spent; their room holds the new shards
            p.grad = None
        if not pt.self_check:
            cand: _Candidate | None = self._candidate(plan)
        else:
            cand, err = self._try(plan)
            if cand is None:  # one group at a time finds the culprits (rare: a wrong rule)
                bad = {g for g in sorted(plan.keep) if self._try(PrunePlan({g: plan.keep[g]}))[0] is None}
                bad = bad or set(plan.keep)
                self.pt.freeze_failing(bad, err, tolerance_for(self.module))
                plan = PrunePlan({g: k for g, k in plan.keep.items() if g not in bad})
                cand = self._try(plan)[0] if plan.keep else None
                if cand is None and plan.keep:
                    self.pt.freeze_failing(plan.keep, err, tolerance_for(self.module))
            pt.check_seconds += time.perf_counter() - start
        report = self._adopt(plan, cand) if cand is not None else None
        cand = None
        gc.collect()  # the replaced (or rejected) sharded copy is a reference cycle: free it now, not at some later step
        self.seconds = time.perf_counter() - start
        return report

    def reconfigure(self, plan: PrunePlan | None = None) -> Any:
        """`PruneTrain.reconfigure` under FSDP2, on every rank together: the pending thresholding, the channel norms
        (one all_reduce), rank 0's plan broadcast, the checked shrink and re-shard, the steering (rank 0's)."""
        from ptgraph.trainers.prunetrain import Reconfiguration

        pt, world = self.pt, self.world
        start, before = time.perf_counter(), pt.flops
        if plan is None:
            plan = world.broadcast_plan(pt._unchecked_plan())  # every rank computes (collectives); rank 0's counts
        else:
            pt.flush()
        report = self.apply(plan)
        r = None
        if report is not None:
            r = Reconfiguration(pt.steps, pt.plans[-1], report, before, pt.flops, time.perf_counter() - start)
        if pt._feedback is not None:
            pt._steer()  # every rank: the next lambda needs the norms, a collective
        pt.load_budget_state(world.broadcast_object(pt.budget_state()))
        return r


def mixed_precision(dtype: torch.dtype | None) -> Any:
    """FSDP2's policy for the run's AMP dtype: parameters all-gathered and computed in it, gradients reduced in
    float32 (the sharded master weights and the optimizer state stay float32); None without AMP."""
    return None if dtype is None else MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def shard(pt: Any, device: torch.device | None = None, mp_policy: Any = None) -> Sharded:
    """Shard `pt`'s model with FSDP2 (see the module's docstring); build the optimizer on `.module` afterwards."""
    return Sharded(pt, device, mp_policy)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as a whole tensor on the CPU, on rank 0 (others get {}): one gather per tensor."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    main = dist.get_rank() == 0
    for name, t in list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers()):
        if id(t) in seen:  # a tied parameter: its first name's tensor, as state_dict() gives it
            if main:
                out[name] = out[seen[id(t)]]
            continue
        seen[id(t)] = name
        full = t.full_tensor() if is_sharded(t) else t.detach()
        if main:
            out[name] = full.cpu().clone()
    return out
