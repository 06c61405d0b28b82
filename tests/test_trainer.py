"""PruneTrain: lambda, the penalty against a naive reference, rounding, the CLI loop, resume, bad input."""
import json

import numpy as np
import pytest
import torch

from ptgraph.cli import main
from ptgraph.errors import UserError
from ptgraph.trainers import PruneTrain
from ptgraph.trainers import loop as loop_module
from ptgraph.trainers.config import TrainConfig
from ptgraph.trainers.loop import train
from ptgraph.trainers.lasso import proximal_step
from ptgraph.trainers.allocation import keep_channels
from ptgraph.trainers.prunetrain import lasso_lambda
from toy_models import ResidualNet


def _pt(**kw):
    torch.manual_seed(0)
    model = ResidualNet(width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return PruneTrain(model, torch.randn(2, 3, 8, 8), opt, **kw), opt


def naive_lasso(pt):
    """Per channel, per member, in Python loops: the definition the vectorised penalty must match."""
    params = dict(pt.model.named_parameters())
    total = torch.zeros((), dtype=torch.float64)
    for g in pt.analysis.groups:
        if not g.prunable:
            continue
        for c in range(g.size):
            sq = torch.zeros((), dtype=torch.float64)
            for m in g.members:
                if m.name not in params:
                    continue
                for pos in m.positions[m.channels == c]:
                    sq = sq + params[m.name].double().select(m.axis, int(pos)).square().sum()
            total = total + (sq + 1e-12).sqrt()
    return total


def test_penalty_matches_naive_reference_and_lambda_formula():
    pt, _ = _pt(proximal=False, penalty_ratio=0.2)
    with torch.no_grad():
        for p in pt.model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours, naive = float(pt.lasso().detach()), float(naive_lasso(pt).detach())
    assert abs(ours - naive) <= 1e-6 * naive
    task = torch.tensor(2.0)
    penalty = pt.penalty(task)
    assert pt.lam == pytest.approx(0.2 * 2.0 / (ours * 0.8))
    assert float(penalty.detach()) / (2.0 + float(penalty.detach())) == pytest.approx(0.2, rel=1e-5)
    assert lasso_lambda(1.0, 4.0, 0.5) == pytest.approx(0.25)


def test_proximal_mode_gives_exact_zeros():
    pt, opt = _pt(proximal=True, penalty_ratio=0.9)
    assert float(pt.penalty(torch.tensor(2.3))) == 0.0 and pt.lam > 0
    for g in opt.param_groups:
        g["lr"] = 10.0  # strength lr * lambda large enough to zero channels in one step
    pt.after_step()
    norms = np.concatenate(list(pt.channel_norms().values()))
    assert (norms == 0).sum() > 0


def test_prox_every_defers_the_thresholding_with_the_summed_strength():
    pt, opt = _pt(proximal=True, penalty_ratio=0.5, prox_every=3)
    pt.penalty(torch.tensor(2.3))
    before = {k: v.clone() for k, v in pt.model.state_dict().items()}
    pt.after_step()
    pt.after_step()
    assert all(torch.equal(v, before[k]) for k, v in pt.model.state_dict().items())  # nothing applied yet
    assert pt._pending == pytest.approx(2 * 0.1 * pt.lam)
    reference, _ = _pt(proximal=True, penalty_ratio=0.5)
    reference.lam = pt.lam
    proximal_step(reference.index, reference.model, 3 * 0.1 * pt.lam)
    pt.after_step()  # the third step applies all three steps' strength at once
    assert pt._pending == 0.0
    assert all(torch.equal(v, reference.model.state_dict()[k]) for k, v in pt.model.state_dict().items())
    pt.after_step()
    pt.plan()  # a plan sees every step's thresholding
    assert pt._pending == 0.0


@pytest.mark.parametrize("round_to", [1, 4, 8])
def test_keep_channels_rounding(round_to):
    rng = np.random.default_rng(round_to)
    norms = rng.random(21)
    norms[rng.choice(21, 9, replace=False)] = 0.0
    kept = keep_channels(norms, 1e-4, round_to)
    assert list(kept) == sorted(kept)
    assert len(kept) == min(21, -(-12 // round_to) * round_to)
    assert norms[kept].min() >= np.sort(norms)[::-1][len(kept) - 1]  # the largest norms win
    assert len(keep_channels(np.zeros(5), 1e-4, round_to)) == min(5, round_to)  # never zero channels
    floor = keep_channels(norms, 1e-4, round_to, at_least=15)  # a floor keeps the largest norms
    assert len(floor) == min(21, -(-15 // round_to) * round_to) and set(kept) <= set(floor)


def test_reconfigure_keeps_optimizer_state_aligned():
    pt, opt = _pt(proximal=False)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    for _ in range(2):
        torch.nn.functional.cross_entropy(pt.model(x), y).backward()
        opt.step()
        opt.zero_grad()
    before = {n: (p.detach().clone(), opt.state[p]["momentum_buffer"].clone()) for n, p in pt.model.named_parameters()}
    group = max((g for g in pt.analysis.groups if g.prunable), key=lambda g: g.size)
    keep = tuple(range(0, group.size, 2))
    from ptgraph.passes import PrunePlan

    pt.reconfigure(PrunePlan({group.id: keep}))
    checked = 0
    for name, p in pt.model.named_parameters():
        w0, buf0 = before[name]
        for m in (m for m in group.members if m.name == name):
            kept = torch.tensor([int(pos) for pos, c in zip(m.positions, m.channels) if c in keep])
            w0, buf0 = w0.index_select(m.axis, kept), buf0.index_select(m.axis, kept)
        if w0.shape != before[name][0].shape:
            checked += 1
        torch.testing.assert_close(p.detach(), w0)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], buf0)
    assert checked >= 3


def _cfg(tmp_path, **kw):
    base = dict(model="toy_models:small_resnet", data="synthetic:easy", epochs=4, batch_size=32, steps_per_epoch=8,
                reconfig_steps=8, penalty_ratio=0.5, threshold=2.1, lr=0.1, run_dir=str(tmp_path / "run"),
                tensorboard=False)
    return TrainConfig(**{**base, **kw})


def _weights(run_dir):
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    return state["model"], state["plans"]


def test_prune_train_shrinks_twice_and_keeps_learning(tmp_path):
    summary = train(_cfg(tmp_path, epochs=5))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    reconfigs = [r for r in records if r["kind"] == "reconfig"]
    assert len(reconfigs) >= 2
    assert epochs[-1]["flops"] < epochs[0]["flops"] or reconfigs[0]["flops"] < summary["dense_flops"]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert summary["train_flops_share"] < 1.0
    assert (tmp_path / "run" / "report.md").exists() and (tmp_path / "run" / "training.png").exists()


class Killed(Exception):
    pass


def test_resume_after_kill_mid_epoch_and_mid_shrink_is_bit_identical(tmp_path, monkeypatch):
    train(_cfg(tmp_path / "a"))
    reference, plans = _weights(tmp_path / "a" / "run")
    assert plans, "the reference run should have shrunk"

    # killed in the middle of epoch 3
    calls = {"n": 0}
    original = loop_module.Run.train_step

    def dying_step(self, x, y):
        calls["n"] += 1
        if calls["n"] == 20:  # in epoch 3
            raise Killed()
        return original(self, x, y)

    monkeypatch.setattr(loop_module.Run, "train_step", dying_step)
    with pytest.raises(Killed):
        train(_cfg(tmp_path / "b"))
    monkeypatch.setattr(loop_module.Run, "train_step", original)
    train(_cfg(tmp_path / "b"), resume_dir=str(tmp_path / "b" / "run"))
    resumed, resumed_plans = _weights(tmp_path / "b" / "run")
    assert resumed_plans == plans
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)

    # killed in the middle of a shrink (after some tensors were sliced): the reconfiguration's shrink is the one
    # fused with its self-check (passes/trial.py), which slices tensor by tensor
    import importlib

    trial = importlib.import_module("ptgraph.passes.trial")
    real_shrink = trial._shrink
    count = {"n": 0}

    def dying_shrink(cut):
        if (tmp_path / "c" / "run" / "checkpoint.pt").exists():  # a shrink after epoch 1 was saved
            count["n"] += 1
            if count["n"] == 3:  # some tensors are sliced, others not
                raise Killed()
        return real_shrink(cut)

    monkeypatch.setattr(trial, "_shrink", dying_shrink)
    with pytest.raises(Killed):
        train(_cfg(tmp_path / "c"))
    assert count["n"] == 3
    monkeypatch.setattr(trial, "_shrink", real_shrink)
    train(_cfg(tmp_path / "c"), resume_dir=str(tmp_path / "c" / "run"))
    again, _ = _weights(tmp_path / "c" / "run")
    assert all(torch.equal(again[k], reference[k]) for k in reference)


def test_dynamic_batch_grows_and_scales_lr(tmp_path):
    train(_cfg(tmp_path, dynamic_batch=True, max_batch=64, threshold=2.3, epochs=3))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    grown = [r for r in records if r["kind"] == "reconfig" and r["batch"] > 32]
    assert grown, records
    r = grown[0]
    assert r["batch"] % 8 == 0 and r["batch"] <= 64
    assert r["lr_scale"] == pytest.approx(r["batch"] / 32)


def run_cli(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["--model", "toy_models:ResidualNet", "--data", "cifar10-npz:/no/such/file.npz"], "does not exist"),
    (["--model", "toy_models:ResidualNet", "--data", "imagenet:/no/where"], "does not exist"),
    (["--model", "toy_models:ResidualNet", "--data", "mnist:/x"], "unknown --data"),
    (["--model", "toy_models:ResidualNet?num_classes=7", "--data", "synthetic"], "has 7 outputs but the data has 10"),
    (["--model", "toy_models:ResidualNet", "--penalty-ratio", "1.5"], "--penalty-ratio"),
    (["--model", "toy_models:ResidualNet", "--device", "cuda:0"] if not torch.cuda.is_available() else
     ["--model", "toy_models:ResidualNet", "--device", "nonsense"], "device"),
    (["--resume", "/no/such/run"], "no checkpoint at"),
])
def test_prune_train_bad_input(capsys, tmp_path, argv, words):
    code, err = run_cli(capsys, "prune-train", *argv, "--run-dir", str(tmp_path / "r"), "--epochs", "1",
                        "--steps-per-epoch", "1")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert words in err


