"""Your own loop (ptgraph.integrations.ddp): EMA copies follow every shrink and go on averaging, a compiled model
trains on after each reconfiguration without running eager, and examples/timm_style_loop.py (EMA + DDP + compile)
ends identical on 2 gloo processes under torchrun and resumes bit-identically after a kill."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ptgraph.errors import UserError
from ptgraph.integrations.ddp import Follower, Runner
from ptgraph.passes.plan import random_plan
from ptgraph.trainers import PruneTrain

from toy_models import small_resnet

ROOT = Path(__file__).parent.parent
DECAY = 0.9


pytestmark = pytest.mark.usefixtures("one_thread")


def _setup():
    torch.manual_seed(0)
    model = small_resnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return PruneTrain(model, torch.randn(2, 3, 16, 16), opt, penalty_ratio=0.3), opt


def _step(pt, opt, runner):
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    loss = F.cross_entropy(runner(x), y)
    (loss + pt.penalty(loss)).backward()
    opt.step()
    opt.zero_grad()
    pt.after_step()
    return loss


def _shrink(pt, seed):
    r = pt.reconfigure(random_plan(pt.analysis.groups, 0.25, seed=seed))
    assert r is not None
    return r


def _tensors(module):
    return dict(module.named_parameters()) | dict(module.named_buffers())


@pytest.mark.parametrize("kind", ["timm ModelEmaV3", "swa_utils AveragedModel"])
def test_an_ema_copy_has_the_model_s_shapes_after_every_shrink_and_averages_on(kind):
    pt, opt = _setup()
    model = pt.model
    if kind.startswith("timm"):
        from timm.utils import ModelEmaV3

        ema, update = ModelEmaV3(model, decay=DECAY), None
        update = lambda: ema.update(model)  # noqa: E731
    else:
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY))
        update = lambda: ema.update_parameters(model)  # noqa: E731
        update()  # the first call copies
    runner = Runner(pt, follow=[ema])
    for i in range(3):
        _step(pt, opt, runner)
        update()
        with torch.no_grad():  # the copy an elementwise function of the model: shrinking must commute with it
            for name, e in _tensors(ema.module).items():
                if e.is_floating_point():
                    e.copy_(2 * _tensors(model)[name] + 1)
        old_module = ema.module
        _shrink(pt, i)
        runner.rebuild()
        assert ema.module is not old_module and ema.module is runner.followers[0].copy
        got, want = _tensors(ema.module), _tensors(model)
        assert got.keys() == want.keys()
        for name, e in got.items():
            assert e.shape == want[name].shape, name
            if e.is_floating_point():
                assert torch.equal(e, 2 * want[name] + 1), name
        before = {n: p.detach().clone() for n, p in ema.module.named_parameters()}
        _step(pt, opt, runner)
        update()
        for n, p in model.named_parameters():  # ema <- decay * ema + (1 - decay) * model, on the new shapes
            assert torch.allclose(dict(ema.module.named_parameters())[n], DECAY * before[n] + (1 - DECAY) * p,
                                  atol=1e-6), n
    out = ema.module(torch.randn(2, 3, 16, 16))  # the copy runs with the shrunk graph
    assert out.shape == (2, 10)


def test_an_ema_copy_of_another_module_is_refused():
    pt, _ = _setup()
    with pytest.raises(UserError, match="build it from pt.model"):
        Follower(pt, AveragedModel(torch.nn.Linear(3, 3)))


@torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True)  # monkeypatch's undo would
def test_a_compiled_model_trains_on_after_every_reconfiguration():  # delete the attributes from dynamo's config
    """More shrinks than dynamo's recompile limit (lowered to 2 here), each a fresh compile, never eager."""
    compiled = []

    def backend(gm, example_inputs):
        compiled.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        return gm.forward

    pt, opt = _setup()
    runner = Runner(pt, compile={"backend": backend})
    _step(pt, opt, runner)
    for i in range(4):
        n = len(compiled)
        before = {n: p.detach().clone() for n, p in pt.model.named_parameters()}
        _shrink(pt, i)
        runner.rebuild()
        x = torch.randn(4, 3, 16, 16)
        assert torch.allclose(runner(x), pt.model(x), atol=1e-6)  # the compiled graph of the new shapes
        assert len(compiled) > n
        loss = _step(pt, opt, runner)
        assert torch.isfinite(loss)
        changed = [n for n, p in pt.model.named_parameters() if p.shape == before[n].shape and not torch.equal(p, before[n])]
        assert changed  # it trained
        assert all(p.grad is None or p.grad.shape == p.shape for p in pt.model.parameters())
    torch._dynamo.reset()


def _example(*args, world=1, out, timeout=240, wait=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
                                 if world > 1 else [])
    cmd = [*launch, str(ROOT / "examples" / "timm_style_loop.py"), "--model", "toy_models:small_resnet", "--image",
           "16", "--samples", "64", "--batch", "8", "--out", str(out), *args]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def test_two_processes_under_torchrun_with_ema_ddp_and_compile_end_identical(tmp_path):
    r0, r1 = _example("--epochs", "3", "--compile", "eager", "--dir", str(tmp_path / "run"), world=2,
                      out=tmp_path / "out")
    assert r0["plans"] == r1["plans"] and len(r0["plans"]) >= 2
    assert abs(r0["flops"] / r0["dense_flops"] - 0.5) < 0.1
    for part in ("model", "ema"):
        assert r0[part].keys() == r1[part].keys()
        assert all(torch.equal(r0[part][k], r1[part][k]) for k in r0[part]), part
    for k, v in r0["model"].items():  # the EMA copy has the model's shapes
        assert r0["ema"][f"module.{k}"].shape == v.shape


def test_a_run_killed_mid_way_resumes_bit_identically(tmp_path):
    schedule = ("--epochs", "4", "--prune-until", "0.75")  # epochs 1 and 2 end mid-schedule
    (whole,) = _example(*schedule, "--dir", str(tmp_path / "whole"), out=tmp_path / "whole")
    run = tmp_path / "killed"
    proc = _example(*schedule, "--dir", str(run), out=run, wait=False)
    for line in proc.stdout:  # killed in the second epoch, after the first checkpoint, mid-schedule
        if line.startswith("epoch 1:"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and (run / "checkpoint.pt").exists() and not (run / "rank0.pt").exists()
    saved = torch.load(run / "checkpoint.pt", weights_only=False)
    assert saved["epoch"] < 4 and not saved["budget"]["done"]
    (resumed,) = _example(*schedule, "--dir", str(run), "--resume", out=run)
    assert resumed["plans"] == whole["plans"]
    for part in ("model", "ema"):
        assert all(torch.equal(resumed[part][k], whole[part][k]) for k in whole[part]), part
