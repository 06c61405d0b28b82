"""The FLOPs budget: the schedule, the steering, the loop reaching its target, resume, bad values."""
import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ptgraph.cli import main
from ptgraph.errors import UserError
from ptgraph.graph import trace
from ptgraph.passes import analyze_channels
from ptgraph.trainers import PruneTrain
from ptgraph.trainers import loop as loop_module
from ptgraph.trainers.budget import FlopsSchedule, LassoController
from ptgraph.trainers.config import TrainConfig
from ptgraph.trainers.allocation import relative_norms, uniform_order
from ptgraph.trainers.planning import deepest
from ptgraph.trainers.sensitivity import output_change, tilts
from ptgraph.trainers.loop import train
from toy_models import PlainNet, ResidualNet, small_resnet


def test_schedule_runs_from_dense_to_the_target_and_stays():
    for shape in ("cubic", "linear"):
        s = FlopsSchedule(0.4, until=100, shape=shape)
        shares = [s.share_at(t) for t in range(0, 150, 5)]
        assert shares[0] == 1.0 and s.share_at(100) == pytest.approx(0.4) and s.share_at(149) == pytest.approx(0.4)
        assert all(a >= b for a, b in zip(shares, shares[1:]))
    assert FlopsSchedule(0.4, 100, "cubic").share_at(25) < FlopsSchedule(0.4, 100, "linear").share_at(25)


def test_controller_gain_follows_the_shortfall_and_stays_bounded():
    c = LassoController()
    c.feedback(asked=10.0, achieved=0.0)
    assert c.gain > 1.0
    high = c.gain
    c.feedback(asked=10.0, achieved=30.0)
    assert c.gain < high
    for _ in range(100):
        c.feedback(asked=10.0, achieved=0.0)
    assert c.gain == c.max_gain
    assert c.strength(2.0, lr=0.1, steps=10) == pytest.approx(c.gain * 2.0)
    c.load_state_dict(LassoController(gain=0.5).state_dict())
    assert c.gain == 0.5


def _run_api(target: float, total: int = 60, until: float = 0.5, seed: int = 0, model=None, side: int = 8, **kw):
    """The README's loop with a target, on a fixed random regression task."""
    torch.manual_seed(seed)
    model = model or ResidualNet(width=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pt = PruneTrain(model, torch.randn(2, 3, side, side), opt, target_flops=target, total_steps=total,
                    prune_until=until, reconfigurations=4, **kw)
    data = torch.randn(total, 8, 3, side, side)
    shrinks = []
    for t in range(total):
        pt.observe(data[t])
        loss = pt.model(data[t]).square().mean()
        (loss + pt.penalty(loss)).backward()
        opt.step()
        opt.zero_grad()
        pt.after_step()
        if pt.reconfiguration_due():
            r = pt.reconfigure()
            if r is not None:
                shrinks.append(r)
    return pt, shrinks


@pytest.mark.parametrize("target,compute_aware,allocation",
                         [(0.5, False, "global"), (0.3, False, "global"), (0.5, True, "global"),
                          (0.5, False, "uniform"), (0.3, False, "uniform"), (0.5, False, "sensitivity")])
def test_the_object_reaches_its_target_gradually_then_trains_plainly(target, compute_aware, allocation):
    pt, shrinks = _run_api(target, compute_aware=compute_aware, allocation=allocation)
    assert abs(pt.flops / pt.dense_flops - target) <= 0.05
    assert sum(r.step < pt.schedule.until for r in shrinks) >= 2  # gradual: shrinks before the schedule's point
    assert all(r.step <= pt.schedule.until for r in shrinks)
    dense = {g.id: g.size for g in analyze_channels(trace(ResidualNet(width=32), torch.randn(2, 3, 8, 8))).groups}
    assert all(pt.channels[g] >= math.ceil(target * dense[g]) for g in pt.channels)  # no group under F of its channels
    assert any(pt.channels[g] < dense[g] for g in pt.channels)
    assert pt.target_reached and pt.lam == 0.0 and pt.scheduled_flops == round(target * pt.dense_flops)
    before = {n: p.detach().clone() for n, p in pt.model.named_parameters()}
    pt.after_step()  # the lasso is off
    assert all(torch.equal(before[n], p) for n, p in pt.model.named_parameters())


def test_uniform_allocation_keeps_the_same_share_of_every_group():
    pt, shrinks = _run_api(0.5, allocation="uniform", model=small_resnet(), side=16)
    dense = pt.dense_sizes
    assert len(dense) >= 4  # groups of different widths and resolutions
    shares = {g: pt.channels[g] / dense[g] for g in pt.channels}
    slack = max(1 / dense[g] for g in dense)  # one channel of the narrowest group
    assert max(shares.values()) - min(shares.values()) <= slack + 1e-9, shares
    assert max(shares.values()) < 1  # every group gave some


def test_allocation_defaults_to_uniform_and_compute_aware_implies_global():
    def made(**kw):
        return PruneTrain(ResidualNet(width=8), torch.randn(2, 3, 8, 8), None, target_flops=0.5, total_steps=10, **kw)
    assert made().allocation == "uniform"
    assert made(compute_aware=True).allocation == "global"
    assert made(allocation="global").allocation == "global"
    assert TrainConfig(model="m").resolved("synthetic").allocation == "uniform"
    assert TrainConfig(model="m", compute_aware=True).resolved("synthetic").allocation == "global"
    with pytest.raises(UserError, match="--compute-aware ranks channels across groups"):
        made(compute_aware=True, allocation="uniform")


def test_an_unknown_allocation_is_refused():
    with pytest.raises(UserError, match="--allocation must be one of"):
        PruneTrain(ResidualNet(width=8), torch.randn(2, 3, 8, 8), None, target_flops=0.5, total_steps=10,
                   allocation="by_layer")


def test_the_steered_lasso_only_presses_the_channels_the_next_point_needs():
    torch.manual_seed(1)
    model = ResidualNet(width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pt = PruneTrain(model, torch.randn(2, 3, 8, 8), opt, target_flops=0.5, total_steps=40, reconfigurations=4)
    pt.penalty(torch.tensor(1.0))
    assert pt.lam > 0 and pt.weights is not None
    assert 0 < pt.weights.sum() < len(pt.weights)  # some channels, not all
    norms = np.concatenate([pt.channel_norms()[g] for g in pt.index.group_slices])
    assert norms[pt.weights > 0].max() <= norms[pt.weights == 0].min() + 1e-6  # the smallest ones
    assert pt.cut_norm == pytest.approx(norms[pt.weights > 0].max())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 1000), min_size=1, max_size=40), st.integers(-10, 1010), st.booleans())