def test_resume_checks_checkpoint(capsys, tmp_path):
    train(_cfg(tmp_path, epochs=1, steps_per_epoch=2))
    run_dir = tmp_path / "run"
    code, err = run_cli(capsys, "prune-train", "--resume", str(run_dir), "--model", "ptgraph:resnet20")
    assert code == 2 and "is of toy_models:small_resnet" in err
    (run_dir / "checkpoint.pt").write_bytes((run_dir / "checkpoint.pt").read_bytes()[:1000])
    code, err = run_cli(capsys, "prune-train", "--resume", str(run_dir))
    assert code == 2 and "truncated" in err
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": 1}, foreign)
    code, err = run_cli(capsys, "prune-train", "--resume", str(foreign))
    assert code == 2 and "not a ptgraph prune-train checkpoint" in err


def test_out_of_memory_on_first_batch_names_the_flag(capsys, tmp_path, monkeypatch):
    def oom(self, x, y):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(loop_module.Run, "train_step", oom)
    code, err = run_cli(capsys, "prune-train", "--model", "toy_models:ResidualNet", "--epochs", "1",
                        "--run-dir", str(tmp_path / "r"))
    assert code == 2 and "--batch-size" in err and err.count("\n") == 1


def test_user_error_from_config():
    with pytest.raises(UserError):
        TrainConfig(model="x", round_to=0).check()


