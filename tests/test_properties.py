"""The shrink contract, checked by hypothesis over random architectures (tests/strategies.py) and random plans.

1. For exact groups, the shrunk model computes what the masked model computes (eval mode, float64).
2. The parameter count after a shrink is what predict_params said before it, and what the
   plan's member slices remove.
3. The shrunk model trains (train-mode outputs and kept gradients equal the masked model's),
   and a second shrink on the refreshed groups still matches its mask.
4. Optimizer state (SGD momentum, Adam moments) follows its parameter's kept channels.
Also: every op the strategy uses has an exact rule (only the model output is frozen), and a
plan that would leave some tensor with no channel (a split piece, a parameter axis) is
rejected with a UserError before anything changes; a plan that empties a parameter axis must
be. Plus unit tests of specific patterns.

PTGRAPH_HYPOTHESIS_SCALE=10 multiplies every test's example count, for a longer bug hunt.
"""
from __future__ import annotations

import copy
import os
from collections import defaultdict

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import ptgraph
from ptgraph.errors import UserError
from ptgraph.passes import (
    PrunePlan, analyze_channels, count_params, keep_every_tensor, mask, predict_params, random_plan, shrink,
)
from strategies import architectures

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SCALE = float(os.environ.get("PTGRAPH_HYPOTHESIS_SCALE", "1"))  # e.g. 10 for a long bug hunt


def examples(n: int) -> int:
    return max(1, int(n * SCALE))