def test_deepest_is_the_deepest_plan_over_the_floor(drops, floor, nearest):
    """Bisection over plans that remove more as their index grows: the last plan keeping at least `floor`
    FLOPs (0 when none does), or with `nearest` the next one when it lands closer."""
    flops = np.maximum(0, 1000 - np.cumsum(drops))  # non-increasing in the plan's index
    i, plan = deepest(lambda k: k, len(flops), floor, lambda k: int(flops[k]), nearest)
    over = [k for k in range(len(flops)) if flops[k] >= floor]
    want = over[-1] if over else 0
    if nearest and want + 1 < len(flops) and floor - flops[want + 1] < flops[want] - floor:
        want += 1
    assert i == plan == want


def test_compute_aware_scores_divide_by_what_a_channel_costs():
    torch.manual_seed(0)
    model = PlainNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pt = PruneTrain(model, torch.randn(2, 3, 16, 16), opt, target_flops=0.5, total_steps=40, compute_aware=True)
    norms = pt.channel_norms()
    plain, aware = relative_norms(norms), pt._scores(norms)
    costs = {g: pt._channel_cost(g, len(n)) for g, n in norms.items()}
    assert len(set(round(c) for c in costs.values())) > 1  # groups at different resolutions cost differently
    ratio = {g: float(np.median(aware[g] / plain[g])) for g in norms}
    cheap, dear = min(costs, key=costs.get), max(costs, key=costs.get)
    assert ratio[dear] < ratio[cheap]  # a costly channel scores lower: pressed and cut first
    assert ratio[dear] * costs[dear] == pytest.approx(ratio[cheap] * costs[cheap], rel=1e-4)


