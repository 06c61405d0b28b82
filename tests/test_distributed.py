"""Multi-process PruneTrain on the CPU: 2 gloo processes take the code path NCCL takes on GPUs.

A 2-process run must end with identical parameters on both ranks, equal (within float noise) to
one process on the same global batch; a killed rank must stop the run with one clear message and
a checkpoint that resumes, with another number of processes.
"""
import faulthandler
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ptgraph.trainers import checkpoint as ckpt
from ptgraph.trainers.config import TrainConfig
from ptgraph.trainers.distributed import ShardSampler

TESTS = Path(__file__).parent


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(tmp_path, **kw):
    base = dict(model="toy_models:plain_net", data="synthetic:easy", epochs=3, batch_size=16, steps_per_epoch=6,
                reconfig_steps=4, penalty_ratio=0.8, threshold=1e-4, lr=0.1, schedule="cosine",
                run_dir=str(tmp_path / "run"), tensorboard=False, device="cpu", dist_timeout=30.0)
    return TrainConfig(**{**base, **kw})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, cfg: TrainConfig, out: Path, kill_at_step: int | None) -> None:
    """One rank, as torchrun would start it: the env variables (the store is the launcher's, as
    torchrun's agent serves it), then the product's own train()."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
    crash_log = open(out / f"rank{rank}.fault", "w")  # a native crash (abort, segfault) leaves its Python stack here
    faulthandler.enable(crash_log, all_threads=True)
    torch.set_num_threads(1)
    from ptgraph.trainers import loop

    runs = []
    init, step = loop.Run.__init__, loop.Run.train_step

    def keep(self, *a, **k):
        init(self, *a, **k)
        runs.append(self)

    def dying_step(self, x, y):
        if self.pt.steps + 1 == kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return step(self, x, y)

    loop.Run.__init__ = keep
    if kill_at_step and rank == 1:
        loop.Run.train_step = dying_step
    try:
        summary = loop.train(cfg)
    except Exception as e:  # noqa: BLE001 - the test reads what happened
        (out / f"rank{rank}.err").write_text(f"{type(e).__name__}: {e}")
        return
    run = runs[0]
    torch.save({"summary": summary, "state": run.model.state_dict(), "plans": [p.to_json() for p in run.pt.plans]},
               out / f"rank{rank}.pt")


def _spawn(cfg: TrainConfig, out: Path, world: int = 2, kill_at_step: int | None = None) -> list[int | None]:
    out.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # lives until every rank ended
    port = store.port
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, cfg, out, kill_at_step)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 300  # generous: a loaded 2-core machine takes minutes to spawn and import
    for p in procs:
        p.join(timeout=max(1.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():  # a hang is a failure of the test, not of the machine
            p.kill()
    del store
    return [p.exitcode for p in procs]


def _why(out: Path) -> list[tuple[str, str]]:
    """What the ranks left: a Python error (.err), or a native crash's stack (.fault)."""
    return [(p.name, p.read_text()) for p in sorted(out.glob("*.err")) + sorted(out.glob("*.fault")) if p.stat().st_size]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_shard_sampler_gives_every_world_the_same_global_batches():
    n, batch = 103, 4
    one = list(ShardSampler(n, 0, 1, True, seed=7))
    for world in (2, 3):
        shards = [list(ShardSampler(n, r, world, True, seed=7)) for r in range(world)]
        assert len({len(s) for s in shards}) == 1 and len(shards[0]) == len(ShardSampler(n, 0, world, True, 7))
        for k in range(len(shards[0]) // batch):
            step = {i for s in shards for i in s[k * batch:(k + 1) * batch]}
            assert step == set(one[k * world * batch:(k + 1) * world * batch])
        evaluation = [i for r in range(world) for i in ShardSampler(n, r, world, False, 0)]
        assert sorted(evaluation) == list(range(n))  # every validation sample exactly once


def test_two_ranks_agree_and_match_one_process_on_the_global_batch(tmp_path):
    from ptgraph.trainers.loop import train

    single = train(_cfg(tmp_path / "one", batch_size=32, lr=0.2))  # the same global batch and learning rate
    reference = ckpt.load(tmp_path / "one" / "run")
    assert single["reconfigurations"] >= 2

    codes = _spawn(_cfg(tmp_path / "two"), tmp_path / "out")  # 2 x 16 per process, lr 0.1 x 2 processes
    assert codes == [0, 0], _why(tmp_path / "out")
    ranks = [torch.load(tmp_path / "out" / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["plans"] == ranks[1]["plans"] == reference["plans"]
    assert len(ranks[0]["plans"]) >= 2
    checksums = [sum(float(v.double().abs().sum()) + float(v.double().sum()) for v in r["state"].values()) for r in ranks]
    assert checksums[0] == checksums[1]
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name
        torch.testing.assert_close(value, reference["model"][name], rtol=1e-4, atol=1e-5)
    records = _records(tmp_path / "two" / "run")  # rank 0 alone wrote them
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3] and all(r["world"] == 2 for r in epochs)
    one_epochs = [r for r in _records(tmp_path / "one" / "run") if r["kind"] == "epoch"]
    for a, b in zip(epochs, one_epochs):
        assert a["lr"] == pytest.approx(b["lr"]) and a["train_flops"] == pytest.approx(b["train_flops"])
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    saved = ckpt.load(tmp_path / "two" / "run")
    assert saved["world"] == 2 and saved["world_scale"] == 2.0


def test_batchnorm_statistics_and_weights_agree_across_ranks(tmp_path):
    """With BatchNorm each rank normalises its own half-batch; rank 0's running statistics go to all."""
    cfg = _cfg(tmp_path, model="toy_models:small_resnet", epochs=2, steps_per_epoch=5, reconfig_steps=4,
               penalty_ratio=0.5, threshold=2.1)
    assert _spawn(cfg, tmp_path / "out") == [0, 0], _why(tmp_path / "out")
    ranks = [torch.load(tmp_path / "out" / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["plans"] == ranks[1]["plans"] and len(ranks[0]["plans"]) >= 1
    assert any("running_mean" in k for k in ranks[0]["state"])
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name
    saved = ckpt.load(tmp_path / "run")["model"]
    assert all(torch.equal(saved[k], v) for k, v in ranks[0]["state"].items())


def test_killed_rank_stops_the_run_cleanly_and_it_resumes_with_one_process(tmp_path):
    from ptgraph.trainers.loop import train

    cfg = _cfg(tmp_path, epochs=3)
    start = time.perf_counter()
    codes = _spawn(cfg, tmp_path / "out", kill_at_step=9)  # in epoch 2 (6 steps per epoch)
    assert codes[1] == -signal.SIGKILL and codes[0] == 0
    assert time.perf_counter() - start < 100  # the survivor did not wait for its timeout forever
    run_dir = tmp_path / "run"
    message = (tmp_path / "out" / "rank0.err").read_text()
    assert message.startswith("RankFailure: rank 1 of 2 stopped (")
    assert f"the last checkpoint is {run_dir / 'checkpoint.pt'}, resume with --resume {run_dir}" in message
    assert not list(run_dir.glob("*.tmp"))
    state = ckpt.load(run_dir)  # written before the kill, whole
    assert state["epoch"] == 1 and state["world"] == 2
    lr_two = state["optimizer"]["param_groups"][0]["lr"]

    summary = train(cfg, resume_dir=str(run_dir))  # one process now: its lr is the per-process lr x 1
    assert summary["epochs"] == 3
    after = ckpt.load(run_dir)
    assert after["epoch"] == 3 and after["world"] == 1 and after["world_scale"] == 1.0
    epochs = [r for r in _records(run_dir) if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    assert epochs[0]["lr"] == pytest.approx(lr_two)
    import math

    cosine = [(1 + math.cos(math.pi * e / 3)) / 2 for e in (1, 2)]
    assert epochs[0]["lr"] == pytest.approx(2 * cfg.lr * cosine[0])
    assert epochs[1]["lr"] == pytest.approx(cfg.lr * cosine[1])


def test_one_rank_process_group_is_bit_identical_to_a_plain_run(tmp_path, monkeypatch):
    """torchrun --nproc-per-node 1: a process group and the broadcasts (no DDP: nothing to average); nothing may change."""
    from ptgraph.trainers.loop import train

    train(_cfg(tmp_path / "plain", epochs=2, batch_size=32, lr=0.2))
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    train(_cfg(tmp_path / "ddp", epochs=2, batch_size=32, lr=0.2))
    a, b = ckpt.load(tmp_path / "plain" / "run"), ckpt.load(tmp_path / "ddp" / "run")
    assert a["plans"] == b["plans"] and len(a["plans"]) >= 1
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert not torch.distributed.is_initialized()


def test_sync_batchnorm_is_analysed_and_shrunk_like_batchnorm():
    from ptgraph.passes import PrunePlan
    from ptgraph.trainers import PruneTrain
    from toy_models import ResidualNet

    torch.manual_seed(0)
    plain = PruneTrain(ResidualNet(width=8), torch.randn(2, 3, 8, 8), None)
    torch.manual_seed(0)
    synced = PruneTrain(torch.nn.SyncBatchNorm.convert_sync_batchnorm(ResidualNet(width=8)), torch.randn(2, 3, 8, 8), None)
    shape = [(g.size, len(g.members), g.prunable, g.exact) for g in plain.analysis.groups]
    assert shape == [(g.size, len(g.members), g.prunable, g.exact) for g in synced.analysis.groups]
    group = max((g for g in synced.analysis.groups if g.prunable), key=lambda g: g.size)
    synced.reconfigure(PrunePlan({group.id: tuple(range(0, group.size, 2))}))
    norms = [m for m in synced.model.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
    assert norms and all(m.num_features == m.weight.shape[0] == m.running_mean.shape[0] for m in norms)
    assert synced.model(torch.randn(4, 3, 8, 8)).shape == (4, 10)


@pytest.mark.filterwarnings("ignore:ptgraph. traced 'switch' as a leaf")
def test_launcher_reports_a_killed_rank_and_the_run_resumes(tmp_path):
    """`ptgraph prune-train --nproc-per-node 2` relaunches itself under torchrun; rank 1 is killed in epoch 2."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "PTGRAPH_TEST_KILL": "1:9", "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "ptgraph", "prune-train", "--nproc-per-node", "2", "--model", "toy_models:KillableNet",
            "--data", "synthetic:easy", "--epochs", "2", "--batch-size", "16", "--steps-per-epoch", "6",
            "--reconfig-steps", "5", "--penalty-ratio", "0.9", "--lr", "0.05", "--device", "cpu",
            "--no-tensorboard", "--dist-timeout", "30", "--run-dir", str(run_dir)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=150)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1, done.stderr[-3000:]
    assert last == (f"error: rank 1 of 2 stopped (killed by SIGKILL); the last checkpoint is "
                    f"{run_dir / 'checkpoint.pt'}, resume with --resume {run_dir}"), done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert ckpt.load(run_dir)["epoch"] == 1

    from ptgraph.cli import main

    assert main(["prune-train", "--resume", str(run_dir), "--device", "cpu"]) == 0
    assert ckpt.load(run_dir)["epoch"] == 2


def test_two_ranks_steer_a_flops_budget_identically(tmp_path):
    """The budget's plans, lambda, gain and weights are decided on rank 0: both ranks end with the same model."""
    cfg = _cfg(tmp_path / "two", penalty_ratio=None, reconfig_steps=None, target_flops=0.5, prune_until=0.5,
               reconfigurations=3)
    codes = _spawn(cfg, tmp_path / "out")
    assert codes == [0, 0], _why(tmp_path / "out")
    ranks = [torch.load(tmp_path / "out" / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["plans"] == ranks[1]["plans"] and len(ranks[0]["plans"]) >= 2
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name
    summary = ranks[0]["summary"]
    assert abs(summary["flops"] / summary["dense_flops"] - 0.5) <= 0.05