ratios = st.floats(0.05, 0.9)
seeds = st.integers(0, 2**16)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only contend (100x slower on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def traced(arch):
    model = arch.build()
    x = arch.inputs()
    g = ptgraph.trace(model, (x,))
    return g, analyze_channels(g), x


def pruning_groups(analysis):
    """The groups property 1 covers: prunable, exact, with a channel to spare."""
    return [g for g in analysis.groups if g.prunable and g.exact and g.size >= 2]


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    got, want = got.detach(), want.detach()
    return got.shape == want.shape and float((got - want).norm()) <= 1e-5 * float(want.norm()) + 1e-12


@st.composite
def drawn_plans(draw, groups, repair: bool = True):
    """A plan drawn channel by channel: some groups untouched, others keep any non-empty subset.

    With `repair`, every member slice keeps one of its channels (as random_plan does), so
    that few plans empty a tensor; without, plans that empty parameters are common.
    """
    keep = {}
    for g in groups:
        if draw(st.booleans()):
            kept = set(draw(st.sets(st.integers(0, g.size - 1), min_size=1, max_size=g.size)))
            for m in g.members if repair else ():
                if not kept & set(m.channels.tolist()):
                    kept.add(draw(st.sampled_from(sorted(set(m.channels.tolist())))))
            if len(kept) < g.size:
                keep[g.id] = tuple(sorted(kept))
    return PrunePlan(keep)


def kept_positions(gm: nn.Module, analysis, plan: PrunePlan) -> dict[str, dict[int, torch.Tensor]]:
    """name -> axis -> positions that survive, computed from the groups' members alone."""
    tensors = {**dict(gm.named_parameters()), **dict(gm.named_buffers())}
    dropped: dict[tuple[str, int], set[int]] = defaultdict(set)
    for gid, keep in plan.keep.items():
        for m in analysis.group(gid).members:
            gone = ~np.isin(m.channels, list(keep))
            dropped[(m.name, m.axis)].update(m.positions[gone].tolist())
    out: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    for (name, axis), gone in dropped.items():
        if gone:
            size = tensors[name].shape[axis]
            out[name][axis] = torch.as_tensor(np.setdiff1d(np.arange(size), sorted(gone)), dtype=torch.long)
    return dict(out)


def sliced(t: torch.Tensor, cuts: dict[int, torch.Tensor]) -> torch.Tensor:
    for axis, keep in cuts.items():
        t = t.index_select(axis, keep)
    return t


def expected_count(gm: nn.Module, kept: dict) -> int:
    return sum(sliced(p, kept.get(name, {})).numel() for name, p in gm.named_parameters())


def try_shrink(a, plan: PrunePlan, **kwargs):
    """shrink, or None when it rejects a plan that would leave some tensor without channels.

    A plan that empties a parameter axis must be rejected; any rejection must say why and
    leave the model and its groups as they were.
    """
    gm = a.graph.module
    kept = kept_positions(gm, a, plan)
    empties_member = any(len(k) == 0 for axes in kept.values() for k in axes.values())
    state = {n: t.clone() for n, t in gm.state_dict().items()}
    sizes = [(g.id, g.size) for g in a.groups]
    try:
        report = shrink(a, plan, **kwargs)
    except UserError as e:
        assert "removes every channel" in str(e), str(e)
        assert gm.state_dict().keys() == state.keys()
        assert all(torch.equal(t, state[n]) for n, t in gm.state_dict().items())
        assert [(g.id, g.size) for g in a.groups] == sizes
        event("plan rejected: it would empty a tensor")
        return None
    assert not empties_member, "shrink accepted a plan that empties a parameter axis"
    return report


def try_mask(gm: nn.Module, a, plan: PrunePlan):
    """mask on a copy, or None when it rejects a plan that would empty a parameter (shrink must reject it too)."""
    try:
        return mask(copy.deepcopy(gm), a, plan)
    except UserError as e:
        assert "removes every channel" in str(e), str(e)
        return None


def check_shrink_matches_mask(g, a, plan: PrunePlan, arch) -> None:
    """Property 1 for one plan: eval-mode outputs of shrink and mask agree; the groups shrank as planned."""
    gm = g.module
    gm.eval()
    sizes = {grp.id: grp.size for grp in a.groups}
    masked = try_mask(gm, a, plan)
    x = arch.inputs(batch=3, seed=1)  # not the traced input: nothing may bake the batch size in
    with torch.no_grad():
        before = gm(x)
        report = try_shrink(a, plan)
        if masked is None or report is None:
            assert report is None, "shrink accepted a plan that mask rejects"
            assert torch.equal(gm(x), before)
            return
        got, want = gm(x), masked(x)
    assert close(got, want), (float((got - want).norm()), float(want.norm()))
    assert report.groups == {gid: (sizes[gid], len(keep)) for gid, keep in plan.keep.items() if len(keep) < sizes[gid]}
    for gid, keep in plan.keep.items():
        assert a.group(gid).size == len(keep)


# ---------------------------------------------------------------------------------------------
# 1. shrink == mask
# ---------------------------------------------------------------------------------------------


@settings(max_examples=examples(40), **SETTINGS)
@given(arch=architectures(), ratio=ratios, seed=seeds)
def test_shrink_matches_mask_random_plan(arch, ratio, seed):
    g, a, _ = traced(arch)
    plan = random_plan(a.groups, ratio, seed)
    assert set(plan.keep) <= {grp.id for grp in pruning_groups(a)}
    plan.check(a.groups)  # random_plan keeps a channel of every parameter slice
    check_shrink_matches_mask(g, a, plan, arch)


@settings(max_examples=examples(40), **SETTINGS)
@given(arch=architectures(), data=st.data())
def test_keep_every_tensor_makes_any_plan_shrinkable(arch, data):
    g, a, _ = traced(arch)
    plan = data.draw(drawn_plans(pruning_groups(a), repair=False), label="plan")
    repaired = keep_every_tensor(a, plan)
    for gid, keep in plan.keep.items():
        assert set(keep) <= set(repaired.keep[gid])  # it only adds channels back
    assert try_shrink(a, repaired) is not None, "keep_every_tensor left an empty tensor"


@settings(max_examples=examples(40), **SETTINGS)
@given(arch=architectures(), data=st.data())
def test_shrink_matches_mask_drawn_plan(arch, data):
    g, a, _ = traced(arch)
    plan = data.draw(drawn_plans(pruning_groups(a), repair=data.draw(st.booleans(), label="repair")), label="plan")
    check_shrink_matches_mask(g, a, plan, arch)


@settings(max_examples=examples(40), **SETTINGS)
@given(arch=architectures())
def test_supported_patterns_are_prunable_and_exact(arch):
    """Every op the strategy uses has an exact rule: nothing is frozen but the model output."""
    _, a, _ = traced(arch)
    for grp in a.groups:
        assert grp.prunable or grp.reason == "model output", grp.reason
        assert grp.exact, grp.reason


# ---------------------------------------------------------------------------------------------
# 2. parameter counts
# ---------------------------------------------------------------------------------------------


@settings(max_examples=examples(30), **SETTINGS)
@given(arch=architectures(), data=st.data())
def test_param_count_is_predicted(arch, data):
    g, a, _ = traced(arch)
    plan = data.draw(drawn_plans(pruning_groups(a)), label="plan")
    gm = g.module
    before = count_params(gm)
    predicted = predict_params(a, plan)
    from_members = expected_count(gm, kept_positions(gm, a, plan))
    report = try_shrink(a, plan)
    if report is None:
        assert count_params(gm) == before
        return
    assert count_params(gm) == predicted == from_members
    assert (report.params_before, report.params_after) == (before, predicted)
    assert (predicted < before) == bool(plan.keep)


# ---------------------------------------------------------------------------------------------
# 3. the shrunk model trains, and shrinks again
# ---------------------------------------------------------------------------------------------


@settings(max_examples=examples(30), **SETTINGS)
@given(arch=architectures(), data=st.data(), ratio=ratios, seed=seeds)
def test_shrunk_model_trains_and_shrinks_again(arch, data, ratio, seed):
    g, a, x = traced(arch)
    gm = g.module.train()
    plan = data.draw(drawn_plans(pruning_groups(a)), label="plan")
    masked = try_mask(gm, a, plan)
    kept = kept_positions(gm, a, plan)
    opt = torch.optim.SGD(gm.parameters(), lr=0.01)
    if try_shrink(a, plan, optimizer=opt) is None:
        masked, kept = copy.deepcopy(gm), {}  # rejected: nothing changed
    assert masked is not None, "shrink accepted a plan that mask rejects"

    # train mode: same outputs as the masked model, and the kept weights get the masked model's gradients
    out, want = gm(x), masked(x)
    assert close(out.detach(), want.detach())
    out.square().mean().backward()
    want.square().mean().backward()
    masked_params = dict(masked.named_parameters())
    for name, p in gm.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name
        assert close(p.grad, sliced(masked_params[name].grad, kept.get(name, {}))), name
    opt.step()
    opt.zero_grad()
    gm(x).square().mean().backward()
    opt.step()

    # a second plan over the refreshed groups
    check_shrink_matches_mask(g, a, random_plan(a.groups, ratio, seed), arch)


# ---------------------------------------------------------------------------------------------
# 4. optimizer state follows the kept channels
# ---------------------------------------------------------------------------------------------


@settings(max_examples=examples(30), **SETTINGS)
@given(arch=architectures(), data=st.data(), kind=st.sampled_from(["sgd", "adam"]))
def test_optimizer_state_follows_kept_channels(arch, data, kind):
    g, a, x = traced(arch)
    gm = g.module.train()
    params = dict(gm.named_parameters())
    if kind == "sgd":
        opt = torch.optim.SGD(gm.parameters(), lr=0.01, momentum=0.9)
        keys = ["momentum_buffer"]
    else:
        opt = torch.optim.Adam(gm.parameters(), lr=1e-3)
        keys = ["exp_avg", "exp_avg_sq"]
    for _ in range(2):
        opt.zero_grad()
        gm(x).square().mean().backward()
        opt.step()
    gm(x).square().mean().backward()  # leave a gradient in place too
    assert any(bool(opt.state[p][keys[0]].any()) for p in params.values())

    plan = data.draw(drawn_plans(pruning_groups(a)), label="plan")
    kept = kept_positions(gm, a, plan)
    old = {name: (p.detach().clone(), p.grad.clone(), {k: opt.state[p][k].clone() for k in keys})
           for name, p in params.items()}
    steps = {name: opt.state[p]["step"].clone() for name, p in params.items() if "step" in opt.state[p]}
    if try_shrink(a, plan, optimizer=opt) is None:
        kept = {}

    assert all(q is params[name] for name, q in gm.named_parameters())  # same Parameter objects
    for name, p in params.items():
        value, grad, state = old[name]
        cuts = kept.get(name, {})
        assert torch.equal(p.detach(), sliced(value, cuts)), name
        assert torch.equal(p.grad, sliced(grad, cuts)), name
        for k in keys:
            assert torch.equal(opt.state[p][k], sliced(state[k], cuts)), (name, k)
        if name in steps:
            assert torch.equal(opt.state[p]["step"], steps[name])
    opt.step()
    opt.zero_grad()
    gm(x).square().mean().backward()
    opt.step()
    for p in params.values():
        for k in keys:
            assert opt.state[p][k].shape == p.shape


# ---------------------------------------------------------------------------------------------
# 5. specific patterns
# ---------------------------------------------------------------------------------------------


def _analyze(model, shape=(2, 3, 8, 8)):
    model = model.double()
    x = torch.randn(*shape, dtype=torch.double)
    g = ptgraph.trace(model, (x,))
    return g, analyze_channels(g), x


def _group_of(a, name, axis=0):
    found = {grp.id for grp in a.groups for m in grp.members if m.name == name and m.axis == axis}
    assert len(found) == 1, (name, axis, found)
    return a.group(found.pop())


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.b1 = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1))
        self.b2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.bn(self.stem(x))
        x = x + self.b1(x)
        x = torch.relu(self.b2(x) + x)
        return self.fc(x.mean((2, 3)))


