"""lightning.Trainer with PruneTrainCallback: examples/lightning_resnet.py on torchvision's ResNet-18 (one process),
a fresh module resumed from its checkpoints, and 2 gloo processes under torchrun (strategy="ddp")."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

from ptgraph.errors import UserError  # noqa: E402
from ptgraph.integrations.lightning import find_model  # noqa: E402

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "examples"))
import lightning_resnet as example  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """ResNet-18 to half its FLOPs in 3 epochs of 4 steps, pruning over the first half; every epoch checkpointed."""
    d = tmp_path_factory.mktemp("lit")
    trainer = example.main(["--epochs", "3", "--samples", "64", "--dir", str(d), "--keep-all"])
    return trainer, d


def _callback(trainer):
    return next(c for c in trainer.callbacks if type(c).__name__ == "PruneTrainCallback")


def _shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


def test_resnet18_reaches_half_its_flops_with_optimizer_and_scheduler_kept(first_run):
    trainer, _ = first_run
    pt, module = _callback(trainer).pt, trainer.lightning_module
    assert module.model is pt.model and len(pt.plans) >= 2
    assert abs(pt.flops / pt.dense_flops - 0.5) < 0.05
    opt = trainer.optimizers[0]
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in module.parameters()}
    for p in module.parameters():  # momentum followed every shrink (and training went on with it)
        assert opt.state[p]["momentum_buffer"].shape == p.shape
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 3
    out = module(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_a_fresh_module_resumes_from_the_last_checkpoint_at_the_same_flops(first_run, tmp_path):
    trainer, d = first_run
    before = trainer.lightning_module.state_dict()
    saved = torch.load(d / "last.ckpt", weights_only=False)
    resumed = example.main(["--epochs", "4", "--samples", "64", "--dir", str(tmp_path), "--resume", str(d / "last.ckpt")])
    pt = _callback(resumed).pt
    assert pt.flops == _callback(trainer).pt.flops and len(pt.plans) == len(saved["callbacks"]["PruneTrainCallback"]["plans"])
    after = resumed.lightning_module.state_dict()
    assert _shapes(after) == _shapes(before)
    assert pt.steps == 16 and resumed.global_step == 16  # trained on: a fourth epoch of 4 steps
    assert not torch.equal(after["model.fc.weight"], before["model.fc.weight"])
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())


def test_a_mid_schedule_checkpoint_resumes_the_run_s_schedule_to_the_target(first_run, tmp_path):
    trainer, d = first_run
    (first,) = d.glob("epoch=0-*.ckpt")
    saved = torch.load(first, weights_only=False)["callbacks"]["PruneTrainCallback"]
    assert saved["total_steps"] == 12 and not saved["budget"]["done"]
    resumed = example.main(["--epochs", "3", "--samples", "64", "--dir", str(tmp_path), "--resume", str(first)])
    pt = _callback(resumed).pt
    assert [p.to_json() for p in pt.plans[:len(saved["plans"])]] == saved["plans"]
    assert pt.target_reached and abs(pt.flops / pt.dense_flops - 0.5) < 0.05


def test_the_model_attribute_is_found_or_named():
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.head, self.loss = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.MSELoss()

    with pytest.raises(UserError, match="backbone, head"):
        find_model(Two())
    assert find_model(Two(), "head") == "head"
    one = Two()
    del one.head
    assert find_model(one) == "backbone"


def test_two_ddp_processes_under_torchrun_end_identical(tmp_path):
    """strategy='ddp' on 2 gloo processes: rank 0 plans, both shrink alike, the DDP wrapper is rebuilt after
    every shrink (a stale one would fail at the next backward), and both end with the same weights."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "examples" / "lightning_resnet.py"), "--devices", "2", "--model", "toy_models:small_resnet",
           "--image", "16", "--epochs", "3", "--samples", "128", "--batch", "8", "--dir", str(tmp_path / "ckpt"),
           "--out", str(tmp_path / "out")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / "out" / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["plans"] == r1["plans"] and len(r0["plans"]) >= 2
    assert abs(r0["flops"] / r0["dense_flops"] - 0.5) < 0.05
    params = [k for k in r0["state"] if "running" not in k and "num_batches" not in k]  # BN statistics are per rank
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in params)


def test_gradient_accumulation_counts_optimizer_steps_not_batches(tmp_path):
    import lightning as L

    from ptgraph.integrations.lightning import PruneTrainCallback
    from toy_models import small_resnet

    torch.manual_seed(0)
    module = example.Classifier(small_resnet(), image=16)
    callback = PruneTrainCallback(target_flops=0.6, prune_until=0.5)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", accumulate_grad_batches=2, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=tmp_path, callbacks=[callback])
    loader = torch.utils.data.DataLoader(example.synthetic(64, 16, 10), batch_size=8)  # 8 batches, 4 steps an epoch
    trainer.fit(module, loader)
    assert trainer.global_step == 8 and callback.pt.steps == 8 and callback.pt.schedule.until <= 4
    assert callback.pt.target_reached and abs(callback.pt.flops / callback.pt.dense_flops - 0.6) < 0.1