def test_a_run_that_removed_almost_nothing_says_to_raise_the_penalty(tmp_path):
    from io import StringIO

    from rich.console import Console

    out = StringIO()
    train(_cfg(tmp_path, epochs=1, penalty_ratio=0.0, threshold=1e-4), console=Console(file=out, width=300))
    assert "raise --penalty-ratio" in out.getvalue() and "removed only 0%" in out.getvalue()
    out = StringIO()
    train(_cfg(tmp_path, epochs=1, dense=True, penalty_ratio=None, run_dir=str(tmp_path / "dense")), console=Console(file=out, width=300))
    assert "--penalty-ratio" not in out.getvalue()
    cfg = _cfg(tmp_path)
    assert loop_module.weak_penalty_hint(cfg, {"mode": "prunetrain", "flops": 50, "dense_flops": 100}) is None
    assert "95%" not in loop_module.weak_penalty_hint(cfg, {"mode": "prunetrain", "flops": 95, "dense_flops": 100})
    assert "removed only 5%" in loop_module.weak_penalty_hint(cfg, {"mode": "prunetrain", "flops": 95, "dense_flops": 100})


def test_final_architecture_spec_retrains_a_runs_widths_from_scratch(tmp_path, capsys):
    """`run:RUN_DIR` builds the run's final widths freshly initialised; training it, analysing and resuming work."""
    from ptgraph.specs import build_model, default_input_shape
    from ptgraph.trainers import checkpoint

    pruned_dir = tmp_path / "run"
    summary = train(_cfg(tmp_path, epochs=2))
    assert summary["flops"] < summary["dense_flops"]
    pruned, shape = checkpoint.rebuild(checkpoint.load(pruned_dir))
    torch.manual_seed(1)
    fresh = build_model(f"run:{pruned_dir}")
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(fresh) == shapes(pruned) and fresh.training
    assert default_input_shape(f"run:{pruned_dir}") == (1, *shape[1:])
    convs = [k for k in shapes(pruned) if k.endswith("weight") and len(shapes(pruned)[k]) == 4]
    assert all(not torch.equal(fresh.state_dict()[k], pruned.state_dict()[k]) for k in convs)  # not the trained weights
    for m in fresh.modules():  # drawn again at the final widths: Kaiming-normal over the pruned fan-out
        if isinstance(m, torch.nn.Conv2d):
            std, expected = float(m.weight.detach().std()), (2 / (m.out_channels * m.weight[0, 0].numel())) ** 0.5
            assert abs(std / expected - 1) < 0.25, (m, std, expected)
    retrained = train(_cfg(tmp_path, model=f"run:{pruned_dir}", dense=True, epochs=1, penalty_ratio=None,
                           reconfig_steps=None, threshold=1e-4, run_dir=str(tmp_path / "again")))
    assert retrained["flops"] == summary["flops"] and retrained["dense_flops"] == summary["flops"]
    again, _ = checkpoint.rebuild(checkpoint.load(tmp_path / "again"))
    assert shapes(again) == shapes(pruned)
    assert main(["analyze", "--model", f"run:{pruned_dir}"]) == 0
    assert main(["analyze", "--model", f"run:{pruned_dir}?x=1"]) == 2
    assert main(["analyze", "--model", f"run:{tmp_path / 'none'}"]) == 2
    err = capsys.readouterr().err
    assert "takes no ?key=value list" in err and "no checkpoint at" in err