def test_residual_stream_is_one_group():
    g, a, x = _analyze(_Residual())
    stream = _group_of(a, "stem.weight")
    for name, axis in [("bn.weight", 0), ("bn.running_var", 0), ("b1.2.weight", 0), ("b1.2.bias", 0),
                       ("b2.0.weight", 0), ("b2.1.bias", 0), ("b1.0.weight", 1), ("fc.weight", 1)]:
        assert _group_of(a, name, axis).id == stream.id
    assert stream.prunable and stream.exact and stream.size == 8
    hidden = _group_of(a, "b1.0.weight")
    assert hidden.id != stream.id and hidden.size == 6
    assert not _group_of(a, "fc.weight").prunable
    g.module.eval()
    plan = PrunePlan({stream.id: (0, 2, 3, 7), hidden.id: (1, 4)})
    want = mask(copy.deepcopy(g.module), a, plan)(x)
    shrink(a, plan)
    assert close(g.module(x), want)
    m = g.module.get_submodule
    assert m("stem").out_channels == 4 and m("bn").num_features == 4 and m("b2.0").groups == 4
    assert m("fc").in_features == 4 and m("b1.0").out_channels == 2 and m("b1.2").in_channels == 2


class _Dense(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.l1 = nn.Sequential(nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1))
        self.l2 = nn.Sequential(nn.BatchNorm2d(10), nn.ReLU(), nn.Conv2d(10, 4, 3, padding=1))
        self.fc = nn.Linear(14, 3)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.l1(x)], 1)
        x = torch.cat([x, self.l2(x)], 1)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_dense_concatenation_keeps_separate_groups():
    g, a, x = _analyze(_Dense())
    stem, l1, l2 = (_group_of(a, n) for n in ("stem.weight", "l1.2.weight", "l2.2.weight"))
    assert len({stem.id, l1.id, l2.id}) == 3
    assert (stem.size, l1.size, l2.size) == (6, 4, 4)
    assert all(grp.prunable and grp.exact for grp in (stem, l1, l2))
    # l2's BatchNorm and the head see all three groups, each on its own positions
    bn = {grp.id: m.positions.tolist() for grp in a.groups for m in grp.members if m.name == "l2.0.weight"}
    assert bn == {stem.id: list(range(6)), l1.id: list(range(6, 10))}
    fc = {grp.id: m.positions.tolist() for grp in a.groups for m in grp.members
          if m.name == "fc.weight" and m.axis == 1}
    assert fc == {stem.id: list(range(6)), l1.id: list(range(6, 10)), l2.id: list(range(10, 14))}
    g.module.eval()
    plan = PrunePlan({stem.id: (1, 5), l1.id: (0, 1, 3), l2.id: (2,)})
    want = mask(copy.deepcopy(g.module), a, plan)(x)
    shrink(a, plan)
    assert close(g.module(x), want)
    assert g.module.fc.in_features == 6 and g.module.get_submodule("l2.0").num_features == 5