def test_a_target_needs_the_run_length_and_no_ratio():
    model = ResidualNet(width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(UserError, match="total_steps"):
        PruneTrain(model, x, opt, target_flops=0.5)
    with pytest.raises(UserError, match="not both"):
        PruneTrain(model, x, opt, target_flops=0.5, total_steps=10, penalty_ratio=0.2)
    with pytest.raises(UserError, match="subgradient"):
        PruneTrain(model, x, opt, target_flops=0.5, total_steps=10, proximal=False)
    with pytest.raises(UserError, match="--prune-until"):
        PruneTrain(model, x, opt, target_flops=0.5, total_steps=10, prune_until=0.0)


def _cfg(tmp_path, **kw):
    base = dict(model="toy_models:small_resnet", data="synthetic:easy", epochs=4, batch_size=32, steps_per_epoch=8,
                lr=0.1, run_dir=str(tmp_path / "run"), tensorboard=False, target_flops=0.5, prune_until=0.5,
                reconfigurations=4)
    return TrainConfig(**{**base, **kw})


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("model", ["toy_models:small_resnet", "toy_models:plain_net"])
def test_the_loop_reaches_the_target_on_two_models_with_the_same_flags(tmp_path, model):
    summary = train(_cfg(tmp_path, model=model))
    assert abs(summary["flops"] / summary["dense_flops"] - 0.5) <= 0.05
    records = _records(tmp_path / "run")
    until = 0.5 * 4 * 8
    assert sum(r["kind"] == "reconfig" and r["step"] < until for r in records) >= 2
    assert all(r["step"] <= until for r in records if r["kind"] == "reconfig")
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert epochs[-1]["scheduled_flops"] == round(0.5 * summary["dense_flops"])
    assert summary["train_flops_share"] < 0.85
    assert "0.5" in (tmp_path / "run" / "report.md").read_text()  # the target is in the report


def test_the_loop_gives_the_sensitivity_allocation_its_batches(tmp_path, monkeypatch):
    measured = []
    real = PruneTrain._tilts

    def spy(self, norms):
        measured.append(real(self, norms))
        return measured[-1]

    monkeypatch.setattr(PruneTrain, "_tilts", spy)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*pt.observe")
        summary = train(_cfg(tmp_path, allocation="sensitivity"))
    assert abs(summary["flops"] / summary["dense_flops"] - 0.5) <= 0.05
    assert measured[0] is None and any(t is not None and len(set(t.values())) > 1 for t in measured)


@pytest.mark.parametrize("allocation", [None, "sensitivity"])
def test_resume_after_a_kill_mid_schedule_is_bit_identical(tmp_path, monkeypatch, allocation):
    train(_cfg(tmp_path / "a", allocation=allocation))
    reference = torch.load(tmp_path / "a" / "run" / "checkpoint.pt", weights_only=False)
    calls = {"n": 0}
    original = loop_module.Run.train_step

    class Killed(Exception):
        pass

    def dying_step(self, x, y):
        calls["n"] += 1
        if calls["n"] == 12:  # epoch 2, between the reconfigurations of the schedule
            raise Killed()
        return original(self, x, y)

    monkeypatch.setattr(loop_module.Run, "train_step", dying_step)
    with pytest.raises(Killed):
        train(_cfg(tmp_path / "b", allocation=allocation))
    monkeypatch.setattr(loop_module.Run, "train_step", original)
    train(_cfg(tmp_path / "b", allocation=allocation), resume_dir=str(tmp_path / "b" / "run"))
    resumed = torch.load(tmp_path / "b" / "run" / "checkpoint.pt", weights_only=False)
    assert resumed["plans"] == reference["plans"] and len(reference["plans"]) >= 2
    assert resumed["budget"]["gain"] == reference["budget"]["gain"]
    assert all(torch.equal(resumed["model"][k], reference["model"][k]) for k in reference["model"])


@pytest.mark.parametrize("argv, words", [
    (["--target-flops", "0"], "--target-flops 0 is outside (0, 1]"),
    (["--target-flops", "1.5"], "--target-flops 1.5 is outside"),
    (["--prune-until", "0"], "--prune-until 0 is outside (0, 1]"),
    (["--prune-until", "1.2"], "--prune-until 1.2"),
    (["--target-flops", "0.5", "--penalty-ratio", "0.9"], "not both"),
    (["--penalty-ratio", "0.9", "--prune-until", "0.5"], "--prune-until"),
    (["--dense", "--target-flops", "0.5"], "--dense trains without pruning"),
    (["--lasso", "subgradient"], "--lasso subgradient only with --penalty-ratio"),
    (["--reconfigurations", "0"], "--reconfigurations must be 1 or more"),
    (["--penalty-ratio", "0.9", "--compute-aware"], "--compute-aware weighs the FLOPs target's choice"),
    (["--dense", "--allocation", "uniform"], "--allocation spreads the FLOPs target's cuts"),
    (["--allocation", "uniform", "--compute-aware"], "--compute-aware ranks channels across groups"),
])
def test_bad_budget_values_are_one_line_and_exit_2(argv, words, capsys, tmp_path):
    code = main(["prune-train", "--model", "toy_models:small_resnet", "--run-dir", str(tmp_path / "r"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and words in err and err.count("\n") == 1, err


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(2, 40), min_size=1, max_size=6), st.integers(0, 2**31 - 1))
def test_uniform_order_keeps_every_prefix_within_one_channel_of_a_common_share(sizes, seed):
    rng = np.random.default_rng(seed)
    norms = {g: rng.random(n) for g, n in enumerate(sizes)}
    order = uniform_order(norms, dict(enumerate(sizes)))
    assert sorted(order) == sorted(g for g, n in enumerate(sizes) for _ in range(n - 1))  # all but one per group
    left = dict(enumerate(sizes))
    for g in order:
        left[g] -= 1
        shares = [left[h] / sizes[h] for h in left]
        assert max(shares) - min(shares) <= max(1 / n for n in sizes) + 1e-12


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(2, 40), min_size=2, max_size=6), st.integers(0, 2**31 - 1))
def test_a_tilted_order_cuts_a_more_sensitive_group_no_more_and_keeps_the_floors(sizes, seed):
    rng = np.random.default_rng(seed)
    norms = {g: rng.random(n) for g, n in enumerate(sizes)}
    tilt = {g: float(rng.choice([0.5, 1.0, 2.0])) for g in norms}
    floors = {g: int(rng.integers(1, n + 1)) for g, n in enumerate(sizes)}
    order = uniform_order(norms, dict(enumerate(sizes)), tilt, floors)
    assert order == uniform_order(norms, dict(enumerate(sizes)), tilt, floors)  # deterministic
    assert sorted(order) == sorted(g for g, n in enumerate(sizes) for _ in range(n - max(floors[g], 1)))
    left = dict(enumerate(sizes))
    effective = []  # the share a removal leaves its group, over the group's tilt: the next one never leaves more
    for g in order:
        left[g] -= 1
        effective.append(left[g] / sizes[g] / tilt[g])
    assert all(a >= b - 1e-12 for a, b in zip(effective, effective[1:]))
    same = [(a, b) for a in norms for b in norms if sizes[a] == sizes[b] and tilt[a] > tilt[b]]
    for a, b in same:  # of two groups alike but for the tilt, the more sensitive one is never cut more
        removed = {a: 0, b: 0}
        for g in order:
            if g in removed:
                removed[g] += 1
                assert removed[a] <= removed[b] or removed[b] == sizes[b] - floors[b]
    assert uniform_order(norms, dict(enumerate(sizes)), {g: 1.0 for g in norms}) == uniform_order(norms, dict(enumerate(sizes)))


