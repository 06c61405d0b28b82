"""A diverged run stops before it can spoil a plan or a checkpoint; wrong values are one line, exit 2."""
import numpy as np
import pytest
import torch

from ptgraph.cli import main
from ptgraph.errors import UserError
from ptgraph.trainers import loop as loop_module
from ptgraph.trainers.config import TrainConfig
from ptgraph.trainers.loop import train
from toy_models import CatNet


def _cfg(tmp_path, **kw):
    base = dict(model="toy_models:small_resnet", data="synthetic:easy", epochs=3, batch_size=32, steps_per_epoch=8,
                reconfig_steps=4, penalty_ratio=0.5, threshold=2.1, lr=0.1, run_dir=str(tmp_path / "run"),
                tensorboard=False)
    return TrainConfig(**{**base, **kw})


def _all_finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_a_nan_weight_stops_the_run_before_the_next_plan_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    original = loop_module.Run.train_step

    def poisoned(self, x, y):
        if self.pt.steps == 10:  # epoch 2, between two reconfigurations
            with torch.no_grad():
                next(self.model.parameters())[0].fill_(float("nan"))
        return original(self, x, y)

    monkeypatch.setattr(loop_module.Run, "train_step", poisoned)
    with pytest.raises(UserError, match="training diverged in epoch 2") as e:
        train(_cfg(tmp_path))
    assert "lower --lr" in str(e.value) and "--resume" in str(e.value)
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert saved["epoch"] == 1 and _all_finite(saved)
    plans_then = saved["plans"]
    monkeypatch.setattr(loop_module.Run, "train_step", original)
    summary = train(_cfg(tmp_path), resume_dir=str(tmp_path / "run"))  # the kept checkpoint resumes
    final = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert summary["epochs"] == 3 and final["epoch"] == 3 and _all_finite(final)
    assert final["plans"][:len(plans_then)] == plans_then


def test_a_huge_learning_rate_exits_2_without_a_poisoned_checkpoint(tmp_path, capsys):
    code = main(["prune-train", "--model", "toy_models:small_resnet", "--data", "synthetic:easy", "--epochs", "2",
                 "--steps-per-epoch", "3", "--batch-size", "16", "--reconfig-steps", "2", "--penalty-ratio", "0.5",
                 "--lr", "1e8", "--no-tensorboard", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "training diverged" in err and err.count("\n") == 1, err
    path = tmp_path / "run" / "checkpoint.pt"
    assert not path.exists() or _all_finite(torch.load(path, weights_only=False))


def test_skipped_gradscaler_steps_are_not_divergence(tmp_path):
    run = loop_module.Run(_cfg(tmp_path))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    loss = torch.nn.functional.cross_entropy(run.model(x), y)
    scaler.scale(loss).backward()
    next(run.model.parameters()).grad.fill_(float("inf"))  # an overflowed fp16 gradient: the step is skipped
    before = [p.detach().clone() for p in run.model.parameters()]
    scaler.step(run.opt)
    scaler.update()
    assert scaler.get_scale() < 2.0 ** 16 and all(torch.equal(a, p) for a, p in zip(before, run.model.parameters()))
    run.check_finite(loss.detach() * len(y), tmp_path)  # nothing raised


@pytest.mark.parametrize("argv, words", [
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--lr", "0"], "--lr must be a positive number"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--momentum", "1.5"], "--momentum must be in [0, 1)"),
    (["--momentum", "-0.1"], "--momentum must be in [0, 1)"),
    (["--weight-decay=-0.001"], "--weight-decay must be zero or positive"),
    (["--max-batch", "0"], "--max-batch must be positive"),
    (["--workers", "-1"], "--workers must be 0 or more"),
    (["--nproc-per-node", "0"], "--nproc-per-node must be 1 or more"),
])
def test_wrong_training_values_are_one_line_and_exit_2(argv, words, capsys, tmp_path):
    code = main(["prune-train", "--model", "toy_models:small_resnet", "--run-dir", str(tmp_path / "r"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and words in err and err.count("\n") == 1, err


def _reversed_cat(monkeypatch):
    """A deliberately broken rule: the cat lists its operands' channels in reverse order."""
    from ptgraph.passes import rules
    from ptgraph.passes.rules import slicing

    def broken(ctx):
        out = slicing.cat(ctx)
        tensors = ctx.arg(0, "tensors")
        parts = [ctx.type_of(n)[1] for n in tensors]
        out[1] = np.concatenate(parts[::-1])
        return out

    for target in (torch.cat, torch.concat, torch.concatenate):
        monkeypatch.setitem(rules.RULES, target, broken)


def _zero_channels(pt, gid, channels):
    """What the lasso does before a reconfiguration: the channels' whole group slices at zero."""
    group = pt.analysis.group(gid)
    params = dict(pt.model.named_parameters())
    with torch.no_grad():
        for m in group.members:
            if m.name in params:
                hit = m.positions[np.isin(m.channels, channels)]
                params[m.name].index_fill_(m.axis, torch.as_tensor(hit), 0.0)



def test_the_self_check_catches_a_broken_rule_and_freezes_its_groups(monkeypatch):
    from ptgraph.trainers import PruneTrain

    _reversed_cat(monkeypatch)
    torch.manual_seed(0)
    model = CatNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pt = PruneTrain(model, torch.randn(2, 3, 8, 8), opt, penalty_ratio=0.5, threshold=1e-6)
    branch = [g.id for g in pt.analysis.groups if g.prunable and any(m.name == "a.weight" for m in g.members)][0]
    _zero_channels(pt, branch, [0, 1, 2])
    before = {n: p.detach().clone() for n, p in pt.model.named_parameters()}
    with pytest.warns(UserWarning, match="self-check: shrinking group"):
        r = pt.reconfigure()
    assert r is None and branch in pt.frozen and "would change the model" in pt.check_note
    assert all(torch.equal(before[n], p) for n, p in pt.model.named_parameters())  # the unshrunk model is kept
    assert branch not in pt.index.group_slices  # no lasso on it any more
    assert branch not in pt.plan().keep  # and never planned again
    pt.model(torch.randn(2, 3, 8, 8)).sum().backward()  # it trains on
    opt.step()


def test_with_correct_rules_the_self_check_passes_and_can_be_switched_off():
    from ptgraph.trainers import PruneTrain

    torch.manual_seed(0)
    pt = PruneTrain(CatNet(), torch.randn(2, 3, 8, 8), None, penalty_ratio=0.5, threshold=1e-6)
    branch = [g.id for g in pt.analysis.groups if g.prunable and any(m.name == "a.weight" for m in g.members)][0]
    _zero_channels(pt, branch, [0, 1, 2])
    r = pt.reconfigure()
    assert r is not None and not pt.frozen and pt.check_note is None and pt.check_seconds > 0
    off = PruneTrain(CatNet(), torch.randn(2, 3, 8, 8), None, penalty_ratio=0.5, self_check=False)
    off.reconfigure(off.plan())
    assert off.check_seconds == 0


def test_the_loop_prints_the_self_check_and_goes_on(tmp_path, monkeypatch, capsys):
    _reversed_cat(monkeypatch)
    summary = train(_cfg(tmp_path, model="toy_models:cat_net", threshold=1e9, reconfig_steps=4, epochs=2))
    assert summary["epochs"] == 2
    out = capsys.readouterr().out
    assert "self-check: shrinking group" in out
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert saved["budget"]["frozen"] and _all_finite(saved)