class _Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.head = nn.Conv2d(12, 5, 1)

    def forward(self, x):
        return self.head(torch.relu(self.grouped(torch.relu(self.stem(x)))))


def test_grouped_conv_prunes_whole_blocks():
    g, a, x = _analyze(_Grouped())
    blocks = _group_of(a, "grouped.weight")
    assert _group_of(a, "stem.weight").id == blocks.id == _group_of(a, "head.weight", 1).id
    assert blocks.size == 4 and blocks.prunable and blocks.exact  # one channel per block
    stem_member = next(m for m in blocks.members if m.name == "stem.weight")
    assert stem_member.channels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    g.module.eval()
    plan = PrunePlan({blocks.id: (1, 3)})
    want = mask(copy.deepcopy(g.module), a, plan)(x)
    shrink(a, plan)
    assert close(g.module(x), want)
    conv = g.module.grouped
    assert (conv.groups, conv.in_channels, conv.out_channels) == (2, 4, 6)
    assert tuple(conv.weight.shape) == (6, 2, 3, 3)


def test_model_output_channels_are_frozen():
    g, a, x = _analyze(_Grouped())
    out = _group_of(a, "head.weight")
    assert not out.prunable and out.reason == "model output"
    assert random_plan(a.groups, 0.5, 0).keep.keys().isdisjoint({out.id})
    with pytest.raises(UserError, match="frozen"):
        shrink(a, PrunePlan({out.id: (0, 1)}))
    g2, a2, _ = _analyze(_Residual())
    assert not _group_of(a2, "fc.weight").prunable and _group_of(a2, "fc.weight").reason == "model output"


class _Flip(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.b(torch.roll(self.a(x), 1, dims=1))


def test_unknown_op_freezes_its_channels():
    g, a, x = _analyze(_Flip())
    grp = _group_of(a, "a.weight")
    assert not grp.prunable and "roll" in grp.reason