def test_tilts_follow_the_output_change_per_flop_and_are_bounded():
    t = tilts({0: 1.0, 1: 4.0, 2: 100.0, 3: 0.0, 4: float("inf")}, {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0})
    assert t[0] < t[1] <= t[2] == 2.0 and t[3] == 0.5 and t[4] == 2.0
    assert tilts({0: 2.0, 1: 2.0}, {0: 1.0, 1: 4.0})[0] > tilts({0: 2.0, 1: 2.0}, {0: 1.0, 1: 4.0})[1]  # per FLOP
    assert tilts({0: 0.0, 1: 0.0}, {0: 1.0, 1: 1.0}) == {0: 1.0, 1: 1.0}  # nothing measured: uniform


def test_output_change_is_zero_for_channels_at_zero_and_leaves_the_model_alone():
    torch.manual_seed(0)
    graph = trace(PlainNet(width=8), torch.randn(2, 3, 8, 8))
    analysis = analyze_channels(graph)
    g = next(g for g in analysis.groups if g.prunable and g.exact)
    conv = next(m for m in graph.module.modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels == g.size)
    before = {k: v.clone() for k, v in graph.module.state_dict().items()}
    from ptgraph.passes import PrunePlan, keep_every_tensor
    drop_first = keep_every_tensor(analysis, PrunePlan({g.id: tuple(range(1, g.size))}))
    x = (torch.randn(4, 3, 8, 8),)
    live = output_change(graph, analysis, {g.id: drop_first}, x)[g.id]
    assert all(torch.equal(v, before[k]) for k, v in graph.module.state_dict().items())  # the masks were undone
    with torch.no_grad():
        for m in graph.module.modules():  # channel 0 of the group at zero everywhere it lives
            if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d)) and m.weight.shape[0] == g.size:
                m.weight[0] = 0
                if m.bias is not None:
                    m.bias[0] = 0
    dead = output_change(graph, analysis, {g.id: drop_first}, x)[g.id]
    assert live > 0 and dead == pytest.approx(0.0, abs=1e-12)
    assert conv.weight.shape[0] == g.size and graph.module.training  # untouched: no shrink, mode kept


def test_the_sensitivity_allocation_warns_once_without_observed_inputs():
    torch.manual_seed(0)
    model = ResidualNet(width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pt = PruneTrain(model, torch.randn(2, 3, 8, 8), opt, target_flops=0.5, total_steps=20, reconfigurations=4,
                    allocation="sensitivity")
    with pytest.warns(UserWarning, match="pt.observe"):
        for _ in range(20):
            loss = pt.model(torch.randn(4, 3, 8, 8)).square().mean()
            (loss + pt.penalty(loss)).backward()
            opt.step()
            opt.zero_grad()
            pt.after_step()
            if pt.reconfiguration_due():
                pt.reconfigure()
    assert abs(pt.flops / pt.dense_flops - 0.5) <= 0.05  # it cut uniformly
